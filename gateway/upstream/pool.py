"""The region's replica pools: for every replica its health (``health.ReplicaState``), its load
(``gateway.upstream.load_stats.LoadStats``) and its client (HTTP session or gRPC channel).

Membership comes from the config (a static list of URLs) or from DNS SRV discovery
(``core.srv_discovery.SrvDiscovery``): a discovered replica joins unhealthy and takes traffic only
after its first successful health check; a replica that vanishes from DNS is marked draining
(no new requests), and its client is closed once its last request has finished.

Load signals: pools with ``metrics_scrape = true`` have their replicas' /metrics scraped on a
timer (``gateway.upstream.load_signals``, one scraper per worker); each reading goes into the replica's
``LoadStats`` (the P2C cost counts the replica's queue with the outstanding requests) and into
its snapshot (``queue_depth`` in the region summary).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from core.config import Config, GatewaySection, PoolSection, RegionSection
from core.tls import ClientTls
from gateway.upstream.grpc_upstream import GrpcUpstream
from gateway.upstream.http_upstream import HttpUpstream, make_session
from gateway.upstream.load_signals import LoadSignals, ReplicaLoad
from gateway.upstream.load_stats import LoadStats
from health.active import ActiveHealthChecker
from health.outlier import OutlierDetector
from health.replica_state import ReplicaState
from health.selection import eligible, healthy_fraction

log = logging.getLogger("geogate.gateway.pool")

SRV_PREFIX = "dns+srv://"
DRAIN_POLL_S = 0.2
CANDIDATES_TTL_S = 0.05  # model_known answers are reused this long
# Eligibility (candidates, healthy fraction) is cached until a health, ejection or membership
# change invalidates it or the first ejection in the region expires; and never longer than this.
CANDIDATES_MAX_AGE_S = 1.0
CANDIDATES_CACHE_MAX = 1024
HEALTHY_FRACTION_KEY = ("healthy fraction",)


class PooledReplica(ReplicaState):
    """A replica's health state plus, in pools with ``metrics_scrape``, its last load-signal
    reading, which its snapshot shows (the queue the balancer scores with, or why none)."""

    load_signal: ReplicaLoad | None = None
    load_signal_valid_until_s: float = 0.0  # time.monotonic(); the reading is stale after it
    upstream: Upstream | None = None  # set by ReplicaPool.add

    def snapshot(self, now_s: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now_s is None else now_s
        snap = super().snapshot(now)
        up = self.upstream
        if up is not None:
            # This worker's attempts in flight and (HTTP) its connection pool: both back to
            # in_flight 0 / busy 0 whenever no request is in flight, whatever failed before.
            snap["in_flight"] = up.load.outstanding
            pool = getattr(up.client, "pool", None)
            if pool is not None:
                snap["connections"] = pool.stats()
        ld = self.load_signal
        if ld is not None:
            fresh = now < self.load_signal_valid_until_s
            snap["queue_depth"] = round(ld.queue_depth, 3) if fresh else None  # None: not scored with
            snap["load_signal"] = {"metrics_url": ld.metrics_url, "fresh": fresh,
                                   "age_s": round(now - ld.updated_s, 3) if ld.updated_s else None,
                                   "error": ld.error}
        return snap


class Upstream:
    """One replica as the data path sees it."""

    __slots__ = ("client", "load", "pool", "state")

    def __init__(self, state: ReplicaState, client, pool: ReplicaPool) -> None:
        self.state = state
        self.client = client
        self.load = LoadStats()
        self.pool = pool

    @property
    def url(self) -> str:
        return self.state.url


class ReplicaPool:
    def __init__(self, section: PoolSection, region: str, owner: RegionPools) -> None:
        self.section = section
        self.name = section.name
        self.kind = section.kind
        self.region = region
        self.owner = owner
        self.members: dict[str, Upstream] = {}
        self.states: list[ReplicaState] = []  # rebuilt on every membership change
        self._by_state: dict[ReplicaState, Upstream] = {}
        self.discovery = None
        self._watch_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ membership

    def _rebuild(self) -> None:
        self.states = [u.state for u in self.members.values()]
        self._by_state = {u.state: u for u in self.members.values()}

    def upstream_of(self, state: ReplicaState) -> Upstream | None:
        return self._by_state.get(state)

    def add(self, url: str, weight: int = 1) -> Upstream:
        existing = self.members.get(url)
        if existing is not None:
            existing.state.weight = max(1, weight)
            if existing.state.draining:  # came back before it finished draining
                existing.state.draining = False
                self.owner.invalidate()
                self.owner.checker.add(existing.state)
                log.info("replica %s is back in discovery; no longer draining", url)
            return existing
        state = PooledReplica(url=url, weight=weight, pool=self.name, kind=self.kind)
        up = Upstream(state, self.owner.make_client(state), self)
        state.upstream = up
        self.members[url] = up
        self._rebuild()
        self.owner.checker.add(state)
        self.owner.on_member_change(up, added=True)
        return up

    def drain(self, url: str) -> None:
        """Stop sending new requests to `url`; forget it once its requests have finished."""
        up = self.members.get(url)
        if up is None or up.state.draining:
            return
        up.state.draining = True
        self.owner.invalidate()
        self.owner.checker.remove(url)
        log.info("replica %s left pool %r; draining %d in-flight requests", url, self.name,
                 up.load.outstanding)
        asyncio.get_running_loop().create_task(self._forget_when_idle(up))

    async def _forget_when_idle(self, up: Upstream) -> None:
        deadline = time.monotonic() + self.owner.gw.drain_timeout_ms / 1000.0
        # Polled: `outstanding` is a plain counter on the hot path, not worth an Event per request.
        while up.load.outstanding > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)
        if not up.state.draining or self.members.get(up.url) is not up:
            return  # rejoined meanwhile
        del self.members[up.url]
        self._rebuild()
        self.owner.on_member_change(up, added=False)
        await up.client.close()

    async def apply_discovery(self, found: list[tuple[str, int]]) -> None:
        urls = {url: weight for url, weight in found}
        for url, weight in urls.items():
            self.add(url, weight)
        for url in list(self.members):
            if url not in urls:
                self.drain(url)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        sec = self.section
        if sec.replicas:
            for url in sec.replicas:
                self.add(url, sec.weights.get(url, 1))
            return
        from core.srv_discovery import SrvDiscovery  # only pools that discover need it

        name = sec.discover[len(SRV_PREFIX):]
        self.discovery = SrvDiscovery(name, sec.discover_scheme, resolver=sec.discover_resolver,
                                      interval_s=self.owner.gw.discovery_interval_ms / 1000.0)
        self._watch_task = asyncio.get_running_loop().create_task(
            self.discovery.watch(self.apply_discovery), name=f"discovery {sec.discover}")

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        for up in list(self.members.values()):
            await up.client.close()


class Candidates:
    """The replicas that may take one request, or why none can."""

    __slots__ = ("detail", "panic", "reason", "upstreams")

    def __init__(self, upstreams: list[Upstream], reason: str, panic: bool, detail: str = "") -> None:
        self.upstreams = upstreams
        self.reason = reason
        self.panic = panic
        self.detail = detail  # panic routing: why


class RegionPools:
    def __init__(self, cfg: Config, region: RegionSection, *,
                 on_health_change: Callable[[ReplicaState], None] | None = None,
                 on_eject: Callable[[ReplicaState], None] | None = None,
                 on_member_change: Callable[[Upstream, bool], None] | None = None,
                 client_factory: Callable[[ReplicaState], Any] | None = None,
                 tls: ClientTls | None = None) -> None:
        self.cfg = cfg
        self.tls = tls  # [tls.upstream]: replicas serve TLS (data path and health checks); None: plaintext
        # Makes each replica's client; None: HTTP session / gRPC channel (`make_client`). The
        # simulation (loadtests.sim) passes its own: no sockets for a planet of replicas.
        self._client_factory = client_factory
        self.region = region
        self.gw: GatewaySection = cfg.gateway
        self.panic_threshold = cfg.health.panic_threshold
        self.checker = ActiveHealthChecker(cfg.health, tls=tls, on_change=self._health_hook(on_health_change))
        self.detector = OutlierDetector(cfg.health, on_eject=self._eject_hook(on_eject))
        self._on_member_change = on_member_change
        self.session: aiohttp.ClientSession | None = None
        self.pools = [ReplicaPool(p, region.name, self) for p in region.pools]
        self._cache: dict[tuple, tuple[float, Candidates]] = {}
        self.load_signals: LoadSignals | None = None  # while pools with metrics_scrape exist

    def _health_hook(self, on_health_change):
        """Every health flip drops cached eligibility, whoever else listens."""
        def changed(state: ReplicaState):
            self.invalidate()
            return on_health_change(state) if on_health_change is not None else None
        return changed

    def _eject_hook(self, on_eject):
        def ejected(state: ReplicaState) -> None:
            self.invalidate()
            if on_eject is not None:
                on_eject(state)
        return ejected

    def make_client(self, state: ReplicaState):
        if self._client_factory is not None:
            return self._client_factory(state)
        if state.scheme == "http":
            assert self.session is not None
            return HttpUpstream(state.address, self.session,
                                connections=self.gw.upstream_connections_per_replica, tls=self.tls)
        return GrpcUpstream(state.address, tls=self.tls)

    def on_member_change(self, up: Upstream, added: bool) -> None:
        self.invalidate()
        if self._on_member_change is not None:
            self._on_member_change(up, added)

    async def start(self) -> None:
        self.session = make_session(self.gw.upstream_connections_per_replica)
        for pool in self.pools:
            pool.start()
        await self.checker.start()
        self.load_signals = LoadSignals.for_region(self, on_sample=self._on_load_sample)
        if self.load_signals is not None:
            await self.load_signals.start()

    def _on_load_sample(self, load: ReplicaLoad, valid_until_s: float) -> None:
        """A replica's queue depth, scraped (valid_until_s 0: the scrape failed): into the
        balancer's cost and the replica's snapshot."""
        for pool in self.pools:
            up = pool.members.get(load.url)
            if up is None:
                continue
            up.load.set_queue_depth(load.queue_depth, valid_until_s)
            if isinstance(up.state, PooledReplica):
                up.state.load_signal = load
                up.state.load_signal_valid_until_s = valid_until_s

    async def close(self) -> None:
        if self.load_signals is not None:
            await self.load_signals.close()
        await self.checker.close()
        for pool in self.pools:
            await pool.close()
        if self.session is not None:
            await self.session.close()

    # ------------------------------------------------------------------ queries

    def upstreams(self) -> list[Upstream]:
        return [u for p in self.pools for u in p.members.values()]

    def all_states(self) -> list[ReplicaState]:
        return [s for p in self.pools for s in p.states]

    def replica_health_changed(self, state: ReplicaState) -> None:
        """A replica's active health flipped (or its ready versions changed): eligibility is
        recomputed; a replica that is healthy again starts with a clean latency record and,
        like Envoy's successful_active_health_check_uneject_host, without the ejection its
        old failures earned (it was restarted)."""
        self.invalidate()
        if not state.healthy:
            return
        for pool in self.pools:
            up = pool.upstream_of(state)
            if up is not None:
                up.load.reset()
        if state.ejected_until_s:
            state.ejected_until_s = 0.0
            state.eject_reason = ""

    def invalidate(self) -> None:
        """Forget cached eligibility (health, ejection or membership changed)."""
        self._cache.clear()

    def candidates(self, model: str, version: str | None, scheme: str, now_s: float) -> Candidates:
        """Eligible replicas over every pool of the region, those speaking the client's protocol
        first (bytes pass through; the others need translation). Cached until a health,
        ejection or membership change drops it, or the first ejection in the region expires
        (the only change that comes by itself), at most CANDIDATES_MAX_AGE_S: the hot path
        does not walk the pool per request, nor every few milliseconds."""
        key = (model, version, scheme)
        hit = self._cache.get(key)
        if hit is not None and now_s < hit[0]:
            return hit[1]
        cands = self._candidates(model, version, scheme, now_s)
        if len(self._cache) > CANDIDATES_CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (self._valid_until(now_s), cands)
        return cands

    def healthy_fraction(self, now_s: float) -> float:
        """Routable replicas / replicas not draining over the region (``health.selection``),
        cached like `candidates`."""
        hit = self._cache.get(HEALTHY_FRACTION_KEY)
        if hit is not None and now_s < hit[0]:
            return hit[1]  # type: ignore[return-value]
        fraction = healthy_fraction(self.all_states(), now_s)
        self._cache[HEALTHY_FRACTION_KEY] = (self._valid_until(now_s), fraction)  # type: ignore[assignment]
        return fraction

    def _valid_until(self, now_s: float) -> float:
        until = now_s + CANDIDATES_MAX_AGE_S
        for pool in self.pools:
            for st in pool.states:
                if now_s < st.ejected_until_s < until:
                    until = st.ejected_until_s
        return until

    def _candidates(self, model: str, version: str | None, scheme: str, now_s: float) -> Candidates:
        same: list[Upstream] = []
        other: list[Upstream] = []
        reasons: list[str] = []
        panic = False
        details: list[str] = []
        for pool in self.pools:
            e = eligible(pool.states, model, version, now_s, self.panic_threshold)
            if not e.replicas:
                reasons.append(e.reason)
                continue
            panic = panic or e.panic
            if e.panic and e.detail:
                details.append(e.detail)
            by_state = pool._by_state
            for st in e.replicas:
                up = by_state.get(st)
                if up is not None:
                    (same if st.scheme == scheme else other).append(up)
        return Candidates(same or other, "; ".join(r for r in reasons if r), panic, "; ".join(details))

    def model_known(self, model: str, version: str | None) -> bool | None:
        """True: some replica (healthy or not) lists the model (version) as ready; False: every
        replica's index is known and none has it; None: cannot tell (no index read yet).
        Cached like `candidates` (ready versions only change through health callbacks)."""
        key = ("known", model, version)
        hit = self._cache.get(key)
        now_s = time.monotonic()
        if hit is not None and now_s < hit[0]:
            return hit[1]  # type: ignore[return-value]
        known = self._model_known(model, version)
        self._cache[key] = (now_s + CANDIDATES_TTL_S, known)  # type: ignore[assignment]
        return known

    def _model_known(self, model: str, version: str | None) -> bool | None:
        unknown_index = False
        for st in self.all_states():
            if not st.ready_versions_known:
                unknown_index = True
                continue
            versions = st.ready_versions.get(model)
            if versions and (version is None or version in versions):
                return True
        return None if unknown_index else False

    def ready_versions(self) -> dict[str, set[str]]:
        """model -> versions READY on at least one routable replica."""
        now = time.monotonic()
        out: dict[str, set[str]] = {}
        for st in self.all_states():
            if st.routable(now)[0]:
                for m, vs in st.ready_versions.items():
                    out.setdefault(m, set()).update(vs)
        return out
