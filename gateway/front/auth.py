"""Client authentication and per-key limits for the client-facing listeners.

API keys look like ``gk_<id>_<secret>``: ``id`` (12 hex characters) is not secret and indexes
the key table, so a request costs one dict lookup and one sha256, never a scan. Only
``sha256(salt || secret)`` is stored, with a random per-key salt, compared in constant time
(``hmac.compare_digest``). The secret is 32 random bytes (256 bits), so a fast hash is enough:
there is nothing to brute-force, and key stretching (scrypt) would cost milliseconds per
request for no gain. Verified tokens are cached for VERIFIED_CACHE_TTL_S so a busy client
pays the hash once a minute; the cache is dropped whenever the key table changes.

The key table lives in a keys file (TOML, or JSON when the name ends in ``.json``)::

    [anonymous]                      # optional: requests without a key
    enabled = true
    models = ["demo"]                # glob patterns (fnmatch, case-sensitive)
    rate_per_s = 5.0                 # token bucket; 0 = unlimited
    burst = 10
    max_concurrent = 4               # 0 = unlimited
    priority = "sheddable"           # critical | standard | sheddable

    [[keys]]
    name = "team-a"                  # shown in logs and messages
    id = "0123456789ab"
    hash = "sha256:<salt hex>:<digest hex>"
    models = ["demo*"]               # default ["*"]
    rate_per_s = 50.0
    burst = 100
    max_concurrent = 8
    priority = "standard"

``python -m gateway.front.auth new-key NAME [--models ...]`` prints a fresh key once, and the
``[[keys]]`` entry to paste. The file is re-read when it changes (its mtime/size/inode are
checked at most every ``reload_interval_s`` on the request path, or at once on SIGHUP when
``install_sighup`` was called); a broken file is logged and the previous table stays in force.
Buckets and in-flight counts of keys whose limits did not change survive a reload.

Where the gateway calls it: see ``Authenticator.authorize``; every refusal is an
``AuthDecision`` with HTTP status (401/403/429), gRPC code and an operator-readable message.

The admin listener has credentials of its own (``AdminCredentials``: the shared ``[admin]
token`` and the operators of ``[admin] operators_file``, an Authenticator over the same file
format), plus signed browser sessions for the status page.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import hashlib
import hmac
import json
import logging
import secrets
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from core.kserve import API_KEY_HEADER, AUTHORIZATION_HEADER, http_to_grpc
from core.watched_file import Signature, WatchedFiles
from gateway.front.rate_limit import RETRY_AFTER_MIN_S, ConcurrencyLimiter, TokenBucket, format_wait, retry_after_header

log = logging.getLogger("geogate.auth")

KEY_PREFIX = "gk_"
KEY_ID_HEX_CHARS = 12
SECRET_BYTES = 32
SALT_BYTES = 16
HASH_SCHEME = "sha256"
PRIORITIES = ("critical", "standard", "sheddable")
DEFAULT_PRIORITY = "standard"
VERIFIED_CACHE_TTL_S = 60.0
VERIFIED_CACHE_MAX = 10_000
MODEL_MATCH_CACHE_MAX = 1024
RELOAD_CHECK_INTERVAL_S = 1.0
MAX_TOKEN_CHARS = 256  # longer "keys" are refused before any work
ANONYMOUS_NAME = "anonymous"



class KeysFileError(ValueError):
    """The keys file (or table) is unusable; the message names the file and the key path."""


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


# ---------------------------------------------------------------------------- key table


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """One key's (or the anonymous client's) identity and limits."""

    name: str
    key_id: str = ""
    salt: bytes = b""
    digest: bytes = b""
    models: tuple[str, ...] = ("*",)
    rate_per_s: float = 0.0  # 0: unlimited
    burst: float = 0.0  # 0: same as rate_per_s
    max_concurrent: int = 0  # 0: unlimited
    priority: str = DEFAULT_PRIORITY

    def limits(self) -> tuple[float, float, int]:
        return self.rate_per_s, self.burst, self.max_concurrent


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


@dataclass(frozen=True, slots=True)
class KeyTable:
    keys: dict[str, KeyPolicy]  # by key id
    anonymous: KeyPolicy | None  # None: requests without a key are refused


_POLICY_FIELDS = {"models", "rate_per_s", "burst", "max_concurrent", "priority"}
_KEY_FIELDS = {"name", "id", "hash", *_POLICY_FIELDS}
_ANON_FIELDS = {"enabled", *_POLICY_FIELDS}


def _policy_kwargs(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    models = entry.get("models", ["*"])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise KeysFileError(f"{path}.models: must be a list of non-empty glob patterns, got {models!r}")
    kw["models"] = tuple(models)
    for name, kind in (("rate_per_s", float), ("burst", float), ("max_concurrent", int)):
        if name in entry:
            v = entry[name]
            ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 and \
                (kind is float or isinstance(v, int))
            if not ok:
                raise KeysFileError(f"{path}.{name}: must be a {'number' if kind is float else 'integer'} "
                                    f">= 0, got {v!r}")
            kw[name] = kind(v)
    priority = entry.get("priority", DEFAULT_PRIORITY)
    if priority not in PRIORITIES:
        raise KeysFileError(f"{path}.priority: must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    kw["priority"] = priority
    return kw


def _unknown(path: str, entry: dict[str, Any], known: set[str]) -> None:
    extra = sorted(set(entry) - known)
    if extra:
        raise KeysFileError(f"{path}.{extra[0]}: unknown key (known keys here: {', '.join(sorted(known))})")


def parse_hash(path: str, value: Any) -> tuple[bytes, bytes]:
    """(salt, digest) from ``sha256:<salt hex>:<digest hex>``."""
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) != 3 or parts[0] != HASH_SCHEME:
        raise KeysFileError(f"{path}: must be '{HASH_SCHEME}:<salt hex>:<digest hex>' "
                            "(as printed by `python -m gateway.front.auth new-key`)")
    try:
        salt, digest = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        raise KeysFileError(f"{path}: salt and digest must be hex") from None
    if len(digest) != hashlib.sha256().digest_size or not salt:
        raise KeysFileError(f"{path}: digest must be 32 bytes of sha256 and the salt non-empty")
    return salt, digest


def parse_key_table(table: Any, source: str = "<keys>") -> KeyTable:
    """A validated KeyTable from a parsed TOML/JSON document."""
    if not isinstance(table, dict):
        raise KeysFileError(f"{source}: must be a table/object with 'keys' and optional 'anonymous'")
    _unknown(source, table, {"keys", "anonymous"})
    entries = table.get("keys", [])
    if not isinstance(entries, list):
        raise KeysFileError(f"{source}: keys: must be a list of tables ([[keys]])")
    keys: dict[str, KeyPolicy] = {}
    for i, entry in enumerate(entries):
        path = f"{source}: keys[{i}]"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{path}: must be a table")
        _unknown(path, entry, _KEY_FIELDS)
        name, kid = entry.get("name"), entry.get("id")
        if not isinstance(name, str) or not name:
            raise KeysFileError(f"{path}.name: required, a non-empty string")
        if not isinstance(kid, str) or len(kid) != KEY_ID_HEX_CHARS or \
                any(c not in "0123456789abcdef" for c in kid):
            raise KeysFileError(f"{path}.id: must be {KEY_ID_HEX_CHARS} lower-case hex characters, got {kid!r}")
        if kid in keys:
            raise KeysFileError(f"{path}.id: duplicate key id {kid!r} (also used by key {keys[kid].name!r})")
        salt, digest = parse_hash(f"{path}.hash", entry.get("hash"))
        keys[kid] = KeyPolicy(name=name, key_id=kid, salt=salt, digest=digest, **_policy_kwargs(path, entry))
    anonymous = None
    anon = table.get("anonymous")
    if anon is not None:
        path = f"{source}: anonymous"
        if not isinstance(anon, dict):
            raise KeysFileError(f"{path}: must be a table")
        _unknown(path, anon, _ANON_FIELDS)
        enabled = anon.get("enabled", False)
        if not isinstance(enabled, bool):
            raise KeysFileError(f"{path}.enabled: must be true or false, got {enabled!r}")
        if enabled:
            anonymous = KeyPolicy(name=ANONYMOUS_NAME, **_policy_kwargs(path, anon))
    return KeyTable(keys, anonymous)


def read_keys_file(path: str) -> KeyTable:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {path!r}: {exc.strerror}") from None
    try:
        if path.endswith(".json"):
            doc = json.loads(data)
        else:
            doc = tomllib.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise KeysFileError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'TOML'}: {exc}") from None
    return parse_key_table(doc, path)


# ---------------------------------------------------------------------------- tokens


def new_key() -> tuple[str, str, bytes, bytes]:
    """(the key to give the client, its id, salt, sha256 digest)."""
    kid = secrets.token_hex(KEY_ID_HEX_CHARS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)  # may contain '_': the id before it has none
    salt = secrets.token_bytes(SALT_BYTES)
    return f"{KEY_PREFIX}{kid}_{secret}", kid, salt, hash_secret(salt, secret)


def hash_secret(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8", "surrogatepass")).digest()


def hash_field(salt: bytes, digest: bytes) -> str:
    return f"{HASH_SCHEME}:{salt.hex()}:{digest.hex()}"


def split_key(token: str) -> tuple[str, str] | None:
    """(id, secret) of ``gk_<id>_<secret>``, or None when it does not have that shape."""
    if not token.startswith(KEY_PREFIX):
        return None
    kid, sep, secret = token[len(KEY_PREFIX):].partition("_")
    if not sep or len(kid) != KEY_ID_HEX_CHARS or not secret:
        return None
    return kid, secret


def token_from_headers(headers: Mapping[str, str]) -> str | None:
    """The client's key from ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.

    Works with aiohttp's case-insensitive headers and with gRPC metadata as a dict (gRPC
    metadata keys are always lower case)."""
    value = headers.get(AUTHORIZATION_HEADER) or headers.get("Authorization")
    if value:
        scheme, _, rest = value.strip().partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            return rest.strip()
        return value.strip()  # a bare key in Authorization: accept it, the shape check decides
    value = headers.get(API_KEY_HEADER) or headers.get("X-API-Key")
    return value.strip() if value else None


def _shown_id(text: str) -> str:
    return repr(text[:KEY_ID_HEX_CHARS + len(KEY_PREFIX)])


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
            return _deny(401, f"malformed API key {_shown_id(token)}...: expected {KEY_PREFIX}<id>_<secret> "
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


# ---------------------------------------------------------------------------- admin credentials


ADMIN_SESSION_COOKIE = "geogate_admin_session"
ADMIN_REALM = 'Bearer realm="geogate-admin"'
DEFAULT_SESSION_TTL_S = 12 * 3600
_SESSION_VERSION = "v1"
_SESSION_KEY_LABEL = b"geogate-admin-session\0"
_SHARED_TOKEN_ID = "-"  # the session cookie's key id for the shared [admin] token


@dataclass(frozen=True, slots=True)
class AdminCheck:
    """The answer to "may this request use the admin listener?". ``who``: the operator's name
    ("" for the shared token); ``key_id``: the operator key's id ("" for the shared token)."""

    ok: bool
    status: int = 200  # 401: no or malformed credentials; 403: wrong ones
    message: str = ""
    who: str = ""
    key_id: str = ""

    def http_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": ADMIN_REALM} if self.status == 401 else {}


def _admin_refusal(status: int, message: str) -> AdminCheck:
    return AdminCheck(False, status, message)


class AdminCredentials:
    """The admin listener's credentials: the shared ``[admin] token`` / ``token_env`` and the
    named operators of ``[admin] operators_file`` (an Authenticator over a keys file).

    ``configured`` is False when neither is set: the admin API is then disabled and the rest
    of the admin listener is open, as before admin credentials existed.

    Browser sessions (the status page): ``session_cookie`` signs ``(key id, expiry)`` with
    HMAC-SHA256 under a key derived from the credential itself (the shared token, or the
    operator key's stored digest), so every worker and every gateway of the deployment accepts
    it without shared state, and rotating the token or revoking the operator key ends it.
    """

    def __init__(self, token: str = "", operators: Authenticator | None = None, *,
                 session_ttl_s: float = DEFAULT_SESSION_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.token = token
        self.operators = operators
        self.session_ttl_s = session_ttl_s
        self.clock = clock

    @property
    def configured(self) -> bool:
        return bool(self.token) or self.operators is not None

    def check_token(self, given: str | None) -> AdminCheck:
        """A bearer token: the shared token or an operator key (``gk_...``)."""
        if not given:
            return _admin_refusal(401, "missing admin credentials: send 'Authorization: Bearer <admin token>'")
        if len(given) > MAX_TOKEN_CHARS or not (given.isascii() and given.isprintable()):
            # Tokens are printable ASCII; anything else (undecodable header bytes arrive as lone
            # surrogates) cannot match and must not reach .encode() (it raised: a 500).
            return _admin_refusal(401, "malformed admin token: expected printable ASCII, at most "
                                       f"{MAX_TOKEN_CHARS} characters")
        if not self.configured:
            return _admin_refusal(403, "admin API disabled: no admin token configured ([admin] token / token_env / "
                                       "operators_file)")
        if self.operators is not None and given.startswith(KEY_PREFIX):
            decision = self.operators.authorize(given, None, limits=False)
            if decision.allowed:
                return AdminCheck(True, who=decision.key_name, key_id=given[len(KEY_PREFIX):][:KEY_ID_HEX_CHARS])
            return _admin_refusal(403, f"invalid operator token: {decision.message}")
        if not self.token or not hmac.compare_digest(given.encode(), self.token.encode()):
            return _admin_refusal(403, "invalid admin token")
        return AdminCheck(True)

    def check_authorization(self, header: str | None) -> AdminCheck:
        """An ``Authorization: Bearer <token>`` header value."""
        if not header:
            return _admin_refusal(401, "missing 'Authorization: Bearer <token>' header")
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return _admin_refusal(401, "Authorization header must be 'Bearer <token>'")
        return self.check_token(given)

    # ------------------------------------------------------------------ browser sessions

    def _session_key(self, key_id: str) -> bytes | None:
        if key_id == _SHARED_TOKEN_ID:
            secret = self.token.encode() if self.token else None
        else:
            secret = self.operators.session_secret(key_id) if self.operators is not None else None
        return hashlib.sha256(_SESSION_KEY_LABEL + secret).digest() if secret else None

    def session_cookie(self, check: AdminCheck) -> str:
        """The cookie value for an accepted ``check`` (valid for ``session_ttl_s``)."""
        key_id = check.key_id or _SHARED_TOKEN_ID
        key = self._session_key(key_id)
        if key is None:
            raise ValueError("no credential to sign a session with")
        payload = f"{_SESSION_VERSION}.{key_id}.{int(self.clock() + self.session_ttl_s)}"
        return payload + "." + hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()

    def check_session(self, cookie: str | None) -> AdminCheck:
        if not cookie:
            return _admin_refusal(401, "no admin session: log in at /ui/login")
        parts = cookie.split(".")
        if len(parts) != 4 or parts[0] != _SESSION_VERSION or not parts[2].isdigit() or not cookie.isascii():
            return _admin_refusal(401, "malformed admin session cookie: log in again at /ui/login")
        key_id, expires = parts[1], int(parts[2])
        key = self._session_key(key_id)
        expected = hmac.new(key, ".".join(parts[:3]).encode(), hashlib.sha256).hexdigest() if key else ""
        if not key or not hmac.compare_digest(expected, parts[3]):
            return _admin_refusal(401, "admin session not valid (token rotated or operator key revoked): "
                                       "log in again at /ui/login")
        if expires < self.clock():
            return _admin_refusal(401, "admin session expired: log in again at /ui/login")
        who = ""
        if key_id != _SHARED_TOKEN_ID and self.operators is not None:
            who = self.operators.key_name(key_id)
        return AdminCheck(True, who=who, key_id="" if key_id == _SHARED_TOKEN_ID else key_id)


def admin_credentials_from_config(cfg: Any) -> AdminCredentials:
    """The gateway's AdminCredentials from ``[admin]`` (a broken operators file raises
    KeysFileError: the gateway must not start with its admin listener less protected than
    configured). The operators file is re-read by ``operators.watch()`` (started by the gateway)."""
    operators = None
    if cfg.admin.operators_file:
        operators = Authenticator(cfg.resolve_path(cfg.admin.operators_file), check_on_request=False)
    return AdminCredentials(cfg.admin_token(), operators, session_ttl_s=cfg.admin.session_ttl_s)


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
