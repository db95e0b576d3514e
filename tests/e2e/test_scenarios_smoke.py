"""A smoke run of every chaos scenario (`geogate bench scenario NAME --quick`): real replicas,
gateways, HAProxy, sync agents, moto S3, network namespaces where root, small counts.

Asserted: correctness only, never speed: each scenario's own checks pass (no failed request
where the scenario promises it, verified answers, the right versions and serving regions, the
faults really happened); goal checks (speed) are reported by the scenarios, not asserted; and
nothing is left behind: no process the scenario started (gateway workers included) is still
running and no port it used is still listening.
"""

from __future__ import annotations

import pytest

from loadtests import scenarios
from loadtests.procs import listening_ports, pid_running
from loadtests.results import load_results
from loadtests.scenario import run_scenario

# scenario -> fault event kinds its quick run must record (in its main load)
EVENTS = {
    "replica-kill": {"kill"},
    "slow-replica": {"fault"},
    "flapping-replica": {"stop", "cont"},
    "overhead": set(),
    "region-outage": {"kill-home", "kill-region", "restore"},
    "promotion-under-load": {"promote"},
    "gateway-restart": {"rolling restart"},
    "store-outage": {"promote", "store-back"},
    "soak": set(),
}


def test_every_registered_scenario_has_a_smoke_run():
    assert set(EVENTS) == set(scenarios.SCENARIOS)


@pytest.mark.parametrize("name", list(EVENTS))
def test_scenario_smoke(tmp_path, name):
    outcome = run_scenario(scenarios.get(name), tmp_path / name, quick=True)
    failed = [f"{c.name}: {c.detail}" for c in outcome.checks if not c.ok and not c.goal]
    assert outcome.passed, failed
    doc = load_results(outcome.results_path)
    assert doc["scenario"]["name"] == name and doc["scenario"]["passed"]
    assert EVENTS[name] <= {e["kind"] for e in doc["events"]}, doc["events"]
    t = doc["totals"]
    assert t["sent"] > 0 and t["ok"] > 0
    assert set(t["versions"]) <= {"1", "2"}, t["versions"]
    assert outcome.report_path.stat().st_size > 0
    # nothing left behind, checked here again independently of the scenario's own audit
    cleanup = doc["scenario"]["cleanup"]
    assert cleanup["audited_pids"] and len(cleanup["audited_pids"]) >= len(doc["scenario"]["processes"])
    assert [p for p in cleanup["audited_pids"] if pid_running(p)] == []
    assert listening_ports(set(cleanup["audited_ports"])) == set()
    assert cleanup["left"]["namespaces"] == []
