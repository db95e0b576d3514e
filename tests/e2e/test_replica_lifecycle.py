"""Graceful shutdown: on SIGTERM the replica reports not ready at once, refuses new work, finishes
what is in flight over both protocols, and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http.aio as thttp_aio

from replicas.demo.onnx_model import reference_outputs, write_repository_entry
from tests.procs import ReplicaProc, async_wait_until

DELAY_MS = 1500


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def in_flight(proc: ReplicaProc) -> float:
    """Requests the replica is handling now (its geogate_replica_inflight_requests gauges)."""
    with urllib.request.urlopen(f"http://{proc.http_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("geogate_replica_inflight_requests{"))


async def until_in_flight(proc: ReplicaProc, n: int) -> None:
    """All `n` requests are inside the replica (held by the injected delay)."""
    await async_wait_until(lambda: in_flight(proc) >= n, 30, f"{n} requests in flight")


def set_delay(proc: ReplicaProc, delay_ms: int) -> None:
    req = urllib.request.Request(f"http://{proc.http_url}/geogate/test/faults", method="POST",
                                 data=json.dumps({"delay_ms": delay_ms}).encode())
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


async def test_sigterm_drains_in_flight_requests(tmp_path, procs):
    write_repository_entry(tmp_path, 1)
    proc = ReplicaProc(str(tmp_path), extra=["--enable-test-faults"])
    procs.append(proc)
    proc.wait_ready()
    set_delay(proc, DELAY_MS)

    grpc_client = tgrpc_aio.InferenceServerClient(proc.grpc_url)
    http_client = thttp_aio.InferenceServerClient(proc.http_url)
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)

    async def via_grpc():
        inp = tgrpc_aio.InferInput("INPUT0", [2, 16], "FP32")
        inp.set_data_from_numpy(x)
        return (await grpc_client.infer("demo", [inp])).as_numpy("OUTPUT0")

    async def via_http():
        inp = thttp_aio.InferInput("INPUT0", [2, 16], "FP32")
        inp.set_data_from_numpy(x)
        return (await http_client.infer("demo", [inp])).as_numpy("OUTPUT0")

    try:
        calls = [asyncio.create_task(via_grpc() if i % 2 else via_http()) for i in range(12)]
        await until_in_flight(proc, len(calls))  # all of them are now inside the delay
        os.kill(proc.pid, signal.SIGTERM)
        # not ready any more while it drains (listeners stay up until the in-flight work is done)
        await async_wait_until(lambda: status_of(f"http://{proc.http_url}/v2/health/ready") in (400, 0), 10,
                               "not ready after SIGTERM")
        assert proc.alive()
        results = await asyncio.gather(*calls)
        for out in results:
            np.testing.assert_allclose(out, reference_outputs("tiny", 1, x), atol=1e-4)
    finally:
        await grpc_client.close()
        await http_client.close()
    assert await asyncio.to_thread(proc.popen.wait, 20) == 0, proc.output()[-2000:]
    assert '"msg":"stopped"' in proc.output()


async def test_new_requests_during_drain_are_refused_as_unavailable(tmp_path, procs):
    write_repository_entry(tmp_path, 1)
    proc = ReplicaProc(str(tmp_path), extra=["--enable-test-faults"])
    procs.append(proc)
    proc.wait_ready()
    set_delay(proc, 2000)
    http_client = thttp_aio.InferenceServerClient(proc.http_url)
    x = np.zeros((1, 16), np.float32)
    try:
        inp = thttp_aio.InferInput("INPUT0", [1, 16], "FP32")
        inp.set_data_from_numpy(x)
        slow = asyncio.create_task(http_client.infer("demo", [inp]))
        await until_in_flight(proc, 1)
        os.kill(proc.pid, signal.SIGTERM)
        await async_wait_until(lambda: status_of(f"http://{proc.http_url}/v2/health/ready") in (400, 0), 10,
                               "draining")
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                       "data": [0.0] * 16}]}).encode()

        def late_request() -> int:
            r = urllib.request.Request(f"http://{proc.http_url}/v2/models/demo/infer", data=body, method="POST")
            try:
                with urllib.request.urlopen(r, timeout=5) as resp:
                    return resp.status
            except urllib.error.HTTPError as e:
                return e.code
            except (urllib.error.URLError, OSError):
                return 0  # listener already closed: also a refusal

        assert await asyncio.to_thread(late_request) in (503, 0)
        result = await slow
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), reference_outputs("tiny", 1, x), atol=1e-4)
    finally:
        await http_client.close()
    assert proc.popen.wait(20) == 0
