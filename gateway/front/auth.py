"""Client authentication and per-key limits for the client-facing listeners.

``Authenticator`` holds the key table of a keys file (format, hashing and new keys:
gateway.front.api_keys) and decides per request whether a key may call a model now; every
refusal is an ``AuthDecision`` with HTTP status (401/403/429), gRPC code and an
operator-readable message. Verified tokens are cached for VERIFIED_CACHE_TTL_S so a busy client
pays the hash once a minute; the cache is dropped whenever the key table changes.

The file is re-read when it changes (its mtime/size/inode are checked at most every
``reload_interval_s`` on the request path, or at once on SIGHUP when ``install_sighup`` was
called); a broken file is logged and the previous table stays in force. Buckets and in-flight
counts of keys whose limits did not change survive a reload.

The admin listener's credentials (shared token, operators, browser sessions) are
gateway.front.admin_auth's; ``python -m gateway.front.auth new-key NAME`` / ``check FILE`` is
this module's command line.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import hmac
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from core.kserve import http_to_grpc
from core.watched_file import Signature, WatchedFiles
from gateway.front.api_keys import (
    DEFAULT_PRIORITY,
    KEY_PREFIX,
    MAX_TOKEN_CHARS,
    PRIORITIES,
    KeyPolicy,
    KeysFileError,
    KeyTable,
    hash_field,
    hash_secret,
    new_key,
    parse_key_table,
    read_keys_file,
    shown_prefix,
    split_key,
    token_from_headers,
)
from gateway.front.rate_limit import RETRY_AFTER_MIN_S, ConcurrencyLimiter, TokenBucket, format_wait, retry_after_header

log = logging.getLogger("geogate.auth")

VERIFIED_CACHE_TTL_S = 60.0
VERIFIED_CACHE_MAX = 10_000
MODEL_MATCH_CACHE_MAX = 1024
RELOAD_CHECK_INTERVAL_S = 1.0


# ---------------------------------------------------------------------------- decisions


@dataclass(slots=True)
class AuthDecision:
    """The answer for one request. When ``allowed``, call ``release()`` once the request is
    finished (it frees the key's concurrency slot; calling it twice is harmless)."""

    allowed: bool
    key_name: str = ""
    http_status: int = 200
    grpc_code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    retry_after_s: float = 0.0
    priority: str = DEFAULT_PRIORITY
    _limiter: ConcurrencyLimiter | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter.release()
            self._limiter = None

    def http_headers(self) -> dict[str, str]:
        """Headers for a refusal: Retry-After on 429, WWW-Authenticate on 401."""
        if self.http_status == 429:
            return {"Retry-After": retry_after_header(self.retry_after_s)}
        if self.http_status == 401:
            return {"WWW-Authenticate": 'Bearer realm="geogate"'}
        return {}

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata for a refusal (gRPC clients read retry hints from here)."""
        if self.http_status == 429:
            return (("retry-after", retry_after_header(self.retry_after_s)),)
        return ()


ALLOWED_OPEN = AuthDecision(True, key_name="", message="authentication is off")


def _deny(status: int, message: str, key_name: str = "", retry_after_s: float = 0.0) -> AuthDecision:
    return AuthDecision(False, key_name=key_name, http_status=status, grpc_code=http_to_grpc(status),
                        message=message, retry_after_s=retry_after_s)


# ---------------------------------------------------------------------------- key state


class _KeyState:
    """A policy plus its live limiters (kept across reloads when limits are unchanged)."""

    __slots__ = ("bucket", "limiter", "model_ok", "policy")

    def __init__(self, policy: KeyPolicy, old: _KeyState | None, clock: Callable[[], float]) -> None:
        self.policy = policy
        if old is not None and old.policy.limits() == policy.limits():
            self.bucket, self.limiter = old.bucket, old.limiter
        else:
            self.bucket = (TokenBucket(policy.rate_per_s, policy.burst or None, clock=clock)
                           if policy.rate_per_s > 0 else None)
            self.limiter = ConcurrencyLimiter(policy.max_concurrent) if policy.max_concurrent > 0 else None
        self.model_ok: dict[str, bool] = {}

    def allows(self, model: str) -> bool:
        ok = self.model_ok.get(model)
        if ok is None:
            ok = any(fnmatch.fnmatchcase(model, p) for p in self.policy.models)
            if len(self.model_ok) >= MODEL_MATCH_CACHE_MAX:
                self.model_ok.clear()
            self.model_ok[model] = ok
        return ok


# ---------------------------------------------------------------------------- authenticator


class Authenticator:
    """Decides, per request, whether a client key may call a model now.

    ``keys_file``: path to the keys file (re-read when it changes). ``table``: a parsed
    document instead (tests, or keys inline in another config); then nothing is reloaded.
    """

    def __init__(self, keys_file: str = "", *, table: Any = None, reload_interval_s: float = RELOAD_CHECK_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, check_on_request: bool = True) -> None:
        if not keys_file and table is None:
            raise KeysFileError("an Authenticator needs a keys file or a key table")
        self.keys_file = keys_file
        self.reload_interval_s = reload_interval_s
        # False: the file is checked only by `watch()` (file IO off the event loop, the gateway's way)
        self.check_on_request = check_on_request
        self.clock = clock
        self._file = WatchedFiles(keys_file) if keys_file else None
        self._next_check_s = 0.0
        self._states: dict[str, _KeyState] = {}
        self._anonymous: _KeyState | None = None
        self._verified: dict[str, tuple[_KeyState, float]] = {}
        self.last_error = ""
        self.reloads = 0
        if keys_file:
            self._install(read_keys_file(keys_file))  # a broken file at startup is fatal
        else:
            self._install(parse_key_table(table))
        self._next_check_s = clock() + reload_interval_s

    # ------------------------------------------------------------------ table

    @property
    def key_names(self) -> list[str]:
        return sorted(s.policy.name for s in self._states.values())

    @property
    def anonymous_allowed(self) -> bool:
        return self._anonymous is not None

    def _install(self, table: KeyTable) -> None:
        old_by_id = self._states
        self._states = {kid: _KeyState(p, old_by_id.get(kid), self.clock) for kid, p in table.keys.items()}
        self._anonymous = _KeyState(table.anonymous, self._anonymous, self.clock) if table.anonymous else None
        self._verified = {}  # revoked or changed keys must not stay cached

    def reload_if_changed(self, *, force: bool = False) -> bool:
        """Re-read the keys file when it changed (or `force`); True when a new table is in force."""
        if self._file is None:
            return False
        if not self._take_sig(self._file.signature(), force):
            return False
        try:
            table = read_keys_file(self.keys_file)
        except KeysFileError as exc:
            return self._reload_failed(exc)
        return self._install_reloaded(table)

    def _take_sig(self, sig: Signature, force: bool) -> bool:
        """Accept the file's signature now, so a broken file is read again only once it changes;
        False when unchanged and not forced (nothing to do)."""
        assert self._file is not None
        if not force and sig == self._file.seen:
            return False
        self._file.accept(sig)
        return True

    def _reload_failed(self, exc: KeysFileError) -> bool:
        self.last_error = str(exc)
        log.error("keys file not reloaded, the previous keys stay in force: %s", exc)
        return False

    def _install_reloaded(self, table: KeyTable) -> bool:
        self._install(table)
        self.last_error = ""
        self.reloads += 1
        log.info("keys file %s reloaded: %d keys, anonymous access %s", self.keys_file, len(self._states),
                 "on" if self._anonymous else "off")
        return True

    def _maybe_reload(self, now_s: float) -> None:
        if now_s >= self._next_check_s:
            self._next_check_s = now_s + self.reload_interval_s
            self.reload_if_changed()

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload at once on SIGHUP (in addition to the mtime check)."""
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload_async(force=True)))

    async def reload_async(self, *, force: bool = False) -> bool:
        """`reload_if_changed` with the stat and the file read in a thread; the new table is
        installed on the caller's (event loop's) thread."""
        if self._file is None:
            return False
        if not self._take_sig(await asyncio.to_thread(self._file.signature), force):
            return False
        try:
            table = await asyncio.to_thread(read_keys_file, self.keys_file)
        except KeysFileError as exc:
            return self._reload_failed(exc)
        return self._install_reloaded(table)

    async def watch(self, interval_s: float | None = None) -> None:
        """Re-read the keys file when it changes, until cancelled (``asyncio.create_task``)."""
        interval = interval_s or self.reload_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload_async()
            except Exception:  # never let the watcher die
                log.exception("keys file reload check failed")

    def session_secret(self, key_id: str) -> bytes | None:
        """Server-side secret material of a key (its stored digest), to derive the signing key
        of that key's admin browser sessions; None for an unknown (or revoked) key."""
        state = self._states.get(key_id)
        return state.policy.digest if state is not None else None

    def key_name(self, key_id: str) -> str:
        state = self._states.get(key_id)
        return state.policy.name if state is not None else ""

    # ------------------------------------------------------------------ per request

    def authorize_headers(self, headers: Mapping[str, str], model: str | None) -> AuthDecision:
        return self.authorize(token_from_headers(headers), model)

    def authorize(self, token: str | None, model: str | None, *, limits: bool = True) -> AuthDecision:
        """May the holder of `token` (None: no key sent) call `model` (None: a server-level
        endpoint, where only the key itself is checked) now? ``limits=False``: identity and model
        only, no rate or concurrency accounting (metadata requests)."""
        now = self.clock()
        if self.keys_file and self.check_on_request:
            self._maybe_reload(now)
        if not token:
            if self._anonymous is None:
                return _deny(401, "missing API key: send 'Authorization: Bearer gk_...' or 'x-api-key: gk_...' "
                                  "(anonymous access is not enabled on this gateway)")
            state = self._anonymous
        else:
            state_or_no = self._verify(token, now)
            if isinstance(state_or_no, AuthDecision):
                return state_or_no
            state = state_or_no
        return self._admit(state, model, now, limits)

    def _verify(self, token: str, now_s: float) -> _KeyState | AuthDecision:
        hit = self._verified.get(token)
        if hit is not None and hit[1] > now_s:
            return hit[0]
        if len(token) > MAX_TOKEN_CHARS:
            return _deny(401, f"API key is {len(token)} characters long; geogate keys are shorter "
                              f"(format {KEY_PREFIX}<id>_<secret>)")
        parts = split_key(token)
        if parts is None:
            return _deny(401, f"malformed API key {shown_prefix(token)}...: expected {KEY_PREFIX}<id>_<secret> "
                              "as printed by `python -m gateway.front.auth new-key`")
        kid, secret = parts
        state = self._states.get(kid)
        if state is None:
            return _deny(401, f"unknown API key id {kid!r} (revoked, or not in this gateway's keys file)")
        if not hmac.compare_digest(hash_secret(state.policy.salt, secret), state.policy.digest):
            return _deny(401, f"API key id {kid!r}: the secret does not match")
        if len(self._verified) >= VERIFIED_CACHE_MAX:
            self._verified.clear()
        self._verified[token] = (state, now_s + VERIFIED_CACHE_TTL_S)
        return state

    def _admit(self, state: _KeyState, model: str | None, now_s: float, limits: bool = True) -> AuthDecision:
        p = state.policy
        if model is not None and not state.allows(model):
            return _deny(403, f"key {p.name!r} may not call model {model!r} (allowed: {', '.join(p.models)})",
                         p.name)
        if not limits:
            return AuthDecision(True, key_name=p.name, priority=p.priority)
        limiter = state.limiter
        if limiter is not None and not limiter.try_acquire():
            return _deny(429, f"concurrency limit of {limiter.limit} requests in flight for key {p.name!r} "
                              f"reached; retry after {RETRY_AFTER_MIN_S} s or when a request finishes",
                         p.name, float(RETRY_AFTER_MIN_S))
        bucket = state.bucket
        if bucket is not None:
            wait_s = bucket.try_take(1.0, now_s)
            if wait_s > 0:
                if limiter is not None:
                    limiter.release()
                return _deny(429, f"rate limit of {bucket.rate_per_s:g}/s (burst {bucket.burst:g}) for key "
                                  f"{p.name!r} exceeded; retry after {format_wait(wait_s)}", p.name, wait_s)
        return AuthDecision(True, key_name=p.name, priority=p.priority, _limiter=limiter)


# ---------------------------------------------------------------------------- front-end helpers


def http_refusal(decision: AuthDecision):
    """The aiohttp response for a refused request: status, ``{"error": message}``, and
    Retry-After / WWW-Authenticate as fits."""
    from aiohttp import web

    return web.Response(body=json.dumps({"error": decision.message}).encode(), status=decision.http_status,
                        content_type="application/json", headers=decision.http_headers())


async def grpc_abort(context: grpc.aio.ServicerContext, decision: AuthDecision) -> None:
    """Abort a grpc.aio call for a refused request (raises, as ``context.abort`` does)."""
    trailers = decision.grpc_trailers()
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(decision.grpc_code, decision.message)


# ---------------------------------------------------------------------------- CLI


def _toml_entry(name: str, kid: str, salt: bytes, digest: bytes, args: argparse.Namespace) -> str:
    lines = ["[[keys]]", f"name = {json.dumps(name)}", f'id = "{kid}"', f'hash = "{hash_field(salt, digest)}"',
             "models = [" + ", ".join(json.dumps(m) for m in args.models) + "]"]
    if args.rate_per_s:
        lines.append(f"rate_per_s = {float(args.rate_per_s)}")
    if args.burst:
        lines.append(f"burst = {float(args.burst)}")
    if args.max_concurrent:
        lines.append(f"max_concurrent = {int(args.max_concurrent)}")
    lines.append(f'priority = "{args.priority}"')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.front.auth", description="geogate API keys")
    sub = parser.add_subparsers(dest="command", required=True)
    nk = sub.add_parser("new-key", help="create a key: prints the key (once) and the entry for the keys file")
    nk.add_argument("name", help="the key's name in logs and messages, e.g. team-a")
    nk.add_argument("--models", nargs="+", default=["*"], help="glob patterns of models it may call (default *)")
    nk.add_argument("--rate-per-s", type=float, default=0.0, help="requests per second (0: unlimited)")
    nk.add_argument("--burst", type=float, default=0.0, help="token bucket size (0: same as the rate)")
    nk.add_argument("--max-concurrent", type=int, default=0, help="requests in flight (0: unlimited)")
    nk.add_argument("--priority", choices=PRIORITIES, default=DEFAULT_PRIORITY)
    nk.add_argument("--json", action="store_true", help="print the keys-file entry as JSON instead of TOML")
    ck = sub.add_parser("check", help="validate a keys file")
    ck.add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "check":
        try:
            table = Authenticator(args.file)
        except KeysFileError as exc:
            print(f"geogate auth: {exc}", file=sys.stderr)
            return 2
        print(f"{args.file}: {len(table.key_names)} keys ({', '.join(table.key_names) or 'none'}); "
              f"anonymous access {'on' if table.anonymous_allowed else 'off'}")
        return 0
    if not args.name.strip():
        print("geogate auth: NAME must not be empty", file=sys.stderr)
        return 2
    key, kid, salt, digest = new_key()
    print(f"# API key for {args.name!r}: give it to the client now; only its hash is kept", file=sys.stderr)
    print(key)
    if args.json:
        entry = {"name": args.name, "id": kid, "hash": hash_field(salt, digest), "models": args.models,
                 "priority": args.priority}
        for k in ("rate_per_s", "burst", "max_concurrent"):
            if getattr(args, k):
                entry[k] = getattr(args, k)
        print(json.dumps(entry))
    else:
        print("# add to the keys file:", file=sys.stderr)
        print(_toml_entry(args.name, kid, salt, digest, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
