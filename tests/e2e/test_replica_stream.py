"""The geogate ORT replica's gRPC ModelStreamInfer, as tritonclient's ``start_stream`` /
``async_stream_infer`` uses it against Triton (non-decoupled model): one response per request,
in request order, the request id echoed, a bad request answered in the stream (not an abort)."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as tgrpc

from replicas.demo.onnx_model import reference_outputs, write_repository_entry
from tests.procs import ReplicaProc

ATOL = 1e-4
WAIT_S = 30.0


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_repository_entry(repo, 1)
    write_repository_entry(repo, 2)
    proc = ReplicaProc(str(repo))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _x(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


def _inputs(x: np.ndarray) -> list[tgrpc.InferInput]:
    inp = tgrpc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def _stream(client: tgrpc.InferenceServerClient) -> queue.Queue:
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    return got


def test_stream_answers_every_request_in_order_with_its_id(replica):
    client = tgrpc.InferenceServerClient(replica.grpc_url)
    got = _stream(client)
    xs = [_x(1 + i % 4, seed=300 + i) for i in range(64)]  # batch sizes vary: the batcher mixes them
    try:
        for i, x in enumerate(xs):
            client.async_stream_infer("demo", _inputs(x), model_version=str(1 + i % 2), request_id=f"r{i}")
        for i, x in enumerate(xs):
            result, error = got.get(timeout=WAIT_S)
            assert error is None, error
            response = result.get_response()
            assert response.id == f"r{i}"  # in the order sent
            assert response.model_version == str(1 + i % 2)
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), reference_outputs("tiny", 1 + i % 2, x),
                                       atol=ATOL)
    finally:
        client.stop_stream()
        client.close()


def test_a_bad_request_is_an_error_response_and_the_stream_goes_on(replica):
    client = tgrpc.InferenceServerClient(replica.grpc_url)
    got = _stream(client)
    x = _x(2, seed=7)
    try:
        client.async_stream_infer("demo", _inputs(x), model_version="1", request_id="before")
        client.async_stream_infer("no-such-model", _inputs(x), request_id="unknown")
        client.async_stream_infer("demo", _inputs(x), model_version="9", request_id="no-version")
        bad = tgrpc.InferInput("INPUT0", [2, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((2, 3), dtype=np.float32))
        client.async_stream_infer("demo", [bad], request_id="bad-shape")
        client.async_stream_infer("demo", _inputs(x), model_version="1", request_id="after")
        answers = [got.get(timeout=WAIT_S) for _ in range(5)]
    finally:
        client.stop_stream()
        client.close()
    (first, e1), (_, e2), (_, e3), (_, e4), (last, e5) = answers
    assert e1 is None and first.get_response().id == "before"
    assert e2 is not None and "no-such-model" in e2.message()
    assert e3 is not None and "9" in e3.message()
    assert e4 is not None and e4.message()
    assert e5 is None and last.get_response().id == "after"
    np.testing.assert_allclose(last.as_numpy("OUTPUT0"), reference_outputs("tiny", 1, x), atol=ATOL)
