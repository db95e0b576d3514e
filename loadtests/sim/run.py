"""``geogate bench sim``: options -> world -> faults -> driver -> sim.json + sim.png.

The world is built first (bad sizes fail at once); then the decision-cost table (``cost``), on
its own planets; then the day: a warm-up (not measured) and the window of ``hours`` from
``start_utc_h`` with the fault timeline.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtests.sim import cost as C
from loadtests.sim import faults as F
from loadtests.sim.driver import Planet
from loadtests.sim.metrics import TIMELINE_BIN_S, Metrics
from loadtests.sim.report import write_png
from loadtests.sim.world import DEFAULT_PEAK_UTILIZATION, build_world

S_PER_HOUR = 3600.0
HEALTHY_NEAREST_SHARE_MIN = 0.9  # the check on the share served in the nearest healthy region, when healthy


@dataclass
class SimOptions:
    regions: int = 24
    replicas_per_region: float = 42.0
    hours: float = 24.0
    start_utc_h: float = 0.0
    seed: int = 1
    samples_per_s: float = 2.0  # sampled requests per simulated second (at least one per metro and tick)
    warmup_s: float = 300.0
    fine_tick_s: float = 3.0
    mid_tick_s: float = 3.0
    coarse_tick_s: float = 120.0
    fine_window_s: float = 300.0
    routing_mode: str = "local-first"
    peak_utilization: float = DEFAULT_PEAK_UTILIZATION  # the busiest region's peak demand / capacity
    cost_sizes: tuple[int, ...] = C.DEFAULT_SIZES
    cost_decisions: int = C.DEFAULT_DECISIONS
    cost_modes: tuple[str, ...] = ("local-first", "nearest-to-client")
    faults: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.hours <= 0:
            raise ValueError(f"--hours must be > 0, got {self.hours}")
        if self.samples_per_s <= 0:
            raise ValueError(f"samples per second must be > 0, got {self.samples_per_s}")
        if not 0 <= self.start_utc_h < 24:
            raise ValueError(f"--start-utc must be an hour in [0, 24), got {self.start_utc_h}")
        if any(n < 2 for n in self.cost_sizes):
            raise ValueError(f"--cost-sizes must be at least 2 replicas each, got {list(self.cost_sizes)}")


def run_sim(opts: SimOptions, out_dir: str | os.PathLike, *, progress=None) -> dict:
    """Run everything; writes DIR/sim.json and DIR/sim.png; returns sim.json's content."""
    opts.validate()
    say = progress or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(f"building the world: {opts.regions} regions, ~{opts.replicas_per_region:g} replicas per region")
    world = build_world(regions=opts.regions, replicas_per_region=opts.replicas_per_region, seed=opts.seed,
                        mode=opts.routing_mode, peak_utilization=opts.peak_utilization)  # bad sizes fail here
    wall0 = time.perf_counter()
    cost = C.cost_table(opts.cost_sizes, decisions=opts.cost_decisions, modes=opts.cost_modes, seed=opts.seed,
                        progress=say) if opts.cost_sizes else {}
    cost_wall = time.perf_counter() - wall0
    start_s = opts.start_utc_h * S_PER_HOUR
    duration_s = opts.hours * S_PER_HOUR
    faults = F.plan_faults(world, start_s, duration_s, seed=opts.seed) if opts.faults else []
    planet = Planet(world, start_s=start_s, duration_s=duration_s, faults=faults, seed=opts.seed,
                    samples_per_s=opts.samples_per_s, warmup_s=opts.warmup_s, fine_tick_s=opts.fine_tick_s,
                    mid_tick_s=opts.mid_tick_s, coarse_tick_s=opts.coarse_tick_s, fine_window_s=opts.fine_window_s,
                    workdir=str(out))
    metrics = Metrics(planet, start_s=start_s, duration_s=duration_s, faults=faults)
    planet.on_served = metrics.on_served
    planet.on_tick = _with_progress(metrics.on_tick, say, start_s, duration_s)
    day0 = time.perf_counter()
    try:
        planet.run()
    finally:
        planet.close()
        (out / "metros.mmdb").unlink(missing_ok=True)
    metrics.finish()
    day_wall = time.perf_counter() - day0
    say("writing sim.json and sim.png")
    result = _result(opts, world, planet, metrics, cost, faults, cost_wall, day_wall)
    path = out / "sim.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False, default=_json_default))
    os.replace(tmp, path)
    write_png(metrics, out / "sim.png")
    return result


def _with_progress(on_tick, say, start_s: float, duration_s: float):
    last = [time.monotonic()]

    def tick(t: float, dt: float) -> None:
        on_tick(t, dt)
        now = time.monotonic()
        if now - last[0] >= 5.0:
            last[0] = now
            done = max(0.0, (t - start_s) / duration_s)
            say(f"simulated {done:.0%} ({(t - start_s) / S_PER_HOUR:.1f} h)")

    return tick


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _result(opts: SimOptions, world, planet: Planet, m: Metrics, cost: dict, faults, cost_wall: float,
            day_wall: float) -> dict:
    total = float(m.h_total.sum())
    ok = float(m.h_ok.sum())
    hours = m.hours_table()
    healthy_share = m.healthy_nearest[0] / m.healthy_nearest[1] if m.healthy_nearest[1] else None
    violations = {k: round(v) for k, v in m.violations.items()}
    refused = {p: round(v) for p, v in m.shed_by_priority.items()}
    checks = {
        "nearest_region_share_when_healthy": {
            "value": round(healthy_share, 4) if healthy_share is not None else None,
            "bound": HEALTHY_NEAREST_SHARE_MIN,
            "ok": healthy_share is not None and healthy_share >= HEALTHY_NEAREST_SHARE_MIN},
        "no_request_routed_to_a_dead_region_after_detection": {
            "violations": {k: violations.get(k, 0) for k in ("peer_tried_after_withdrawn", "unhealthy_replica_picked",
                                                             "dns_answered_dead_region")},
            "ok": not any(violations.get(k, 0) for k in ("peer_tried_after_withdrawn", "unhealthy_replica_picked",
                                                         "dns_answered_dead_region"))},
        "refusals_sheddable_before_standard": {
            "critical_refused": violations.get("critical_refused", 0),
            "standard_refused_while_sheddable_admitted": violations.get("standard_refused_while_sheddable_admitted", 0),
            "ok": not violations.get("critical_refused") and not violations.get(
                "standard_refused_while_sheddable_admitted")},
    }
    if cost.get("ratio_large_vs_small"):
        checks["decision_cost_flat"] = {"ratios": {k: v["ratio"] for k, v in cost["ratio_large_vs_small"].items()},
                                        "goal": C.GOAL_RATIO,
                                        "ok": all(v["goal_met"] for v in cost["ratio_large_vs_small"].values())}
    regions = [{"name": r.name, "city": r.city, "continent": r.continent, "replicas": len(world.replicas[r.name]),
                "capacity_per_s": round(world.capacity_per_s(r.name)),
                "peak_demand_per_s": round(world.peak_demand_per_s[r.name])} for r in world.regions]
    timeline = _timeline(m)
    return _finite({
        "command": "geogate bench sim",
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items() if k != "extra"},
        "world": {"regions": regions, "replicas": world.total_replicas, "metros": len(world.metros),
                  "demand_per_million_people_at_peak_per_s": round(world.demand_scale, 2),
                  "routing_mode": world.config.routing.mode},
        "faults": [f.as_dict() | {"t_rel_s": round(f.t_s - m.start_s, 1)} for f in faults],
        "decision_cost_us": cost,
        "decision_cost_day_us": m.decision_cost(),
        "requests": {"sampled": m.samples, "represented": round(total), "served": round(ok),
                     "served_share": round(ok / total, 5) if total else None,
                     "refused_by_priority": refused,
                     "failed_by_reason": {k: round(v) for k, v in sorted(m.failed_by_reason.items(),
                                                                         key=lambda kv: -kv[1])}},
        "latency_ms": m.latency(),
        "nearest_region_share_by_hour": [h["nearest_region_share"] for h in hours],
        "hours": hours,
        "region_loss": m.region_loss(),
        "partition": m.partition_figures(),
        "slow_replica": m.slow_replica(),
        "replica_failures": {"count": sum(1 for f in faults if f.kind == F.REPLICA_DOWN),
                             "requests_retried": round(m.retried)},
        "checks": checks,
        "violation_examples": dict(m.violation_examples),
        "timeline": timeline,
        "runtime": {"decision_cost_s": round(cost_wall, 1), "day_s": round(day_wall, 1),
                    "python": platform.python_version(), "machine": platform.machine()},
    })


def _timeline(m: Metrics) -> dict:
    """Per 5-minute bin: demand, served, refused (real requests/s), nearest share."""
    out = {"bin_s": TIMELINE_BIN_S, "t_s": [], "demand_per_s": [], "served_per_s": [], "refused_per_s": [],
           "nearest_share": []}
    n = max(1, math.ceil((m.end_s - m.start_s) / TIMELINE_BIN_S))
    acc = [[0.0, 0.0, 0.0, 0.0, 0.0] for _ in range(n)]
    for i, (t, dt) in enumerate(m.t_rows):
        if i >= len(m.t_total):
            break
        b = min(n - 1, int((t - m.start_s) // TIMELINE_BIN_S))
        a = acc[b]
        a[0] += dt
        a[1] += m.t_total[i]
        a[2] += m.t_ok[i]
        a[3] += m.t_refused[i]
        a[4] += m.t_nearest[i]
    for b, (secs, tot, ok, ref, near) in enumerate(acc):
        out["t_s"].append(b * TIMELINE_BIN_S)
        out["demand_per_s"].append(round(tot / secs) if secs else None)
        out["served_per_s"].append(round(ok / secs) if secs else None)
        out["refused_per_s"].append(round(ref / secs) if secs else None)
        out["nearest_share"].append(round(near / ok, 4) if ok else None)
    return out
