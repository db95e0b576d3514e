"""Dynamic batching merges concurrent requests into larger ORT runs (seen in the batch-size histogram
on /metrics) and every client still gets the rows of its own input back; without
`dynamic_batching` in the config every run has exactly one request."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http.aio as thttp_aio

from replicas.demo.onnx_model import reference_outputs, write_repository_entry
from tests.procs import ReplicaProc

CONCURRENCY = 64
QUEUE_DELAY_US = 5000


def _write_repo(root, *, batching: bool, name: str) -> None:
    write_repository_entry(root, 1, name=name, batching=batching)
    if batching:  # a small queue delay so merging does not depend on the machine's speed
        cfg = (root / name / "config.pbtxt")
        cfg.write_text(cfg.read_text().replace("max_queue_delay_microseconds: 0",
                                               f"max_queue_delay_microseconds: {QUEUE_DELAY_US}"))


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    _write_repo(repo, batching=True, name="batched")
    _write_repo(repo, batching=False, name="single")
    proc = ReplicaProc(str(repo))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def batch_histogram(replica, model: str) -> dict[str, float]:
    """le -> cumulative count of geogate_replica_batch_size for one model (version 1)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    pattern = re.compile(r'geogate_replica_batch_size_bucket\{le="([^"]+)",model="'
                         + re.escape(model) + r'",version="1"\} (\S+)')
    for le, value in pattern.findall(text):
        out[le] = float(value)
    return out


async def _flood(replica, model: str, protocol: str) -> None:
    rng = np.random.default_rng(42)
    xs = [rng.standard_normal((1 + i % 3, 16)).astype(np.float32) for i in range(CONCURRENCY)]
    if protocol == "grpc":
        client = tgrpc_aio.InferenceServerClient(replica.grpc_url)
        mod = tgrpc_aio
    else:
        client = thttp_aio.InferenceServerClient(replica.http_url, conn_limit=CONCURRENCY)
        mod = thttp_aio
    try:
        async def one(x):
            inp = mod.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = await client.infer(model, [inp])
            return result.as_numpy("OUTPUT0")

        for _ in range(2):
            outs = await asyncio.gather(*(one(x) for x in xs))
            for x, out in zip(xs, outs, strict=True):
                assert out.shape == (x.shape[0], 8)
                np.testing.assert_allclose(out, reference_outputs("tiny", 1, x), atol=1e-4)
    finally:
        await client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_concurrent_requests_are_batched_and_answered_correctly(replica, protocol):
    before = batch_histogram(replica, "batched")
    await _flood(replica, "batched", protocol)
    after = batch_histogram(replica, "batched")
    runs = after["+Inf"] - before.get("+Inf", 0)
    single_row_runs = after["1.0"] - before.get("1.0", 0)
    assert runs > 0
    # Requests carry 1-3 rows; with merging, most runs hold more than one row and there are
    # far fewer runs than requests.
    assert runs - single_row_runs > 0, after
    assert runs < 2 * CONCURRENCY, after


async def test_no_batching_without_dynamic_batching(replica):
    # rows per request are 1..3, so without merging every run has 1-3 rows, never more
    await _flood(replica, "single", "grpc")
    hist = batch_histogram(replica, "single")
    assert hist["+Inf"] == 2 * CONCURRENCY
    assert hist["4.0"] == hist["+Inf"]


async def test_different_shapes_are_not_merged(tmp_path, procs):
    """A model with a free non-batch dimension: requests of different widths run separately."""
    import onnx
    from onnx import TensorProto, helper

    model_dir = tmp_path / "sum" / "1"
    model_dir.mkdir(parents=True)
    # Y[i] = sum of row i: batchable, with a free width dimension
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["X", "axes"], ["Y"], keepdims=0)],
        "rowsum", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", "w"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b"])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(model_dir / "model.onnx"))
    (tmp_path / "sum" / "config.pbtxt").write_text(
        'max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 20000 }\n')
    proc = ReplicaProc(str(tmp_path))
    procs.append(proc)
    proc.wait_ready()
    client = tgrpc_aio.InferenceServerClient(proc.grpc_url)
    try:
        xs = [np.full((1, 2 + i % 3), float(i), np.float32) for i in range(12)]

        async def one(x):
            inp = tgrpc_aio.InferInput("X", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return (await client.infer("sum", [inp])).as_numpy("Y")

        outs = await asyncio.gather(*(one(x) for x in xs))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_allclose(out, x.sum(axis=1))
    finally:
        await client.close()
    hist = batch_histogram(proc, "sum")
    assert hist["+Inf"] >= 3  # at least one run per distinct width
