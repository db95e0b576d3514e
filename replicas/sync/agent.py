"""One site's sync agent: its round loop and lifecycle (DESIGN.md, Model store layout).

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

The parts: ``installer`` (step 1), ``replica_control`` and ``replica_client`` (step 2),
``retirement`` (step 3's gate), ``status`` and ``metrics`` (step 4), ``state`` (what the agent
knows), ``cli`` (``geogate sync``). This module runs the rounds and sequences those steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from core.srv_discovery import DiscoveryError
from core.tls import ClientTls
from replicas.releases.records import ReleaseRecord, Releases
from replicas.store import ObjectStore, StoreError, StoreUnavailable
from replicas.sync.installer import Installer, VersionRefused, clean_staging, installed_versions, remove_version
from replicas.sync.metrics import SyncMetrics
from replicas.sync.replica_control import ReplicaControl, not_ready_reason, ready_sets
from replicas.sync.retirement import DEFAULT_RESOLVER_POLL_S, DEFAULT_SITE_STALE_AFTER_S, RetirementGate
from replicas.sync.state import ModelState, Target, record_failure, sorted_versions
from replicas.sync.status import StatusReporter

log = logging.getLogger("geogate.sync")

MAX_STORE_BACKOFF_S = 30.0


class SyncAgent:
    """Runs sync rounds every ``poll_interval_s`` until stopped, publishing a heartbeat between."""

    def __init__(self, store: ObjectStore, site: str, targets: list[Target], *, poll_interval_s: float,
                 load_timeout_s: float, keep_previous: int, rate_limit_bytes_per_s: int = 0,
                 cutover: str = "global", resolver_poll_s: float = DEFAULT_RESOLVER_POLL_S,
                 site_stale_after_s: float = DEFAULT_SITE_STALE_AFTER_S, manifest_public_key=None,
                 replica_tls: ClientTls | None = None):
        self.store = store
        self.site = site
        self.targets = targets
        self.poll_interval_s = poll_interval_s
        self.keep_previous = keep_previous
        self.releases = Releases(store)
        self.models: dict[str, ModelState] = {}
        self.metrics = SyncMetrics(site)
        self.installer = Installer(store, site, self.metrics, rate_limit_bytes_per_s=rate_limit_bytes_per_s,
                                   manifest_public_key=manifest_public_key)
        self.replicas = ReplicaControl(site, self.metrics, load_timeout_s=load_timeout_s, tls=replica_tls)
        self.retirement = RetirementGate(store, site, cutover=cutover, resolver_poll_s=resolver_poll_s,
                                         site_stale_after_s=site_stale_after_s)
        self.status = StatusReporter(store, site, self.metrics)
        self._stop = asyncio.Event()
        self._cycle: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle

    def clean_staging(self) -> None:
        clean_staging(self.targets)

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
                    self.status.store_failed(exc, retry_in_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self.close()
            log.info("sync agent stopped", extra={"fields": {"site": self.site}})

    async def close(self) -> None:
        await self.replicas.close()

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

    async def publish_status(self) -> None:
        await self.status.publish(self.models, self.replicas.health)

    # ------------------------------------------------------------ one pass

    async def _refresh_discovered(self) -> None:
        """Re-resolve discovered pools (a DNS failure keeps the last good set); keep one client
        per replica."""
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
        await self.replicas.use({u: t.control_token for t in self.targets for u in t.replicas})

    async def sync_once(self) -> None:
        await self._refresh_discovered()
        records = await self.releases.all()
        self.status.store_answered(round_ok=True)
        for name, rec in records.items():
            st = self.models.setdefault(name, ModelState())
            st.record = rec
            ready_per_target, serving = [], set()
            for t in self.targets:
                ready, serving_t = await self._sync_model(t, name, rec, st)
                ready_per_target.append(ready)
                serving |= serving_t
            st.ready = sorted_versions(set.intersection(*ready_per_target)) if ready_per_target else []
            st.serving = sorted_versions(serving)
        await self.publish_status()

    def _fail(self, st: ModelState, name: str, version: str, reason: str) -> None:
        record_failure(st, self.site, name, version, reason)

    async def _sync_model(self, t: Target, name: str, rec: ReleaseRecord, st: ModelState) -> tuple[set, set]:
        """Install, load, then retire for one model in one repository: (READY everywhere,
        READY somewhere) afterwards."""
        wanted = rec.wanted_versions(self.keep_previous)
        # A failure no longer matters once the version is not wanted (e.g. rolled back).
        for v in [v for v in st.failed if v not in wanted]:
            del st.failed[v]
        installed = await asyncio.to_thread(installed_versions, t, name)
        now = time.time()

        def backing_off(v: str) -> bool:
            f = st.failed.get(v)
            return f is not None and now < f.retry_at_s

        for v in wanted:
            if v in installed or backing_off(v):
                continue
            try:
                await self.installer.install(t, name, v, st)
                installed.add(v)
                st.failed.pop(v, None)
            except VersionRefused as exc:
                self._fail(st, name, v, str(exc))
        usable = [v for v in wanted if v in installed and not backing_off(v)]
        if not t.replicas:
            return set(usable), set(usable)
        indexes = await self.replicas.indexes(t)
        if not indexes:
            # No replica answers: nothing to load now; installed versions wait for them.
            return set(), set()
        ready, serving = ready_sets(indexes, name)
        if not usable:  # nothing new can be loaded: what serves keeps serving
            return ready, serving
        if not set(usable) <= ready:
            # Load the wanted versions alongside what serves now: nothing is dropped yet.
            load_set = set(usable) | (serving & installed)
            errors: dict[str, str] = {}
            for url in t.replicas:  # one at a time (step 2 above)
                errors |= await self.replicas.load(t, name, load_set, installed, st, replicas=[url])
                await self.replicas.wait_ready(t, name, set(usable), replicas=[url])
            indexes = await self.replicas.indexes(t)
            ready, serving = ready_sets(indexes, name)
            for v in usable:
                if v not in ready and indexes:
                    self._fail(st, name, v, not_ready_reason(indexes, name, v, errors))
            usable = [v for v in usable if v in ready]
        for v in usable:
            if v in ready:
                st.failed.pop(v, None)  # a retry that worked
        reachable = all(url in indexes for url in t.replicas)
        if usable and set(usable) <= ready and reachable and set(wanted) <= set(usable):
            return await self._retire(t, name, rec, st, set(usable), installed, ready, serving)
        return ready, serving

    async def _retire(self, t: Target, name: str, rec: ReleaseRecord, st: ModelState, usable: set[str],
                      installed: set[str], ready: set[str], serving: set[str]) -> tuple[set, set]:
        """Every wanted version is READY everywhere: unload the old ones once gateways no longer
        send them traffic (step 3), then delete their directories."""
        extras = (serving | installed) - usable
        if serving - usable:
            drop = frozenset(serving - usable)
            if not await self.retirement.may_retire(t, name, rec, drop, st):
                return ready, serving
            # One replica at a time: Triton reloads the model for the new config, and while
            # it does its readiness answers 400 and the model's requests can stall; the other
            # replicas keep serving meanwhile.
            for url in t.replicas:
                await self.replicas.load(t, name, usable, installed, st, replicas=[url])
                await self.replicas.wait_retired(url, name, drop)
            indexes = await self.replicas.indexes(t)
            ready, serving = ready_sets(indexes, name)
        if not (serving - usable):
            for v in sorted_versions(extras & installed):
                await asyncio.to_thread(remove_version, t, name, v)
        return ready, serving
