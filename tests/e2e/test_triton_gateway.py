"""Real NVIDIA Triton servers (python-backend demo model) as a gateway pool of ``kind = "triton"``:
tritonclient HTTP and gRPC through the gateway get the reference outputs, a Triton killed with
SIGKILL under a steady stream costs no request, and per-version readiness follows Triton's
repository index."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from replicas.demo.onnx_model import reference_outputs
from replicas.demo.python_backend import python_backend_config, write_python_backend_entry
from replicas.sync.replica_control import model_config_json
from tests.gateway_load import Stream
from tests.gateway_procs import FAST_HEALTH, RegionGatewayProc, http_call, one_region_toml
from tests.procs import GEOGATE, TritonProc, free_port

WAIT_S = 30.0


class TritonGatewayProc(RegionGatewayProc):
    """`geogate gateway` for one region whose pool is ``kind = "triton"``."""

    def __init__(self, tmp_path: Path, replicas: list[str], *, pool_extra: str = "", top_extra: str = "",
                 health: str = FAST_HEALTH, name: str = "gw"):
        self.http_port, self.grpc_port, self.admin_port = free_port(), free_port(), free_port()
        members = f"replicas = {json.dumps(replicas)}\n{pool_extra}"
        text = f"""
[deployment]
name = "triton-test"
{top_extra}
{health}
{one_region_toml(self, pool="tri", kind="triton", members=members)}"""
        self.config_path = tmp_path / f"{name}-{self.http_port}.toml"
        self.config_path.write_text(text)
        super().__init__([*GEOGATE, "gateway", "--config", str(self.config_path), "--region", "r1"],
                         name=f"{name}-{self.http_port}")


def start_tritons(procs: list, repo: str, n: int) -> list[TritonProc]:
    tritons = [TritonProc(repo, load=("demo",)) for _ in range(n)]
    procs.extend(tritons)
    for t in tritons:
        t.wait_ready()
    return tritons


def both_urls(tritons: list[TritonProc]) -> list[str]:
    return [u for t in tritons for u in (f"http://{t.http_url}", f"grpc://{t.grpc_url}")]


def wait_for(check, what: str, timeout_s: float = WAIT_S, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{logs}")


def all_healthy(gw: TritonGatewayProc, n: int) -> bool:
    try:
        return gw.region()["replicas"]["healthy"] == n
    except OSError:
        return False


def http_infer(address: str, x: np.ndarray, version: str = "") -> tuple[str, np.ndarray]:
    client = httpclient.InferenceServerClient(address)
    try:
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        res = client.infer("demo", [inp], model_version=version)
        return str(res.get_response()["model_version"]), res.as_numpy("OUTPUT0")
    finally:
        client.close()


def grpc_infer(address: str, x: np.ndarray, version: str = "") -> tuple[str, np.ndarray]:
    client = grpcclient.InferenceServerClient(address)
    try:
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("demo", [inp], model_version=version)
        return str(res.get_response().model_version), res.as_numpy("OUTPUT0")
    finally:
        client.close()


def load_versions(triton: TritonProc, versions: list[int]) -> None:
    """Ask Triton itself (repository API, explicit mode) to serve exactly `versions` of demo,
    with the same config override the sync agent sends."""
    cfg_json, _ = model_config_json("demo", python_backend_config("tiny"), [str(v) for v in versions])
    client = httpclient.InferenceServerClient(triton.http_url)
    try:
        client.load_model("demo", config=cfg_json)
    finally:
        client.close()


@pytest.fixture
def triton_world(tmp_path, procs):
    repo = tmp_path / "repo"
    for v in (1, 2):
        write_python_backend_entry(repo, v)
    tritons = start_tritons(procs, str(repo), 3)
    # Queue depth from every Triton's metrics port (gateway.upstream.load_signals), for the balancer.
    ports = {u: t.metrics_port for t in tritons for u in (f"http://{t.http_url}", f"grpc://{t.grpc_url}")}
    pool_extra = ("  metrics_scrape = true\n  metrics_interval_ms = 200\n  metrics_ports = { "
                  + ", ".join(f'"{u}" = {p}' for u, p in ports.items()) + " }\n")
    gw = TritonGatewayProc(tmp_path, both_urls(tritons), pool_extra=pool_extra)
    procs.append(gw)
    gw.wait_ready()
    wait_for(lambda: all_healthy(gw, 6), "all 6 Triton upstreams healthy", procs=[gw])
    yield tritons, gw
    gw.stop()
    for t in tritons:
        t.kill()  # nothing to drain or save: skip Triton's exit timeout


def test_triton_pool_serves_reference_outputs_and_follows_repository_index(triton_world):
    tritons, gw = triton_world
    summary = gw.region()
    assert [p["kind"] for p in summary["pools"]] == ["triton"]
    assert summary["models"]["demo"]["ready_versions"] == ["1", "2"]
    x = np.random.default_rng(7).random((3, 16), dtype=np.float32)
    for infer in (http_infer, grpc_infer):
        for version in ("1", "2"):
            answered, y = infer(gw.http if infer is http_infer else gw.grpc, x, version)
            assert answered == version
            np.testing.assert_allclose(y, reference_outputs("tiny", int(version), x), rtol=1e-5, atol=1e-6)
        # No version asked and no release record: Triton's own default, the highest version.
        answered, y = infer(gw.http if infer is http_infer else gw.grpc, x)
        assert answered == "2"
        np.testing.assert_allclose(y, reference_outputs("tiny", 2, x), rtol=1e-5, atol=1e-6)
    # The response headers name the Triton that answered and the version.
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [3, 16],
                                     "data": x.flatten().tolist()}]}).encode()
    status, headers, body = http_call(f"http://{gw.http}/v2/models/demo/versions/1/infer", header,
                                      {"Content-Type": "application/json"})
    assert status == 200, body
    heads = {k.lower(): v for k, v in headers.items()}
    assert heads["geogate-model-version"] == "1"
    assert any(heads["geogate-replica"].endswith(t.http_url) for t in tritons)

    # Version 2 unloaded on every Triton (explicit mode, no restart): the gateway's readiness
    # follows the repository index, and a request for version 2 is refused with the reason.
    for t in tritons:
        load_versions(t, [1])
    wait_for(lambda: gw.region()["models"]["demo"]["ready_versions"] == ["1"],
             "version 2 to leave the region's ready versions", procs=[gw])
    client = httpclient.InferenceServerClient(gw.http)
    try:
        assert client.is_model_ready("demo", "1")
        assert not client.is_model_ready("demo", "2")
        inp = httpclient.InferInput("INPUT0", [3, 16], "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as info:
            client.infer("demo", [inp], model_version="2")
        assert "2" in str(info.value) and "demo" in str(info.value)
    finally:
        client.close()
    answered, y = grpc_infer(gw.grpc, x)
    assert answered == "1"  # the only version left
    np.testing.assert_allclose(y, reference_outputs("tiny", 1, x), rtol=1e-5, atol=1e-6)
    # Back on one Triton only: version 2 is ready in the region again, served by that one.
    load_versions(tritons[0], [1, 2])
    wait_for(lambda: gw.region()["models"]["demo"]["ready_versions"] == ["1", "2"],
             "version 2 to be ready again", procs=[gw])
    for _ in range(5):
        answered, y = grpc_infer(gw.grpc, x, "2")
        assert answered == "2"
        np.testing.assert_allclose(y, reference_outputs("tiny", 2, x), rtol=1e-5, atol=1e-6)


def test_triton_killed_under_load_loses_no_request(triton_world):
    tritons, gw = triton_world
    victim = tritons[0]
    with Stream(gw, http_threads=3, grpc_threads=2) as stream:
        stream.wait_for(150)
        before = stream.results.total
        victim.kill()  # SIGKILL: connections reset, nothing drains
        stream.wait_for(before + 400)
        results = stream.stop()
    assert results.failures == [], results.failures[:5]
    served = {url for url in results.replicas}
    assert any(victim.http_url in u or victim.grpc_url in u for u in served)  # it did serve before
    wait_for(lambda: gw.region()["replicas"]["healthy"] == 4, "the dead Triton's upstreams marked unhealthy",
             procs=[gw])
    # Afterwards only the survivors answer.
    x = np.ones((1, 16), dtype=np.float32)
    for _ in range(10):
        status, headers, body = http_call(
            f"http://{gw.http}/v2/models/demo/infer",
            json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                    "data": x.flatten().tolist()}]}).encode(),
            {"Content-Type": "application/json"})
        assert status == 200, body
        replica = {k.lower(): v for k, v in headers.items()}["geogate-replica"]
        assert victim.http_url not in replica and victim.grpc_url not in replica
        out = np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(1, 8)
        np.testing.assert_allclose(out, reference_outputs("tiny", 2, x), rtol=1e-5, atol=1e-6)
