"""Per-replica load as the balancer scores it: requests outstanding, the replica's scraped queue
depth, and a peak-EWMA of its latency (gateway.routing.balancer explains the cost). Kept with
the upstreams that own it: the pools create one per replica and the clients update it."""

from __future__ import annotations

import math

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
