"""The replica speaks KServe v2 as Triton does: unmodified tritonclient HTTP (JSON and binary), gRPC
(sync and aio) and HTTP aio against a real `geogate replica` process; answers equal the model's
own computation for the version that served."""

from __future__ import annotations

import asyncio
import gzip
import json
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
import tritonclient.http.aio as thttp_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from replicas.demo.onnx_model import reference_outputs, write_repository_entry
from tests.procs import ReplicaProc

ATOL = 1e-4


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_repository_entry(repo, 1)
    write_repository_entry(repo, 2)
    write_repository_entry(repo, 1, name="auto", with_config=False)
    write_repository_entry(repo, 3, name="auto", with_config=False)
    proc = ReplicaProc(str(repo))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _x(rows: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


def _http_get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
@pytest.mark.parametrize("version", ["", "1", "2"])
def test_http_infer_matches_reference(replica, binary_in, binary_out, version):
    client = thttp.InferenceServerClient(replica.http_url)
    x = _x(seed=hash((binary_in, binary_out, version)) % 1000)
    inp = thttp.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    out = thttp.InferRequestedOutput("OUTPUT0", binary_data=binary_out)
    result = client.infer("demo", [inp], model_version=version, outputs=[out], request_id="req-7")
    response = result.get_response()
    served = int(response["model_version"])
    assert served == (int(version) if version else 2)  # unversioned: latest loaded
    assert response["id"] == "req-7"
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), reference_outputs("tiny", served, x), atol=ATOL)
    client.close()


def test_http_all_outputs_binary_by_default_and_gzip_request(replica):
    client = thttp.InferenceServerClient(replica.http_url)
    x = _x(5, seed=11)
    inp = thttp.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for algo in (None, "gzip", "deflate"):
        result = client.infer("demo", [inp], model_version="1", request_compression_algorithm=algo)
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), reference_outputs("tiny", 1, x), atol=ATOL)
    client.close()


def test_http_headers_and_content_types(replica):
    x = _x(2, seed=3)
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16],
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    req = urllib.request.Request(f"http://{replica.http_url}/v2/models/demo/versions/1/infer",
                                 data=header + x.tobytes(), method="POST",
                                 headers={"Inference-Header-Content-Length": str(len(header)),
                                          "Content-Type": "application/octet-stream",
                                          "x-request-id": "trace-1"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
        assert r.headers["geogate-model-version"] == "1"
        assert r.headers["Content-Type"].startswith("application/octet-stream")
        hlen = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(body[:hlen])
    assert meta["model_version"] == "1"
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 2 * 8 * 4
    got = np.frombuffer(body[hlen:], dtype=np.float32).reshape(2, 8)
    np.testing.assert_allclose(got, reference_outputs("tiny", 1, x), atol=ATOL)
    # JSON request sent as gzip with no Content-Type at all
    payload = gzip.compress(json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16],
                                                   "data": x.ravel().tolist()}]}).encode())
    req = urllib.request.Request(f"http://{replica.http_url}/v2/models/demo/infer", data=payload,
                                 method="POST", headers={"Content-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["geogate-model-version"] == "2"
        assert r.headers["Content-Type"].startswith("application/json")
        out = json.loads(r.read())
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"], dtype=np.float32).reshape(2, 8),
                               reference_outputs("tiny", 2, x), atol=ATOL)


def test_http_metadata_config_ready(replica):
    client = thttp.InferenceServerClient(replica.http_url)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    for ext in ("binary_tensor_data", "model_repository", "statistics"):
        assert ext in meta["extensions"]
    md = client.get_model_metadata("demo")
    assert md["versions"] == ["1", "2"]
    assert md["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}]
    assert md["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 8]}]
    assert client.get_model_metadata("demo", "1")["versions"] == ["1"]
    cfg = client.get_model_config("demo")
    assert cfg["max_batch_size"] == 32
    assert cfg["input"][0]["data_type"] == "TYPE_FP32" and cfg["input"][0]["dims"] == [16]
    assert cfg["version_policy"] == {"all": {}}
    assert cfg["parameters"]["execution_provider"]["string_value"] == "CPUExecutionProvider"
    assert isinstance(cfg["dynamic_batching"]["max_queue_delay_microseconds"], int)
    assert client.is_model_ready("demo") and client.is_model_ready("demo", "1")
    assert not client.is_model_ready("demo", "9") and not client.is_model_ready("nope")
    status, _, _ = _http_get(f"http://{replica.http_url}/v2/models/demo/versions/9/ready")
    assert status == 400
    stats = client.get_inference_statistics("demo", "1")
    assert stats["model_stats"][0]["name"] == "demo" and stats["model_stats"][0]["version"] == "1"
    assert isinstance(stats["model_stats"][0]["inference_stats"]["success"]["count"], int)
    client.close()


def test_config_autocomplete_without_pbtxt(replica):
    client = thttp.InferenceServerClient(replica.http_url)
    cfg = client.get_model_config("auto")
    assert cfg["name"] == "auto" and cfg["platform"] == "onnxruntime_onnx"
    assert cfg["max_batch_size"] == 4
    assert "dynamic_batching" in cfg
    assert cfg["version_policy"] == {"latest": {"num_versions": 1}}
    assert [(t["name"], t["data_type"], t["dims"]) for t in cfg["input"]] == [("INPUT0", "TYPE_FP32", [16])]
    assert [(t["name"], t["data_type"], t["dims"]) for t in cfg["output"]] == [("OUTPUT0", "TYPE_FP32", [8])]
    assert cfg["instance_group"][0]["count"] == 1
    # latest 1: only version 3 is loaded
    assert client.get_model_metadata("auto")["versions"] == ["3"]
    assert not client.is_model_ready("auto", "1")
    x = _x(4, seed=5)
    inp = thttp.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("auto", [inp])
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), reference_outputs("tiny", 3, x), atol=ATOL)
    client.close()


def test_metrics_on_both_ports(replica):
    for port in (replica.metrics_port, replica.http_port):
        status, _, body = _http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        text = body.decode()
        assert 'geogate_replica_execution_provider_info{model="demo",provider="CPUExecutionProvider",version="1"}' \
            in text
        assert "geogate_replica_requests_total" in text and "geogate_replica_batch_size_bucket" in text


@pytest.mark.parametrize("version", ["", "1"])
def test_grpc_sync_infer_and_metadata(replica, version):
    client = tgrpc.InferenceServerClient(replica.grpc_url)
    assert client.is_server_live() and client.is_server_ready()
    x = _x(3, seed=21)
    inp = tgrpc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("demo", [inp], model_version=version, request_id="g-1",
                          outputs=[tgrpc.InferRequestedOutput("OUTPUT0")])
    response = result.get_response()
    served = int(response.model_version)
    assert served == (int(version) if version else 2)
    assert response.id == "g-1"
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), reference_outputs("tiny", served, x), atol=ATOL)
    md = client.get_model_metadata("demo", as_json=True)
    assert md["versions"] == ["1", "2"] and md["inputs"][0]["shape"] == ["-1", "16"]
    cfg = client.get_model_config("demo", as_json=True)["config"]
    assert cfg["max_batch_size"] == 32
    assert client.is_model_ready("demo", "2") and not client.is_model_ready("demo", "7")
    assert "statistics" in client.get_server_metadata(as_json=True)["extensions"]
    stats = client.get_inference_statistics("demo", as_json=True)
    assert {s["version"] for s in stats["model_stats"]} == {"1", "2"}
    client.close()


def test_grpc_typed_contents_and_initial_metadata(replica):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    x = _x(2, seed=8)
    with grpc.insecure_channel(replica.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="demo", model_version="1", id="typed")
        t = request.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 16])
        t.contents.fp32_contents.extend(x.ravel().tolist())
        response, call = stub.ModelInfer.with_call(request, metadata=(("geogate-request-id", "abc"),))
        assert dict(call.initial_metadata())["geogate-model-version"] == "1"
        assert response.id == "typed" and response.model_version == "1"
        got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 8)
        np.testing.assert_allclose(got, reference_outputs("tiny", 1, x), atol=ATOL)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_stream_infer(replica):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    xs = [_x(1 + i % 3, seed=100 + i) for i in range(6)]

    def requests():
        for i, x in enumerate(xs):
            r = service_pb2.ModelInferRequest(model_name="demo", model_version=str(1 + i % 2), id=str(i))
            r.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
            r.raw_input_contents.append(x.tobytes())
            yield r

    with grpc.insecure_channel(replica.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        seen = set()
        for item in stub.ModelStreamInfer(requests()):
            assert item.error_message == ""
            resp = item.infer_response
            i = int(resp.id)
            seen.add(i)
            assert resp.model_version == str(1 + i % 2)
            got = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(xs[i].shape[0], 8)
            np.testing.assert_allclose(got, reference_outputs("tiny", 1 + i % 2, xs[i]), atol=ATOL)
        assert seen == set(range(6))


async def test_aio_clients(replica):
    gclient = tgrpc_aio.InferenceServerClient(replica.grpc_url)
    hclient = thttp_aio.InferenceServerClient(replica.http_url)
    try:
        assert await gclient.is_server_ready() and await hclient.is_server_ready()
        xs = [_x(1 + i % 4, seed=200 + i) for i in range(24)]

        async def one_grpc(x, version):
            inp = tgrpc_aio.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            r = await gclient.infer("demo", [inp], model_version=version)
            return r.as_numpy("OUTPUT0"), r.get_response().model_version

        async def one_http(x, version):
            inp = thttp_aio.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            r = await hclient.infer("demo", [inp], model_version=version)
            return r.as_numpy("OUTPUT0"), r.get_response()["model_version"]

        calls = []
        for i, x in enumerate(xs):
            version = ["", "1", "2"][i % 3]
            calls.append((x, version, (one_grpc if i % 2 else one_http)(x, version)))
        results = await asyncio.gather(*(c for _, _, c in calls))
        for (x, version, _), (out, served) in zip(calls, results, strict=True):
            assert served == (version or "2")
            np.testing.assert_allclose(out, reference_outputs("tiny", int(served), x), atol=ATOL)
        cfg = await gclient.get_model_config("demo", as_json=True)
        assert cfg["config"]["name"] == "demo"
        assert (await hclient.get_model_metadata("demo"))["name"] == "demo"
    finally:
        await gclient.close()
        await hclient.close()
