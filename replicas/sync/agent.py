"""`geogate sync --config FILE --site S`: one site's sync agent (DESIGN.md, Model store layout).

Every ``sync.poll_interval_ms`` the agent reads the release records and, for each model, keeps
{stable, canary, ``keep_previous`` previous stables} installed in each of the site's model
repositories (the ``repository`` of the site's pools; Triton layout) and loaded on the
pool's replicas:

1. Install (per missing version): download every file to ``<repository parent>/.staging/``,
   verify each file's size and sha256 against MANIFEST.json, then rename the staged directory
   to ``<repository>/<name>/<version>``. The rename is the commit point: a version directory is
   either complete (it holds MANIFEST.json) or absent. A version without a manifest in the store
   is incomplete and ignored; a corrupt one is refused and reported ``failed``, never loaded.
2. Load: write ``<repository>/<name>/config.pbtxt`` (the stable's config with
   ``version_policy { specific { versions: [...] } }``) and ask every replica to load the model
   with that config as an override (KServe repository extension: HTTP
   ``POST /v2/repository/models/{name}/load {"parameters": {"config": "<JSON>"}}`` or gRPC
   ``RepositoryModelLoad``), then read the repository index until the versions are READY.
   Old versions stay in the load set until every wanted version is READY everywhere. Replicas
   load one at a time: while Triton loads a model (a new config reloads it) its readiness
   answers 400, the model's requests stall, and gateways' health checks cannot read its index;
   the other replicas keep serving meanwhile, and by the time the last one is done the gateways
   have seen the new version READY on the others.
3. Garbage-collect: only then, and only once no gateway routes unversioned traffic to them
   any more, load with just the wanted versions (the replicas drop the old ones) and delete the
   old version directories. Gateways switch when the *published* site statuses say so (global
   or per-site cutover, ``replicas.releases.resolver``) and re-read them every
   ``resolver_poll_interval_ms``: the agent applies the same rule to the statuses in the store
   and unloads only after that rule has pointed away from the old versions for a poll interval
   plus a margin. Unloading in the pass that first saw the new version READY (before its status
   was even published) failed every request still routed to the old one.
4. Publish ``sites/{site}/status.json`` (ready / loading / failed with reason / serving) with a
   heartbeat every poll, also while a long download runs.

Faults: store unreachable, missing (its directory or bucket gone: never re-created here) or
hanging (no answer within ``[store] connect_timeout_s`` / ``read_timeout_s``) -> keep serving
what is installed, retry with backoff, log a warning naming the store and how long it has not
answered (``geogate_sync_store_unanswered_seconds`` says the same, live), and once reachable
again say what happened in the status; agent killed mid-download -> the restart wipes
staging and starts the version again; a replica that fails to load a version -> the version is
reported failed (with the replica's reason) and the old versions keep serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import orjson
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from core.logs import setup_logging
from replicas.releases.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    load_public_key,
    read_manifest,
    signature_problem,
    verify_dir,
)
from replicas.releases.records import ReleaseRecord, Releases
from replicas.releases.resolver import VersionResolver  # the cutover rule gateways apply
from replicas.releases.site_status import ModelStatus, SiteStatus, publish, read_all_sites
from replicas.store import ObjectStore, StoreError, StoreMissing, StoreTimeout, StoreUnavailable

log = logging.getLogger("geogate.sync")

CONFIG_NAME = "config.pbtxt"
STAGING_DIR = ".staging"
READY = "READY"
UNLOADING = "UNLOADING"
MAX_STORE_BACKOFF_S = 30.0
FAILED_RETRY_BASE_S = 30.0  # a refused/failed version is retried after this, doubling
FAILED_RETRY_MAX_S = 600.0
READY_POLL_S = 0.25
INDEX_TIMEOUT_S = 5.0
GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_RESOLVER_POLL_S = 1.0  # [sync] resolver_poll_interval_ms's default
DEFAULT_SITE_STALE_AFTER_S = 15.0  # [sync] site_stale_after_ms's default
RETIRE_MARGIN_S = 1.0  # after gateways have re-read the statuses: requests routed before finish


# ====================================================================== replica control


class ReplicaError(Exception):
    """The replica refused or could not be reached; the message says which and why.
    ``reachable``: False when it did not answer at all (down, timeout), True when it refused."""

    def __init__(self, message: str, *, reachable: bool):
        super().__init__(message)
        self.reachable = reachable


@dataclass(frozen=True)
class VersionState:
    state: str  # READY, LOADING, UNAVAILABLE, ...
    reason: str


Index = dict[str, dict[str, VersionState]]  # model -> version -> state


def _address(url: str) -> str:
    return url.partition("://")[2].rstrip("/")


def _bearer(token: str) -> str:
    return f"Bearer {token}"


class HttpReplica:
    def __init__(self, url: str, control_token: str = ""):
        self.url = url
        self._base = ("https://" if url.startswith("https://") else "http://") + _address(url)
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "application/json"}
        if control_token:
            self._headers["Authorization"] = _bearer(control_token)

    async def _post(self, path: str, body: dict, timeout_s: float) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(self._base + path, data=orjson.dumps(body), headers=self._headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                data = await resp.read()
                if resp.status != 200:
                    try:
                        msg = orjson.loads(data).get("error", "")
                    except (orjson.JSONDecodeError, AttributeError):
                        msg = data[:200].decode(errors="replace")
                    raise ReplicaError(f"{self.url}: HTTP {resp.status}: {msg}", reachable=True)
                return data
        except (aiohttp.ClientError, OSError) as exc:
            raise ReplicaError(f"{self.url}: unreachable: {type(exc).__name__}: {exc}", reachable=False) from None
        except TimeoutError:
            raise ReplicaError(f"{self.url}: no answer within {timeout_s:.0f} s", reachable=False) from None

    async def load(self, model: str, config_json: str, timeout_s: float) -> None:
        await self._post(f"/v2/repository/models/{model}/load", {"parameters": {"config": config_json}},
                         timeout_s)

    async def index(self) -> Index:
        out: Index = {}
        for r in orjson.loads(await self._post("/v2/repository/index", {}, INDEX_TIMEOUT_S)):
            if r.get("version"):
                out.setdefault(r["name"], {})[str(r["version"])] = VersionState(r.get("state", ""),
                                                                                r.get("reason", ""))
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class GrpcReplica:
    def __init__(self, url: str, control_token: str = ""):
        self.url = url
        self._metadata = (("authorization", _bearer(control_token)),) if control_token else None
        opts = [("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES)]
        addr = _address(url)
        self._channel = (grpc.aio.secure_channel(addr, grpc.ssl_channel_credentials(), options=opts)
                         if url.startswith("grpcs://") else grpc.aio.insecure_channel(addr, options=opts))
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def load(self, model: str, config_json: str, timeout_s: float) -> None:
        req = service_pb2.RepositoryModelLoadRequest(model_name=model)
        req.parameters["config"].string_param = config_json
        try:
            await self._stub.RepositoryModelLoad(req, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _grpc_error(self.url, exc) from None

    async def index(self) -> Index:
        try:
            resp = await self._stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=INDEX_TIMEOUT_S,
                                                    metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _grpc_error(self.url, exc) from None
        out: Index = {}
        for m in resp.models:
            if m.version:
                out.setdefault(m.name, {})[m.version] = VersionState(m.state, m.reason)
        return out

    async def close(self) -> None:
        await self._channel.close()


def _grpc_error(url: str, exc: grpc.aio.AioRpcError) -> ReplicaError:
    down = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return ReplicaError(f"{url}: {exc.code().name}: {exc.details()}", reachable=not down)


def replica_client(url: str, control_token: str = "") -> HttpReplica | GrpcReplica:
    """The replica's protocol is its URL's scheme (DESIGN.md: Configuration); `control_token`:
    presented on its repository API (the pool's control_token_file)."""
    scheme = url.partition("://")[0]
    if scheme in ("http", "https"):
        return HttpReplica(url, control_token)
    if scheme in ("grpc", "grpcs"):
        return GrpcReplica(url, control_token)
    raise ValueError(f"replica URL {url!r}: scheme must be http or grpc")


# ====================================================================== model config


def model_config_json(name: str, config_pbtxt: str | None, versions: list[str]) -> tuple[str, str]:
    """(JSON for the load override, pbtxt for the repository) of the model config restricted to
    ``versions`` (Triton's ``version_policy { specific { versions } }``)."""
    cfg = model_config_pb2.ModelConfig()
    if config_pbtxt:
        text_format.Parse(config_pbtxt, cfg)
    cfg.name = name
    cfg.version_policy.Clear()
    cfg.version_policy.specific.versions.extend(sorted(int(v) for v in versions))
    return (json_format.MessageToJson(cfg, preserving_proto_field_name=True, indent=None),
            text_format.MessageToString(cfg))


# ====================================================================== metrics


class SyncMetrics:
    """Prometheus metrics of the agent (``geogate_sync_*``), served on ``--metrics HOST:PORT``."""

    def __init__(self, site: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.site = site
        self.store_up = Gauge("geogate_sync_store_up", "1 when the last store read succeeded", ["site"],
                              registry=r).labels(site)
        self.heartbeat = Gauge("geogate_sync_heartbeat_timestamp_seconds", "Last status publication (unix)",
                               ["site"], registry=r).labels(site)
        self.versions = Gauge("geogate_sync_versions", "Versions per model by state at this site",
                              ["site", "model", "state"], registry=r)
        self.downloaded = Counter("geogate_sync_downloaded_bytes", "Bytes downloaded from the store",
                                  ["site"], registry=r).labels(site)
        self.installs = Counter("geogate_sync_installs", "Version installs by outcome (installed, refused)",
                                ["site", "outcome"], registry=r)
        self.loads = Counter("geogate_sync_replica_loads", "Load requests to replicas by outcome (ok, error)",
                             ["site", "outcome"], registry=r)
        self.store_unanswered = Gauge("geogate_sync_store_unanswered_seconds",
                                      "Seconds since the store last answered while it does not (0 while it does)",
                                      ["site"], registry=r).labels(site)
        self.store_failures = Counter("geogate_sync_store_failures",
                                      "Sync rounds that failed on the store, by kind (timeout: it hangs; missing: "
                                      "no directory/bucket; unavailable: refused, 5xx, I/O error)",
                                      ["site", "kind"], registry=r)

    def observe(self, status: SiteStatus) -> None:
        self.store_up.set(1 if status.store_ok else 0)
        self.heartbeat.set(status.heartbeat_s)
        for model, ms in status.models.items():
            for state, versions in (("ready", ms.ready), ("loading", ms.loading), ("failed", ms.failed),
                                    ("serving", ms.serving)):
                self.versions.labels(self.site, model, state).set(len(versions))

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ====================================================================== the agent


class VersionRefused(Exception):
    """A version the agent will not install (incomplete, corrupt); the message says why."""


@dataclass
class Target:
    """One model repository of the site and the replicas that serve it."""

    repository: Path
    replicas: list[str]  # what the agent loads versions into: configured + discovered now
    pools: list[str]
    configured: list[str] = field(default_factory=list)
    # Pools that find replicas by DNS SRV (core.srv_discovery.SrvDiscovery): re-resolved every
    # sync round, so replicas that come and go (an autoscaler) get every version loaded too.
    discoveries: list = field(default_factory=list)
    control_token: str = ""  # presented to these replicas' repository API (pools' control_token_file)

    @property
    def staging_root(self) -> Path:
        # Inside the repository's parent: same filesystem (rename is atomic), outside the
        # directory replicas scan.
        return self.repository.parent / STAGING_DIR / self.repository.name


@dataclass
class Failure:
    reason: str
    retry_at_s: float
    attempts: int = 1


@dataclass
class ModelState:
    record: ReleaseRecord | None = None
    loading: dict[str, str] = field(default_factory=dict)  # version -> what is happening
    failed: dict[str, Failure] = field(default_factory=dict)
    ready: list[str] = field(default_factory=list)
    serving: list[str] = field(default_factory=list)
    # Per repository: old versions waiting to be unloaded, and since when (time.monotonic())
    # the cutover rule has routed unversioned traffic away from them.
    retiring: dict[str, tuple[frozenset[str], float]] = field(default_factory=dict)


def _sorted_versions(vs) -> list[str]:
    return sorted(set(vs), key=int)


class SyncAgent:
    def __init__(self, store: ObjectStore, site: str, targets: list[Target], *, poll_interval_s: float,
                 load_timeout_s: float, keep_previous: int, rate_limit_bytes_per_s: int = 0,
                 cutover: str = "global", resolver_poll_s: float = DEFAULT_RESOLVER_POLL_S,
                 site_stale_after_s: float = DEFAULT_SITE_STALE_AFTER_S, manifest_public_key=None):
        self.store = store
        # Ed25519 public key ([signing] public_key_file): install only versions it signed.
        self.manifest_public_key = manifest_public_key
        self.site = site
        self.targets = targets
        self.poll_interval_s = poll_interval_s
        self.load_timeout_s = load_timeout_s
        self.keep_previous = keep_previous
        self.rate_limit_bytes_per_s = rate_limit_bytes_per_s
        self.cutover = cutover
        self.site_stale_after_s = site_stale_after_s
        # How long the cutover rule must point away from a version before it is unloaded.
        self.retire_grace_s = resolver_poll_s + RETIRE_MARGIN_S
        self.releases = Releases(store)
        self.models: dict[str, ModelState] = {}
        self.replica_health: dict[str, dict] = {}
        self.store_ok = True
        self.store_error = ""
        self.store_last_error = ""  # kept after recovery, so the status can say what happened
        self.store_last_error_s = 0.0
        self._store_answered_mono = time.monotonic()  # the last round/publication the store answered
        self._clients = {url: replica_client(url, t.control_token) for t in targets for url in t.replicas}
        self._publish_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._cycle: asyncio.Task | None = None
        self.metrics = SyncMetrics(site)
        self.metrics.store_unanswered.set_function(lambda: 0.0 if self.store_ok else self.store_unanswered_s())

    # ------------------------------------------------------------ lifecycle

    def clean_staging(self) -> None:
        """A previous run killed mid-download left partial files: start those versions over."""
        for t in self.targets:
            if t.staging_root.exists():
                log.info("removing leftover staging", extra={"fields": {"path": str(t.staging_root)}})
                shutil.rmtree(t.staging_root, ignore_errors=True)

    async def run(self) -> None:
        await asyncio.to_thread(self.clean_staging)
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._cycle = asyncio.create_task(self.sync_once())
                    try:
                        await self._cycle
                    except asyncio.CancelledError:
                        if self._stop.is_set():
                            break  # stop() cancelled the pass: staging is cleaned on the next start
                        raise
                    failures = 0
                    delay = self.poll_interval_s
                except StoreUnavailable as exc:
                    failures += 1
                    delay = min(MAX_STORE_BACKOFF_S, self.poll_interval_s * 2 ** min(failures, 10))
                    self.store_failed(exc, retry_in_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self.close()
            log.info("sync agent stopped", extra={"fields": {"site": self.site}})

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()

    def store_unanswered_s(self) -> float:
        return time.monotonic() - self._store_answered_mono

    def _store_answered(self) -> None:
        self._store_answered_mono = time.monotonic()

    def store_failed(self, exc: StoreUnavailable, *, retry_in_s: float | None) -> None:
        """A round failed on the store: keep serving what is installed, and say so: which store,
        how long it has not answered, why (a hang, a missing store, an error)."""
        kind = "timeout" if isinstance(exc, StoreTimeout) else "missing" if isinstance(exc, StoreMissing) \
            else "unavailable"
        silent_s = self.store_unanswered_s()
        self.store_ok, self.store_error = False, str(exc)
        self.store_last_error, self.store_last_error_s = str(exc), time.time()
        self.metrics.store_up.set(0)
        self.metrics.store_failures.labels(self.site, kind).inc()
        what = "hangs" if kind == "timeout" else "is missing" if kind == "missing" else "fails"
        retry = f", retry in {retry_in_s:.0f} s" if retry_in_s is not None else ""
        log.warning(f"store unreachable: {self.store.url} {what} and has not answered for {silent_s:.0f} s; "
                    f"keeping installed versions serving{retry}",
                    extra={"fields": {"site": self.site, "store": self.store.url, "kind": kind,
                                      "unanswered_s": round(silent_s, 1), "error": str(exc),
                                      **({"retry_in_s": round(retry_in_s, 1)} if retry_in_s is not None else {})}})

    def stop(self) -> None:
        """Stop promptly, even mid-download (the rename is the commit point, so this is safe)."""
        self._stop.set()
        if self._cycle is not None and not self._cycle.done():
            self._cycle.cancel()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            with contextlib.suppress(StoreError):
                await self.publish_status()

    # ------------------------------------------------------------ one pass

    async def _refresh_discovered(self) -> None:
        """Re-resolve discovered pools; a DNS failure keeps the last good set."""
        from core.srv_discovery import DiscoveryError

        for t in self.targets:
            if not t.discoveries:
                continue
            urls = list(t.configured)
            for d in t.discoveries:
                try:
                    found = await d.resolve()
                    d.last_good = found
                except DiscoveryError as exc:
                    log.warning("replica discovery failed; keeping the last answer",
                                extra={"fields": {"name": d.name, "error": str(exc)}})
                    found = d.last_good or []
                urls.extend(u for u, _weight in found if u not in urls)
            if urls != t.replicas:
                log.info("replicas of the repository changed", extra={"fields": {
                    "repository": str(t.repository), "replicas": urls}})
            t.replicas = urls
        wanted = {u: t.control_token for t in self.targets for u in t.replicas}
        for url in wanted.keys() - self._clients.keys():
            self._clients[url] = replica_client(url, wanted[url])
        for url in self._clients.keys() - wanted:
            await self._clients.pop(url).close()

    async def sync_once(self) -> None:
        await self._refresh_discovered()
        records = await self.releases.all()
        self._store_answered()
        self.store_ok, self.store_error = True, ""
        for name, rec in records.items():
            st = self.models.setdefault(name, ModelState())
            st.record = rec
            ready_sets, serving = [], set()
            for t in self.targets:
                ready, serving_t = await self._sync_model(t, name, rec, st)
                ready_sets.append(ready)
                serving |= serving_t
            st.ready = _sorted_versions(set.intersection(*ready_sets)) if ready_sets else []
            st.serving = _sorted_versions(serving)
        await self.publish_status()

    async def _sync_model(self, t: Target, name: str, rec: ReleaseRecord, st: ModelState) -> tuple[set, set]:
        wanted = rec.wanted_versions(self.keep_previous)
        # A failure no longer matters once the version is not wanted (e.g. rolled back).
        for v in [v for v in st.failed if v not in wanted]:
            del st.failed[v]
        installed = await asyncio.to_thread(self._installed, t, name)
        now = time.time()

        def backing_off(v: str) -> bool:
            f = st.failed.get(v)
            return f is not None and now < f.retry_at_s

        for v in wanted:
            if v in installed or backing_off(v):
                continue
            try:
                await self._install(t, name, v, st)
                installed.add(v)
                st.failed.pop(v, None)
            except VersionRefused as exc:
                self._fail(st, name, v, str(exc))
        usable = [v for v in wanted if v in installed and not backing_off(v)]
        if not t.replicas:
            return set(usable), set(usable)
        indexes = await self._indexes(t)
        if not indexes:
            # No replica answers: nothing to load now; installed versions wait for them.
            return set(), set()
        ready, serving = self._ready_sets(indexes, name)
        if not usable:  # nothing new can be loaded: what serves keeps serving
            return ready, serving
        if not set(usable) <= ready:
            # Load the wanted versions alongside what serves now: nothing is dropped yet.
            load_set = set(usable) | (serving & installed)
            errors: dict[str, str] = {}
            for url in t.replicas:  # one at a time (step 2 above)
                errors |= await self._load(t, name, load_set, installed, st, replicas=[url])
                await self._wait_ready(t, name, set(usable), replicas=[url])
            indexes = await self._indexes(t)
            ready, serving = self._ready_sets(indexes, name)
            for v in usable:
                if v not in ready and indexes:
                    self._fail(st, name, v, self._not_ready_reason(indexes, name, v, errors))
            usable = [v for v in usable if v in ready]
        for v in usable:
            if v in ready:
                st.failed.pop(v, None)  # a retry that worked
        reachable = all(url in indexes for url in t.replicas)
        if usable and set(usable) <= ready and reachable and set(wanted) <= set(usable):
            extras = (serving | installed) - set(usable)
            if serving - set(usable):
                # Every wanted version is READY everywhere: the old ones may go once gateways
                # no longer send them traffic.
                drop = frozenset(serving - set(usable))
                if not await self._may_retire(t, name, rec, drop, st):
                    return ready, serving
                # One replica at a time: Triton reloads the model for the new config, and while
                # it does its readiness answers 400 and the model's requests can stall; the other
                # replicas keep serving meanwhile.
                for url in t.replicas:
                    await self._load(t, name, set(usable), installed, st, replicas=[url])
                    await self._wait_retired(url, name, drop)
                indexes = await self._indexes(t)
                ready, serving = self._ready_sets(indexes, name)
            if not (serving - set(usable)):
                for v in _sorted_versions(extras & installed):
                    await asyncio.to_thread(self._remove_version, t, name, v)
        return ready, serving

    async def _may_retire(self, t: Target, name: str, rec: ReleaseRecord, drop: frozenset[str],
                          st: ModelState) -> bool:
        """Whether versions `drop` may be unloaded now: the gateways' cutover rule, applied to the
        site statuses as published, has routed unversioned traffic to a version outside `drop`
        for at least ``retire_grace_s`` (gateways' resolvers re-read statuses every poll)."""
        if rec.stable is None:
            return True  # no release-routed traffic: replicas answer unversioned requests themselves
        try:
            sites = await read_all_sites(self.store)
        except StoreError as exc:
            log.warning("cannot read site statuses: keeping old versions loaded",
                        extra={"fields": {"model": name, "versions": _sorted_versions(drop), "error": str(exc)}})
            return False
        judge = VersionResolver(None, cutover=self.cutover, stale_after_s=self.site_stale_after_s, site=self.site)
        judge.update({name: rec}, sites)
        routed, _ = judge.effective_stable(rec, self.site)
        now = time.monotonic()
        key = str(t.repository)
        if routed in drop:
            st.retiring.pop(key, None)
            return False
        since = st.retiring.get(key)
        if since is None or since[0] != drop:
            since = st.retiring[key] = (drop, now)
            log.info("old versions unload once gateways have switched",
                     extra={"fields": {"model": name, "versions": _sorted_versions(drop), "routed": routed,
                                       "in_s": round(self.retire_grace_s, 1), "repository": key}})
        if now - since[1] < self.retire_grace_s:
            return False
        del st.retiring[key]
        return True

    def _fail(self, st: ModelState, name: str, version: str, reason: str) -> None:
        prev = st.failed.get(version)
        attempts = prev.attempts + 1 if prev else 1
        delay = min(FAILED_RETRY_MAX_S, FAILED_RETRY_BASE_S * 2 ** (attempts - 1))
        st.failed[version] = Failure(reason, time.time() + delay, attempts)
        st.loading.pop(version, None)
        log.error("version failed", extra={"fields": {"site": self.site, "model": name, "version": version,
                                                       "reason": reason, "retry_in_s": delay}})

    # ------------------------------------------------------------ install

    @staticmethod
    def _installed(t: Target, name: str) -> set[str]:
        """Versions committed to the repository: MANIFEST.json present (the rename put it there)
        and every file it lists present with its size (someone may have deleted files by hand:
        such a version is installed again). Checksums are not re-read every poll."""
        d = t.repository / name
        if not d.is_dir():
            return set()
        out = set()
        for p in d.iterdir():
            if not p.name.isdigit():
                continue
            try:
                manifest = Manifest.from_bytes((p / MANIFEST_NAME).read_bytes())
                if all((p / f.path).stat().st_size == f.size for f in manifest.files):
                    out.add(p.name)
                else:
                    log.warning("installed version damaged: installing it again",
                                extra={"fields": {"path": str(p)}})
            except (FileNotFoundError, ManifestError):
                continue
        return out

    async def _install(self, t: Target, name: str, version: str, st: ModelState) -> None:
        try:
            manifest = await read_manifest(self.store, name, version)
        except ManifestError as exc:
            raise VersionRefused(f"unreadable manifest: {exc}") from None
        if manifest is None:
            raise VersionRefused("incomplete in the store: no MANIFEST.json (an interrupted push?)")
        if self.manifest_public_key is not None:
            problem = signature_problem(manifest, self.manifest_public_key)
            if problem:
                self.metrics.installs.labels(self.site, "refused").inc()
                raise VersionRefused(f"signature check failed, refused: {problem}")
        stage = t.staging_root / name / f"{version}-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(stage.mkdir, parents=True, exist_ok=True)
        total = manifest.total_bytes
        done = 0
        log.info("downloading version", extra={"fields": {"site": self.site, "model": name, "version": version,
                                                          "bytes": total, "repository": str(t.repository)}})
        try:
            for f in manifest.files:
                dest = stage / f.path
                await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
                st.loading[version] = f"downloading {f.path} ({done}/{total} bytes)"
                try:
                    await self.store.download_file(f"models/{name}/{version}/{f.path}", str(dest),
                                                   rate_limit_bytes_per_s=self.rate_limit_bytes_per_s)
                except StoreError as exc:
                    if isinstance(exc, StoreUnavailable):
                        raise
                    raise VersionRefused(f"{f.path}: {exc}") from None
                done += f.size
                self.metrics.downloaded.inc(f.size)
            st.loading[version] = "verifying checksums"
            problems = await asyncio.to_thread(verify_dir, stage, manifest)
            if problems:
                self.metrics.installs.labels(self.site, "refused").inc()
                raise VersionRefused("corrupt, refused: " + "; ".join(problems))
            await asyncio.to_thread(self._commit, t, name, version, stage, manifest)
            self.metrics.installs.labels(self.site, "installed").inc()
            log.info("installed version", extra={"fields": {"site": self.site, "model": name,
                                                            "version": version, "repository": str(t.repository)}})
        finally:
            st.loading.pop(version, None)
            await asyncio.to_thread(shutil.rmtree, stage, True)

    @staticmethod
    def _commit(t: Target, name: str, version: str, stage: Path, manifest: Manifest) -> None:
        (stage / MANIFEST_NAME).write_bytes(manifest.to_bytes())
        model_dir = t.repository / name
        model_dir.mkdir(parents=True, exist_ok=True)
        target = model_dir / version
        if target.exists():  # unmanaged or damaged: move it out of the way first (one rename)
            trash = t.staging_root / f"trash-{name}-{version}-{uuid.uuid4().hex[:8]}"
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(stage, target)  # the commit point
        fd = os.open(model_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _remove_version(t: Target, name: str, version: str) -> None:
        """Unpublish first (rename out of the repository), then delete at leisure."""
        src = t.repository / name / version
        if not src.exists():
            return
        trash = t.staging_root / f"trash-{name}-{version}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("removed version", extra={"fields": {"model": name, "version": version,
                                                      "repository": str(t.repository)}})

    # ------------------------------------------------------------ load

    def _config_source(self, t: Target, name: str, versions: set[str], st: ModelState) -> str | None:
        """The model config to use: the stable's config.pbtxt, else the newest version's."""
        rec = st.record
        order = ([rec.stable] if rec and rec.stable else []) + sorted(versions, key=int, reverse=True)
        for v in order:
            p = t.repository / name / v / CONFIG_NAME
            if p.is_file():
                return p.read_text()
        return None

    async def _load(self, t: Target, name: str, versions: set[str], installed: set[str],
                    st: ModelState, replicas: list[str] | None = None) -> dict[str, str]:
        """Ask every replica (or just `replicas`) to load exactly ``versions``; returns replica
        URL -> error."""
        replicas = t.replicas if replicas is None else replicas
        versions = {v for v in versions if v in installed}
        errors: dict[str, str] = {}
        if not versions:
            return errors
        source = await asyncio.to_thread(self._config_source, t, name, versions, st)
        try:
            cfg_json, cfg_pbtxt = model_config_json(name, source, list(versions))
        except text_format.ParseError as exc:
            for v in versions:
                self._fail(st, name, v, f"config.pbtxt does not parse: {exc}")
            return {u: "bad config" for u in t.replicas}
        await asyncio.to_thread(_write_atomic, t.repository / name / CONFIG_NAME, cfg_pbtxt)
        for v in versions:
            st.loading.setdefault(v, "loading on replicas")
        log.info("loading", extra={"fields": {"site": self.site, "model": name,
                                              "versions": _sorted_versions(versions)}})
        results = await asyncio.gather(*(self._clients[u].load(name, cfg_json, self.load_timeout_s)
                                         for u in replicas), return_exceptions=True)
        for url, res in zip(replicas, results, strict=True):
            self.metrics.loads.labels(self.site, "error" if isinstance(res, BaseException) else "ok").inc()
            if isinstance(res, BaseException):
                if not isinstance(res, ReplicaError):
                    raise res
                log.warning("replica load failed", extra={"fields": {"replica": url, "model": name,
                                                                     "error": str(res)}})
                errors[url] = str(res)
                if not res.reachable:
                    self.replica_health[url] = {"ok": False, "error": str(res)}
        for v in versions:
            st.loading.pop(v, None)
        return errors

    async def _indexes(self, t: Target, replicas: list[str] | None = None) -> dict[str, Index]:
        replicas = t.replicas if replicas is None else replicas
        results = await asyncio.gather(*(self._clients[u].index() for u in replicas), return_exceptions=True)
        out: dict[str, Index] = {}
        for url, res in zip(replicas, results, strict=True):
            if isinstance(res, ReplicaError):
                self.replica_health[url] = {"ok": False, "error": str(res)}
                if res.reachable:  # it answered, just not the index: count it as there, knowing nothing
                    out[url] = {}
            elif isinstance(res, BaseException):
                raise res
            else:
                self.replica_health[url] = {"ok": True, "error": ""}
                out[url] = res
        return out

    async def _wait_ready(self, t: Target, name: str, versions: set[str],
                          replicas: list[str] | None = None) -> dict[str, Index]:
        """Until every reachable replica (of `replicas`, default all) has ``versions`` READY or
        none is still LOADING."""
        deadline = time.monotonic() + self.load_timeout_s
        while True:
            indexes = await self._indexes(t, replicas)
            ready, _ = self._ready_sets(indexes, name)
            loading = any(s.state == "LOADING" for idx in indexes.values() for s in idx.get(name, {}).values())
            if versions <= ready or not loading or time.monotonic() > deadline:
                return indexes
            await asyncio.sleep(READY_POLL_S)

    async def _wait_retired(self, url: str, name: str, drop: frozenset[str]) -> None:
        """Until `url` has finished unloading `drop` (none READY or UNLOADING), it stopped
        answering, or load_timeout_s passed."""
        deadline = time.monotonic() + self.load_timeout_s
        while time.monotonic() < deadline:
            try:
                index = await self._clients[url].index()
            except ReplicaError:
                return
            states = index.get(name, {})
            if not any(states[v].state in (READY, UNLOADING) for v in drop if v in states):
                return
            await asyncio.sleep(READY_POLL_S)

    @staticmethod
    def _ready_sets(indexes: dict[str, Index], name: str) -> tuple[set[str], set[str]]:
        """(READY on every reachable replica, READY on at least one)."""
        per = [{v for v, s in idx.get(name, {}).items() if s.state == READY} for idx in indexes.values()]
        if not per:
            return set(), set()
        return set.intersection(*per), set.union(*per)

    @staticmethod
    def _not_ready_reason(indexes: dict[str, Index], name: str, version: str, errors: dict[str, str]) -> str:
        reasons = []
        for url, idx in indexes.items():
            s = idx.get(name, {}).get(version)
            if s is None or s.state != READY:
                why = s.reason if s and s.reason else errors.get(url, "")
                reasons.append(f"{url}: {s.state if s else 'not loaded'}" + (f" ({why})" if why else ""))
        return "did not become ready: " + "; ".join(reasons)

    # ------------------------------------------------------------ status

    def snapshot(self) -> SiteStatus:
        models = {}
        for name, st in self.models.items():
            rec = st.record
            models[name] = ModelStatus(
                generation=rec.generation if rec else 0, stable=rec.stable if rec else None,
                canary=rec.canary_version if rec else None, ready=list(st.ready),
                loading=_sorted_versions(st.loading), failed={v: f.reason for v, f in st.failed.items()},
                serving=list(st.serving))
        return SiteStatus(site=self.site, heartbeat_s=time.time(), store_ok=self.store_ok,
                          store_error=self.store_error, store_last_error=self.store_last_error,
                          store_last_error_s=self.store_last_error_s, replicas=dict(self.replica_health),
                          models=models)

    async def publish_status(self) -> None:
        async with self._publish_lock:
            status = self.snapshot()
            self.metrics.observe(status)
            await publish(self.store, status)
            self._store_answered()


def _write_atomic(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ====================================================================== command line


def _control_token(cfg, pool) -> str:
    """The pool's replica control token (its control_token_file), checked as replicas check it."""
    from core.config import ConfigError
    from replicas.server.repository import ControlToken, ControlTokenError

    if not pool.control_token_file:
        return ""
    path = cfg.resolve_path(pool.control_token_file)
    try:
        return ControlToken.from_file(path).text
    except ControlTokenError as exc:
        raise ConfigError(f"pool {pool.name!r} control_token_file: {exc}") from None


def targets_for_site(cfg, site: str) -> list[Target]:
    from core.config import ConfigError

    region = cfg.region(site)
    by_repo: dict[str, Target] = {}
    for pool in region.pools:
        if not pool.repository:
            log.warning("pool has no repository: nothing to sync", extra={"fields": {"pool": pool.name}})
            continue
        repo = cfg.resolve_path(pool.repository)
        token = _control_token(cfg, pool)
        t = by_repo.setdefault(repo, Target(Path(repo), [], [], control_token=token))
        if token != t.control_token:
            raise ConfigError(f"pool {pool.name!r}: pools {t.pools} share its repository {pool.repository!r} but "
                              "not its control_token_file (the sync agent loads them all with one token)")
        t.pools.append(pool.name)
        t.replicas.extend(u for u in pool.replicas if u not in t.replicas)
        t.configured.extend(u for u in pool.replicas if u not in t.configured)
        if pool.discover:
            from core.srv_discovery import SrvDiscovery

            t.discoveries.append(SrvDiscovery(pool.discover, pool.discover_scheme, resolver=pool.discover_resolver))
    return list(by_repo.values())


async def _serve_metrics(metrics: SyncMetrics, listen: str):
    from aiohttp import web

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4"})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    return runner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="deployment config")
    parser.add_argument("--site", required=True, help="the region whose pools' repositories this agent fills")
    parser.add_argument("--store", default="", metavar="URL", help="override the config's [store] url")
    parser.add_argument("--metrics", default="", metavar="HOST:PORT",
                        help="serve Prometheus /metrics here (default: off)")
    parser.add_argument("--once", action="store_true", help="one pass, then exit (0 when no version failed)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


async def _amain(args: argparse.Namespace) -> int:
    from core.config import load_config
    from replicas.store import open_store_from_config

    cfg = load_config(args.config)
    targets = targets_for_site(cfg, args.site)
    for t in targets:
        t.repository.mkdir(parents=True, exist_ok=True)
    # create=False: a sync agent never makes the store. A store directory that vanished in an
    # outage (an unmounted share) must not come back empty and be written into: the agent
    # keeps serving what it has and waits for the real store to return.
    store = open_store_from_config(cfg, args.store, create=False)
    agent = SyncAgent(store, args.site, targets, poll_interval_s=cfg.sync.poll_interval_ms / 1000,
                      load_timeout_s=cfg.sync.load_timeout_ms / 1000, keep_previous=cfg.sync.keep_previous,
                      rate_limit_bytes_per_s=getattr(cfg.sync, "download_rate_limit_bytes_per_s", 0),
                      cutover=cfg.routing.cutover, resolver_poll_s=cfg.sync.resolver_poll_interval_ms / 1000,
                      site_stale_after_s=cfg.sync.site_stale_after_ms / 1000,
                      manifest_public_key=load_public_key(cfg.resolve_path(cfg.signing.public_key_file))
                      if cfg.signing.public_key_file else None)
    log.info("sync agent starting", extra={"fields": {
        "site": args.site, "store": store.url, "repositories": [str(t.repository) for t in targets],
        "replicas": [u for t in targets for u in t.replicas]}})
    try:
        if args.once:
            await asyncio.to_thread(agent.clean_staging)
            try:
                await agent.sync_once()
            except StoreUnavailable as exc:
                agent.store_failed(exc, retry_in_s=None)
                return 1
            finally:
                await agent.close()
            return 1 if any(st.failed for st in agent.models.values()) else 0
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        runner = await _serve_metrics(agent.metrics, args.metrics) if args.metrics else None
        try:
            await agent.run()
        finally:
            if runner is not None:
                await runner.cleanup()
        return 0
    finally:
        await store.close()


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        import uvloop

        return uvloop.run(_amain(args))
    except ImportError:
        return asyncio.run(_amain(args))
