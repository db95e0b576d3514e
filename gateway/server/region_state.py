"""One gateway worker's view of its region: replica pools, region order and peers, capacity,
the forwarder, model versions, readiness and recent events.

Built by the composition root (gateway.server.composition) with its collaborators passed in;
read by the fronts (readiness, "model known?", version resolution), the admin listener (region
summary, status page) and the drain; ``gateway.server.main`` owns its lifecycle
(start -> serve -> drain -> close).
"""

from __future__ import annotations

import collections
import logging
import time

import grpc

from core.config import Config, RegionSection
from core.tls import LinkTls
from gateway.front.access_log import AccessLog
from gateway.routing.forwarder import Forwarder
from gateway.routing.load_window import LoadWindow
from gateway.routing.sequences import SequenceRouter
from gateway.routing.targets import Router
from gateway.server.metrics import GatewayMetrics
from gateway.upstream.catalog import ModelCatalog
from gateway.upstream.peer_links import PeerLinks
from gateway.upstream.pool import RegionPools
from gateway.upstream.types import Reply
from health.outcomes import Outcome
from health.replica_state import ReplicaState
from replicas.releases.resolver import VersionResolver

log = logging.getLogger("geogate.gateway")

REASON_DRAINING = "draining: the gateway is shutting down"
READY_CACHE_S = 0.05  # how long "is this version ready here" is reused across requests
MAX_EVENTS = 200  # recent events this worker remembers (status page, geogate status)
# A burst of requests served by another region is one "failover" event, not one per request.
CROSS_REGION_EVENT_QUIET_S = 10.0


class RegionState:
    def __init__(self, cfg: Config, region: RegionSection, *, metrics: GatewayMetrics, access_log: AccessLog,
                 resolver: VersionResolver, links: LinkTls, worker: int = 0, workers: int = 1) -> None:
        self.cfg = cfg
        self.region = region
        self.worker = worker
        # Worker processes sharing the ports: each sees about 1/workers of the region's load.
        self.workers = max(1, workers)
        self.metrics = metrics
        self.load = LoadWindow()
        self.access_log = access_log
        self.links = links
        self.pools = RegionPools(cfg, region, tls=links.upstream, on_health_change=self._on_health_change,
                                 on_eject=self._on_eject, on_member_change=self._on_member)
        self.events: collections.deque[dict] = collections.deque(maxlen=MAX_EVENTS)
        self.region_monitor = None
        self.peers: PeerLinks | None = None
        self.locator = None
        self.router = self._make_router()
        # The fronts read the client's address only when routing depends on it.
        self.locate_clients = len(cfg.regions) > 1 and cfg.routing.mode == "nearest-to-client"
        # A model this region has never heard of may still be served by a peer region.
        self.multi_region = len(cfg.regions) > 1
        self.catalog = ModelCatalog(self.pools)
        self.capacity_control = self._make_capacity()
        self.capacity = self.capacity_control.tracker if self.capacity_control else None
        self.overload = self.capacity_control.guard if self.capacity_control else None
        self.forwarder = Forwarder(self.pools, cfg.gateway, self.metrics, self.router, self.load, self.peers,
                                   capacity=self.capacity, overload=self.overload,
                                   sequences=SequenceRouter(self.pools, self.metrics, config_of=self.catalog.config))
        self.forwarder.on_cross_region = self._on_cross_region
        self._last_cross_event: dict[str, float] = {}
        self._ready_cache: dict[tuple[str, str], tuple[float, bool]] = {}
        self.resolver = resolver  # model versions from the store's release records (replicas.releases)
        self.draining = False
        self.started_s = time.monotonic()

    def _make_router(self):
        """One region: the local pools only. Several: peers are health-checked (readiness and
        region summary, RTT EWMA) and requests fail over / spill to them (region_router)."""
        if len(self.cfg.regions) <= 1:
            return Router(self.region.name)
        from gateway.routing.region_router import MultiRegionRouter
        from geo.client_locator import ClientLocator
        from geo.region_health import RegionHealthMonitor

        d = self.cfg.dns
        peers = [r for r in self.cfg.regions if r.name != self.region.name]
        peer_tls = self.links.peers
        self.region_monitor = RegionHealthMonitor(peers, interval_ms=d.check_interval_ms,
                                                  timeout_ms=d.check_timeout_ms, fall=d.fall, rise=d.rise,
                                                  on_change=self._on_peer_change,
                                                  ssl_context=peer_tls.ssl_context if peer_tls else None)
        self.peers = PeerLinks(self.cfg, self.region.name, tls=peer_tls)
        routing = self.cfg.routing
        mmdb = self.cfg.resolve_path(routing.geoip_database) if routing.geoip_database else ""
        self.locator = ClientLocator(self.cfg.regions, mmdb_path=mmdb, trusted_proxies=routing.trusted_proxies)
        return MultiRegionRouter(self.cfg, self.region.name, local_fraction=self.local_fraction,
                                 peers=self.region_monitor, locator=self.locator)

    def _make_capacity(self):
        """Capacity tracking, admission and load-aware spill (gateway.routing.capacity), unless
        ``[capacity] enabled = false``. Peers' advertised load comes from the region monitor's
        summaries."""
        if not self.cfg.capacity.enabled:
            return None
        from gateway.routing.capacity import CapacityControl
        from gateway.routing.load_spill import peer_loads

        monitor = self.region_monitor
        peers = (lambda: peer_loads(monitor, self.region.name)) if monitor is not None else None
        return CapacityControl(self.cfg.capacity, region=self.region.name, registry=self.metrics.registry,
                               peers=peers, has_peers=monitor is not None, workers=self.workers)

    def local_fraction(self) -> float:
        """Healthy fraction of this region's replicas (0 while draining: send everything away)."""
        if self.draining:
            return 0.0
        return self.pools.healthy_fraction(time.monotonic())

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.access_log.start()
        await self.pools.start()
        if self.peers is not None:
            self.peers.start()
        if self.region_monitor is not None:
            await self.region_monitor.start()
        if self.capacity_control is not None:
            self.capacity_control.start(self)
        try:
            await self.resolver.start()
        except Exception as exc:  # a store problem must not stop the data path: it retries itself
            log.warning("version resolver failed to start (%s); forwarding requested versions until it reads "
                        "the release records", exc)

    async def close(self) -> None:
        if self.capacity_control is not None:
            await self.capacity_control.close()
        try:
            await self.resolver.close()
        except Exception:
            log.exception("version resolver close failed")
        if self.region_monitor is not None:
            await self.region_monitor.close()
        if self.peers is not None:
            await self.peers.close()
        if self.locator is not None:
            self.locator.close()
        await self.pools.close()
        await self.access_log.close()

    # ------------------------------------------------------------------ callbacks

    def _on_health_change(self, state: ReplicaState) -> None:
        # Eligibility recomputed; a replica back from the dead starts with a clean latency
        # record and without its old ejection (RegionPools.replica_health_changed).
        self.pools.replica_health_changed(state)
        self.metrics.health(state.pool, state.url, state.healthy)
        log.info("replica %s is now %s%s", state.url, "healthy" if state.healthy else "unhealthy",
                 "" if state.healthy else f" ({state.health_reason})")

    def _on_eject(self, state: ReplicaState) -> None:
        self.pools.invalidate()
        self.metrics.ejected(state.url)
        log.warning("replica %s ejected: %s", state.url, state.eject_reason)

    def _on_peer_change(self, state) -> None:
        self.metrics.peer_health(state.name, state.healthy)
        if self.peers is not None:
            self.peers.mark(state.name, state.healthy, state.reason)
        verb = "healthy" if state.healthy else f"unhealthy ({state.reason})"
        self.event("region", f"peer region {state.name} is {verb}")
        log.info("peer region %s is now %s", state.name, verb)

    def _on_cross_region(self, to_region: str, reply: Reply, why: str) -> None:
        now = time.monotonic()
        if now - self._last_cross_event.get(to_region, -1e9) < CROSS_REGION_EVENT_QUIET_S:
            return
        self._last_cross_event[to_region] = now
        why = why or "local replicas failed or the spill rule sent it"
        self.event("failover", f"requests from {self.region.name} served by {to_region} ({why})")
        log.warning("sending requests to region %s: %s", to_region, why)

    def event(self, kind: str, message: str) -> None:
        self.events.append({"time": time.time(), "kind": kind, "message": message, "region": self.region.name})

    def _on_member(self, up, added: bool) -> None:
        self.metrics.health(up.state.pool, up.state.url, up.state.healthy if added else False)

    # ------------------------------------------------------------------ answers

    def readiness(self) -> tuple[bool, str]:
        """(can this region serve?, why not)."""
        if self.draining:
            return False, REASON_DRAINING
        now = time.monotonic()
        states = self.pools.all_states()
        if any(s.routable(now)[0] for s in states):
            return True, ""
        if not states:
            return False, f"region {self.region.name!r} has no replicas"
        reasons = []
        for pool in self.pools.pools:
            counts: dict[str, int] = {}
            for s in pool.states:
                d = s.unroutable_detail(now) or "unknown"
                counts[d] = counts.get(d, 0) + 1
            detail = ", ".join(f"{n} {c}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            reasons.append(f"pool {pool.name!r}: {len(pool.states)} replicas, none routable ({detail})")
        return False, f"no routable replica in region {self.region.name!r}: " + "; ".join(reasons)

    def resolve_version(self, model: str, requested: str | None) -> str | None:
        try:
            # _ready_here: the sites may say a new stable is ready before this gateway's own
            # health checks (they poll) have seen it on a routable replica.
            return self.resolver.resolve(model, requested, self.region.name, self._ready_here).version
        except Exception as exc:
            log.warning("version resolver failed for %r (%s); using the requested version", model, exc)
            return requested

    def _ready_here(self, model: str, version: str) -> bool:
        """Is `version` READY on a routable local replica? Cached briefly: asked per request."""
        now = time.monotonic()
        key = (model, version)
        hit = self._ready_cache.get(key)
        if hit is not None and now < hit[0]:
            return hit[1]
        ready = any(st.routable(now)[0] and version in st.ready_versions.get(model, ())
                    for st in self.pools.all_states())
        self._ready_cache[key] = (now + READY_CACHE_S, ready)
        return ready

    def unknown_model(self, model: str, version: str | None, hops: int = 0) -> Reply | None:
        """A 404 / NOT_FOUND reply when no replica has the model (version), else None. With
        peers, only for requests that cannot go to another region (hops >= 1): the local
        replicas may simply be down, and a peer then answers (or says 404 itself)."""
        if self.multi_region and hops == 0:
            return None
        known = self.pools.model_known(model, version)
        if known is False:
            if version is None or self.pools.model_known(model, None) is False:
                msg = f"Request for unknown model: '{model}' is not found"
            else:
                msg = f"Request for unknown model: '{model}' version {version} is not found"
            return Reply(Outcome.CLIENT_ERROR, 404, grpc.StatusCode.NOT_FOUND, message=msg)
        return None
