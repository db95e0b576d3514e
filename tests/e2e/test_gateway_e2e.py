"""A pool of 3 real replica processes behind a real gateway process: unmodified tritonclient
(HTTP JSON, HTTP binary, gRPC sync and aio) gets the same answers through the gateway as
directly, with the geogate-* headers; every bad input gets its clear error at the gateway
(the replicas never see it); repository calls are not exposed."""

from __future__ import annotations

import gzip
import json
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from replicas.demo.onnx_model import reference_outputs
from tests.gateway_procs import (
    GatewayProc,
    gateway_with_replicas,
    http_call,
    replica_urls,
)

GEOGATE_HEADERS = ("geogate-region", "geogate-replica", "geogate-model-version", "geogate-attempts")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with gateway_with_replicas(tmp_path_factory.mktemp("gw-e2e")) as (gw, reps):
        yield gw, reps


def _x(rows: int = 3) -> np.ndarray:
    return np.random.default_rng(rows).random((rows, 16), dtype=np.float32)


def _http_infer(url: str, x: np.ndarray, binary: bool, version: str = ""):
    client = thttp.InferenceServerClient(url)
    inp = thttp.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = thttp.InferRequestedOutput("OUTPUT0", binary_data=binary)
    return client.infer("demo", [inp], outputs=[out], model_version=version)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("version", ["", "1", "2"])
def test_http_same_answers_as_direct(world, binary, version):
    gw, reps = world
    x = _x()
    direct = _http_infer(reps[0].http_url, x, binary, version)
    via = _http_infer(gw.http, x, binary, version)
    np.testing.assert_allclose(via.as_numpy("OUTPUT0"), direct.as_numpy("OUTPUT0"), rtol=1e-6)
    served = version or "2"  # the replica's default: the latest version
    np.testing.assert_allclose(via.as_numpy("OUTPUT0"), reference_outputs("tiny", int(served), x), atol=1e-4)
    assert via.get_response()["model_version"] == served


def test_http_response_headers(world):
    gw, _reps = world
    x = _x(1)
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                   "data": x.ravel().tolist()}]}).encode()
    status, headers, raw = http_call(f"http://{gw.http}/v2/models/demo/versions/1/infer", body,
                                     {"x-request-id": "req-42"})
    assert status == 200, raw
    h = {k.lower(): v for k, v in headers.items()}
    for name in GEOGATE_HEADERS:
        assert name in h, (name, h)
    assert h["geogate-region"] == "r1"
    assert h["geogate-model-version"] == "1"
    assert h["geogate-attempts"] == "1"
    assert h["geogate-replica"].startswith("http://")  # HTTP clients go to HTTP replicas
    assert h["x-request-id"] == "req-42"


def test_http_gzip_body_passes_through(world):
    gw, _ = world
    x = _x(2)
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16],
                                   "data": x.ravel().tolist()}]}).encode()
    status, _, raw = http_call(f"http://{gw.http}/v2/models/demo/versions/1/infer", gzip.compress(body),
                               {"Content-Encoding": "gzip"})
    assert status == 200, raw
    out = json.loads(raw)["outputs"][0]["data"]
    np.testing.assert_allclose(np.array(out).reshape(2, 8), reference_outputs("tiny", 1, x), atol=1e-4)


def test_grpc_same_answers_and_metadata(world):
    gw, reps = world
    x = _x()
    direct = tgrpc.InferenceServerClient(reps[1].grpc_url)
    client = tgrpc.InferenceServerClient(gw.grpc)
    for version in ("", "1"):
        inp = tgrpc.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        a = direct.infer("demo", [inp], model_version=version)
        b = client.infer("demo", [inp], model_version=version, headers={"x-request-id": "g-1"})
        np.testing.assert_allclose(b.as_numpy("OUTPUT0"), a.as_numpy("OUTPUT0"), rtol=1e-6)
        assert b.get_response().model_version == (version or "2")
    # initial metadata: call the raw stub to see it
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc))
    req = service_pb2.ModelInferRequest(model_name="demo", model_version="1")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    req.raw_input_contents.append(_x(1).tobytes())
    resp, call = stub.ModelInfer.with_call(req, timeout=10)
    md = dict(call.initial_metadata())
    for name in GEOGATE_HEADERS:
        assert name in md, (name, md)
    assert md["geogate-replica"].startswith("http://")  # default grpc_upstream: translated to HTTP
    assert md["geogate-model-version"] == "1" == resp.model_version
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("demo") and client.is_model_ready("demo", "2")
    assert not client.is_model_ready("demo", "7")
    assert client.get_model_metadata("demo").inputs[0].name == "INPUT0"
    assert client.get_model_config("demo").config.max_batch_size == 32
    assert client.get_inference_statistics("demo").model_stats


@pytest.mark.parametrize("upstream", ["http", "grpc"])
def test_grpc_clients_over_either_replica_listener(world, tmp_path, upstream):
    """[gateway] grpc_upstream = "http" (the default): a gRPC ModelInfer goes to the replicas'
    HTTP listeners, translated (typed contents, raw contents, parameters; Triton's gRPC control
    parameters such as perf_analyzer's left out); "grpc": its bytes go to their gRPC listeners.
    Either way the same answers as direct, the same metadata and the replica's own refusals."""
    _gw, reps = world
    gw = GatewayProc(tmp_path, replicas=replica_urls(reps), gateway_extra=f'grpc_upstream = "{upstream}"',
                     name=f"gw-{upstream}")
    try:
        gw.wait_ready()
        direct = tgrpc.InferenceServerClient(reps[0].grpc_url)
        client = tgrpc.InferenceServerClient(gw.grpc)
        x = _x(2)
        inp = tgrpc.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        for version in ("", "1"):
            a = direct.infer("demo", [inp], model_version=version)
            b = client.infer("demo", [inp], model_version=version, request_id="r-7")
            np.testing.assert_allclose(b.as_numpy("OUTPUT0"), a.as_numpy("OUTPUT0"), rtol=1e-6)
            assert b.get_response().model_version == (version or "2") and b.get_response().id == "r-7"
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc))
        req = service_pb2.ModelInferRequest(model_name="demo", model_version="1")
        req.parameters["triton_enable_empty_final_response"].bool_param = True
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend(
            _x(1).ravel().tolist())
        resp, call = stub.ModelInfer.with_call(req, timeout=10)
        md = dict(call.initial_metadata())
        assert md["geogate-replica"].startswith(f"{upstream}://") and md["geogate-model-version"] == "1"
        np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(1, 8),
                                   reference_outputs("tiny", 1, _x(1)), atol=1e-4)
        with pytest.raises(grpc.RpcError) as err:  # the replica's own refusal, as a gRPC status
            bad = service_pb2.ModelInferRequest(model_name="demo")
            bad.inputs.add(name="NOPE", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend([0.0] * 16)
            stub.ModelInfer(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        gw.stop()


async def test_grpc_aio(world):
    gw, _ = world
    x = _x(4)
    client = tgrpc_aio.InferenceServerClient(gw.grpc)
    try:
        inp = tgrpc_aio.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = await client.infer("demo", [inp], model_version="2")
        np.testing.assert_allclose(res.as_numpy("OUTPUT0"), reference_outputs("tiny", 2, x), atol=1e-4)
        assert await client.is_model_ready("demo")
    finally:
        await client.close()


async def test_http_aio(world):
    import tritonclient.http.aio as thttp_aio

    gw, _ = world
    x = _x(5)
    client = thttp_aio.InferenceServerClient(gw.http)
    try:
        inp = thttp_aio.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        res = await client.infer("demo", [inp])
        np.testing.assert_allclose(res.as_numpy("OUTPUT0"), reference_outputs("tiny", 2, x), atol=1e-4)
        assert (await client.get_model_metadata("demo"))["name"] == "demo"
    finally:
        await client.close()


def test_http_metadata_endpoints(world):
    gw, _ = world
    client = thttp.InferenceServerClient(gw.http)
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "geogate"
    assert client.is_model_ready("demo", "1")
    assert client.get_model_metadata("demo", "1")["inputs"][0]["shape"] == [-1, 16]
    assert client.get_model_config("demo")["max_batch_size"] == 32
    assert client.get_inference_statistics("demo")["model_stats"]
    status, _, body = http_call(f"http://{gw.http}/v2/models/nope")
    assert status == 404 and "nope" in json.loads(body)["error"]


def test_repository_extension_not_exposed(world):
    gw, _ = world
    status, _, body = http_call(f"http://{gw.http}/v2/repository/index", b"{}")
    assert status == 404 and "repository" in json.loads(body)["error"]
    with pytest.raises(InferenceServerException) as exc:
        tgrpc.InferenceServerClient(gw.grpc).get_model_repository_index()
    assert "UNIMPLEMENTED" in str(exc.value.status()) and "repository" in exc.value.message()


# ---------------------------------------------------------------------- bad input, both protocols


def _json_body(inputs, outputs=None) -> bytes:
    d = {"inputs": inputs}
    if outputs is not None:
        d["outputs"] = outputs
    return json.dumps(d).encode()


GOOD_INPUT = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}

HTTP_BAD = {
    "wrong input name": (_json_body([{**GOOD_INPUT, "name": "INPUTX"}]), {}, 400, "INPUTX"),
    "missing input": (_json_body([]), {}, 400, "inputs"),
    "wrong datatype": (_json_body([{**GOOD_INPUT, "datatype": "INT32", "data": [1] * 16}]), {}, 400, "INT32"),
    "wrong shape": (_json_body([{**GOOD_INPUT, "shape": [1, 15], "data": [0.5] * 15}]), {}, 400, "shape"),
    "element count": (_json_body([{**GOOD_INPUT, "data": [0.5] * 10}]), {}, 400, "elements"),
    "malformed json": (b'{"inputs": [', {}, 400, "JSON"),
    "unknown output": (_json_body([GOOD_INPUT], [{"name": "NOPE"}]), {}, 400, "NOPE"),
    "binary size mismatch": (
        json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                "parameters": {"binary_data_size": 64}}]}).encode() + b"\0" * 60,
        "header", 400, "binary"),
    "binary size vs shape": (
        json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                "parameters": {"binary_data_size": 60}}]}).encode() + b"\0" * 60,
        "header", 400, "byte size"),
    "bad header length": (_json_body([GOOD_INPUT]), {"Inference-Header-Content-Length": "99999"}, 400,
                          "Inference-Header-Content-Length"),
    "bad timeout header": (_json_body([GOOD_INPUT]), {"geogate-timeout-ms": "soon"}, 400, "geogate-timeout-ms"),
}


@pytest.mark.parametrize("case", list(HTTP_BAD), ids=list(HTTP_BAD))
def test_http_bad_input_rejected_at_gateway(world, case):
    gw, _reps = world
    body, headers, want_status, want_text = HTTP_BAD[case]
    if headers == "header":
        head_len = body.index(b"}]}") + 3
        headers = {"Inference-Header-Content-Length": str(head_len)}
    status, h, raw = http_call(f"http://{gw.http}/v2/models/demo/versions/1/infer", body, headers)
    assert status == want_status, raw
    msg = json.loads(raw)["error"]
    assert want_text.lower() in msg.lower(), msg
    assert {k.lower(): v for k, v in h.items()}["geogate-attempts"] == "0"  # no replica was asked


def test_http_unknown_model_and_version(world):
    gw, _ = world
    status, _, raw = http_call(f"http://{gw.http}/v2/models/nope/infer", _json_body([GOOD_INPUT]))
    assert status == 404 and "nope" in json.loads(raw)["error"]
    status, _, raw = http_call(f"http://{gw.http}/v2/models/demo/versions/9/infer", _json_body([GOOD_INPUT]))
    assert status == 404 and "version 9" in json.loads(raw)["error"]


def test_http_body_too_large(tmp_path, world):
    _, reps = world
    gw = GatewayProc(tmp_path, replicas=replica_urls(reps), gateway_extra="max_body_bytes = 4096",
                     name="small")
    try:
        gw.wait_ready()
        big = _json_body([{**GOOD_INPUT, "shape": [400, 16], "data": [0.5] * 6400}])
        status, _, raw = http_call(f"http://{gw.http}/v2/models/demo/infer", big)
        assert status == 413 and "4096" in json.loads(raw)["error"]
        with pytest.raises(InferenceServerException) as exc:
            client = tgrpc.InferenceServerClient(gw.grpc)
            inp = tgrpc.InferInput("INPUT0", [400, 16], "FP32")
            inp.set_data_from_numpy(np.zeros((400, 16), np.float32))
            client.infer("demo", [inp])
        assert "RESOURCE_EXHAUSTED" in str(exc.value.status())
    finally:
        gw.stop()


def _grpc_request(name="INPUT0", datatype="FP32", shape=(1, 16), raw: bytes | None = None,
                  model="demo", version="1", outputs=()) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    req.inputs.add(name=name, datatype=datatype, shape=list(shape))
    req.raw_input_contents.append(raw if raw is not None else b"\0" * (4 * int(np.prod(shape))))
    for o in outputs:
        req.outputs.add(name=o)
    return req


GRPC_BAD = {
    "wrong input name": (_grpc_request(name="INPUTX"), grpc.StatusCode.INVALID_ARGUMENT, "INPUTX"),
    "wrong datatype": (_grpc_request(datatype="INT32"), grpc.StatusCode.INVALID_ARGUMENT, "INT32"),
    "wrong shape": (_grpc_request(shape=(1, 15)), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "raw byte count": (_grpc_request(raw=b"\0" * 60), grpc.StatusCode.INVALID_ARGUMENT, "byte size"),
    "unknown model": (_grpc_request(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "unknown version": (_grpc_request(version="9"), grpc.StatusCode.NOT_FOUND, "version 9"),
}


@pytest.mark.parametrize("case", list(GRPC_BAD), ids=list(GRPC_BAD))
def test_grpc_bad_input_rejected_at_gateway(world, case):
    gw, _ = world
    req, code, text = GRPC_BAD[case]
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc))
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(req, timeout=10)
    assert exc.value.code() == code
    assert text.lower() in exc.value.details().lower(), exc.value.details()
    md = dict(exc.value.initial_metadata() or ())
    assert md.get("geogate-attempts") == "0"


def test_grpc_missing_input_and_garbage(world):
    gw, _ = world
    channel = grpc.insecure_channel(gw.grpc)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(service_pb2.ModelInferRequest(model_name="demo"), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no inputs" in exc.value.details()
    raw_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as exc:
        raw_call(b"\x0a\xff\xff", timeout=10)  # truncated field
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in exc.value.details()


def test_replica_4xx_passes_through_unchanged(world):
    """A bad request the gateway does not judge (JSON values that are not numbers: the gateway
    counts elements, the replica reads them) reaches a replica; its 400 comes back as is, after
    exactly one attempt."""
    gw, _ = world
    body = _json_body([{**GOOD_INPUT, "shape": [2, 16], "data": [[0.5] * 16, [0.5] * 15 + ["x"]]}])
    status, h, raw = http_call(f"http://{gw.http}/v2/models/demo/versions/1/infer", body)
    assert status == 400, raw
    assert json.loads(raw)["error"]
    assert {k.lower(): v for k, v in h.items()}["geogate-attempts"] == "1"


def test_nothing_can_serve_is_503_with_the_reason(tmp_path):
    """A pool whose only replica is down: readiness, HTTP and gRPC all say why."""
    from health.replica_state import NOT_PROBED_YET
    from tests.procs import free_port, http_ok, wait_until

    dead = free_port()  # nothing listens there
    gw = GatewayProc(tmp_path, replicas=[f"http://127.0.0.1:{dead}"], name="dead")
    try:
        gw.wait_until(lambda: http_ok(f"http://{gw.admin}/v2/health/live"), 60, "live")
        # the replica's first probe has failed (its health reason is the probe's, not "not probed yet")
        wait_until(lambda: gw.region()["pools"][0]["replicas"][0]["health_reason"] not in ("", NOT_PROBED_YET),
                   60, "a failed probe")
        status, _, raw = http_call(f"http://{gw.http}/v2/health/ready")
        assert status == 503
        reason = json.loads(raw)["error"]
        assert "none routable" in reason and "p1" in reason, reason
        assert gw.region()["ready"] is False and gw.region()["reason"] == reason
        status, _h, raw = http_call(f"http://{gw.http}/v2/models/demo/infer", _json_body([GOOD_INPUT]))
        assert status == 503, raw
        # every replica unhealthy: panic routing tries them anyway (DESIGN: try everything once)
        # and the answer says what happened and why it was tried
        msg = json.loads(raw)["error"]
        assert "cannot connect" in msg and "panic routing" in msg and "'p1'" in msg, msg
        with pytest.raises(grpc.RpcError) as exc:
            service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc)).ModelInfer(
                _grpc_request(), timeout=10)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "panic routing" in exc.value.details()
    finally:
        gw.stop()


def test_access_log_carries_the_request_id(world):
    gw, _ = world
    status, _h, _ = http_call(f"http://{gw.http}/v2/models/demo/versions/1/infer", _json_body([GOOD_INPUT]),
                             {"x-request-id": "trace-me-123", "geogate-hops": "1"})
    assert status == 200  # hops >= 1: served locally (the only choice today, and never forwarded)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "trace-me-123" not in gw.output():
        time.sleep(0.1)
    line = next(ln for ln in gw.output().splitlines() if "trace-me-123" in ln)
    entry = json.loads(line)
    assert entry["log"] == "access" and entry["status"] == 200 and entry["replica"].startswith("http://")
