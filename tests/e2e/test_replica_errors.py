"""Bad input gets Triton's answers over HTTP and gRPC, nothing crashes, and the test fault switch
exists only with --enable-test-faults."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from replicas.demo.onnx_model import reference_outputs, write_repository_entry
from tests.procs import ReplicaProc

MAX_BODY_BYTES = 200_000


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_repository_entry(repo, 1)
    proc = ReplicaProc(str(repo), extra=["--max-body-bytes", str(MAX_BODY_BYTES), "--enable-test-faults"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def post(url: str, body: bytes, headers: dict[str, str] | None = None, timeout_s: float = 10
         ) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def infer_json(replica, body: dict | bytes, model: str = "demo", headers=None) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, data = post(f"http://{replica.http_url}/v2/models/{model}/infer", raw, headers)
    return status, json.loads(data) if data else {}


def good_input(rows: int = 1) -> dict:
    return {"name": "INPUT0", "datatype": "FP32", "shape": [rows, 16], "data": [0.5] * (16 * rows)}


def grpc_request(model="demo", name="INPUT0", datatype="FP32", shape=(1, 16), raw: bytes | None = None,
                 outputs=()) -> service_pb2.ModelInferRequest:
    r = service_pb2.ModelInferRequest(model_name=model)
    if name is not None:
        r.inputs.add(name=name, datatype=datatype, shape=list(shape))
        r.raw_input_contents.append(raw if raw is not None else np.zeros(shape, np.float32).tobytes())
    for o in outputs:
        r.outputs.add(name=o)
    return r


@pytest.fixture(scope="module")
def stub(replica):
    channel = grpc.insecure_channel(replica.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def grpc_error(stub, request, version: str = "") -> grpc.RpcError:
    if version:
        request.model_version = version
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    return info.value


HTTP_CASES = {
    "unknown model": ("nope", {"inputs": [good_input()]}, 404, "unknown model"),
    "wrong input name": ("demo", {"inputs": [{**good_input(), "name": "INPUTX"}]}, 400, "INPUTX"),
    "missing input": ("demo", {"inputs": []}, 400, "missing required input"),
    "wrong datatype": ("demo", {"inputs": [{**good_input(), "datatype": "INT32"}]}, 400, "data-type"),
    "wrong shape": ("demo", {"inputs": [{**good_input(), "shape": [1, 15], "data": [0] * 15}]}, 400,
                    "unexpected shape"),
    "no batch dim": ("demo", {"inputs": [{**good_input(), "shape": [16], "data": [0] * 16}]}, 400,
                     "unexpected shape"),
    "batch too big": ("demo", {"inputs": [good_input(33)]}, 400, "batch-size"),
    "data count": ("demo", {"inputs": [{**good_input(), "data": [0.5] * 15}]}, 400, "elements"),
    "unknown output": ("demo", {"inputs": [good_input()], "outputs": [{"name": "OUT9"}]}, 400, "OUT9"),
    "not numbers": ("demo", {"inputs": [{**good_input(), "data": ["a"] * 16}]}, 400, "INPUT0"),
    "no inputs key": ("demo", {"id": "x"}, 400, "inputs"),
}


@pytest.mark.parametrize("case", sorted(HTTP_CASES))
def test_http_bad_requests(replica, case):
    model, body, status, fragment = HTTP_CASES[case]
    got_status, got = infer_json(replica, body, model=model)
    assert got_status == status, got
    assert fragment in got["error"]


def test_http_unknown_version_and_malformed(replica):
    status, _, data = post(f"http://{replica.http_url}/v2/models/demo/versions/7/infer",
                           json.dumps({"inputs": [good_input()]}).encode())
    assert status == 404 and "version 7" in json.loads(data)["error"]
    status, body = infer_json(replica, b"{not json")
    assert status == 400 and "JSON" in body["error"]
    status, _ = infer_json(replica, b"[1, 2]")
    assert status == 400
    # binary: header length beyond body, byte count mismatch, missing header, trailing bytes
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                     "parameters": {"binary_data_size": 64}}]}).encode()
    blob = np.zeros(16, np.float32).tobytes()
    for headers, payload, fragment in [
        ({"Inference-Header-Content-Length": "99999"}, header + blob, "Inference-Header-Content-Length"),
        ({"Inference-Header-Content-Length": "abc"}, header + blob, "integer"),
        ({"Inference-Header-Content-Length": str(len(header))}, header + blob[:60], "end of binary data"),
        ({"Inference-Header-Content-Length": str(len(header))}, header + blob + b"xxxx", "no input claims"),
        ({}, header + blob, ""),
    ]:
        status, body = infer_json(replica, payload, headers=headers)
        assert status == 400, body
        assert fragment in body["error"]
    bad_size = header.replace(b"64", b"60")
    status, body = infer_json(replica, bad_size + blob[:60],
                              headers={"Inference-Header-Content-Length": str(len(bad_size))})
    assert status == 400 and "byte size" in body["error"]


def test_http_body_too_large(replica):
    rows = 32
    big = json.dumps({"inputs": [good_input(rows)]}).encode() + b" " * MAX_BODY_BYTES
    status, body = infer_json(replica, big)
    assert status == 413 and "limit" in body["error"]


def test_http_bad_compressed_body(replica):
    status, body = infer_json(replica, b"definitely not gzip", headers={"Content-Encoding": "gzip"})
    assert status == 400 and "request body" in body["error"]


@pytest.mark.parametrize("case", [
    "unknown model", "unknown version", "wrong input name", "missing input", "wrong datatype", "wrong shape",
    "byte count", "unknown output", "raw count"])
def test_grpc_bad_requests(replica, stub, case):
    x = np.zeros((1, 16), np.float32).tobytes()
    req, version, code, fragment = {
        "unknown model": (grpc_request(model="nope"), "", grpc.StatusCode.NOT_FOUND, "unknown model"),
        "unknown version": (grpc_request(), "5", grpc.StatusCode.NOT_FOUND, "version 5"),
        "wrong input name": (grpc_request(name="BAD"), "", grpc.StatusCode.INVALID_ARGUMENT, "BAD"),
        "missing input": (grpc_request(name=None), "", grpc.StatusCode.INVALID_ARGUMENT, "missing required"),
        "wrong datatype": (grpc_request(datatype="FP64"), "", grpc.StatusCode.INVALID_ARGUMENT, "data-type"),
        "wrong shape": (grpc_request(shape=(1, 17), raw=np.zeros((1, 17), np.float32).tobytes()), "",
                        grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape"),
        "byte count": (grpc_request(raw=x[:-4]), "", grpc.StatusCode.INVALID_ARGUMENT, "byte size"),
        "unknown output": (grpc_request(outputs=["NOPE"]), "", grpc.StatusCode.INVALID_ARGUMENT, "NOPE"),
        "raw count": (grpc_request(), "", grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"),
    }[case]
    if case == "raw count":
        req.raw_input_contents.append(x)
    err = grpc_error(stub, req, version)
    assert err.code() == code, err.details()
    assert fragment in err.details()


def test_grpc_message_too_large(replica, stub):
    req = grpc_request()
    req.raw_input_contents[0] = b"\0" * (MAX_BODY_BYTES + 10)
    err = grpc_error(stub, req)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_tritonclient_surfaces_errors(replica):
    client = tgrpc.InferenceServerClient(replica.grpc_url)
    inp = tgrpc.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("missing", [inp])
    client.close()


def test_still_serving_after_errors(replica):
    x = np.full((1, 16), 0.5, np.float32)
    status, body = infer_json(replica, {"inputs": [good_input()]})
    assert status == 200
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"], np.float32).reshape(1, 8),
                               reference_outputs("tiny", 1, x), atol=1e-4)


def _set_faults(replica, **faults) -> None:
    status, _, data = post(f"http://{replica.http_url}/geogate/test/faults", json.dumps(faults).encode())
    assert status == 200, data


def test_fault_switch_status_and_delay(replica, stub):
    try:
        _set_faults(replica, status=503)
        status, body = infer_json(replica, {"inputs": [good_input()]})
        assert status == 503 and "injected" in body["error"]
        assert grpc_error(stub, grpc_request()).code() == grpc.StatusCode.UNAVAILABLE
        _set_faults(replica, status=0, delay_ms=300)
        started = time.monotonic()
        status, _ = infer_json(replica, {"inputs": [good_input()]})
        assert status == 200 and time.monotonic() - started >= 0.3
        started = time.monotonic()
        stub.ModelInfer(grpc_request(), timeout=10)
        assert time.monotonic() - started >= 0.3
    finally:
        _set_faults(replica, status=0, delay_ms=0, hang=False)
    status, _ = infer_json(replica, {"inputs": [good_input()]})
    assert status == 200


def test_fault_switch_hang_until_cleared(replica, stub):
    results: dict[str, object] = {}
    _set_faults(replica, hang=True)
    try:
        def http_call():
            results["http"] = infer_json(replica, {"inputs": [good_input()]})[0]

        def grpc_call():
            results["grpc"] = stub.ModelInfer(grpc_request(), timeout=30).model_version

        threads = [threading.Thread(target=http_call), threading.Thread(target=grpc_call)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # held on purpose: a hang is nothing answered for a while
        assert results == {}  # nobody answered while hanging
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(grpc_request(), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        _set_faults(replica, hang=False)
    for t in threads:
        t.join(20)
    assert results == {"http": 200, "grpc": "1"}


def test_fault_route_absent_without_flag(tmp_path, procs):
    write_repository_entry(tmp_path, 1)
    proc = ReplicaProc(str(tmp_path))
    procs.append(proc)
    proc.wait_ready()
    status, _, _ = post(f"http://{proc.http_url}/geogate/test/faults", json.dumps({"status": 503}).encode())
    assert status == 404


def test_grpc_stream_reports_errors_per_request(replica, stub):
    good = grpc_request()
    good.id = "ok"
    bad = grpc_request(model="nope")
    bad.id = "bad"
    answers = {item.infer_response.id: item for item in stub.ModelStreamInfer(iter([good, bad]), timeout=20)}
    assert answers["ok"].error_message == "" and answers["ok"].infer_response.model_version == "1"
    assert "unknown model" in answers["bad"].error_message


def test_statistics_count_failures(replica):
    assert infer_json(replica, {"inputs": [{**good_input(), "data": [0.5] * 15}]})[0] == 400
    assert infer_json(replica, {"inputs": [good_input()]})[0] == 200
    with urllib.request.urlopen(f"http://{replica.http_url}/v2/models/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"]
    (demo,) = [s for s in stats if s["name"] == "demo" and s["version"] == "1"]
    assert demo["inference_stats"]["fail"]["count"] > 0  # refused after reaching the model
    assert demo["inference_stats"]["success"]["count"] > 0
    assert demo["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}
