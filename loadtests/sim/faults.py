"""The fault timeline of a run.

``plan_faults`` places, inside the simulated window:
- replicas failing (process gone: connections refused) and recovering minutes later, about
  ``REPLICA_FAILURES_PER_DAY_FRACTION`` of the fleet per day (at least two per run), never in
  the region that will be lost (its loss is the bigger story);
- one slow replica (service time x ``SLOW_FACTOR``) in the second-busiest region, for a while;
- the busiest region (highest peak demand) lost whole (gateway and replicas) at its peak hour
  inside the window, restored ``REGION_LOSS_S`` later (a quarter of a short window);
- a partition between two continents, cutting both ways, placed so it does not overlap the
  region loss: the pair most clients cross between to reach their nearest region (clients
  in one continent served in the other), else the lost region's continent and the one with the
  next-biggest demand.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loadtests.sim import traffic
from loadtests.sim.world import World

REPLICA_DOWN = "replica_down"
REPLICA_UP = "replica_up"
REPLICA_SLOW = "replica_slow"
REPLICA_NORMAL = "replica_normal"
REGION_DOWN = "region_down"
REGION_UP = "region_up"
PARTITION = "partition"
HEAL = "heal"

REPLICA_FAILURES_PER_DAY_FRACTION = 0.01
MIN_REPLICA_FAILURES = 2
REPLICA_DOWN_MIN_S = 300.0
REPLICA_DOWN_MAX_S = 1800.0
SLOW_FACTOR = 8.0
SLOW_S = 3600.0
REGION_LOSS_S = 3600.0
PARTITION_S = 1800.0
PEAK_SEARCH_STEP_S = 60.0
DAY_S = 86400.0


@dataclass(frozen=True, slots=True)
class Fault:
    t_s: float
    kind: str
    target: str  # replica URL, region name, or "A|B" for two continents
    detail: str = ""

    def as_dict(self) -> dict:
        return {"t_s": round(self.t_s, 3), "kind": self.kind, "target": self.target, "detail": self.detail}


def region_demand_per_s(world: World, region: str, t_s: float) -> float:
    """Demand of the metros whose nearest region is `region`, at `t_s`."""
    return sum(world.metro_rate_per_s(m, t_s) for m in world.metros if world.nearest[m.name] == region)


def busiest_regions(world: World) -> list[str]:
    """Regions by peak demand, busiest first."""
    return sorted(world.peak_demand_per_s, key=lambda r: -world.peak_demand_per_s[r])


def peak_time_s(world: World, region: str, lo_s: float, hi_s: float) -> float:
    """When `region`'s demand peaks inside [lo_s, hi_s] (minute resolution)."""
    best_t, best = lo_s, -1.0
    t = lo_s
    while t <= hi_s:
        d = region_demand_per_s(world, region, t)
        if d > best:
            best_t, best = t, d
        t += PEAK_SEARCH_STEP_S
    return best_t


def crossing_pair(world: World) -> str | None:
    """The two continents ("A|B", sorted) between which the most people cross to reach their
    nearest region; None when every metro's nearest region is on its own continent."""
    crossing: dict[tuple[str, str], float] = {}
    for m in world.metros:
        there = world.region(world.nearest[m.name]).continent
        if there != m.continent:
            key = tuple(sorted((m.continent, there)))
            crossing[key] = crossing.get(key, 0.0) + m.population_m  # type: ignore[index]
    if not crossing:
        return None
    a, b = max(crossing, key=lambda k: crossing[k])
    return f"{a}|{b}"


def plan_faults(world: World, start_s: float, duration_s: float, *, seed: int = 1) -> list[Fault]:
    rng = random.Random(seed + 7919)
    end_s = start_s + duration_s
    faults: list[Fault] = []
    order = busiest_regions(world)
    lost = order[0]
    lost_continent = world.region(lost).continent

    # The busiest region, lost at its peak inside the window, with room to see it come back.
    loss_s = min(REGION_LOSS_S, duration_s / 4.0)
    settle_s = min(REGION_LOSS_S / 2.0, duration_s / 8.0)
    lo = start_s + duration_s * 0.05
    hi = max(lo, end_s - loss_s - settle_s)
    t_loss = peak_time_s(world, lost, lo, hi)
    faults.append(Fault(t_loss, REGION_DOWN, lost, "busiest region lost at its peak hour"))
    faults.append(Fault(t_loss + loss_s, REGION_UP, lost, "restored"))

    # A partition between two continents, apart from the loss.
    pair = crossing_pair(world)
    other = next((r for r in order if world.region(r).continent != lost_continent), None)
    if pair is None and other is not None:
        pair = f"{lost_continent}|{world.region(other).continent}"
    if pair is not None:
        part_s = min(PARTITION_S, duration_s / 8.0)
        gap_s = duration_s / 16.0
        after = t_loss + loss_s + settle_s
        if after + part_s <= end_s - gap_s:
            t_part = after + (end_s - gap_s - part_s - after) / 2.0
        else:
            t_part = max(start_s + gap_s / 2.0, t_loss - gap_s - part_s)
        faults.append(Fault(t_part, PARTITION, pair, "continents cut off from each other"))
        faults.append(Fault(t_part + part_s, HEAL, pair, "partition healed"))

    # A slow replica in the second-busiest region.
    slow_region = order[1] if len(order) > 1 else lost
    slow = rng.choice(world.replicas[slow_region]).url
    slow_s = min(SLOW_S, duration_s / 4.0)
    t_slow = start_s + duration_s * 0.15
    faults.append(Fault(t_slow, REPLICA_SLOW, slow, f"service time x{SLOW_FACTOR:g}"))
    faults.append(Fault(t_slow + slow_s, REPLICA_NORMAL, slow, "speed back to normal"))

    # Replicas failing and recovering (not in the region that will be lost).
    pool = [s.url for r, specs in world.replicas.items() if r != lost for s in specs if s.url != slow]
    n = max(MIN_REPLICA_FAILURES, round(len(pool) * REPLICA_FAILURES_PER_DAY_FRACTION * duration_s / DAY_S))
    down_max = min(REPLICA_DOWN_MAX_S, duration_s / 4.0)
    down_min = min(REPLICA_DOWN_MIN_S, down_max / 2.0)
    for url in rng.sample(pool, min(n, len(pool))):
        down_s = rng.uniform(down_min, down_max)
        t = rng.uniform(start_s, max(start_s, end_s - down_s - down_min))
        faults.append(Fault(t, REPLICA_DOWN, url, "process gone: connections refused"))
        faults.append(Fault(t + down_s, REPLICA_UP, url, "restarted"))
    return sorted(faults, key=lambda f: f.t_s)


def local_hour_of(world: World, region: str, t_s: float) -> float:
    from loadtests.sim.world import utc_offset_h

    return traffic.local_hour(t_s, utc_offset_h(world.region(region).tz))
