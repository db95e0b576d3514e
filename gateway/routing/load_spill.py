"""Load-aware spill: send a request to a peer region when waiting here would take longer.

Peers advertise their load in the region summary (``GET /geogate/v1/region``), in the
``load`` object: ``utilization`` (in-flight / sum of replica concurrency limits),
``concurrency_limit`` (that sum) and ``expected_queue_ms`` (expected queueing delay of a new
request; -1 when the region has no capacity at all). ``peer_load_from_summary`` reads them.

The decision, per gateway (``LoadSpill.update`` on the sampling timer, ``LoadSpill.choose``
per request)::

    enter spilling   local expected queueing > spill_queue_ms (B), and the state has not
                     changed for spill_min_dwell_ms; the spilled fraction starts at spill_ramp_step
    while spilling   above B: the fraction ramps up by spill_ramp_step per update;
                     inside the band [B * spill_exit_fraction, B]: it holds;
                     under the band: it ramps down by half a step per update
    leave spilling   the fraction has been 0 with the local queue under the band for
                     spill_min_dwell_ms (and the state is at least that old)
    peer choice      the peer with the lowest rtt_ms + expected_queue_ms, only if that is below
                     the local expected queueing (while spilling: at least B) and the peer is
                     ready and under PEER_MAX_UTILIZATION (it has capacity); none: stay local
    spill targets    every such peer, each with its spare in-flight (concurrency_limit x
                     (PEER_MAX_UTILIZATION - utilization)): OverloadGuard spreads spilled requests
                     over them by spare capacity and never spills more than they have room for

Why the fraction ramps down instead of dropping to 0 when the local queue falls: the local
queue is low *because* requests are being spilled. Dropping to 0 at once would bring the whole
load back, refill the queue and re-enter (oscillation between 0% and 100%). Stepping down
(more slowly than up) finds the share the region can keep: the queue settles inside the
hysteresis band. Spill stops only once no share at all has been needed for the dwell time,
so a fraction that touches 0 for a moment while the load lasts does not end (and restart) it;
once the load itself falls, spill ends within 2 / spill_ramp_step updates plus the dwell.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.config import CapacitySection

PEER_MAX_UTILIZATION = 1.0  # a peer at or over its limits has no spare capacity
PEER_LOAD_STALE_S = 10.0  # advertised load older than this is not trusted
DOWN_STEP_FACTOR = 0.5  # the fraction falls by this share of spill_ramp_step per update (rises by a whole one)


@dataclass(frozen=True, slots=True)
class PeerLoad:
    region: str
    rtt_ms: float
    expected_queue_ms: float  # math.inf: no capacity
    utilization: float
    ready: bool = True
    age_s: float = 0.0
    concurrency_limit: int = 0  # the peer's sum of replica limits; 0: not advertised (older gateway)

    @property
    def cost_ms(self) -> float:
        return self.rtt_ms + self.expected_queue_ms

    @property
    def spare_in_flight(self) -> float:
        """Requests the peer could take in flight before its limits (inf: not advertised)."""
        if self.concurrency_limit <= 0:
            return math.inf
        return max(0.0, (PEER_MAX_UTILIZATION - self.utilization) * self.concurrency_limit)

    def unusable(self) -> str:
        if not self.ready:
            return "not ready"
        if self.age_s > PEER_LOAD_STALE_S:
            return f"load report is {self.age_s:.0f} s old"
        if math.isinf(self.expected_queue_ms) or self.utilization >= PEER_MAX_UTILIZATION:
            return f"no spare capacity (utilization {self.utilization:.0%})"
        return ""


def peer_load_from_summary(summary: dict, rtt_ms: float, *, age_s: float = 0.0) -> PeerLoad:
    """A peer's region summary -> PeerLoad. Missing load fields (an older gateway) count as
    idle only when the region is ready: expected queueing 0, utilization 0."""
    load = summary.get("load") or {}
    q = load.get("expected_queue_ms", 0.0)
    q_ms = math.inf if q is None or q < 0 else float(q)
    return PeerLoad(region=str(summary.get("region", "")), rtt_ms=float(rtt_ms), expected_queue_ms=q_ms,
                    utilization=float(load.get("utilization", 0.0) or 0.0),
                    ready=bool(summary.get("ready", False)), age_s=age_s,
                    concurrency_limit=int(load.get("concurrency_limit", 0) or 0))


@dataclass(frozen=True, slots=True)
class SpillChoice:
    region: str | None  # None: serve locally
    reason: str


class LoadSpill:
    """Hysteresis state machine plus the per-request peer choice."""

    def __init__(self, sec: CapacitySection, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.enter_ms = sec.spill_queue_ms
        self.exit_ms = sec.spill_queue_ms * sec.spill_exit_fraction
        self.dwell_s = sec.spill_min_dwell_ms / 1000.0
        self.ramp_step = sec.spill_ramp_step
        self.clock = clock
        self.rng = rng or random.Random()
        self.spilling = False
        self.fraction = 0.0
        self.changed_s = -math.inf
        self._calm_since_s: float | None = None  # fraction 0 and queue under the band since
        self.local_queue_ms = 0.0
        self.reason = "local queueing is under the spill bound"

    def update(self, local_queue_ms: float, now_s: float | None = None) -> bool:
        """Feed the local expected queueing (on the sampling timer); returns `spilling`."""
        now = self.clock() if now_s is None else now_s
        self.local_queue_ms = local_queue_ms
        dwelt = now - self.changed_s >= self.dwell_s
        q = "unbounded" if math.isinf(local_queue_ms) else f"{local_queue_ms:.0f} ms"
        if not self.spilling:
            if local_queue_ms > self.enter_ms and dwelt:
                self.spilling, self.changed_s = True, now
                self._calm_since_s = None
                self.fraction = self.ramp_step
                self.reason = f"spilling: local expected queueing {q} is over {self.enter_ms:g} ms"
            elif local_queue_ms > self.enter_ms:
                self.reason = f"local expected queueing {q} is over {self.enter_ms:g} ms; waiting out the dwell time"
            else:
                self.reason = f"local expected queueing {q} is under the spill bound of {self.enter_ms:g} ms"
            return self.spilling
        if local_queue_ms > self.enter_ms:
            self._calm_since_s = None
            self.fraction = min(1.0, self.fraction + self.ramp_step)
            self.reason = (f"spilling {self.fraction:.0%}: local expected queueing {q} is over "
                           f"{self.enter_ms:g} ms")
        elif local_queue_ms < self.exit_ms:
            if self.fraction <= 0.0:
                if self._calm_since_s is None:
                    self._calm_since_s = now
            else:
                self.fraction = max(0.0, self.fraction - self.ramp_step * DOWN_STEP_FACTOR)
            if self._calm_since_s is not None and now - self._calm_since_s >= self.dwell_s and dwelt:
                self.spilling, self.changed_s = False, now
                self._calm_since_s = None
                self.reason = f"spill stopped: local expected queueing {q} is back under {self.exit_ms:g} ms"
            else:
                self.reason = (f"spilling {self.fraction:.0%}: local expected queueing {q} is under "
                               f"{self.exit_ms:g} ms, spilling less")
        else:
            self._calm_since_s = None
            self.reason = (f"spilling {self.fraction:.0%}: local expected queueing {q} is inside the "
                           f"{self.exit_ms:g}-{self.enter_ms:g} ms band; holding")
        return self.spilling

    def best_peer(self, peers: Sequence[PeerLoad], local_queue_ms: float | None = None) -> tuple[PeerLoad | None, str]:
        """The usable peer with the lowest rtt + queueing below what waiting here costs. While
        spilling, waiting here counts as at least the spill bound: the local queue is short
        *because* of the spill, and the region is known to be past the bound without it."""
        sooner, skipped, local = self._sooner(peers, local_queue_ms)
        best = min(sooner, key=lambda p: p.cost_ms, default=None)
        if best is None:
            return None, "no peer region would answer sooner" + (f" ({'; '.join(skipped)})" if skipped else "")
        return best, (f"region {best.region!r} answers sooner: rtt {best.rtt_ms:.0f} ms + queueing "
                      f"{best.expected_queue_ms:.0f} ms < {local:.0f} ms here")

    def spill_targets(self, peers: Sequence[PeerLoad], local_queue_ms: float | None = None) -> list[PeerLoad]:
        """Every usable peer that would answer sooner than waiting here (``best_peer``'s
        candidates): where spilled requests may go."""
        return self._sooner(peers, local_queue_ms)[0]

    def _sooner(self, peers: Sequence[PeerLoad],
                local_queue_ms: float | None) -> tuple[list[PeerLoad], list[str], float]:
        local = self.local_queue_ms if local_queue_ms is None else local_queue_ms
        if self.spilling:
            local = max(local, self.enter_ms)
        sooner: list[PeerLoad] = []
        skipped: list[str] = []
        for p in peers:
            why = p.unusable()
            if why:
                skipped.append(f"{p.region}: {why}")
            elif p.cost_ms >= local:
                skipped.append(f"{p.region}: rtt {p.rtt_ms:.0f} ms + queueing {p.expected_queue_ms:.0f} ms "
                               f"is not sooner than {local:.0f} ms here")
            else:
                sooner.append(p)
        return sooner, skipped, local

    def choose(self, peers: Sequence[PeerLoad]) -> SpillChoice:
        """Per request: the peer to send this one to, or None (local)."""
        if not self.spilling:
            return SpillChoice(None, self.reason)
        if self.fraction < 1.0 and self.rng.random() >= self.fraction:
            return SpillChoice(None, f"{self.reason}; this request stays local")
        peer, why = self.best_peer(peers)
        return SpillChoice(peer.region if peer else None, why)


def peer_loads(monitor, local_region: str, now_s: float | None = None) -> list[PeerLoad]:
    """PeerLoad of every peer a ``geo.region_health.RegionHealthMonitor`` knows: its last
    region summary (``load`` fields), its measured RTT and health; peers never summarized are
    left out (nothing is known about their load)."""
    now = time.monotonic() if now_s is None else now_s
    out = []
    for name, st in monitor.states.items():
        if name == local_region or not st.summary:
            continue
        p = peer_load_from_summary({**st.summary, "region": name, "ready": st.healthy},
                                   st.rtt_ewma_s * 1000.0, age_s=max(0.0, now - st.last_probe_s))
        out.append(p)
    return out
