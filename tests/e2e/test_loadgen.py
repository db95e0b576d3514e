"""The load generator against a REAL replica process (and, for scenarios, real gateways):
open and closed loop over all three protocols, multi-process merging, answer verification
catching a wrong version, the in-flight cap, latency from the intended send time, results JSON,
report PNG and the CLI. (Smoke runs of the chaos scenarios: tests/e2e/test_scenarios_smoke.py.)"""

from __future__ import annotations

import json

import pytest

from loadtests.loadgen import REASON_OVERLOADED, LoadSpec, run_load
from loadtests.report import write_report
from loadtests.results import SCHEMA, FaultEvent, build_results, load_results, write_results
from replicas.demo.onnx_model import write_repository_entry
from tests.procs import ReplicaProc, http_ok

PROTOCOLS = ("http", "http-binary", "grpc")
RATE = 30.0  # low: the machine is shared
DURATION_S = 2.0


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    """One replica with demo versions 1 and 2 and the test fault switch, for the whole module."""
    repo = tmp_path_factory.mktemp("repo")
    write_repository_entry(repo, 1)
    write_repository_entry(repo, 2)
    proc = ReplicaProc(str(repo), extra=["--enable-test-faults"])
    try:
        proc.wait_ready(timeout_s=120)
        yield proc
    finally:
        proc.stop()


def set_faults(replica: ReplicaProc, **faults) -> None:
    import urllib.request

    body = json.dumps({"delay_ms": 0, "status": 0, "hang": False, **faults}).encode()
    req = urllib.request.Request(f"http://{replica.http_url}/geogate/test/faults", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def target(replica: ReplicaProc, protocol: str) -> str:
    return f"grpc://{replica.grpc_url}" if protocol == "grpc" else f"http://{replica.http_url}"


def results_of(spec: LoadSpec, events=None) -> dict:
    load = run_load(spec)
    return build_results(load.recorder, spec=spec.to_dict(), duration_s=spec.duration_s, events=events)


# ---------------------------------------------------------------------------- pure parts










# ---------------------------------------------------------------------------- against a replica


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_open_loop_sends_the_scheduled_requests_and_verifies_them(replica, protocol):
    spec = LoadSpec(url=target(replica, protocol), protocol=protocol, rate=RATE, duration_s=DURATION_S)
    res = results_of(spec)
    t = res["totals"]
    assert t["sent"] == int(RATE * DURATION_S)  # open loop: the schedule decides, not the server
    assert t["ok"] == t["sent"], t["failed_by_reason"]
    assert len(t["versions"]) == 1 and set(t["versions"]) <= {"1", "2"}
    assert t["latency_ms"]["count"] == t["ok"] and 0 < t["latency_ms"]["p50"] <= t["latency_ms"]["p99"]
    assert [row["sent"] for row in res["timeline"]] == [int(RATE)] * int(DURATION_S)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_closed_loop_keeps_its_concurrency_busy(replica, protocol):
    spec = LoadSpec(url=target(replica, protocol), protocol=protocol, concurrency=2, duration_s=1.5,
                    model_version="2")
    t = results_of(spec)["totals"]
    assert t["ok"] > 3 and t["failed"] == 0, t["failed_by_reason"]
    assert t["versions"] == {"2": t["ok"]}


def test_several_processes_share_the_rate_and_merge_their_histograms(replica):
    spec = LoadSpec(url=target(replica, "grpc"), protocol="grpc", schedule=[(0.0, 20.0), (1.0, 40.0)],
                    duration_s=DURATION_S, processes=2, trace=True)
    load = run_load(spec)
    res = build_results(load.recorder, spec=spec.to_dict(), duration_s=spec.duration_s)
    assert [row["sent"] for row in res["timeline"]] == [20, 40]
    assert res["totals"]["ok"] == 60 and res["totals"]["latency_ms"]["count"] == 60
    # every request of both processes in the merged trace, in send order
    trace = load.recorder.trace
    assert len(trace) == 60 and [e[0] for e in trace] == sorted(e[0] for e in trace)
    assert all(e[1] and e[4] in ("1", "2") for e in trace)
    assert load.recorder.window_latency(1, 2)["count"] == 40




async def test_run_load_async_inside_a_running_event_loop(replica):
    from loadtests.loadgen import run_load_async

    spec = LoadSpec(url=target(replica, "http-binary"), protocol="http-binary", rate=20, duration_s=1)
    load = await run_load_async(spec)
    assert load.recorder.counts() == (20, 20, 0)


@pytest.mark.parametrize("protocol", ["http-binary", "grpc"])
def test_a_wrong_answer_is_a_failure(replica, protocol):
    # The replica really serves version 2 (and says so); the checker insists on version 1.
    spec = LoadSpec(url=target(replica, protocol), protocol=protocol, rate=20, duration_s=1,
                    model_version="2", assume_version="1")
    t = results_of(spec)["totals"]
    assert t["ok"] == 0 and t["failed_by_reason"] == {"wrong answer (not version 1)": 20}


def test_latency_counts_from_the_intended_send_time_and_overload_is_counted(replica):
    set_faults(replica, delay_ms=400)
    try:
        # Every answer takes >= 400 ms; at 30/s about 12 are in flight. A cap of 4 must turn the
        # sends beyond it into "client overloaded" failures instead of delaying them.
        spec = LoadSpec(url=target(replica, "http"), protocol="http", rate=RATE, duration_s=1.5, max_in_flight=4)
        t = results_of(spec)["totals"]
    finally:
        set_faults(replica)
    assert t["sent"] == int(RATE * 1.5)
    assert t["failed_by_reason"].get(REASON_OVERLOADED, 0) >= 10
    assert t["ok"] >= 4
    assert t["latency_ms"]["p50"] >= 400  # the injected delay is inside every measured latency


def test_a_stalled_server_shows_up_as_latency_not_as_fewer_sends(replica):
    # SIGSTOP the replica for ~1 s: open loop keeps sending on schedule, and requests sent at the
    # start of the stall wait the whole stall (measured from their intended send time).
    import signal
    import threading
    import time

    def stall(t0: float) -> None:
        def run():
            time.sleep(max(0.0, t0 + 0.5 - time.monotonic()))
            replica.kill(signal.SIGSTOP)
            time.sleep(1.0)  # the fault: a 1 s stall
            replica.kill(signal.SIGCONT)
        threading.Thread(target=run, daemon=True).start()

    spec = LoadSpec(url=target(replica, "grpc"), protocol="grpc", rate=RATE, duration_s=DURATION_S)
    try:
        load = run_load(spec, on_start=stall)
    finally:
        replica.kill(signal.SIGCONT)
    res = build_results(load.recorder, spec=spec.to_dict(), duration_s=spec.duration_s)
    t = res["totals"]
    assert t["sent"] == int(RATE * DURATION_S) and t["ok"] == t["sent"], t["failed_by_reason"]
    assert t["latency_ms"]["max"] >= 800
    assert http_ok(f"http://{replica.http_url}/v2/health/ready", timeout_s=5)


# ---------------------------------------------------------------------------- outputs


def test_results_json_and_report_png(replica, tmp_path):
    spec = LoadSpec(url=target(replica, "http"), protocol="http", rate=20, duration_s=DURATION_S)
    res = results_of(spec, events=[FaultEvent(1.2, "kill", "replica-x", "SIGKILL pid 1")])
    path = write_results(res, tmp_path / "out" / "results.json")
    doc = load_results(path)
    assert doc["schema"] == SCHEMA and doc["started_at_unix_s"] > 0
    assert doc["spec"]["mode"] == "open-loop" and doc["spec"]["rate"] == 20
    assert set(doc["totals"]) >= {"sent", "ok", "failed", "failed_by_reason", "success_ratio", "ok_per_s",
                                  "latency_ms", "send_lag_ms", "regions", "versions", "replicas"}
    assert set(doc["totals"]["latency_ms"]) >= {"p50", "p90", "p99", "p999", "max", "mean", "count"}
    assert len(doc["timeline"]) == 2
    for row in doc["timeline"]:
        assert set(row) >= {"t_s", "sent", "ok", "failed", "failed_by_reason", "p50_ms", "p99_ms",
                            "regions", "versions", "replicas"}
    assert doc["events"] == [{"t_s": 1.2, "kind": "kill", "target": "replica-x", "detail": "SIGKILL pid 1"}]
    png = write_report(doc, tmp_path / "out" / "report.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_load_writes_results_and_refuses_remote_targets(replica, tmp_path, capsys):
    from gateway.cli import main as geogate_main
    from loadtests.__main__ import main as loadtests_main

    out = tmp_path / "cli"
    code = geogate_main(["bench", "load", "--url", target(replica, "grpc"), "--protocol", "grpc",
                         "--rate", "20", "--duration", "1", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "sent 20  ok 20" in captured.out
    assert load_results(out / "results.json")["totals"]["ok"] == 20
    assert (out / "report.png").stat().st_size > 0
    code = loadtests_main(["load", "--url", "http://198.51.100.7:8000", "--rate", "1", "--duration", "1",
                           "--out", str(out)])
    assert code == 2 and "not a loopback address" in capsys.readouterr().err
