"""The simulation's model pieces (loadtests/sim): round trips from distance, the diurnal curve,
the replica queueing model, the world and the fault timeline. Pure logic, in-process."""

from __future__ import annotations

import math
import random

import pytest

from geo.distance import great_circle_km
from loadtests.sim import faults as F
from loadtests.sim import network, queueing, traffic
from loadtests.sim.world import DEFAULT_PEAK_UTILIZATION, build_world, utc_offset_h

LONDON = (51.51, -0.13)
NEW_YORK = (40.71, -74.01)
SYDNEY = (-33.87, 151.21)


# ---------------------------------------------------------------------- network


def test_rtt_is_fibre_round_trip_plus_a_hop():
    assert network.rtt_ms(LONDON, LONDON) == pytest.approx(network.PER_HOP_MS)
    d = great_circle_km(LONDON, NEW_YORK)
    assert 5500 < d < 5650
    # light in glass covers ~200 km per ms: London-New York and back is ~56 ms, plus the hop
    assert network.rtt_ms(LONDON, NEW_YORK) == pytest.approx(2 * d / 199.86 + network.PER_HOP_MS, rel=1e-3)
    assert 58 < network.rtt_ms(LONDON, NEW_YORK) < 63
    assert network.rtt_ms(LONDON, NEW_YORK) == network.rtt_ms(NEW_YORK, LONDON)
    # twice as far, twice the propagation
    far = network.rtt_ms(LONDON, SYDNEY) - network.PER_HOP_MS
    near = network.rtt_ms(LONDON, NEW_YORK) - network.PER_HOP_MS
    assert far / near == pytest.approx(great_circle_km(LONDON, SYDNEY) / d, rel=1e-9)


def test_partitions_cut_both_ways_and_heal():
    n = network.Network()
    assert n.reachable("EU", "NA")
    n.partition("EU", "NA")
    assert not n.reachable("EU", "NA") and not n.reachable("NA", "EU")
    assert n.reachable("EU", "EU") and n.reachable("EU", "AS")
    assert n.partitions == [("EU", "NA")]
    n.heal("NA", "EU")
    assert n.reachable("EU", "NA")
    with pytest.raises(ValueError, match="two different continents"):
        n.partition("EU", "EU")


# ---------------------------------------------------------------------- traffic


def test_diurnal_curve_peaks_in_the_evening_and_is_periodic_and_continuous():
    f = traffic.diurnal_factor
    assert f(20.0) == 1.0 and max(f(h / 10) for h in range(240)) == 1.0
    assert min(range(24), key=f) == 4  # trough before dawn
    assert f(4.0) < 0.25 < 0.7 < f(12.0)
    assert f(0.0) == f(24.0) == f(48.0)
    for h in range(24):  # no jumps at the full hours
        assert abs(f(h - 1e-9) - f(h + 1e-9)) < 1e-6
    mean = sum(f(h / 100) for h in range(2400)) / 2400
    assert 0.55 < mean < 0.7


def test_local_hour_follows_the_utc_offset():
    assert traffic.local_hour(0.0, 9.0) == 9.0  # Tokyo at 00:00 UTC
    assert traffic.local_hour(3 * 3600.0, -4.0) == 23.0  # New York (summer time) at 03:00 UTC
    assert traffic.local_hour(3600.0 * 30, 5.5) == pytest.approx(11.5)  # wraps around the day
    assert utc_offset_h("Asia/Tokyo") == 9.0
    assert utc_offset_h("America/New_York") == -4.0  # the simulated day is in June
    assert utc_offset_h("Asia/Kolkata") == 5.5


# ---------------------------------------------------------------------- queueing


def test_erlang_c_known_values():
    assert queueing.erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert queueing.erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert queueing.erlang_c(4, 0.0) == 0.0
    assert queueing.erlang_c(4, 4.0) == 1.0
    # M/M/1 mean wait rho / (mu - lambda): service 10 ms, 50 requests/s
    assert queueing.mmc_wait_s(1, 0.010, 50.0) == pytest.approx(0.5 / (100 - 50))
    assert math.isinf(queueing.mmc_wait_s(2, 0.010, 200.0))
    # more slots at the same utilization wait less
    assert queueing.mmc_wait_s(16, 0.010, 1280.0) < queueing.mmc_wait_s(4, 0.010, 320.0)


def test_replica_queue_steady_state_is_littles_law():
    q = queueing.ReplicaQueue(8, 0.040)  # 200 requests/s
    assert q.capacity_per_s == pytest.approx(200.0)
    q.step(100.0, 10.0)
    assert q.backlog == 0.0
    assert q.in_flight == pytest.approx(100.0 * q.mean_latency_s, rel=1e-9)  # L = lambda W
    assert 0.040 <= q.mean_latency_s < 0.045  # half load: a little queueing
    assert q.in_flight_if(100.0, 10.0) == pytest.approx(q.in_flight)
    rng = random.Random(3)
    samples = [q.sample_latency_s(rng) for _ in range(20000)]
    assert sum(samples) / len(samples) == pytest.approx(q.mean_latency_s, rel=0.03)
    q.step(190.0, 10.0)
    assert q.mean_latency_s > 0.05  # 95%: waits grow


def test_replica_queue_overload_builds_a_backlog_that_drains_and_is_bounded():
    q = queueing.ReplicaQueue(4, 0.040, abandon_s=30.0)  # 100 requests/s
    q.step(150.0, 10.0)
    assert q.backlog == pytest.approx(500.0)
    assert q.wait_s > 5.0
    q.step(50.0, 5.0)  # drains at 50/s
    assert q.backlog == pytest.approx(250.0)
    q.step(10_000.0, 60.0)
    assert q.backlog == pytest.approx(100.0 * 30.0)  # what waits past the deadline is abandoned
    q.alive = False
    q.step(100.0, 1.0)
    assert q.backlog == 0.0 and q.in_flight == 0.0


def test_a_slow_replica_has_less_capacity_and_longer_latency():
    q = queueing.ReplicaQueue(8, 0.040)
    q.slowdown = 8.0
    assert q.capacity_per_s == pytest.approx(25.0)
    q.step(10.0, 10.0)
    assert q.mean_latency_s >= 0.32
    assert q.latency_at_level_s(16) == pytest.approx(0.64)  # twice the slots in flight: twice the wait


# ---------------------------------------------------------------------- world and faults


@pytest.fixture(scope="module")
def world():
    return build_world(regions=24, replicas_per_region=42, seed=1)


def test_world_is_a_planet_of_heterogeneous_replicas_sized_to_demand(world):
    assert len(world.regions) == 24 and len({r.name for r in world.regions}) == 24
    assert world.total_replicas >= 1000
    assert len({r.continent for r in world.regions}) == 6
    specs = [s for v in world.replicas.values() for s in v]
    assert {s.hw for s in specs} == {"large", "medium", "small"}
    assert max(s.service_s for s in specs) > 2 * min(s.service_s for s in specs)
    assert len({s.url for s in specs}) == len(specs)
    # the busiest region (relative to capacity) peaks at the configured utilization, none above
    ratios = {r: world.peak_demand_per_s[r] / world.capacity_per_s(r) for r in world.replicas}
    assert max(ratios.values()) == pytest.approx(DEFAULT_PEAK_UTILIZATION)
    # the config the product reads: every region, every replica
    assert len(world.config.regions) == 24
    assert sum(len(p.replicas) for r in world.config.regions for p in r.pools) == world.total_replicas
    assert world.nearest["Paris"] == "eu-west-3" and world.nearest["Tokyo"] == "ap-northeast-1"


def test_world_rejects_bad_sizes():
    with pytest.raises(ValueError, match="--regions must be between 2 and 30"):
        build_world(regions=31)
    with pytest.raises(ValueError, match="--replicas-per-region must be at least 2"):
        build_world(regions=4, replicas_per_region=1)


def test_fault_plan_loses_the_busiest_region_at_its_peak(world):
    start, dur = 0.0, 86400.0
    plan = F.plan_faults(world, start, dur, seed=1)
    assert plan == sorted(plan, key=lambda f: f.t_s)
    down = next(f for f in plan if f.kind == F.REGION_DOWN)
    up = next(f for f in plan if f.kind == F.REGION_UP)
    assert down.target == F.busiest_regions(world)[0] == up.target
    assert up.t_s - down.t_s == F.REGION_LOSS_S
    peak = F.region_demand_per_s(world, down.target, down.t_s)
    assert all(F.region_demand_per_s(world, down.target, t) <= peak + 1e-6 for t in range(0, 82800, 600))
    part = next(f for f in plan if f.kind == F.PARTITION)
    heal = next(f for f in plan if f.kind == F.HEAL)
    a, b = part.target.split("|")
    assert part.target == F.crossing_pair(world) == "AF|AS"  # Cairo and Nairobi are served from Dubai
    assert a != b
    assert heal.t_s <= down.t_s or part.t_s >= up.t_s  # apart from the loss
    lost_urls = {s.url for s in world.replicas[down.target]}
    failures = [f for f in plan if f.kind == F.REPLICA_DOWN]
    outside = world.total_replicas - len(lost_urls) - 1  # nor the slow one
    assert len(failures) == round(outside * F.REPLICA_FAILURES_PER_DAY_FRACTION) >= 8  # 1% of the fleet a day
    assert not any(f.target in lost_urls for f in failures)
    assert any(f.kind == F.REPLICA_SLOW for f in plan)
    assert all(start <= f.t_s <= start + dur for f in plan)


def test_fault_plan_fits_a_short_window(world):
    plan = F.plan_faults(world, 14 * 3600.0, 1800.0, seed=2)
    assert all(14 * 3600.0 <= f.t_s <= 14.5 * 3600.0 for f in plan)
    down = next(f for f in plan if f.kind == F.REGION_DOWN)
    up = next(f for f in plan if f.kind == F.REGION_UP)
    assert up.t_s - down.t_s == pytest.approx(1800.0 / 4)
    assert len([f for f in plan if f.kind == F.REPLICA_DOWN]) == F.MIN_REPLICA_FAILURES
