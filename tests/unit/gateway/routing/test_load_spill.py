"""Load-aware spill: hysteresis, dwell time, ramp and peer choice (pure logic, fake clock)."""

from __future__ import annotations

import math
import random

from core.config import CapacitySection
from gateway.routing.load_spill import LoadSpill, PeerLoad, peer_load_from_summary, peer_loads

SEC = CapacitySection(spill_queue_ms=100.0, spill_exit_fraction=0.7, spill_min_dwell_ms=2000,
                      spill_ramp_step=0.25)


def make(clock):
    return LoadSpill(SEC, clock=lambda: clock[0], rng=random.Random(7))


def test_enter_above_bound_and_leave_below_the_exit_bound_only():
    clock = [0.0]
    s = make(clock)
    assert not s.update(90.0)
    assert s.update(150.0)
    assert s.fraction == 0.25
    # inside the hysteresis band (70..100 ms): stays spilling, even long after the dwell
    for _ in range(10):
        clock[0] += 1.0
        assert s.update(85.0)
    assert s.fraction == 0.25
    # under the band: the share steps down by half a step per update...
    clock[0] += 1.0
    assert s.update(60.0) and s.fraction == 0.125 and "spilling less" in s.reason
    clock[0] += 1.0
    assert s.update(60.0) and s.fraction == 0.0
    # ... and spill stops once none has been needed for the dwell time (2 s)
    clock[0] += 1.0
    assert s.update(60.0)
    clock[0] += 2.0
    assert not s.update(60.0)
    assert s.fraction == 0.0 and "spill stopped" in s.reason


def test_no_oscillation_around_the_bound():
    clock = [0.0]
    s = make(clock)
    flips = 0
    state = False
    for i in range(200):  # queueing wobbling around B every 100 ms
        clock[0] += 0.1
        now = s.update(100.0 + (15.0 if i % 2 else -15.0))
        flips += now != state
        state = now
    assert flips == 1  # entered once, never left: 85 ms is inside the band


def test_min_dwell_time():
    clock = [0.0]
    s = make(clock)
    assert s.update(500.0)
    clock[0] += 0.5
    assert s.update(0.0) and s.fraction == 0.125
    clock[0] += 0.5
    assert s.update(0.0) and s.fraction == 0.0
    clock[0] += 0.5
    assert s.update(0.0)  # no share needed since now: the calm dwell (2 s) starts
    clock[0] += 1.9
    assert s.update(0.0)  # not yet
    clock[0] += 0.1
    assert not s.update(0.0)
    clock[0] += 0.5
    assert not s.update(500.0)  # just left: dwell again before re-entering
    assert "waiting out the dwell time" in s.reason
    clock[0] += 2.0
    assert s.update(500.0)


def test_fraction_ramps_up_while_over_the_bound():
    clock = [0.0]
    s = make(clock)
    fractions = []
    for _ in range(6):
        clock[0] += 0.25
        s.update(400.0)
        fractions.append(s.fraction)
    assert fractions == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_peer_choice_rtt_plus_queueing():
    clock = [0.0]
    s = make(clock)
    s.update(300.0)
    s.fraction = 1.0
    peers = [PeerLoad("us-east", 80.0, 10.0, 0.5), PeerLoad("ap-south", 150.0, 0.0, 0.1),
             PeerLoad("us-west", 20.0, 400.0, 0.9)]
    choice = s.choose(peers)
    assert choice.region == "us-east" and "rtt 80 ms + queueing 10 ms" in choice.reason
    # a saturated, not-ready or stale peer is never chosen; nothing sooner: stay local
    bad = [PeerLoad("a", 1.0, 0.0, 1.2), PeerLoad("b", 1.0, 0.0, 0.1, ready=False),
           PeerLoad("c", 1.0, 0.0, 0.1, age_s=60.0), PeerLoad("d", 290.0, 20.0, 0.2)]
    choice = s.choose(bad)
    assert choice.region is None
    for why in ("a: no spare capacity", "b: not ready", "c: load report is 60 s old", "d: rtt 290 ms"):
        assert why in choice.reason


def test_partial_fraction_sends_about_that_share():
    clock = [0.0]
    s = make(clock)
    s.update(300.0)
    s.update(300.0)  # 50%
    peers = [PeerLoad("us-east", 5.0, 0.0, 0.1)]
    n = sum(s.choose(peers).region == "us-east" for _ in range(2000))
    assert 850 < n < 1150


def test_local_when_not_spilling():
    clock = [0.0]
    s = make(clock)
    s.update(10.0)
    assert s.choose([PeerLoad("us-east", 1.0, 0.0, 0.0)]).region is None


def test_peer_load_from_summary_fields():
    summary = {"region": "us-east", "ready": True,
               "load": {"in_flight": 3, "utilization": 0.4, "expected_queue_ms": 12.5}}
    p = peer_load_from_summary(summary, 70.0)
    assert (p.region, p.utilization, p.expected_queue_ms, p.cost_ms) == ("us-east", 0.4, 12.5, 82.5)
    p = peer_load_from_summary({"region": "x", "ready": True, "load": {"expected_queue_ms": -1.0}}, 1.0)
    assert math.isinf(p.expected_queue_ms) and p.unusable()
    assert peer_load_from_summary({"region": "y", "ready": False}, 1.0).unusable() == "not ready"


def test_peer_loads_from_a_region_health_monitor():
    from geo.region_health import RegionHealth

    class Monitor:
        states = {
            "eu-west": RegionHealth("eu-west", "http://127.0.0.1:1", healthy=True, summary={"load": {}}),
            "us-east": RegionHealth("us-east", "http://127.0.0.1:2", healthy=True, rtt_ewma_s=0.05,
                                    last_probe_s=99.0,
                                    summary={"region": "us-east", "ready": True,
                                             "load": {"utilization": 0.3, "expected_queue_ms": 4.0}}),
            "ap-south": RegionHealth("ap-south", "http://127.0.0.1:3", healthy=False, summary=None),
        }

    (p,) = peer_loads(Monitor(), "eu-west", now_s=100.0)
    assert (p.region, p.rtt_ms, p.expected_queue_ms, p.utilization, p.age_s) == ("us-east", 50.0, 4.0, 0.3, 1.0)
    assert p.unusable() == ""


def test_fraction_steps_down_under_the_band_and_spill_stops_after_the_dwell():
    clock = [0.0]
    s = make(clock)
    for _ in range(4):
        clock[0] += 0.25
        s.update(400.0)
    assert s.fraction == 1.0
    clock[0] += 3.0  # dwell over
    fractions = []
    for _ in range(4):
        clock[0] += 0.25
        s.update(10.0)
        fractions.append((s.spilling, s.fraction))
    assert fractions == [(True, 0.875), (True, 0.75), (True, 0.625), (True, 0.5)]
    for _ in range(4 + 1 + 8):  # to 0, then the 2 s dwell
        clock[0] += 0.25
        s.update(10.0)
    assert not s.spilling and "spill stopped" in s.reason


def test_touching_zero_for_a_moment_does_not_end_spilling():
    clock = [0.0]
    s = make(clock)
    s.update(400.0)
    for q in (10.0, 10.0, 10.0):  # the share falls to 0 ...
        clock[0] += 3.0
        s.update(q)
    assert s.spilling and s.fraction == 0.0
    clock[0] += 1.0
    assert s.update(400.0) and s.fraction == 0.25  # ... the load is still there: up again, never left


def test_spilling_settles_when_spilling_itself_empties_the_local_queue():
    """The plant the controller runs on: the local queue depends on the share kept at home.
    Offered load 8 in flight on 2 slots of 100 ms: (8 (1 - f) - 2) x 50 ms of queueing. The
    spill must not flap on/off (dropping to 0 would refill the queue at once): it enters
    once, settles inside the band, and stops once the offered load falls."""
    clock = [0.0]
    s = make(clock)

    def queue_ms(offered: float) -> float:
        return max(0.0, offered * (1.0 - (s.fraction if s.spilling else 0.0)) - 2.0) * 50.0

    flips, state, settled = 0, False, []
    for i in range(400):  # 100 s of high load at 4 updates per second
        clock[0] += 0.25
        now = s.update(queue_ms(8.0))
        flips += now != state
        state = now
        if i >= 200:
            settled.append(queue_ms(8.0))
    assert flips == 1
    assert max(settled) <= 150.0 and min(settled) >= 0.0  # hunting between neighbouring shares only
    assert 0.5 <= s.fraction <= 0.75
    # the load falls: spill ends within a few updates plus the dwell
    for _ in range(8 + 9):
        clock[0] += 0.25
        s.update(queue_ms(1.0))
    assert not s.spilling and s.fraction == 0.0


def test_while_spilling_a_peer_under_the_bound_stays_the_target():
    """The local queue is short because of the spill: a peer faster than the spill bound keeps
    taking the share, one slower than the bound does not."""
    clock = [0.0]
    s = make(clock)
    s.update(400.0)
    s.update(0.0)  # the spill emptied the local queue
    peer, why = s.best_peer([PeerLoad("us-east", 30.0, 10.0, 0.3)])
    assert peer is not None and peer.region == "us-east" and "< 100 ms here" in why
    assert s.best_peer([PeerLoad("us-east", 90.0, 20.0, 0.3)])[0] is None
    not_spilling = make(clock)
    not_spilling.update(0.0)
    assert not_spilling.best_peer([PeerLoad("us-east", 1.0, 0.0, 0.0)])[0] is None


def test_peer_spare_capacity_from_the_summary_and_spill_targets():
    p = peer_load_from_summary({"region": "us-east", "ready": True,
                                "load": {"utilization": 0.25, "expected_queue_ms": 0.0, "concurrency_limit": 80}}, 40.0)
    assert p.concurrency_limit == 80 and p.spare_in_flight == 60.0
    assert math.isinf(PeerLoad("old", 1.0, 0.0, 0.2).spare_in_flight)  # an older gateway: not advertised
    assert PeerLoad("full", 1.0, 0.0, 1.3, concurrency_limit=10).spare_in_flight == 0.0
    clock = [0.0]
    s = make(clock)
    s.update(300.0)
    peers = [p, PeerLoad("ap-south", 150.0, 0.0, 0.1), PeerLoad("busy", 1.0, 0.0, 1.2),
             PeerLoad("far", 400.0, 0.0, 0.1)]
    assert [t.region for t in s.spill_targets(peers)] == ["us-east", "ap-south"]  # ready, room, sooner
    assert s.best_peer(peers)[0].region == "us-east"
