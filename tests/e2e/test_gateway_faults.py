"""Replicas misbehaving on purpose (the replica's --enable-test-faults switch):
- a slow replica gets little traffic (power of two choices over peak-EWMA latency);
- a replica answering 503 and one that hangs: retries land elsewhere, no client sees an error;
- a request with a short deadline never runs past it (504 / DEADLINE_EXCEEDED), on both
  protocols and for each way of giving the deadline."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.gateway_load import Results, Stream
from tests.gateway_procs import (
    GatewayProc,
    demo_repository,
    http_call,
    replica_of,
    replica_urls,
    set_faults,
    start_replicas,
)

# Generous: the machine is small and shared; what matters is "bounded", not "fast".
DEADLINE_SLACK_S = 1.0
BODY = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                               "data": [0.25] * 16}]}).encode()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw-faults")
    started: list = []
    try:
        reps = start_replicas(started, demo_repository(tmp), 3)
        yield tmp, reps
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture
def clean(replicas):
    _, reps = replicas
    for r in reps:
        set_faults(r)
    yield replicas
    for r in reps:
        set_faults(r)


def _gateway(tmp, reps, procs, extra: str = "") -> GatewayProc:
    gw = GatewayProc(tmp, replicas=replica_urls(reps), gateway_extra=extra)
    procs.append(gw)
    return gw.wait_ready()


def _stream(gw: GatewayProc, total: int, *, http_threads: int, grpc_threads: int,
            timeout_s: float = 60.0) -> Results:
    """Run a steady request stream through `gw` until `total` requests are done; its Results."""
    with Stream(gw, http_threads=http_threads, grpc_threads=grpc_threads) as stream:
        stream.wait_for(total, timeout_s=timeout_s)
        return stream.stop()


def _share(results, replica) -> float:
    mine = sum(n for url, n in results.replicas.items() if replica.http_url in url or replica.grpc_url in url)
    return mine / max(1, results.ok)


def test_slow_replica_gets_less_traffic(clean, procs):
    tmp, reps = clean
    gw = _gateway(tmp, reps, procs)
    slow = reps[0]
    set_faults(slow, delay_ms=150)
    results = _stream(gw, 300, http_threads=3, grpc_threads=1)
    assert results.failures == [], results.failures[:5]
    share = _share(results, slow)
    # a fair share would be 1/3; the slow replica only gets the odd probe
    assert share < 0.10, (share, results.replicas)


def test_503_replica_retried_elsewhere_and_ejected(clean, procs):
    tmp, reps = clean
    gw = _gateway(tmp, reps, procs)
    bad = reps[1]
    set_faults(bad, status=503)
    results = _stream(gw, 200, http_threads=2, grpc_threads=1)
    assert results.failures == [], results.failures[:5]
    assert _share(results, bad) == 0.0, results.replicas
    assert sum(n for a, n in results.attempts.items() if a != "1") >= 1, results.attempts
    # the 503s were seen and counted against the replica (outlier detection's input)
    metrics = gw.metrics()
    assert any(line.startswith("geogate_upstream_attempts_total") and bad.http_url in line
               and 'outcome="unavailable"' in line for line in metrics.splitlines()) or \
        any(line.startswith("geogate_upstream_attempts_total") and bad.grpc_url in line
            and 'outcome="unavailable"' in line for line in metrics.splitlines()), metrics


def test_hanging_replica_retried_elsewhere(clean, procs):
    tmp, reps = clean
    gw = _gateway(tmp, reps, procs, "per_try_timeout_ms = 400")
    stuck = reps[2]
    set_faults(stuck, hang=True)
    results = _stream(gw, 150, timeout_s=90, http_threads=3, grpc_threads=1)
    assert results.failures == [], results.failures[:5]
    assert _share(results, stuck) == 0.0, results.replicas
    assert sum(n for a, n in results.attempts.items() if a != "1") >= 1, results.attempts


def _timed(fn) -> tuple[float, object]:
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as exc:  # the error is what the caller inspects
        out = exc
    return time.monotonic() - t0, out


def test_short_deadline_is_never_exceeded(clean, procs):
    tmp, reps = clean
    gw = _gateway(tmp, reps, procs)
    for r in reps:
        set_faults(r, hang=True)
    url = f"http://{gw.http}/v2/models/demo/infer"

    # HTTP, header
    took, out = _timed(lambda: http_call(url, BODY, {"geogate-timeout-ms": "300"}))
    assert out[0] == 504 and "deadline" in json.loads(out[2])["error"], out
    assert 0.25 <= took <= 0.3 + DEADLINE_SLACK_S, took

    # HTTP, Triton's `timeout` parameter (microseconds) through tritonclient
    client = thttp.InferenceServerClient(gw.http, network_timeout=30)
    inp = thttp.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    took, out = _timed(lambda: client.infer("demo", [inp], timeout=250_000))
    assert isinstance(out, InferenceServerException) and "deadline" in out.message(), out
    assert took <= 0.25 + DEADLINE_SLACK_S, took

    # gRPC deadline
    gclient = tgrpc.InferenceServerClient(gw.grpc)
    ginp = tgrpc.InferInput("INPUT0", [1, 16], "FP32")
    ginp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    took, out = _timed(lambda: gclient.infer("demo", [ginp], client_timeout=0.3))
    assert isinstance(out, InferenceServerException), out
    assert "DEADLINE_EXCEEDED" in str(out.status()), out
    assert took <= 0.3 + DEADLINE_SLACK_S, took

    # gRPC with a server-side answer: the gateway gives up first when its default is shorter
    gw2 = _gateway(tmp, reps, procs, "default_timeout_ms = 300")
    stub_client = tgrpc.InferenceServerClient(gw2.grpc)
    took, out = _timed(lambda: stub_client.infer("demo", [ginp], client_timeout=20))
    assert isinstance(out, InferenceServerException) and "DEADLINE_EXCEEDED" in str(out.status()), out
    assert "deadline of 300 ms exceeded" in out.message(), out.message()
    assert took <= 0.3 + DEADLINE_SLACK_S, took
    for r in reps:
        set_faults(r)
    # and after the faults clear, traffic flows again
    status, _, raw = http_call(url, BODY)
    assert status == 200, raw


def test_hedging_races_a_stuck_replica(clean, procs):
    """With hedge_after_percentile, a request stuck on a replica gets a second attempt on
    another one after the recent p90 latency: the client never waits for the stuck one."""
    tmp, reps = clean
    gw = _gateway(tmp, reps[:2], procs, "hedge_after_percentile = 90.0\ndefault_timeout_ms = 10000")
    url = f"http://{gw.http}/v2/models/demo/infer"
    for _ in range(80):  # recent latencies for the percentile
        status, headers, _ = http_call(url, BODY)
        assert status == 200
    # stall the replica the balancer currently favours, so the next request lands on it
    favoured = {k.lower(): v for k, v in headers.items()}["geogate-replica"]
    set_faults(replica_of(favoured, reps[:2]), hang=True)
    attempts = []
    for _ in range(20):
        took, out = _timed(lambda: http_call(url, BODY))
        status, headers, raw = out
        assert status == 200, raw
        assert took < 5.0, took  # far below the 10 s deadline a stuck attempt would run into
        attempts.append({k.lower(): v for k, v in headers.items()}["geogate-attempts"])
    assert "2" in attempts, attempts  # at least one request was hedged
    assert 'reason="hedge"' in gw.metrics()
