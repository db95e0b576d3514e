"""A promotion carried into real Triton servers by the sync agent, under load.

`geogate models push` puts the python-backend demo v1 and v2 into a file:// store; v1 is
promoted; `geogate sync` installs it into the site's repository and has both Tritons (explicit
model control, no restart) load it through the repository API with a config override. Then v2
is promoted while a steady stream of HTTP and gRPC requests flows through `geogate gateway`:
no request fails, every answer's version header matches its outputs, and Triton ends up
serving v2 to unversioned requests. With keep_previous = 0 the agent also unloads v1, but only
once gateways have switched unversioned traffic away from it (the cutover rule applied to the
published site statuses), so that too costs no request."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from replicas.demo.onnx_model import reference_outputs
from replicas.demo.python_backend import write_python_backend_entry
from tests.e2e.test_triton_gateway import TritonGatewayProc, wait_for
from tests.procs import GEOGATE, TritonProc, geogate

POLL_MS = 300
X = np.linspace(-1.0, 1.0, 32, dtype=np.float32).reshape(2, 16)
EXPECTED = {v: reference_outputs("tiny", v, X) for v in (1, 2)}


def cli(*args: str) -> str:
    done = subprocess.run([*GEOGATE, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"geogate {' '.join(args)} failed ({done.returncode}):\n{done.stderr}"
    return done.stdout


def matching_version(outputs: np.ndarray) -> int | None:
    for v, want in EXPECTED.items():
        if outputs.shape == want.shape and np.allclose(outputs, want, rtol=1e-5, atol=1e-5):
            return v
    return None


@dataclass
class Tally:
    versions: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    last_version: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, proto: str, header: str, body_version: str, outputs: np.ndarray) -> None:
        got = matching_version(outputs)
        with self.lock:
            if header != body_version or got is None or str(got) != header:
                self.failures.append(f"{proto}: header {header!r}, body {body_version!r}, outputs of {got}")
            else:
                self.versions[header] += 1
                self.last_version[proto] = header

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    @property
    def total(self) -> int:
        return sum(self.versions.values()) + len(self.failures)


def http_worker(address: str, stop: threading.Event, tally: Tally) -> None:
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16],
                                     "parameters": {"binary_data_size": X.nbytes}}],
                         "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    while not stop.is_set():
        try:
            conn.request("POST", "/v2/models/demo/infer", body=header + X.tobytes(), headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                tally.fail(f"http {resp.status}: {data[:300]!r}")
                continue
            json_len = int(resp.getheader("Inference-Header-Content-Length"))
            meta = json.loads(data[:json_len])
            out = np.frombuffer(data[json_len:], dtype=np.float32).reshape(2, 8)
            tally.ok("http", resp.getheader("geogate-model-version", ""), str(meta["model_version"]), out)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            tally.fail(f"http: {type(exc).__name__}: {exc}")
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.close()


def grpc_worker(address: str, stop: threading.Event, tally: Tally) -> None:
    channel = grpc.insecure_channel(address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    req = service_pb2.ModelInferRequest(model_name="demo")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 16])
    req.raw_input_contents.append(X.tobytes())
    while not stop.is_set():
        try:
            resp, call = stub.ModelInfer.with_call(req, timeout=30)
            md = dict(call.initial_metadata())
            out = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(2, 8)
            tally.ok("grpc", md.get("geogate-model-version", ""), resp.model_version, out)
        except grpc.RpcError as exc:
            tally.fail(f"grpc: {exc.code()} {exc.details()}")
    channel.close()


def triton_ready_versions(triton: TritonProc) -> set[str]:
    client = httpclient.InferenceServerClient(triton.http_url)
    try:
        return {m["version"] for m in client.get_model_repository_index()
                if m["name"] == "demo" and m.get("state") == "READY"}
    finally:
        client.close()


@pytest.mark.parametrize("keep_previous", [1, 0])
def test_promotion_reaches_triton_through_sync_agent_under_load(tmp_path, procs, keep_previous):
    src = tmp_path / "src"
    for v in (1, 2):
        write_python_backend_entry(src, v)
    store = f"file://{tmp_path / 'store'}"
    for v in ("1", "2"):
        cli("models", "push", "demo", str(src / "demo"), "--version", v, "--store", store, "--quiet")
    site_repo = tmp_path / "site" / "models"
    site_repo.mkdir(parents=True)
    tritons = [TritonProc(str(site_repo)) for _ in range(2)]  # explicit mode, nothing loaded yet
    procs.extend(tritons)
    for t in tritons:
        t.wait_ready()
    # One Triton over HTTP, one over gRPC: the sync agent drives both protocols' repository API.
    replicas = [f"http://{tritons[0].http_url}", f"grpc://{tritons[1].grpc_url}"]
    gw = TritonGatewayProc(
        tmp_path, replicas,
        top_extra=f'[store]\nurl = "{store}"\n[sync]\npoll_interval_ms = {POLL_MS}\nkeep_previous = {keep_previous}\n'
                  'load_timeout_ms = 60000\nresolver_poll_interval_ms = 300\n',
        pool_extra=f'  repository = "{site_repo}"\n')
    procs.append(gw)
    cli("models", "promote", "demo", "1", "--store", store)
    agent = geogate("sync", "--config", str(gw.config_path), "--site", "r1", name="sync")
    procs.append(agent)
    wait_for(lambda: all(triton_ready_versions(t) == {"1"} for t in tritons),
             "the sync agent to load v1 into both Tritons", procs=[agent, *tritons])
    gw.wait_ready()
    stop = threading.Event()
    tally = Tally()
    workers = [threading.Thread(target=http_worker, args=(gw.http, stop, tally), daemon=True) for _ in range(2)]
    workers.append(threading.Thread(target=grpc_worker, args=(gw.grpc, stop, tally), daemon=True))
    for w in workers:
        w.start()
    try:
        wait_for(lambda: tally.versions["1"] >= 100, "100 answers from v1", procs=[gw])
        cli("models", "promote", "demo", "2", "--store", store)
        wait_for(lambda: tally.last_version.get("http") == "2" and tally.last_version.get("grpc") == "2",
                 "unversioned traffic to switch to v2", timeout_s=60, procs=[gw, agent, *tritons])
        # Triton serves v2, loaded in place (the same processes that served v1); v1, the previous
        # stable, stays loaded only when keep_previous = 1. Traffic keeps flowing meanwhile: an
        # unload of v1 while gateways still route to it would show up as failed requests.
        kept = {"1", "2"} if keep_previous else {"2"}
        wait_for(lambda: all(triton_ready_versions(t) == kept for t in tritons), f"Tritons to serve {kept}",
                 procs=[agent, *tritons])
        after = tally.versions["2"]
        wait_for(lambda: tally.versions["2"] >= after + 100, "100 more answers from v2", procs=[gw])
    finally:
        stop.set()
        for w in workers:
            w.join(40)
    assert tally.failures == [], (f"{len(tally.failures)} failed: {tally.failures[:3]}\n"
                                  + "\n".join(f"--- {p.name}\n{p.output()[-4000:]}" for p in (gw, agent)))
    assert tally.versions["1"] >= 100 and tally.versions["2"] >= 100
    assert all(t.alive() for t in tritons)
    # The directories of unloaded versions go last.
    wait_for(lambda: {p.name for p in (site_repo / "demo").iterdir() if p.name.isdigit()} == kept,
             f"installed versions to be {kept}", procs=[agent])
    for t in tritons:
        t.kill()  # nothing to drain or save: skip Triton's exit timeout
    assert (site_repo / "demo" / "2" / "MANIFEST.json").is_file()
