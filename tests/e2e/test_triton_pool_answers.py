"""Triton-faithful answers from a gateway in front of two real Tritons (one reached over HTTP, one
over gRPC): server metadata is the Tritons' (less the extensions the gateway does not forward),
statistics are the sums of both Tritons' own, and a non-numeric version gets Triton's text."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.upstream.pool_merge import UNHONOURED_EXTENSIONS
from replicas.demo.python_backend import write_python_backend_entry
from tests.e2e.test_triton_gateway import TritonGatewayProc, all_healthy, start_tritons, wait_for

COUNTS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def _get(url: str, body: bytes | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read() or b"{}")


def _infer_directly(address: str, n: int, version: str) -> None:
    client = httpclient.InferenceServerClient(address)
    try:
        for i in range(n):
            x = np.full((1 + i % 3, 16), i, dtype=np.float32)
            inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer("demo", [inp], model_version=version)
    finally:
        client.close()


def _row(stats: dict, version: str) -> dict:
    [row] = [r for r in stats["model_stats"] if r["name"] == "demo" and r["version"] == version]
    return row


def _n(value) -> int:
    return int(value or 0)


@pytest.fixture
def two_tritons(tmp_path, procs):
    repo = tmp_path / "repo"
    for v in (1, 2):
        write_python_backend_entry(repo, v)
    tritons = start_tritons(procs, str(repo), 2)
    gw = TritonGatewayProc(tmp_path, [f"http://{tritons[0].http_url}", f"grpc://{tritons[1].grpc_url}"])
    procs.append(gw)
    gw.wait_ready()
    wait_for(lambda: all_healthy(gw, 2), "both Tritons healthy", procs=[gw])
    yield tritons, gw
    gw.stop()
    for t in tritons:
        t.kill()


def test_server_metadata_statistics_and_version_texts_are_the_tritons(two_tritons):
    tritons, gw = two_tritons
    # --- server metadata: Triton's name, version and extensions, less those the gateway does not honour
    _, _, direct = _get(f"http://{tritons[0].http_url}/v2")
    assert direct["name"] == "triton"
    expected = [e for e in direct["extensions"] if e not in UNHONOURED_EXTENSIONS]
    assert "sequence" in expected and "model_repository" in direct["extensions"]
    status, _, through = _get(f"http://{gw.http}/v2")
    assert status == 200 and through == {"name": "triton", "version": direct["version"], "extensions": expected}
    client = grpcclient.InferenceServerClient(gw.grpc)
    try:
        meta = client.get_server_metadata(as_json=True)
        assert (meta["name"], meta["version"], meta["extensions"]) == ("triton", direct["version"], expected)
    finally:
        client.close()

    # --- statistics: each Triton served a different number of requests, directly
    _infer_directly(tritons[0].http_url, 3, "1")
    _infer_directly(tritons[1].http_url, 5, "1")
    _infer_directly(tritons[1].http_url, 2, "2")
    own = [_get(f"http://{t.http_url}/v2/models/demo/stats")[2] for t in tritons]
    for path in ("/v2/models/demo/versions/1/stats", "/v2/models/demo/stats", "/v2/models/stats"):
        status, headers, summed = _get(f"http://{gw.http}{path}")
        assert status == 200, summed
        assert headers["geogate-replicas-aggregated"] == "2" and headers["geogate-replicas-asked"] == "2"
        row = _row(summed, "1")
        ones = [_row(s, "1") for s in own]
        assert row["inference_stats"]["success"]["count"] == 8  # requests
        assert row["inference_count"] == sum(r["inference_count"] for r in ones) == 15  # rows: 1+2+3 +1+2+3+1+2
        assert row["execution_count"] == sum(r["execution_count"] for r in ones)
        assert row["last_inference"] == max(r["last_inference"] for r in ones)
        for key in COUNTS:
            for part in ("count", "ns"):
                assert row["inference_stats"][key][part] == sum(r["inference_stats"][key][part] for r in ones), key
        batches = {b["batch_size"]: b["compute_infer"]["count"] for b in row["batch_stats"]}
        assert sum(batches.values()) == row["execution_count"]
        if "versions" not in path:
            assert _row(summed, "2")["inference_stats"]["success"]["count"] == 2
    client = grpcclient.InferenceServerClient(gw.grpc)
    try:
        stats = client.get_inference_statistics("demo", "1", as_json=True)
        [row] = stats["model_stats"]
        assert int(row["inference_stats"]["success"]["count"]) == 8
        all_models = client.get_inference_statistics(as_json=True)
        assert sum(_n(r["inference_stats"]["success"].get("count")) for r in all_models["model_stats"]) == 10
    finally:
        client.close()
    with grpc.insecure_channel(gw.grpc) as channel:  # how many replicas: in the initial metadata
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelStatistics.with_call(service_pb2.ModelStatisticsRequest(name="demo"))
        meta = dict(call.initial_metadata())
        assert meta["geogate-replicas-aggregated"] == "2" and meta["geogate-replicas-asked"] == "2"
        assert sum(s.inference_stats.success.count for s in response.model_stats) == 10

    # --- a version Triton cannot read: Triton's own text (gRPC: the same code and message as a Triton's;
    # HTTP: 400 with that text, where Triton's HTTP front only says 404 "Not Found" (its route wants digits))
    x = np.zeros((1, 16), dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                   "data": [0.0] * 16}]}).encode()
    for version in ("abc", "-1", "99999999999999999999"):
        answers = []
        for address in (tritons[1].grpc_url, gw.grpc):
            client = grpcclient.InferenceServerClient(address)
            try:
                with pytest.raises(InferenceServerException) as info:
                    client.infer("demo", [inp], model_version=version)
                answers.append((info.value.status(), info.value.message()))
            finally:
                client.close()
        assert answers[0] == answers[1] and "integral value > 0" in answers[0][1], answers
        status, _, error = _get(f"http://{gw.http}/v2/models/demo/versions/{version}/infer", body)
        assert (status, error) == (400, {"error": answers[0][1]})
