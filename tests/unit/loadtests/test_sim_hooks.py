"""The product's hooks that let a simulated clock drive it (used by loadtests/sim): the active
checker's rise/fall applied at a given time, the region monitor on an injected clock, pools
with an injected client factory and their reaction to a health flip. Pure logic, in-process;
the same code paths the live probe loops call."""

from __future__ import annotations

from types import SimpleNamespace

from core.config import HealthSection, parse_config
from gateway.upstream.pool import RegionPools
from geo.region_health import RegionHealthMonitor
from health.active import ActiveHealthChecker, ProbeResult
from health.outcomes import Outcome
from health.replica_state import ReplicaState

OK = ProbeResult(ok=True, ready_versions={"demo": {"1"}}, versions_known=True, rtt_s=0.002)
REFUSED = ProbeResult(ok=False, cause="connect refused", reason="connect refused")


def test_active_record_applies_rise_and_fall_at_the_given_time():
    checker = ActiveHealthChecker(HealthSection(rise=2, fall=2))
    st = ReplicaState("grpc://10.0.0.1:8001")
    assert checker.record(st, OK, 5.0)  # first success: healthy at once (never seen healthy)
    assert st.healthy and st.last_probe_s == 5.0 and st.health_changed_s == 5.0
    assert not checker.record(st, REFUSED, 6.0)  # one failure: still healthy, nothing to tell
    assert st.healthy and st.last_probe_error == "connect refused"
    assert checker.record(st, REFUSED, 7.0)  # fall = 2
    assert not st.healthy and st.health_cause == "connect refused" and st.health_changed_s == 7.0
    assert not checker.record(st, OK, 8.0)  # rise = 2: one success is not enough
    assert checker.record(st, OK, 9.0) and st.healthy and st.health_changed_s == 9.0
    newer = ProbeResult(ok=True, ready_versions={"demo": {"1", "2"}}, versions_known=True, rtt_s=0.002)
    assert checker.record(st, newer, 10.0)  # ready versions changed: on_change is due
    assert not checker.record(st, newer, 11.0)


def test_region_monitor_on_an_injected_clock():
    now = [100.0]
    changes = []
    mon = RegionHealthMonitor([SimpleNamespace(name="eu-west", http="10.0.0.1:8000")], interval_ms=500,
                              timeout_ms=400, fall=2, rise=3, on_change=lambda s: changes.append(s.healthy),
                              clock=lambda: now[0])
    summary = {"replicas": {"healthy": 3, "total": 4}}
    mon.record_probe("eu-west", True, "", 0.030, summary)
    st = mon.states["eu-west"]
    assert st.healthy and st.last_probe_s == 100.0 and st.rtt_ewma_s == 0.030
    assert st.healthy_fraction() == 0.75 and changes == [True]
    now[0] = 100.5
    mon.record_probe("eu-west", False, "probe timeout after 400 ms", summary={"replicas": {"healthy": 0, "total": 4}})
    assert st.healthy and st.summary == summary  # a failed probe brings no summary
    now[0] = 101.0
    mon.record_probe("eu-west", False, "probe timeout after 400 ms")
    assert not st.healthy and st.last_change_s == 101.0 and changes == [True, False]
    assert st.reason == "probe timeout after 400 ms"


CONFIG = """
[health]
consecutive_failures = 1
[[regions]]
name = "eu-west"
  [[regions.pools]]
  name = "eu-pool"
  replicas = ["grpc://10.0.0.1:8001", "grpc://10.0.0.2:8001"]
"""


def test_pools_with_a_client_factory_and_their_reaction_to_a_health_flip():
    cfg = parse_config(CONFIG)
    made = []
    pools = RegionPools(cfg, cfg.regions[0], client_factory=lambda state: made.append(state.url) or state.url)
    for pool in pools.pools:
        pool.start()
    assert sorted(made) == ["grpc://10.0.0.1:8001", "grpc://10.0.0.2:8001"]  # no socket opened
    up = pools.upstreams()[0]
    assert up.client == up.state.url
    for st in pools.all_states():
        pools.checker.record(st, OK, 1.0)
    pools.invalidate()
    up.load.observe(0.5, 1.0)
    pools.detector.record(up.state, Outcome.CONNECT_FAILURE, pools.all_states(), 1.0)
    assert up.state.ejected(1.0) and up.state.eject_reason
    pools.checker.record(up.state, REFUSED, 2.0)
    pools.checker.record(up.state, REFUSED, 3.0)
    pools.replica_health_changed(up.state)  # down: cache dropped, history kept
    assert not up.state.healthy and up.load.ewma_s == 0.5
    pools.checker.record(up.state, OK, 4.0)
    pools.checker.record(up.state, OK, 5.0)
    pools.replica_health_changed(up.state)  # back: clean latency record, old ejection lifted
    assert up.state.healthy and up.load.ewma_s == 0.0
    assert not up.state.ejected(5.0) and up.state.eject_reason == ""
    assert up in pools.candidates("demo", None, "grpc", 5.0).upstreams
