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

import random
from collections.abc import Sequence


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
