"""gRPC ModelStreamInfer through the gateway, with two real Triton servers behind it: tritonclient's
``start_stream`` / ``async_stream_infer`` get every response, in order, equal to a direct run; a
decoupled model's N responses per request (and its empty final response) pass through; many
streams at once; a refused request is answered on the stream and the stream goes on; a client
that cancels its stream cancels the request on the replica; ``perf_analyzer --streaming``
through the gateway produces figures and exits."""

from __future__ import annotations

import queue
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from loadtests.stream_models import write_repeat_model
from replicas.demo.onnx_model import reference_outputs
from replicas.demo.python_backend import write_python_backend_entry
from tests.e2e.test_triton_gateway import TritonGatewayProc, all_healthy, wait_for
from tests.procs import TritonProc

PERF_ANALYZER = Path(__file__).resolve().parents[2] / ".venv-triton" / "bin" / "perf_analyzer-geogate"


def metrics_text(gw) -> str:
    with urllib.request.urlopen(f"http://{gw.admin}/metrics", timeout=5) as r:
        return r.read().decode()


def start_world(tmp_path, procs, n: int = 2):
    repo = tmp_path / "repo"
    write_python_backend_entry(repo, 1)
    write_repeat_model(repo, tmp_path / "sent")
    tritons = [TritonProc(str(repo), load=("demo", "repeat")) for _ in range(n)]
    procs.extend(tritons)
    for t in tritons:
        t.wait_ready()
    gw = TritonGatewayProc(tmp_path, [f"grpc://{t.grpc_url}" for t in tritons])
    procs.append(gw)
    gw.wait_ready()
    wait_for(lambda: all_healthy(gw, n), "both Tritons healthy", procs=[gw])
    return tritons, gw


class Collector:
    """A stream's callback: (result, error) pairs in arrival order."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()

    def __call__(self, result, error) -> None:
        self.items.put((result, error))

    def take(self, n: int, timeout_s: float = 30.0) -> list:
        return [self.items.get(timeout=timeout_s) for _ in range(n)]


def demo_input(i: int) -> tuple[grpcclient.InferInput, np.ndarray]:
    x = np.full((1, 16), i / 10.0, dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    return inp, x


def repeat_inputs(count: int, base: int) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in (("COUNT", count), ("BASE", base)):
        t = grpcclient.InferInput(name, [1], "INT32")
        t.set_data_from_numpy(np.array([value], dtype=np.int32))
        inputs.append(t)
    return inputs


def test_stream_through_the_gateway_equals_direct(tmp_path, procs):
    tritons, gw = start_world(tmp_path, procs)

    def run(url: str) -> list:
        client = grpcclient.InferenceServerClient(url)
        got = Collector()
        client.start_stream(callback=got)
        try:
            for i in range(20):
                inp, _ = demo_input(i)
                client.async_stream_infer("demo", [inp], request_id=str(i))
            items = got.take(20)
        finally:
            client.stop_stream()
            client.close()
        assert all(err is None for _, err in items), [str(e) for _, e in items if e is not None][:3]
        return [(r.get_response().id, r.as_numpy("OUTPUT0")) for r, _ in items]

    # one response per request, each equal to the direct one (requests on one stream run
    # concurrently on two replicas: across requests, answers come in completion order)
    through, direct = sorted(run(gw.grpc), key=lambda p: int(p[0])), sorted(run(tritons[0].grpc_url),
                                                                               key=lambda p: int(p[0]))
    assert [rid for rid, _ in through] == [str(i) for i in range(20)]
    for (rid, out), (drid, dout) in zip(through, direct, strict=True):
        assert rid == drid and np.allclose(out, dout)
        assert np.allclose(out, reference_outputs("tiny", 1, demo_input(int(rid))[1]), atol=1e-5)

    # a decoupled model: N responses per request, in order, and the empty final response
    client = grpcclient.InferenceServerClient(gw.grpc)
    got = Collector()
    client.start_stream(callback=got)
    try:
        for i in range(4):
            client.async_stream_infer("repeat", repeat_inputs(5, 100 * i), request_id=f"r{i}",
                                      enable_empty_final_response=True)
        # a request the gateway refuses (unknown model) is answered on the stream; the stream goes on
        inp, _ = demo_input(1)
        client.async_stream_infer("nosuchmodel", [inp], request_id="bad")
        client.async_stream_infer("repeat", repeat_inputs(2, 900), request_id="after", enable_empty_final_response=True)
        items = got.take(4 * 6 + 1 + 3)
    finally:
        client.stop_stream()
        client.close()
    errors = [str(e) for _, e in items if e is not None]
    assert len(errors) == 1 and "nosuchmodel" in errors[0], errors
    by_id: dict[str, list] = {}
    for r, err in items:
        if err is not None:
            continue
        resp = r.get_response()
        final = resp.parameters["triton_final_response"].bool_param
        by_id.setdefault(resp.id, []).append(None if final and not resp.outputs else int(r.as_numpy("OUT")[0]))
    for i in range(4):
        assert by_id[f"r{i}"] == [100 * i + k for k in range(5)] + [None], by_id
    assert by_id["after"] == [900, 901, None]


def test_many_streams_at_once_and_cancel_reaches_the_replica(tmp_path, procs):
    _, gw = start_world(tmp_path, procs)
    failures: list[str] = []

    def one_stream(k: int) -> None:
        client = grpcclient.InferenceServerClient(gw.grpc)
        got = Collector()
        client.start_stream(callback=got)
        try:
            for i in range(10):
                client.async_stream_infer("repeat", repeat_inputs(3, 1000 * k + 10 * i), request_id=f"s{k}-{i}",
                                          enable_empty_final_response=True)
            items = got.take(40)
            seen: dict[str, list] = {}
            for r, err in items:
                if err is not None:
                    failures.append(str(err))
                    continue
                resp = r.get_response()
                if resp.outputs:
                    seen.setdefault(resp.id, []).append(int(r.as_numpy("OUT")[0]))
            for i in range(10):
                base = 1000 * k + 10 * i
                if seen.get(f"s{k}-{i}") != [base, base + 1, base + 2]:
                    failures.append(f"s{k}-{i}: {seen.get(f's{k}-{i}')}")
        except Exception as exc:  # the assertion below reports it
            failures.append(f"stream {k}: {type(exc).__name__}: {exc}")
        finally:
            client.stop_stream()
            client.close()

    threads = [threading.Thread(target=one_stream, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]

    # a long decoupled request, the client cancels its stream after a few responses: the
    # replica's model sees the cancel and stops early
    client = grpcclient.InferenceServerClient(gw.grpc)
    got = Collector()
    client.start_stream(callback=got)
    client.async_stream_infer("repeat", repeat_inputs(2000, 0), request_id="long")
    got.take(3)
    client.stop_stream(cancel_requests=True)
    client.close()
    sent = tmp_path / "sent" / "long.sent"
    wait_for(sent.exists, "the model to record the cancelled request", timeout_s=30)
    assert int(sent.read_text()) < 2000, sent.read_text()
    wait_for(lambda: 'geogate_streams_open{region="r1"} 0.0' in metrics_text(gw), "no stream open", timeout_s=20)


def test_perf_analyzer_streaming_through_the_gateway(tmp_path, procs):
    assert PERF_ANALYZER.exists(), "perf_analyzer is missing: run `make triton-env`"
    _, gw = start_world(tmp_path, procs)
    t0 = time.monotonic()
    out = subprocess.run([str(PERF_ANALYZER), "-m", "demo", "-i", "grpc", "--streaming", "-u", gw.grpc,
                          "--concurrency-range", "2", "--measurement-interval", "1000", "--max-trials", "10",
                          "-s", "100"], capture_output=True, text=True, timeout=180)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    count = re.search(r"Request count: (\d+)", text)
    assert count and int(count.group(1)) > 0, text[-3000:]
    assert re.search(r"Concurrency: 2, throughput: [\d.]+ infer/sec", text), text[-3000:]
    assert time.monotonic() - t0 < 170


def test_a_replica_dying_mid_stream(tmp_path, procs):
    """Requests whose replica dies after some of their responses were relayed get an error
    response saying so; the stream's other requests finish on the other replica, and later
    requests on the same stream are served there."""
    tritons, gw = start_world(tmp_path, procs)
    client = grpcclient.InferenceServerClient(gw.grpc)
    got = Collector()
    client.start_stream(callback=got)
    try:
        for i in range(8):
            client.async_stream_infer("repeat", repeat_inputs(300, 1000 * i), request_id=f"k{i}")
        first = got.take(16)  # both replicas are answering by now (P2C spreads by outstanding requests)
        tritons[0].kill()
        results: dict[str, list] = {}
        errors: list[str] = []
        for r, _ in first:
            results.setdefault(r.get_response().id, []).append(int(r.as_numpy("OUT")[0]))
        deadline = time.monotonic() + 60
        def finished() -> int:
            return len(errors) + sum(1 for outs in results.values() if len(outs) == 300)

        while time.monotonic() < deadline and finished() < 8:
            r, err = got.items.get(timeout=30)
            if err is not None:
                errors.append(str(err))
            else:
                results.setdefault(r.get_response().id, []).append(int(r.as_numpy("OUT")[0]))
        assert errors and all("failed after" in e for e in errors), errors
        complete = [rid for rid, outs in results.items() if len(outs) == 300]
        assert len(complete) + len(errors) == 8, (len(complete), errors)
        for rid in complete:
            base = 1000 * int(rid[1:])
            assert results[rid] == list(range(base, base + 300))
        # the same stream goes on, on the replica that is left
        client.async_stream_infer("repeat", repeat_inputs(2, 7), request_id="later")
        later = got.take(2)
        assert [int(r.as_numpy("OUT")[0]) for r, err in later if err is None] == [7, 8], later
    finally:
        client.stop_stream()
        client.close()


def test_stream_over_geogate_replicas(tmp_path, procs):
    """The geogate ORT replica answers ModelStreamInfer too (one response per request), so a
    stream through the gateway works over a pool of them (or one mixed with Tritons)."""
    from tests.gateway_procs import GatewayProc, demo_repository, replica_urls, start_replicas

    reps = start_replicas(procs, demo_repository(tmp_path), 2, faults=False)
    gw = GatewayProc(tmp_path, replicas=replica_urls(reps, ("grpc",)))
    procs.append(gw)
    gw.wait_ready()
    client = grpcclient.InferenceServerClient(gw.grpc)
    got = Collector()
    client.start_stream(callback=got)
    try:
        for i in range(30):
            inp, _ = demo_input(i)
            client.async_stream_infer("demo", [inp], request_id=str(i))
        items = got.take(30)
    finally:
        client.stop_stream()
        client.close()
    assert all(err is None for _, err in items), [str(e) for _, e in items if e is not None][:3]
    answers = {r.get_response().id: r.as_numpy("OUTPUT0") for r, _ in items}
    assert sorted(answers, key=int) == [str(i) for i in range(30)]
    for rid, out in answers.items():
        assert np.allclose(out, reference_outputs("tiny", 1, demo_input(int(rid))[1]), atol=1e-5)
