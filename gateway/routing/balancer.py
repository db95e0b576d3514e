"""Replica choice inside a region: power of two choices over peak-EWMA cost.

Algorithm (Finagle's P2C + PeakEWMA, as in Linkerd): pick two distinct candidates at random
and send to the cheaper one, where

    cost = peak_ewma_latency_s * (outstanding + queue_depth + 1) / weight

The latency average jumps up to any slower sample at once ("peak") and decays toward faster
samples with a time constant, and it also decays with time while a replica gets no traffic,
so a replica that was slow is probed again after a while. A replica with no samples yet costs
nothing when idle (new replicas get traffic and a measurement quickly) and a penalty when it
already has requests in flight. Two random choices avoid the herd behaviour of "always the
least loaded" across many gateway workers that each see stale load.

``queue_depth`` is the replica's own queue as scraped from its /metrics (``gateway.upstream.load_signals``,
pools with ``metrics_scrape = true``; like the Gateway API inference extension's endpoint
picker): it shows load this gateway cannot see (other gateways, other clients, a replica that
slowed down). The scraper writes it on a timer with an expiry; an expired (stale) or failed
reading counts as 0, so scoring falls back to outstanding requests. The request path only reads
two floats: nothing is parsed per request.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

DECAY_S = 2.0  # time constant of the latency EWMA (short: this host is noisy, peaks must fade)
NO_DATA_PENALTY_S = 1.0  # cost of a request to a replica with no latency sample yet, busy


class LoadStats:
    """Outstanding requests and peak-EWMA latency of one upstream."""

    __slots__ = ("ewma_s", "outstanding", "queue_depth", "queue_valid_until_s", "requests", "stamp_s")

    def __init__(self) -> None:
        self.ewma_s = 0.0
        self.stamp_s = 0.0
        self.outstanding = 0
        self.requests = 0
        self.queue_depth = 0.0  # the replica's scraped queue (load signal); 0: none
        self.queue_valid_until_s = 0.0  # time.monotonic() after which queue_depth is stale

    def set_queue_depth(self, depth: float, valid_until_s: float) -> None:
        """A load-signal reading (by the scraper, off the request path); `valid_until_s` 0 drops it."""
        self.queue_depth = max(0.0, depth)
        self.queue_valid_until_s = valid_until_s

    def observe(self, rtt_s: float, now_s: float) -> None:
        dt_s = max(0.0, now_s - self.stamp_s)
        self.stamp_s = now_s
        if rtt_s > self.ewma_s:
            self.ewma_s = rtt_s
        else:
            w = math.exp(-dt_s / DECAY_S)
            self.ewma_s = self.ewma_s * w + rtt_s * (1.0 - w)

    def reset(self) -> None:
        """Forget latency history (outstanding requests are still real)."""
        self.ewma_s = 0.0
        self.stamp_s = 0.0

    def cost(self, now_s: float, weight: int) -> float:
        busy = self.outstanding
        if now_s < self.queue_valid_until_s:  # a fresh load-signal reading (inline: hot path)
            busy += self.queue_depth
        if self.ewma_s == 0.0:
            return NO_DATA_PENALTY_S * busy / max(1, weight)
        # Idle decay: what observe(0) would give now, without recording it.
        ewma_s = self.ewma_s * math.exp(-max(0.0, now_s - self.stamp_s) / DECAY_S)
        return ewma_s * (busy + 1) / max(1, weight)


def pick_p2c(candidates: Sequence, now_s: float, rng: random.Random = random._inst):  # type: ignore[attr-defined]
    """Power of two choices over `candidates` (objects with `.load: LoadStats` and
    `.state.weight`); None when empty."""
    n = len(candidates)
    if n == 0:
        return None
    if n == 1:
        return candidates[0]
    i = int(rng.random() * n)
    j = int(rng.random() * (n - 1))
    if j >= i:
        j += 1
    a, b = candidates[i], candidates[j]
    ca = a.load.cost(now_s, a.state.weight)
    cb = b.load.cost(now_s, b.state.weight)
    if ca == cb:
        return a  # a is already a uniformly random choice
    return a if ca < cb else b
