"""Replica eligibility and panic routing: pure logic on ReplicaState objects."""

import pytest

from health.replica_state import (
    REASON_DRAINING,
    REASON_EJECTED,
    REASON_UNHEALTHY,
    ReplicaState,
)
from health.selection import eligible, healthy_fraction

NOW = 1000.0


def replica(port: int, *, healthy=True, versions=("1",), model="demo", pool="eu-ort",
            cause="", ejected=False, draining=False) -> ReplicaState:
    r = ReplicaState(f"grpc://127.0.0.1:{port}", pool=pool)
    r.healthy = healthy
    r.ready_versions = {model: set(versions)} if versions else {}
    r.ready_versions_known = True
    if not healthy:
        r.health_cause = cause or "probe timeout"
        r.health_reason = f"{r.health_cause} after 500 ms"
    if ejected:
        r.ejected_until_s = NOW + 5
    r.draining = draining
    return r


def urls(e):
    return sorted(r.url for r in e.replicas)


def test_replica_state_basics():
    r = ReplicaState("http://127.0.0.1:8000/", weight=0, pool="p")
    assert (r.scheme, r.address, r.weight) == ("http", "127.0.0.1:8000", 1)
    assert r.routable(NOW) == (False, REASON_UNHEALTHY)
    assert r.has_model("anything")  # versions unknown until probed
    r.healthy = True
    r.ready_versions, r.ready_versions_known = {"demo": {"1", "2"}}, True
    assert r.has_model("demo") and r.has_model("demo", "2") and not r.has_model("demo", "3")
    assert not r.has_model("other")
    r.ejected_until_s = NOW + 1
    assert r.routable(NOW) == (False, REASON_EJECTED)
    r.draining = True
    assert r.routable(NOW) == (False, REASON_DRAINING)
    snap = r.snapshot(NOW)
    assert snap["ready_versions"] == {"demo": ["1", "2"]} and snap["ejected"] and snap["draining"]
    with pytest.raises(ValueError, match="ftp://x:1"):
        ReplicaState("ftp://x:1")


def test_routable_replicas_with_the_version():
    pool = [replica(1, versions=("1", "2")), replica(2, versions=("1",)), replica(3, healthy=False),
            replica(4, ejected=True)]
    e = eligible(pool, "demo", "2", NOW, 0.3)
    assert urls(e) == ["grpc://127.0.0.1:1"] and not e.panic and e.reason == ""
    e = eligible(pool, "demo", None, NOW, 0.3)
    assert urls(e) == ["grpc://127.0.0.1:1", "grpc://127.0.0.1:2"]
    assert healthy_fraction(pool, NOW) == 0.5


def test_panic_routes_to_every_non_draining_replica_with_the_model():
    pool = [replica(1), replica(2, healthy=False), replica(3, ejected=True), replica(4, healthy=False),
            replica(5, draining=True), replica(6, versions=("2",), healthy=False)]
    # 1 of 5 non-draining replicas healthy: 20% < 50%
    e = eligible(pool, "demo", "1", NOW, 0.5)
    assert e.panic
    assert urls(e) == [f"grpc://127.0.0.1:{p}" for p in (1, 2, 3, 4)]
    assert "1 of 5" in e.detail


def test_no_replicas_or_all_draining():
    assert eligible([], "demo", None, NOW, 0.5).reason == "the pool has no replicas"
    pool = [replica(1, draining=True), replica(2, draining=True)]
    e = eligible(pool, "demo", None, NOW, 0.5)
    assert e.replicas == [] and e.reason == "all 2 replicas of pool 'eu-ort' are draining"


def test_version_not_ready_anywhere():
    pool = [replica(1, versions=("1", "2")), replica(2, versions=("10",))]
    e = eligible(pool, "demo", "3", NOW, 0.5)
    assert e.replicas == [] and not e.panic
    assert e.reason == "version 3 of 'demo' is not ready on any replica of pool 'eu-ort' (ready: 1, 2, 10)"
    e = eligible(pool, "other", None, NOW, 0.5)
    assert e.reason == "model 'other' is not ready on any replica of pool 'eu-ort'"


def test_all_unhealthy_names_counts_per_cause():
    pool = [replica(1, healthy=False), replica(2, healthy=False), replica(3, ejected=True)]
    # panic threshold 0: no panic routing, so the reason must explain
    e = eligible(pool, "demo", None, NOW, 0.0)
    assert e.replicas == []
    assert e.reason == "all 3 replicas of pool 'eu-ort' are unhealthy (2 probe timeout, 1 ejected)"
    e = eligible([replica(1, healthy=False, cause="connect refused")], "demo", None, NOW, 0.0)
    assert e.reason == "the only replica of pool 'eu-ort' is unhealthy (1 connect refused)"


def test_version_only_on_unhealthy_replicas():
    pool = [replica(1), replica(2), replica(3, versions=("2",), healthy=False, cause="connect refused"),
            replica(4, draining=True, versions=("2",))]
    e = eligible(pool, "demo", "2", NOW, 0.5)
    assert e.replicas == [] and not e.panic
    assert e.reason == ("the only replica of pool 'eu-ort' that has version 2 of 'demo' is unhealthy "
                        "(1 connect refused); 1 draining")
