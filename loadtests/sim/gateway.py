"""One region's gateway, composed from the product's own objects on the simulated clock.

What ``gateway.server.composition.GatewayState`` wires for a live gateway, minus sockets, metrics
and logs:

    pools      gateway.upstream.pool.RegionPools (replica states, P2C load stats, eligibility cache,
               outlier detector, active-health rise/fall through ActiveHealthChecker.record);
               clients are None: the simulation answers for the replicas
    peers      geo.region_health.RegionHealthMonitor over the other regions' gateways (rise/fall,
               RTT EWMA, their summaries: healthy fraction and advertised load)
    router     gateway.routing.region_router.MultiRegionRouter (region order, spill shares, failback hold)
    capacity   gateway.routing.capacity.CapacityTracker + gateway.routing.admission.AdmissionController +
               gateway.routing.load_spill.LoadSpill inside gateway.routing.admission.OverloadGuard (what
               gateway.routing.capacity.CapacityControl builds), sampled by gateway.routing.capacity.sample_gateway
    budget     gateway.routing.retry_budget.RetryBudget

Every object gets the simulation's clock (``now_s`` arguments, or ``clock=``) and a seeded
random generator, so a run is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from core.config import Config
from gateway.routing.admission import AdmissionController, OverloadGuard
from gateway.routing.capacity import CapacityTracker, sample_gateway
from gateway.routing.load_spill import LoadSpill, peer_loads
from gateway.routing.region_router import MultiRegionRouter
from gateway.routing.retry_budget import RetryBudget
from gateway.upstream.pool import RegionPools, Upstream
from geo.region_health import RegionHealthMonitor
from health.active import ProbeResult
from health.replica_state import ReplicaState

MS_PER_S = 1000.0


class SimGateway:
    def __init__(self, cfg: Config, region: str, clock: Callable[[], float], seed: int) -> None:
        self.cfg = cfg
        self.name = region
        self.section = cfg.region(region)
        self.clock = clock
        self.alive = True
        self.pools = RegionPools(cfg, self.section, on_eject=self._on_eject, client_factory=_no_client)
        for pool in self.pools.pools:
            pool.start()  # static replica lists: adds every member, no I/O
        self.upstreams: dict[str, Upstream] = {u.state.url: u for u in self.pools.upstreams()}
        d = cfg.dns
        peers = [r for r in cfg.regions if r.name != region]
        self.peer_down: set[str] = set()  # what PeerLinks.mark would hold: peers the monitor withdrew
        self.monitor = RegionHealthMonitor(peers, interval_ms=d.check_interval_ms, timeout_ms=d.check_timeout_ms,
                                           fall=d.fall, rise=d.rise, on_change=self._on_peer_change, clock=clock)
        self.router = MultiRegionRouter(cfg, region, local_fraction=self.local_fraction, peers=self.monitor,
                                        rng=random.Random(seed), clock=clock)
        sec = cfg.capacity
        self.tracker = CapacityTracker(sec, region=region, clock=clock)
        self.admission = AdmissionController(sec, region=region)
        self.spill = LoadSpill(sec, clock=clock, rng=random.Random(seed + 1))
        self.guard = OverloadGuard(self.admission, self.tracker, self.spill,
                                   lambda: peer_loads(self.monitor, region, clock()), has_peers=bool(peers))
        g = cfg.gateway
        self.budget = RetryBudget(percent=g.retry_budget_percent, min_per_s=g.retry_budget_min_per_s, clock=clock)
        self.rng = random.Random(seed + 2)
        self.ejections = 0

    # ------------------------------------------------------------------ product callbacks

    def _on_eject(self, state: ReplicaState) -> None:
        self.pools.invalidate()  # what GatewayState._on_eject does, minus metrics and the log
        self.ejections += 1

    def _on_peer_change(self, state) -> None:
        if state.healthy:
            self.peer_down.discard(state.name)
        else:
            self.peer_down.add(state.name)

    def local_fraction(self) -> float:
        return self.pools.healthy_fraction(self.clock())  # what GatewayState.local_fraction reads

    # ------------------------------------------------------------------ simulated inputs

    def probe_replica(self, url: str, ok: bool, now_s: float, rtt_s: float = 0.001,
                      ready: dict[str, set[str]] | None = None) -> None:
        """One active health probe of a replica, as the probe loop would apply it."""
        up = self.upstreams[url]
        if ok:
            result = ProbeResult(ok=True, ready_versions=ready or {}, versions_known=ready is not None, rtt_s=rtt_s)
        else:
            result = ProbeResult(ok=False, cause="connect refused", reason="connect refused")
        if self.pools.checker.record(up.state, result, now_s):
            self.pools.replica_health_changed(up.state)

    def sample_capacity(self, now_s: float) -> None:
        """The capacity sampler's timer: pools' in-flight into the tracker, then the guard."""
        sample_gateway(self.tracker, self, now_s)
        self.guard.refresh(now_s)

    def summary(self, now_s: float) -> dict:
        """The parts of the region summary peers read (replica counts, advertised load)."""
        states = self.pools.all_states()
        healthy = sum(1 for s in states if s.routable(now_s)[0])
        load = self.tracker.region_load()
        load["spilling"] = self.spill.spilling
        return {"region": self.name, "ready": healthy > 0, "replicas": {"healthy": healthy, "total": len(states)},
                "load": load}


def _no_client(state: ReplicaState) -> None:
    return None
