"""Priority classes and admit / shed / spill decisions (pure logic)."""

from __future__ import annotations

import math

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.admission import (
    AdmissionController,
    AdmissionMetrics,
    PriorityError,
    priority_from_headers,
    priority_from_metadata,
    request_priority,
)
from gateway.config import CapacitySection, ConfigError, parse_config

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
    AdmissionMetrics(ac, reg)
    text = generate_latest(reg).decode()
    assert 'geogate_admission_decisions_total{outcome="shed",priority="sheddable",region="eu-west"} 1.0' in text


def test_config_keeps_the_order_of_bounds():
    with pytest.raises(ConfigError, match=r"capacity\.standard_max_queue_ms"):
        parse_config("[capacity]\nsheddable_max_queue_ms = 900.0\n")
    with pytest.raises(ConfigError, match=r"capacity\.default_priority"):
        parse_config("[capacity]\ndefault_priority = 'urgent'\n")


def _guard(clock):
    import random

    from gateway.admission import OverloadGuard
    from gateway.capacity import CapacityTracker
    from gateway.load_spill import LoadSpill, PeerLoad

    sec = CapacitySection(replica_concurrency_limit=2, spill_queue_ms=100.0, spill_min_dwell_ms=0,
                          spill_ramp_step=1.0, sheddable_max_queue_ms=50.0, standard_max_queue_ms=500.0)
    tracker = CapacityTracker(sec, region="eu-west", clock=lambda: clock[0])
    url = "grpc://127.0.0.1:1"
    for _ in range(10):
        tracker.observe("p", url, 0.1, 1, clock[0])
    peers = [PeerLoad("us-east", 30.0, 0.0, 0.2)]
    guard = OverloadGuard(AdmissionController(sec, region="eu-west"), tracker,
                          LoadSpill(sec, clock=lambda: clock[0], rng=random.Random(1)), lambda: peers)
    return guard, tracker, url


def test_overload_guard_end_to_end_logic():
    clock = [0.0]
    guard, tracker, url = _guard(clock)
    # idle: everything local
    tracker.sample([("p", {url: 1}, [url], 1)])
    guard.refresh()
    assert [guard.check(p).outcome for p in ("critical", "standard", "sheddable")] == ["admitted"] * 3
    # 6 in flight over a limit of 2, 100 ms service: 200 ms expected queueing
    clock[0] += 1
    tracker.sample([("p", {url: 6}, [url], 1)])
    guard.refresh()
    assert guard.queue_ms == 200.0 and guard.spill.spilling
    d = guard.check("sheddable")
    assert d.outcome == "shed" and d.http_status == 429
    d = guard.check("standard")
    assert d.outcome == "spilled" and d.peer == "us-east"
    assert guard.check("critical").peer == "us-east"
    # capacity back: spill stops, all local again
    clock[0] += 1
    tracker.sample([("p", {url: 1}, [url], 1)])
    guard.refresh()
    assert not guard.spill.spilling
    assert guard.check("standard").outcome == "admitted"
    c = guard.controller.counters()
    assert c["standard"] == {"admitted": 2, "shed": 0, "spilled": 1}
    assert c["sheddable"]["shed"] == 1
