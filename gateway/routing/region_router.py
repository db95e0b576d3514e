"""Multi-region routing: which region serves a request, and where it fails over to.

    order regions     local-first: local, then peers by measured RTT (EWMA of health probes),
                      then distance; nearest-to-client: by the client's location
    health per region local: healthy fraction of the local pools; peers: their gateways'
                      readiness and replica counts (geo.region_health), each through a
                      FailbackHold so a recovered region takes traffic back only after
                      `routing.failback_hold_ms` of continuous health (no flapping)
    spill             Envoy priority levels: a region with healthy fraction h takes
                      min(1, 1.4 h) of the traffic reaching it, the rest goes down the order
    targets           the region drawn by those shares first, then the other healthy regions
                      in order (failover), then the unhealthy ones (panic: try everything once)

A request that arrived with ``geogate-hops >= 1`` came from a peer: it is served locally only,
so requests never loop or ping-pong between two sick regions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from core.config import Config
from gateway.routing.targets import TARGET_LOCAL, TARGET_PEER, Target
from geo.client_locator import ClientLocator, Location
from geo.region_health import RegionHealthMonitor
from geo.region_order import (
    MODE_NEAREST_TO_CLIENT,
    FailbackHold,
    client_distance_order,
    order_regions,
    spill_shares,
)

# Health (healthy fractions through the failback hold, RTTs) is re-read at most this often, and
# a plan (region order and shares) is reused for that long: they change on the probe cadence,
# not per request.
PLAN_CACHE_S = 0.05
# nearest-to-client: plans kept per client location within one health snapshot, and region
# orders by distance kept per client location across snapshots (they depend on the location
# only); both are dropped whole when full. Client locations are city-granular (GeoIP records).
CLIENT_PLANS_MAX = 4096
CLIENT_ORDERS_MAX = 65536


class RegionPlan:
    """Ordered regions and the share of traffic each takes, at one moment."""

    __slots__ = ("healthy", "ordered", "shares")

    def __init__(self, ordered: list[str], shares: dict[str, float], healthy: dict[str, bool]) -> None:
        self.ordered = ordered
        self.shares = shares
        self.healthy = healthy

    def draw_first(self, rng: random.Random) -> str:
        x = rng.random()
        acc = 0.0
        for name in self.ordered:
            acc += self.shares.get(name, 0.0)
            if x < acc:
                return name
        return self.ordered[0]


class MultiRegionRouter:
    def __init__(self, cfg: Config, local_region: str, *, local_fraction: Callable[[], float],
                 peers: RegionHealthMonitor | None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic, locator: ClientLocator | None = None) -> None:
        self.cfg = cfg
        self.local_region = local_region
        self.mode = cfg.routing.mode
        self.factor = cfg.routing.overprovisioning_factor
        self.local_fraction = local_fraction
        self.peers = peers
        self.locator = locator
        self.hold = FailbackHold(cfg.routing.failback_hold_ms, clock=clock)
        self._rng = rng or random.Random()
        self._clock = clock
        self._local_only = (Target(TARGET_LOCAL, local_region),)
        self._targets = {r.name: (Target(TARGET_LOCAL, r.name) if r.name == local_region
                                  else Target(TARGET_PEER, r.name, r.http))
                         for r in cfg.regions}
        self._snapshot: tuple[dict[str, bool], dict[str, float], dict[str, float]] | None = None
        self._snapshot_at = -1.0
        self._cached: RegionPlan | None = None  # the plan without a client location, this snapshot
        self._client_plans: dict[tuple, RegionPlan] = {}  # per client location, this snapshot
        self._client_orders: dict[tuple, list[str]] = {}  # per client location, distance order (no ties)

    # ------------------------------------------------------------ state

    def region_fractions(self) -> dict[str, float]:
        """Healthy fraction per region, before the failback hold."""
        fractions = {self.local_region: self.local_fraction()}
        if self.peers is not None:
            for name, state in self.peers.states.items():
                if name != self.local_region:
                    fractions[name] = state.healthy_fraction()
        return fractions

    def _health(self, now: float) -> tuple[dict[str, bool], dict[str, float], dict[str, float]]:
        """(healthy after the failback hold, effective healthy fraction, RTT) per region, re-read
        at most every PLAN_CACHE_S; a new snapshot drops the plans made from the old one."""
        if self._snapshot is not None and now - self._snapshot_at < PLAN_CACHE_S:
            return self._snapshot
        fractions = self.region_fractions()
        healthy = {name: self.hold.observe(name, h > 0.0, now) for name, h in fractions.items()}
        effective = {name: (h if healthy[name] else 0.0) for name, h in fractions.items()}
        rtt = self.peers.rtt_s() if self.peers is not None else {}
        rtt[self.local_region] = 0.0
        self._snapshot, self._snapshot_at = (healthy, effective, rtt), now
        self._cached = None
        self._client_plans.clear()
        return self._snapshot

    def plan(self, client: Location | None = None) -> RegionPlan:
        healthy, effective, rtt = self._health(self._clock())
        if self.mode != MODE_NEAREST_TO_CLIENT or client is None:
            if self._cached is None:
                ordered = order_regions(self.local_region, self.cfg.regions, client=client, rtt_s=rtt,
                                        mode=self.mode)
                self._cached = RegionPlan(ordered, spill_shares(ordered, effective, self.factor), healthy)
            return self._cached
        # nearest-to-client: one plan per client location and snapshot; the sort by distance
        # only once per location (order_regions again only where two regions tie on distance)
        key = (client.region, client.lat, client.lon)
        plan = self._client_plans.get(key)
        if plan is None:
            ordered = self._client_orders.get(key)
            if ordered is None:
                ordered, ties = client_distance_order(self.cfg.regions, client)
                if ties:
                    ordered = order_regions(self.local_region, self.cfg.regions, client=client, rtt_s=rtt,
                                            mode=self.mode)
                else:
                    if len(self._client_orders) >= CLIENT_ORDERS_MAX:
                        self._client_orders.clear()
                    self._client_orders[key] = ordered
            plan = RegionPlan(ordered, spill_shares(ordered, effective, self.factor), healthy)
            if len(self._client_plans) >= CLIENT_PLANS_MAX:
                self._client_plans.clear()
            self._client_plans[key] = plan
        return plan

    # ------------------------------------------------------------ per request

    def targets(self, model: str, version: str | None, hops: int, *,
                client: Location | None = None) -> tuple[Target, ...]:
        if hops >= 1 or len(self.cfg.regions) <= 1:
            return self._local_only
        plan = self.plan(client)
        first = plan.draw_first(self._rng)
        rest_healthy = [n for n in plan.ordered if n != first and plan.healthy.get(n)]
        rest_unhealthy = [n for n in plan.ordered if n != first and not plan.healthy.get(n)]
        return tuple(self._targets[n] for n in (first, *rest_healthy, *rest_unhealthy) if n in self._targets)

    def targets_for(self, call) -> tuple[Target, ...]:
        """`targets` for an InferCall; the client is located only in nearest-to-client mode."""
        client = None
        if self.mode == MODE_NEAREST_TO_CLIENT and self.locator is not None and call.hops == 0 and call.client_ip:
            client = self.locator.locate(call.client_ip, call.forwarded_for)
        return self.targets(call.model, call.version, call.hops, client=client)

    def snapshot(self) -> dict:
        plan = self.plan()
        return {"mode": self.mode, "order": plan.ordered,
                "shares": {k: round(v, 4) for k, v in plan.shares.items()},
                "healthy": plan.healthy,
                "held_s": {n: round(self.hold.held_for_s(n), 2) for n in plan.ordered}}
