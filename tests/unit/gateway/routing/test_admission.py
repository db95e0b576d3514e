"""Priority classes and admit / shed / spill decisions (pure logic)."""

from __future__ import annotations

import math

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from core.config import CapacitySection, ConfigError, parse_config
from gateway.routing.admission import (
    AdmissionController,
    AdmissionMetrics,
    PriorityError,
    priority_from_headers,
    priority_from_metadata,
    request_priority,
)

SEC = CapacitySection(sheddable_max_utilization=1.0, sheddable_max_queue_ms=50.0,
                      standard_max_utilization=2.0, standard_max_queue_ms=500.0)


def test_priority_sources():
    assert request_priority(None) == "standard"
    assert request_priority(None, default="sheddable") == "sheddable"
    assert request_priority("Critical") == "critical"
    assert request_priority(None, key_priority="sheddable") == "sheddable"
    # a key may lower its priority but never raise it
    assert request_priority("sheddable", key_priority="standard") == "sheddable"
    assert request_priority("critical", key_priority="standard") == "standard"
    assert priority_from_headers({"geogate-priority": "sheddable"}) == "sheddable"
    assert priority_from_metadata((("x", "y"), ("geogate-priority", b"critical"))) == "critical"
    with pytest.raises(PriorityError, match="use one of critical, standard, sheddable"):
        request_priority("urgent")


def test_idle_region_admits_everything():
    ac = AdmissionController(SEC, region="eu-west")
    for p in ("critical", "standard", "sheddable"):
        d = ac.decide(p, 0.3, 0.0)
        assert d.admitted and not d.spill and d.http_status == 200


def test_sheddable_is_refused_first_with_retry_after():
    ac = AdmissionController(SEC, region="eu-west")
    d = ac.decide("sheddable", 1.2, 2400.0)
    assert not d.admitted and d.http_status == 429
    assert d.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert d.retry_after_s == 3  # ceil((2400 - 50) / 1000)
    assert d.http_headers() == {"Retry-After": "3"}
    assert d.grpc_trailers() == (("retry-after", "3"),)
    assert "sheddable request refused in region 'eu-west'" in d.reason
    assert "expected queueing 2400 ms is over 50 ms" in d.reason
    # standard is still served at that load (between the two bounds)
    assert ac.decide("standard", 1.2, 60.0).admitted
    # utilization alone also sheds sheddable
    d = ac.decide("sheddable", 1.5, 0.0)
    assert not d.admitted and "utilization 150% is over 100%" in d.reason


def test_standard_spills_when_a_peer_has_capacity_else_refused():
    ac = AdmissionController(SEC, region="eu-west")
    d = ac.decide("standard", 3.0, 900.0, peer_available=True, peer="us-east")
    assert d.admitted and d.spill and "spilled to region 'us-east'" in d.reason
    d = ac.decide("standard", 3.0, 900.0)
    assert not d.admitted and d.http_status == 429 and d.retry_after_s == 1
    assert "no peer region has capacity" in d.reason


def test_standard_is_refused_only_in_deep_overload():
    """Past one bound (the learned knee, or a long queue at replicas within their limits) is
    queueing, not overload: standard is served; past both it is refused."""
    ac = AdmissionController(SEC, region="eu-west")
    d = ac.decide("standard", 21.2, 6.0)  # 2120% of a small learned limit, 6 ms expected wait
    assert d.admitted and not d.spill and "standard request queued" in d.reason
    assert ac.decide("standard", 1.5, 900.0).admitted  # long queue, replicas within their limits
    d = ac.decide("standard", 21.2, 900.0)
    assert not d.admitted and "expected queueing 900 ms is over 500 ms at utilization 2120%" in d.reason
    # sheddable still goes at the knee
    assert not ac.decide("sheddable", 21.2, 6.0).admitted


def test_tiny_model_at_high_concurrency_is_not_refused():
    """A replica that answers in 0.3 ms whatever the concurrency (it batches) teaches a limit of
    about 1 (its latency doubles at in-flight 2); 32 and 128 concurrent clients, with one or
    four gateway workers, are then far past the limit but expect a few ms of queueing: admitted."""
    from gateway.routing.admission import OverloadGuard
    from gateway.routing.capacity import CapacityTracker
    from gateway.routing.load_spill import LoadSpill

    sec = CapacitySection()  # the defaults
    for workers in (1, 4):
        for clients in (32, 128):
            tracker = CapacityTracker(sec, region="r1", workers=workers)
            url = "http://127.0.0.1:1"
            now = 100.0
            for level, latency in ((1, 0.0003), (2, 0.0007), (4, 0.0012)):
                for _ in range(10):
                    tracker.observe("p", url, latency, level, now)
            per_worker = clients // workers
            tracker.sample([("p", {url: per_worker}, [url], 1)], now)
            tracker.sample([("p", {url: per_worker}, [url], 1)], now + 0.25)
            guard = OverloadGuard(AdmissionController(sec, region="r1"), tracker, LoadSpill(sec), None)
            guard.refresh(now + 0.25)
            assert guard.utilization > sec.standard_max_utilization  # far past the learned limit
            d = guard.check("standard")
            assert d.admitted, (workers, clients, d.reason, guard.queue_ms)


def test_critical_is_never_refused():
    ac = AdmissionController(SEC, region="eu-west")
    d = ac.decide("critical", 10.0, 10_000.0, peer_available=True, peer="us-east")
    assert d.spill
    d = ac.decide("critical", math.inf, math.inf)
    assert d.admitted and not d.spill and "critical request queued" in d.reason
    # sheddable at no capacity at all: longest Retry-After
    d = ac.decide("sheddable", math.inf, math.inf)
    assert d.retry_after_s == 60 and "no capacity" in d.reason


def test_counters_and_metrics():
    ac = AdmissionController(SEC, region="eu-west")
    ac.decide("sheddable", 2.0, 100.0)
    ac.decide("sheddable", 0.1, 0.0)
    ac.decide("standard", 3.0, 900.0, peer_available=True)
    c = ac.counters()
    assert c["sheddable"] == {"admitted": 1, "shed": 1, "spilled": 0}
    assert c["standard"]["spilled"] == 1
    reg = CollectorRegistry()
    metrics = AdmissionMetrics(ac, reg)
    text = generate_latest(reg).decode()
    assert 'geogate_admission_decisions_total{outcome="shed",priority="sheddable",region="eu-west"} 0.0' in text
    metrics.flush()  # (on the sampler's timer in a gateway)
    ac.decide("critical", 0.1, 0.0)
    metrics.flush()
    metrics.flush()  # idempotent
    text = generate_latest(reg).decode()
    assert 'geogate_admission_decisions_total{outcome="admitted",priority="critical",region="eu-west"} 1.0' in text
    assert 'geogate_admission_decisions_total{outcome="shed",priority="sheddable",region="eu-west"} 1.0' in text


def test_config_keeps_the_order_of_bounds():
    with pytest.raises(ConfigError, match=r"capacity\.standard_max_queue_ms"):
        parse_config("[capacity]\nsheddable_max_queue_ms = 9000.0\n")
    with pytest.raises(ConfigError, match=r"capacity\.default_priority"):
        parse_config("[capacity]\ndefault_priority = 'urgent'\n")


def _guard(clock, peers=None, **kw):
    import random

    from gateway.routing.admission import OverloadGuard
    from gateway.routing.capacity import CapacityTracker
    from gateway.routing.load_spill import LoadSpill, PeerLoad

    base = dict(replica_concurrency_limit=2, spill_queue_ms=100.0, spill_min_dwell_ms=0, spill_ramp_step=1.0,
                sheddable_max_queue_ms=50.0, standard_max_queue_ms=500.0, standard_max_utilization=2.0)
    base.update(kw)
    sec = CapacitySection(**base)
    tracker = CapacityTracker(sec, region="eu-west", clock=lambda: clock[0])
    url = "grpc://127.0.0.1:1"
    for _ in range(10):
        tracker.observe("p", url, 0.1, 1, clock[0])
    peers = [PeerLoad("us-east", 30.0, 0.0, 0.2)] if peers is None else peers
    guard = OverloadGuard(AdmissionController(sec, region="eu-west"), tracker,
                          LoadSpill(sec, clock=lambda: clock[0], rng=random.Random(1)), lambda: peers)
    return guard, tracker, url


def _load(guard, tracker, clock, url, in_flight, samples=20, routable=True):
    """`samples` sampler ticks at a steady in-flight count (the guard smooths over a few)."""
    for _ in range(samples):
        clock[0] += 0.1
        tracker.sample([("p", {url: in_flight}, [url] if routable else [], 1)])
        guard.refresh()


def test_overload_guard_end_to_end_logic():
    clock = [0.0]
    guard, tracker, url = _guard(clock)
    # idle: everything local
    _load(guard, tracker, clock, url, 1)
    assert [guard.check(p).outcome for p in ("critical", "standard", "sheddable")] == ["admitted"] * 3
    # 6 in flight over a limit of 2, 100 ms service: 200 ms expected queueing
    _load(guard, tracker, clock, url, 6)
    assert math.isclose(guard.queue_ms, 200.0, rel_tol=1e-3) and guard.spill.spilling
    d = guard.check("sheddable")
    assert d.outcome == "shed" and d.http_status == 429
    d = guard.check("standard")
    assert d.outcome == "spilled" and d.peer == "us-east"
    assert guard.check("critical").peer == "us-east"
    # a request that came from a peer is never sent on: over one standard bound (utilization
    # 300% > 200%) but expected to wait 200 ms (< 500 ms) it queues here; deep overload refuses it
    d = guard.check("standard", may_spill=False)
    assert d.outcome == "admitted" and "standard request queued" in d.reason
    assert guard.check("critical", may_spill=False).outcome == "admitted"
    # capacity back: spill stops (after stepping down), all local again
    _load(guard, tracker, clock, url, 1)
    assert not guard.spill.spilling
    assert guard.check("standard").outcome == "admitted"
    c = guard.controller.counters()
    assert c["standard"] == {"admitted": 3, "shed": 0, "spilled": 1}
    assert c["sheddable"]["shed"] == 1


def test_overloaded_without_a_peer_sheds_standard_and_queues_critical():
    clock = [0.0]
    guard, tracker, url = _guard(clock, peers=[])
    # 24 in flight over 2 slots: 1100 ms expected queueing, over every bound
    _load(guard, tracker, clock, url, 24)
    assert guard.queue_ms > 1000
    s = guard.check("standard")
    assert s.outcome == "shed" and s.retry_after_s == 1 and "no peer region has capacity" in s.reason
    c = guard.check("critical")
    assert c.outcome == "admitted" and "critical request queued" in c.reason


def test_saturated_peer_is_not_a_spill_target():
    from gateway.routing.load_spill import PeerLoad

    clock = [0.0]
    guard, tracker, url = _guard(clock, peers=[PeerLoad("us-east", 1.0, 0.0, 1.5)])
    _load(guard, tracker, clock, url, 6)
    assert guard.spill.spilling and guard.check("critical").outcome == "admitted"  # queued here
    assert "us-east: no spare capacity" in guard.spill_state()["peer_reason"]


def test_no_routable_replica_is_not_overload():
    """Health failover moves such traffic; nothing is shed or load-spilled."""
    clock = [0.0]
    guard, tracker, url = _guard(clock)
    _load(guard, tracker, clock, url, 0, routable=False)
    assert guard.no_capacity and not guard.spill.spilling
    assert guard.check("sheddable").outcome == "admitted"
    assert tracker.region_load()["expected_queue_ms"] == -1.0  # what peers read: no capacity here


def test_single_region_never_spills():
    from gateway.routing.admission import OverloadGuard
    from gateway.routing.capacity import CapacityTracker
    from gateway.routing.load_spill import LoadSpill

    clock = [0.0]
    sec = CapacitySection(replica_concurrency_limit=1, spill_min_dwell_ms=0)
    tracker = CapacityTracker(sec, clock=lambda: clock[0])
    guard = OverloadGuard(AdmissionController(sec), tracker, LoadSpill(sec, clock=lambda: clock[0]))
    assert not guard.has_peers
    tracker.observe("p", "u", 0.1, 1, 0.0)
    _load(guard, tracker, clock, "u", 30)
    assert not guard.spill.spilling and guard.spill_state()["reason"] == "no peer region to spill to"


def test_classify_uses_the_configured_default():
    clock = [0.0]
    guard, _, _ = _guard(clock, default_priority="sheddable")
    assert guard.classify("") == "sheddable"
    assert guard.classify("", "critical") == "critical"
    assert guard.classify("critical", "standard") == "standard"
    with pytest.raises(PriorityError, match="unknown priority 'urgent'"):
        guard.classify("urgent")


def test_forwarder_admission_step():
    """What the forwarder does with the guard's answer, once per request."""
    import types

    from gateway.routing.forwarder import Forwarder, spill_first
    from gateway.routing.targets import TARGET_LOCAL, TARGET_PEER, Target
    from gateway.upstream.types import InferCall

    clock = [0.0]
    guard, tracker, url = _guard(clock)
    fwd = types.SimpleNamespace(overload=guard)

    def call(priority="", hops=0, key=None):
        return InferCall("http", "demo", None, None, "rid", 1e9, hops=hops, priority=priority, key_priority=key)

    refused, _, _ = Forwarder.admit(fwd, call("urgent"))
    assert refused.http_status == 400 and refused.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown priority 'urgent'" in refused.message
    _load(guard, tracker, clock, url, 6)  # overloaded, spilling to us-east
    refused, peer, _ = Forwarder.admit(fwd, call("sheddable"))
    assert (refused.http_status, refused.grpc_code) == (429, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert refused.retry_after_s == 1
    assert "sheddable request refused" in refused.message
    c = call("critical")
    refused, peer, why = Forwarder.admit(fwd, c)
    assert refused is None and peer == "us-east" and "us-east" in why
    assert c.priority == "critical"  # the class a peer would be told
    # an API key capped at standard cannot send critical
    c = call("critical", key="standard")
    Forwarder.admit(fwd, c)
    assert c.priority == "standard"
    # from a peer without a class: admitted as the peer decided, never sent on
    assert Forwarder.admit(fwd, call("", hops=1, key="sheddable")) == (None, "", "")
    # ... with one: judged here, but never spilled again
    refused, peer, _ = Forwarder.admit(fwd, call("critical", hops=1))
    assert refused is None and peer == ""

    local, a, b = Target(TARGET_LOCAL, "eu-west"), Target(TARGET_PEER, "us-east"), Target(TARGET_PEER, "ap-south")
    assert spill_first((local, b, a), "us-east") == (a, local, b)
    assert spill_first((local, b), "us-east") == (local, b)


# ---------------------------------------------------------------- spill targets (loadtests/sim)
# Found by the planet simulation: the whole spilled share went to the single best-looking peer,
# whatever its size; a big region (and several at once) buried a small idle peer, which spilled
# in turn, and the loss of the busiest region at 80% peak load cascaded over twenty regions.


def test_spilled_requests_spread_over_the_peers_by_spare_capacity():
    from gateway.routing.load_spill import PeerLoad

    clock = [0.0]
    big = PeerLoad("us-east", 30.0, 0.0, 0.5, concurrency_limit=400)  # 200 spare
    small = PeerLoad("eu-central", 20.0, 0.0, 0.5, concurrency_limit=40)  # 20 spare, and closer
    guard, tracker, url = _guard(clock, peers=[big, small])
    _load(guard, tracker, clock, url, 6)
    assert guard.spill.spilling and guard.spill_state()["targets"] == ["us-east", "eu-central"]
    sent = [guard.check("standard").peer for _ in range(4000)]
    assert set(sent) == {"us-east", "eu-central"}
    assert abs(sent.count("eu-central") / 4000 - 20 / 220) < 0.02  # by room, not by who looks best
    assert guard.spill_state()["peer"] == "eu-central"  # still named as the soonest


def test_the_load_aware_share_is_capped_by_the_peers_room():
    from gateway.routing.load_spill import PeerLoad

    clock = [0.0]
    # local: 6 in flight; the only peer has room for 1 more (limit 2 at 50%)
    guard, tracker, url = _guard(clock, peers=[PeerLoad("us-east", 30.0, 0.0, 0.5, concurrency_limit=2)],
                                 standard_max_queue_ms=5000.0, standard_max_utilization=8.0)
    _load(guard, tracker, clock, url, 6)
    assert guard.spill.spilling and guard.spill.fraction == 1.0
    assert math.isclose(guard.spill_state()["capped_at"], 1 / 6, rel_tol=0.05)
    outcomes = [guard.check("standard").outcome for _ in range(3000)]
    assert abs(outcomes.count("spilled") / 3000 - 1 / 6) < 0.03  # not all of it: the peer has room for 1


def test_peers_without_an_advertised_limit_keep_the_best_peer_uncapped():
    from gateway.routing.load_spill import PeerLoad

    clock = [0.0]
    guard, tracker, url = _guard(clock, peers=[PeerLoad("us-east", 30.0, 0.0, 0.5),
                                               PeerLoad("ap-south", 90.0, 0.0, 0.1)],
                                 standard_max_queue_ms=5000.0, standard_max_utilization=8.0)
    _load(guard, tracker, clock, url, 6)
    assert guard.spill_state()["targets"] == ["us-east"] and guard.spill_state()["capped_at"] == 1.0
    assert {guard.check("standard").peer for _ in range(200)} == {"us-east"}
