"""Capacity model: learned / configured limits, pool utilization and queueing, desired
replicas with scale-up / scale-down windows (pure logic, fake clock)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, generate_latest

from core.config import CapacitySection, parse_config
from gateway.routing.capacity import (
    CapacityTracker,
    ConcurrencyLimit,
    DesiredReplicas,
    expected_queue_ms,
)


def feed_replica(lim: ConcurrencyLimit, slots: int, service_s: float, levels, now_s: float = 0.0,
                 n: int = 20) -> float:
    """Latency of a replica with `slots` parallel slots at each in-flight level (Little)."""
    for level in levels:
        lat = service_s * max(1.0, level / slots)
        for _ in range(n):
            now_s += 0.01
            lim.observe(lat, level, now_s)
    return now_s


def test_configured_limit_wins():
    lim = ConcurrencyLimit(configured=5, initial=8)
    feed_replica(lim, 2, 0.01, range(1, 10))
    assert lim.limit == 5
    assert lim.explain() == "configured 5"


def test_learned_limit_finds_the_knee():
    lim = ConcurrencyLimit(initial=2, knee_factor=2.0)
    feed_replica(lim, 4, 0.010, range(1, 13))
    assert lim.limit == 4, lim.explain()
    assert "latency passes 2x" in lim.explain()


def test_learned_limit_without_knee_grows_with_observed_levels():
    lim = ConcurrencyLimit(initial=3, knee_factor=2.0)
    assert lim.limit == 3
    feed_replica(lim, 64, 0.010, range(1, 11))
    assert lim.limit == 10
    assert "no latency knee" in lim.explain()


def test_learned_limit_follows_a_slower_replica():
    lim = ConcurrencyLimit(initial=16)
    feed_replica(lim, 2, 0.020, range(1, 9))
    assert lim.limit == 2, lim.explain()


def test_expected_queue_is_littles_law():
    assert expected_queue_ms(8, 8, 0.1) == 0.0
    # 16 queued behind 8 slots finishing one request per 100 ms each: 200 ms wait
    assert math.isclose(expected_queue_ms(24, 8, 0.1), 200.0)
    assert math.isinf(expected_queue_ms(3, 0, 0.1))


def desired(**kw) -> DesiredReplicas:
    base = dict(target_utilization=0.7, min_replicas=1, max_replicas=10, scale_up_window_s=3.0,
                scale_down_window_s=60.0)
    base.update(kw)
    return DesiredReplicas(**base)


def test_desired_replicas_formula_and_reason():
    d = desired()
    rec = d.update(37.0, 4, 8, now_s=0.0)
    assert rec.desired == 7  # ceil(37 / (0.7 * 8)) = ceil(6.6)
    assert rec.reason == "in-flight 37.0 over 4 replicas at target 70% of limit 8: want 7"


def test_scale_up_is_immediate_and_down_waits_for_the_window():
    d = desired()
    assert d.update(37.0, 4, 8, now_s=0.0).desired == 7
    # load falls: still holding 7 for the 60 s window
    rec = d.update(10.0, 7, 8, now_s=5.0)
    assert rec.want == 2 and rec.desired == 7
    assert rec.reason.startswith("holding 7 during the 60 s scale-down window")
    assert d.update(10.0, 7, 8, now_s=59.0).desired == 7
    rec = d.update(10.0, 7, 8, now_s=61.0)
    assert rec.desired == 2, rec.reason


def test_scale_up_uses_the_largest_recent_recommendation():
    d = desired(scale_up_window_s=3.0, scale_down_window_s=0.0)
    assert d.update(50.0, 1, 8, now_s=0.0).desired == 9
    # a dip inside the short window does not undo a scale-up that has not happened yet
    assert d.update(5.0, 1, 8, now_s=1.0).desired == 9
    # after the window, with no scale-down window, it follows the load
    assert d.update(5.0, 9, 8, now_s=5.0).desired == 1


def test_bounds_are_named_in_the_reason():
    d = desired(max_replicas=3, min_replicas=2)
    rec = d.update(100.0, 2, 4, now_s=0.0)
    assert rec.desired == 3 and "capped at max_replicas 3" in rec.reason
    d2 = desired(min_replicas=2, scale_down_window_s=0.0)
    rec = d2.update(0.0, 2, 4, now_s=0.0)
    assert rec.desired == 2 and "raised to min_replicas 2" in rec.reason


def test_tracker_pool_load_gauges_and_snapshot():
    clock = [100.0]
    reg = CollectorRegistry()
    sec = CapacitySection(replica_concurrency_limit=4, in_flight_window_s=5.0, scale_down_window_s=0.0)
    t = CapacityTracker(sec, region="eu-west", registry=reg, clock=lambda: clock[0])
    a, b = "grpc://127.0.0.1:1", "grpc://127.0.0.1:2"
    for _ in range(10):
        t.observe("eu-ort", a, 0.05, 2, clock[0])
        t.observe("eu-ort", b, 0.05, 2, clock[0])
    t.sample([("eu-ort", {a: 8, b: 8}, [a, b], 2)])
    load = t.pools["eu-ort"].load()
    assert load.limit_total == 8 and load.in_flight == 16 and load.queued == 8
    assert math.isclose(load.utilization, 2.0)
    assert math.isclose(load.expected_queue_ms, 8 * 0.05 / 8 * 1000, rel_tol=1e-6)
    snap = t.snapshot()
    pool = snap["pools"]["eu-ort"]
    assert pool["desired_replicas"] == 6  # ceil(16 / (0.7 * 4))
    assert "want 6" in pool["reason"]
    assert snap["load"]["utilization"] == 2.0 and snap["load"]["expected_queue_ms"] == 50.0
    text = generate_latest(reg).decode()
    assert 'geogate_pool_desired_replicas{pool="eu-ort",region="eu-west"} 6.0' in text
    assert "geogate_pool_desired_replicas_reason{" in text and "want 6" in text
    # the reason gauge keeps one series per pool: the old reason goes away
    clock[0] += 10
    t.sample([("eu-ort", {a: 0, b: 0}, [a, b], 2)])
    text = generate_latest(reg).decode()
    assert text.count("geogate_pool_desired_replicas_reason{") == 1


def test_no_routable_replica_means_unbounded_queueing():
    t = CapacityTracker(CapacitySection(), region="r")
    t.sample([("p", {"grpc://127.0.0.1:1": 3}, [], 1)], now_s=0.0)
    assert math.isinf(t.pools["p"].load().expected_queue_ms)
    assert t.region_load()["expected_queue_ms"] == -1.0


def test_capacity_section_defaults_keep_configs_valid():
    cfg = parse_config("[deployment]\nname = 'x'\n")
    assert cfg.capacity.target_utilization == 0.7
    cfg = parse_config("[capacity]\nreplica_concurrency_limit = 4\nmax_replicas = 3\n")
    assert cfg.capacity.replica_concurrency_limit == 4


def test_workers_scale_the_in_flight_each_worker_sees():
    sec = CapacitySection(replica_concurrency_limit=4, scale_down_window_s=0.0)
    t = CapacityTracker(sec, region="r", workers=2)
    t.sample([("p", {"grpc://127.0.0.1:1": 3}, ["grpc://127.0.0.1:1"], 1)], now_s=0.0)
    load = t.pools["p"].load()
    assert load.in_flight == 6 and math.isclose(load.utilization, 1.5)
    assert t.snapshot()["pools"]["p"]["desired_replicas"] == 3  # ceil(6 / (0.7 * 4))


def test_each_replica_limit_is_learned_once_per_sample(monkeypatch):
    """Found by the planet simulation (loadtests/sim): the recommendation, the gauges and the
    region load each recomputed every replica's learned limit and its explanation string, 33 ms
    per sample for a 1,162-replica pool; now once per sample, explanations only for the snapshot."""
    calls = [0]
    learned = ConcurrencyLimit._learned

    def counting(self):
        calls[0] += 1
        return learned(self)

    monkeypatch.setattr(ConcurrencyLimit, "_learned", counting)
    t = CapacityTracker(CapacitySection(), region="r", registry=CollectorRegistry())
    urls = [f"grpc://127.0.0.1:{i}" for i in range(1, 41)]
    for u in urls:
        feed_replica(t.pool("p").limit_of(u), 4, 0.01, range(1, 13), n=6)
    t.sample([("p", dict.fromkeys(urls, 3), urls, len(urls))], now_s=1.0)
    t.region_load()
    t.pool_loads()
    assert calls[0] == len(urls)  # recommendation + gauges + region load: one learning pass
    snap = t.snapshot()
    assert snap["pools"]["p"]["limits"][urls[0]].startswith("learned 4")  # the snapshot still explains
    assert snap["pools"]["p"]["concurrency_limit"] == 4 * len(urls)
    t.sample([("p", dict.fromkeys(urls, 30), urls, len(urls))], now_s=1.25)
    assert t.region_load()["utilization"] > 1.0  # a new sample is a new load


def feed_noisy(lim: ConcurrencyLimit, slots: int, service_s: float, mean_level: float, *, n: int = 6000,
               shape: float = 9.0, now_s: float = 0.0, seed: int = 1) -> float:
    """Requests at in-flight levels around `mean_level`, service times gamma(shape) (cv^2 = 1/shape)."""
    import random

    rng = random.Random(seed)
    for _ in range(n):
        now_s += 0.005
        level = max(1, round(mean_level + math.sqrt(mean_level) * rng.gauss(0.0, 1.0)))
        lim.observe(rng.gammavariate(shape, service_s / shape) * max(1.0, level / slots), level, now_s)
    return now_s


def test_varying_service_times_do_not_fake_a_knee():
    """Found by the planet simulation (loadtests/sim): with service times varying by a third
    (cv 0.33), the fastest single sample is ~5 ms for a 30 ms service, every level's average
    was 'past 2x the minimum', and a 16-slot replica at half load learned a limit of 4
    (utilization x4: sheddable traffic refused at a quarter of the real capacity)."""
    lim = ConcurrencyLimit(initial=8)
    feed_noisy(lim, 16, 0.030, 8.0)
    assert lim.limit >= 14, lim.explain()  # the highest level seen, no knee: nothing slowed down
    assert "no latency knee" in lim.explain()


def test_the_knee_is_still_found_with_varying_service_times():
    lim = ConcurrencyLimit(initial=2)
    now = 0.0
    for level in range(1, 13):
        now = feed_noisy(lim, 4, 0.010, level, n=400, now_s=now, seed=level)
    assert 3 <= lim.limit <= 5, lim.explain()
    assert "latency passes 2x the base" in lim.explain()


def test_the_base_latency_rises_again_after_the_replica_slows_down():
    lim = ConcurrencyLimit(initial=8)
    now = feed_noisy(lim, 16, 0.020, 8.0, n=4000)
    fast = lim.base_latency_s
    feed_noisy(lim, 16, 0.040, 8.0, n=20000, now_s=now, seed=2)  # a slower model: 100 s of it
    assert lim.base_latency_s > 1.6 * fast
    assert lim.limit >= 12, lim.explain()  # slower, not saturated: no knee
