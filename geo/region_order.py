"""Region ordering and spill shares: pure functions the gateway and GeoDNS call.

``order_regions`` decides which region a request tries first, second, ...;
``spill_shares`` decides how much of the traffic each region in that order takes, given how
healthy it is (Envoy's priority-level load computation); ``FailbackHold`` keeps a region that
just recovered out of rotation until it has stayed healthy for a while (no flapping).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from geo.client_locator import Location
from geo.distance import great_circle_km

MODE_LOCAL_FIRST = "local-first"
MODE_NEAREST_TO_CLIENT = "nearest-to-client"

# Envoy's default overprovisioning factor (1.4): a region 72% healthy still takes all its traffic.
DEFAULT_OVERPROVISIONING_FACTOR = 1.4


def _location(region: Any) -> tuple[float, float]:
    return float(region.location[0]), float(region.location[1])


def order_regions(local: str, regions: Sequence[Any], *, client: Location | None,
                  rtt_s: Mapping[str, float], mode: str) -> list[str]:
    """Region names in the order to try them.

    ``regions``: objects with ``name`` and ``location`` (``core.config.RegionSection``),
    in configured order.  ``rtt_s``: measured round trip (EWMA of health probes) per region.

    - ``local-first``: ``local``, then the others by measured RTT (unmeasured ones last), ties
      and unmeasured by great-circle distance from the local region.  With no (known) local
      region and nothing measured, the configured order is kept (sorts are stable).
    - ``nearest-to-client``: a CIDR-table hit (``client.region``) first, then by great-circle
      distance from the client, ties by measured RTT.  Unknown client: ``local-first``.
    """
    by_name = {r.name: r for r in regions}
    if mode == MODE_NEAREST_TO_CLIENT and client is not None:
        here = (client.lat, client.lon)

        def client_key(r: Any) -> tuple[bool, float, float]:
            return (r.name != client.region, great_circle_km(here, _location(r)),
                    rtt_s.get(r.name, math.inf))

        return [r.name for r in sorted(regions, key=client_key)]
    if mode not in (MODE_LOCAL_FIRST, MODE_NEAREST_TO_CLIENT):
        raise ValueError(f"routing mode must be {MODE_LOCAL_FIRST!r} or {MODE_NEAREST_TO_CLIENT!r}, got {mode!r}")
    home = by_name.get(local)
    others = [r for r in regions if r.name != local]

    def local_key(r: Any) -> tuple[float, float]:
        distance = great_circle_km(_location(home), _location(r)) if home is not None else 0.0
        return rtt_s.get(r.name, math.inf), distance

    ordered = sorted(others, key=local_key)
    return ([local] if home is not None else []) + [r.name for r in ordered]


def client_distance_order(regions: Sequence[Any], client: Location) -> tuple[list[str], bool]:
    """The part of ``nearest-to-client`` ordering that depends on the client's location alone:
    region names by (not the client's CIDR-table region, great-circle distance), and whether two
    regions tie on that key (only then does the measured RTT, the last key, change the order)."""
    here = (client.lat, client.lon)
    keyed = sorted(((r.name != client.region, great_circle_km(here, _location(r))), r.name) for r in regions)
    ties = any(a[0] == b[0] for a, b in itertools.pairwise(keyed))
    return [name for _, name in keyed], ties


def spill_shares(ordered: Sequence[str], healthy_fraction: Mapping[str, float],
                 factor: float = DEFAULT_OVERPROVISIONING_FACTOR) -> dict[str, float]:
    """Share of traffic (0..1, summing to 1) each region in ``ordered`` takes.

    Envoy's priority levels (``LoadBalancerBase::recalculatePerPriorityState``): a region's
    *availability* is ``min(1, factor * h)`` for healthy fraction ``h``.  Going down the order,
    each region takes its availability of what is left, the rest spills to the next one
    (h=0.5: 0.7 stays, 0.3 spills).  When the availabilities add up to less than 1 (too little
    healthy capacity anywhere), they are normalised by their sum so all traffic is still
    placed in proportion; a region at h=0 takes nothing (a full outage fails over
    completely).  When nothing is healthy at all, everything goes to the first region, as
    Envoy does (the caller's panic routing decides what happens there).  Envoy works in
    integer percent; this uses floats, so shares are exact.
    """
    shares = dict.fromkeys(ordered, 0.0)
    if not ordered:
        return shares
    availability = [min(1.0, factor * max(0.0, min(1.0, healthy_fraction.get(n, 0.0)))) for n in ordered]
    total = min(1.0, sum(availability))
    if total <= 0.0:
        shares[ordered[0]] = 1.0
        return shares
    left = 1.0
    for name, avail in zip(ordered, availability, strict=True):
        take = min(left, avail / total)
        shares[name] = take
        left -= take
        if left <= 0.0:
            break
    if left > 1e-12:  # float rounding only: give the crumb to the first region taking traffic
        first = next(n for n in ordered if shares[n] > 0.0)
        shares[first] += left
    return shares


class FailbackHold:
    """Keeps a recovered region out of routing until it has been healthy for ``hold_ms``.

    Going unhealthy counts at once; coming back counts only after ``hold_ms`` of being
    continuously healthy, so a region whose health flaps never takes traffic back.  A region
    seen for the first time counts as it is observed, and one that has never been healthy
    (still starting) joins as soon as it is: no history, nothing to hold against.
    """

    def __init__(self, hold_ms: int, *, clock: Callable[[], float] = time.monotonic):
        self.hold_s = hold_ms / 1000.0
        self._clock = clock
        self._effective: dict[str, bool] = {}
        self._healthy_since: dict[str, float | None] = {}
        self._ever_healthy: set[str] = set()

    def observe(self, region: str, healthy: bool, now_s: float | None = None) -> bool:
        """Record the region's current health; returns whether it counts as healthy."""
        now = self._clock() if now_s is None else now_s
        if region not in self._effective or (healthy and region not in self._ever_healthy):
            self._effective[region] = healthy
            self._healthy_since[region] = now if healthy else None
            if healthy:
                self._ever_healthy.add(region)
            return healthy
        if not healthy:
            self._effective[region] = False
            self._healthy_since[region] = None
            return False
        if self._healthy_since[region] is None:
            self._healthy_since[region] = now
        return self.is_healthy(region, now)

    def is_healthy(self, region: str, now_s: float | None = None) -> bool:
        """Whether the region counts as healthy now (a hold may have expired since the last observe)."""
        if region not in self._effective:
            return False
        if not self._effective[region]:
            since = self._healthy_since[region]
            now = self._clock() if now_s is None else now_s
            if since is not None and now - since >= self.hold_s:
                self._effective[region] = True
        return self._effective[region]

    def held_for_s(self, region: str, now_s: float | None = None) -> float:
        """Seconds until a recovering region counts as healthy again (0: not held)."""
        since = self._healthy_since.get(region)
        if since is None or self.is_healthy(region, now_s):
            return 0.0
        now = self._clock() if now_s is None else now_s
        return max(0.0, self.hold_s - (now - since))

    def apply(self, healthy: Mapping[str, bool], now_s: float | None = None) -> dict[str, bool]:
        """``observe`` every region of a snapshot at once."""
        now = self._clock() if now_s is None else now_s
        return {name: self.observe(name, ok, now) for name, ok in healthy.items()}
