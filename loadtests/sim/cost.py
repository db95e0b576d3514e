"""The per-request cost of the product's routing decisions as the fleet grows.

For each fleet size a planet is built (24 regions, or fewer for fleets too small to give each
region ``MIN_REPLICAS_PER_REGION``), warmed up at a low sample rate, then driven at
``RATE_PER_GATEWAY_S`` decisions per second per gateway on average (what one gateway worker
handles in production; the caches of the routing code see a realistic request rate) until
``decisions`` sampled requests have been served. The cost of one request is the real time
(``time.perf_counter_ns``) spent in the product's calls for it: admission, region order, every
replica pick and every outcome record (``requests.serve``). Medians over many decisions are
what is compared: robust to the shared machine's preemptions, which the mean is not.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from loadtests.sim.driver import Planet
from loadtests.sim.world import MIN_REPLICAS_PER_REGION, REGIONS, build_world

DEFAULT_SIZES = (10, 100, 1000, 10000)
DEFAULT_DECISIONS = 40_000
RATE_PER_GATEWAY_S = 2000.0
WARMUP_S = 20.0
WARMUP_SAMPLES_PER_S = 200.0
START_S = 14 * 3600.0  # 14:00 UTC: Europe's afternoon, Asia's evening peak, America's morning
GOAL_RATIO = 2.0  # cost at 10,000 replicas within 2x of the cost at 100


def regions_for(total_replicas: int) -> int:
    return max(2, min(24, len(REGIONS), total_replicas // MIN_REPLICAS_PER_REGION))


def measure(total_replicas: int, *, decisions: int = DEFAULT_DECISIONS, mode: str = "local-first",
            seed: int = 1) -> dict:
    """Decision cost (microseconds per request) on a planet of about `total_replicas` replicas."""
    regions = regions_for(total_replicas)
    world = build_world(regions=regions, replicas_per_region=total_replicas / regions, seed=seed, mode=mode)
    rate = RATE_PER_GATEWAY_S * regions
    duration_s = max(1.0, decisions / rate)
    costs: list[int] = []

    def on_served(req, served, resolved_s) -> None:
        if req.t_s >= START_S and served.decision_ns:
            costs.append(served.decision_ns)

    planet = Planet(world, start_s=START_S, duration_s=duration_s, faults=[], seed=seed, samples_per_s=rate,
                    warmup_s=WARMUP_S, warmup_samples_per_s=WARMUP_SAMPLES_PER_S, fine_tick_s=1.0,
                    coarse_tick_s=1.0, on_served=on_served)
    gc.collect()
    gc.freeze()  # the planet's long-lived objects stay out of the collector's walks (gc.freeze)
    wall = time.perf_counter()
    try:
        planet.run()
    finally:
        gc.unfreeze()
        planet.close()
    a = np.array(costs, dtype=float) / 1000.0
    return {"replicas": world.total_replicas, "regions": regions, "mode": mode, "decisions": len(a),
            "median_us": round(float(np.median(a)), 2) if len(a) else None,
            "p90_us": round(float(np.percentile(a, 90)), 2) if len(a) else None,
            "p99_us": round(float(np.percentile(a, 99)), 2) if len(a) else None,
            "mean_us": round(float(a.mean()), 2) if len(a) else None,
            "rate_per_gateway_s": RATE_PER_GATEWAY_S, "wall_s": round(time.perf_counter() - wall, 1)}


def cost_table(sizes=DEFAULT_SIZES, *, decisions: int = DEFAULT_DECISIONS, modes=("local-first",),
               seed: int = 1, progress=None) -> dict:
    rows = []
    for mode in modes:
        for n in sizes:
            if progress:
                progress(f"decision cost: {n} replicas, {mode}")
            rows.append(measure(n, decisions=decisions, mode=mode, seed=seed))
    out: dict = {"fleet_sizes": rows, "goal": f"cost at 10,000 replicas within {GOAL_RATIO:g}x of the cost at 100"}
    ratios = {}
    for mode in modes:
        by = {r["replicas"]: r["median_us"] for r in rows if r["mode"] == mode and r["median_us"]}
        small = _closest(by, 100)
        big = _closest(by, 10000)
        if small is not None and big is not None and small != big:
            ratios[mode] = {"small_replicas": small, "large_replicas": big, "ratio": round(by[big] / by[small], 3),
                            "goal_met": by[big] / by[small] <= GOAL_RATIO}
    out["ratio_large_vs_small"] = ratios
    return out


def _closest(by: dict[int, float], target: int) -> int | None:
    if not by:
        return None
    return min(by, key=lambda n: abs(np.log(n) - np.log(target)))
