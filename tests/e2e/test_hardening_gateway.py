"""Hostile clients against real processes (issue 17, the gateway's data path): a gateway in
front of real ONNX Runtime replicas (FP32 model `demo`, INT64 model `ids`), a real Triton
(python backend: BYTES model `strlen`, FP32 `demo`) for the translation paths, and two regions
behind a real `geogate dns`.

- Deadlines: `geogate-timeout-ms` and Triton's `timeout` parameter (HTTP JSON and gRPC) that
  are NaN, inf, negative, zero, huge, empty or not ASCII digits get a clear 400 /
  INVALID_ARGUMENT naming them; 50 of them interleaved with normal requests leave the normal
  ones fast and the gateway with no connection or in-flight count leaked.
- Attribution: requests whose own short deadlines run out (HTTP header and parameter, gRPC
  deadline and parameter) never eject a replica, never turn /v2/health/ready 503 and never take
  a region out of GeoDNS answers, also when they reach a peer region; a replica that really
  fails (the gateway's own per-try timeout, a killed process) is still ejected.
- Bounded work: a BYTES element that is a number is a 400 (it once allocated 1.2 GB from 86
  bytes), BYTES length prefixes and element counts are checked on every path, and the
  gateway's peak memory does not move.
- Malformed headers and bodies get 4xx, never 500; malformed HTTP is logged as one rate-limited
  warning line each, never a traceback.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from loadtests.geo_standin import NEW_YORK_NET, dig, start_dns, wait_dns
from replicas.demo.onnx_model import write_repository_entry
from replicas.demo.python_backend import write_python_backend_entry
from tests.gateway_procs import (
    RegionGatewayProc,
    demo_repository,
    get_json,
    http_call,
    one_region_toml,
    set_faults,
    start_replicas,
)
from tests.procs import GEOGATE, Proc, ReplicaProc, TritonProc, free_port, http_ok

WAIT_S = 60.0
SLACK_S = 1.5  # a refused or timed-out request answers within its deadline plus this (shared 2-core box)
X16 = [0.25] * 16
BAD_TIMEOUT_HEADERS = ["nan", "NaN", "inf", "-inf", "-1", "0", "1e400", "\uff11\uff10", "\u0663", "", "1_0", "0x10"]

# Passive outlier detection as sensitive as it gets: 2 failures in a row eject, and every
# replica may be ejected (so ejecting the pool's replicas turns readiness 503). Active checks
# are slow, so what happens in a test is the data path's doing.
SENSITIVE_HEALTH = """
[health]
interval_ms = 2000
timeout_ms = 1500
rise = 1
fall = 3
consecutive_failures = 2
base_ejection_ms = 10000
max_ejection_ms = 20000
max_ejection_percent = 100
"""


# ---------------------------------------------------------------------------- helpers


class Gateway(RegionGatewayProc):
    """`geogate gateway` for region r1 over `replicas` (URLs), pool kind `kind`."""

    def __init__(self, tmp: Path, replicas: list[str], *, kind: str = "geogate", health: str = SENSITIVE_HEALTH,
                 gateway_extra: str = "", name: str = "gw") -> None:
        self.http_port, self.grpc_port, self.admin_port = free_port(), free_port(), free_port()
        text = (f'[deployment]\nname = "hardening"\n{health}\n[gateway]\n{gateway_extra}\n\n'
                + one_region_toml(self, pool="p1", kind=kind, members=f"replicas = {json.dumps(replicas)}"))
        self.config_path = tmp / f"{name}-{self.http_port}.toml"
        self.config_path.write_text(text)
        super().__init__([*GEOGATE, "gateway", "--config", str(self.config_path), "--region", "r1"],
                         name=f"{name}-{self.http_port}")

    def replicas(self) -> list[dict]:
        return [r for p in self.region()["pools"] for r in p["replicas"]]

    def metric(self, name: str, **labels: str) -> float:
        return metric_total(f"http://{self.admin}/metrics", name, **labels)

    def peak_rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


def metric_total(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` (a Prometheus text exposition at `url`) with `labels`."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def raw_http(address: str, path: str, body: bytes = b"", headers: list[tuple[str, str | bytes]] = (),
             method: str = "POST", timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte (header values may be any bytes): (status, headers, body)."""
    host, port = address.rsplit(":", 1)
    head = f"{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    data = head.encode()
    for k, v in headers:
        data += k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) + b"\r\n"
    return _exchange(host, int(port), data + b"\r\n" + body, timeout_s)


def _exchange(host: str, port: int, data: bytes, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), hdrs, body


def json_body(inputs: list[dict], **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def fp32_input(rows: int = 1) -> dict:
    return {"name": "INPUT0", "datatype": "FP32", "shape": [rows, 16], "data": X16 * rows}


def int64_input() -> dict:
    return {"name": "IDS", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]}


def error_of(body: bytes) -> str:
    return json.loads(body)["error"]


def grpc_request(model: str = "demo", **int_params: int) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model)
    if model == "ids":
        req.inputs.add(name="IDS", datatype="INT64", shape=[1, 4])
        req.raw_input_contents.append(np.arange(4, dtype=np.int64).tobytes())
    else:
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
        req.raw_input_contents.append(np.full(16, 0.25, dtype=np.float32).tobytes())
    for k, v in int_params.items():
        if v >= 2**63:
            req.parameters[k].uint64_param = v
        else:
            req.parameters[k].int64_param = v
    return req


def grpc_infer(stub, req, *, timeout_s: float | None = 10.0, metadata=()) -> tuple[grpc.StatusCode, str]:
    """(code, details) of one ModelInfer; `timeout_s` None: no gRPC deadline (a `timeout`
    parameter is then the request's deadline)."""
    try:
        stub.ModelInfer(req, timeout=timeout_s, metadata=metadata)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""


def write_ids_model(repo: str) -> None:
    """Model `ids`: IDS INT64 [-1, 4] -> OUT FP32 [-1, 4] (a Cast), config from the graph."""
    import onnx
    from onnx import TensorProto, helper

    d = Path(repo) / "ids" / "1"
    d.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph([helper.make_node("Cast", ["IDS"], ["OUT"], to=TensorProto.FLOAT)], "ids",
                              [helper.make_tensor_value_info("IDS", TensorProto.INT64, ["batch", 4])],
                              [helper.make_tensor_value_info("OUT", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(d / "model.onnx"))


def wait_for(cond, what: str, procs=(), timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{logs}")


def assert_nothing_held(gw: Gateway) -> None:
    """No attempt in flight, no pooled connection busy, nobody waiting, nobody ejected."""
    for r in gw.replicas():
        assert r["in_flight"] == 0, r
        if "connections" in r:
            c = r["connections"]
            assert c["busy"] == 0 and c["waiting"] == 0 and c["open"] == c["idle"], r
        assert not r["ejected"] and r["consecutive_failures"] == 0, r
    status, _, body = http_call(f"http://{gw.http}/v2/health/ready")
    assert status == 200, body


def assert_quiet_log(gw: Gateway) -> None:
    out = gw.output()
    assert "Traceback" not in out, out[-3000:]
    assert '"level":"error"' not in out, out[-3000:]


# ---------------------------------------------------------------------------- one region, ORT replica


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One ORT replica (demo FP32, ids INT64; test faults on) behind a gateway with HTTP and
    gRPC URLs for it; sensitive outlier detection (two failures eject, all may be ejected)."""
    tmp = tmp_path_factory.mktemp("hardening")
    repo = demo_repository(tmp)
    write_ids_model(repo)
    started: list = []
    try:
        (rep,) = start_replicas(started, repo, 1)
        gw = Gateway(tmp, [f"http://{rep.http_url}", f"grpc://{rep.grpc_url}"])
        started.append(gw)
        gw.wait_ready()
        wait_for(lambda: all(r["healthy"] for r in gw.replicas()), "both replica URLs healthy", [gw])
        yield gw, rep
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture
def clean(world):
    gw, rep = world
    set_faults(rep)
    yield gw, rep
    set_faults(rep)


@pytest.mark.parametrize("model", ["demo", "ids"])
@pytest.mark.parametrize("value", BAD_TIMEOUT_HEADERS)
def test_bad_timeout_header_is_400(clean, value, model):
    gw, _ = clean
    body = json_body([fp32_input() if model == "demo" else int64_input()])
    status, _, resp = raw_http(gw.http, f"/v2/models/{model}/infer", body, [("geogate-timeout-ms", value)])
    assert status == 400, resp
    assert "geogate-timeout-ms" in error_of(resp)


@pytest.mark.parametrize(("value", "named"), [(-1, True), (1.5, True), ("10", True), (10**20, True), (True, True),
                                              ([1], True), ("1e400", False)])
def test_bad_timeout_parameter_is_400(clean, value, named):
    gw, _ = clean
    if value == "1e400":  # not JSON a parser accepts as a number (infinity): the JSON is refused
        body = b'{"inputs":[' + json.dumps(int64_input()).encode() + b'],"parameters":{"timeout":1e400}}'
    else:
        body = json_body([int64_input()], parameters={"timeout": value})
    status, _, resp = raw_http(gw.http, "/v2/models/ids/infer", body)
    assert status == 400, resp
    if named:
        assert "'timeout'" in error_of(resp)
    # 0 is Triton's "no timeout": served
    status, _, resp = raw_http(gw.http, "/v2/models/ids/infer", json_body([int64_input()], parameters={"timeout": 0}))
    assert status == 200, resp


@pytest.mark.parametrize("model", ["demo", "ids"])
@pytest.mark.parametrize("value", [-1, -(2**63), 86_400_000_001, 2**64 - 1])
def test_bad_grpc_timeout_parameter_is_invalid_argument(clean, value, model):
    gw, _ = clean
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc))
    code, details = grpc_infer(stub, grpc_request(model, timeout=value))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "'timeout'" in details
    assert grpc_infer(stub, grpc_request(model, timeout=0))[0] == grpc.StatusCode.OK


def test_bad_requests_interleaved_leave_nothing_behind(clean):
    """The NaN attack: ~30 of these once left every later request a 30 s 504. 50 bad ones of
    every kind, each followed by good ones: the good ones stay fast, nothing is held after."""
    gw, _ = clean
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc))
    slowest_good_s = 0.0
    for i in range(50):
        value = BAD_TIMEOUT_HEADERS[i % len(BAD_TIMEOUT_HEADERS)]
        model, inp = (("demo", fp32_input()), ("ids", int64_input()))[i % 2]
        if i % 5 == 4:
            code, _ = grpc_infer(stub, grpc_request(model, timeout=-1 - i))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        else:
            status, _, _ = raw_http(gw.http, f"/v2/models/{model}/infer", json_body([inp]),
                                    [("geogate-timeout-ms", value)])
            assert status == 400
        t0 = time.monotonic()
        status, _, resp = raw_http(gw.http, f"/v2/models/{model}/infer", json_body([inp]))
        assert status == 200, resp
        assert grpc_infer(stub, grpc_request(model))[0] == grpc.StatusCode.OK
        slowest_good_s = max(slowest_good_s, time.monotonic() - t0)
    assert slowest_good_s < 5.0, slowest_good_s
    assert_nothing_held(gw)
    assert_quiet_log(gw)


def test_client_deadlines_never_eject_nor_unready(clean):
    """Short deadlines the clients chose run out on a slow replica, over every way of giving
    one: the replica is never ejected, the region stays ready. (Before: three requests with
    `geogate-timeout-ms: 0.15` ejected the replica and /v2/health/ready turned 503.)"""
    gw, rep = clean
    set_faults(rep, delay_ms=400)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc))
    client = tgrpc.InferenceServerClient(gw.grpc)
    grpc_fp32 = tgrpc.InferInput("INPUT0", [1, 16], "FP32")
    grpc_fp32.set_data_from_numpy(np.full((1, 16), 0.25, dtype=np.float32))
    attacks = []
    for _ in range(6):
        attacks += [("http header 50 ms", lambda: raw_http(gw.http, "/v2/models/demo/infer",
                                                          json_body([fp32_input()]),
                                                          [("geogate-timeout-ms", "50")])[0] == 504),
                    ("http header 0.15 ms", lambda: raw_http(gw.http, "/v2/models/ids/infer",
                                                            json_body([int64_input()]),
                                                            [("geogate-timeout-ms", "0.15")])[0] == 504),
                    ("http parameter 50 ms", lambda: raw_http(gw.http, "/v2/models/ids/infer",
                                                             json_body([int64_input()],
                                                                       parameters={"timeout": 50_000}))[0] == 504),
                    ("grpc deadline 50 ms", lambda: _deadline_exceeded(client, grpc_fp32)),
                    ("grpc parameter 50 ms", lambda: grpc_infer(stub, grpc_request("ids", timeout=50_000),
                                                                  timeout_s=None)[0]
                     == grpc.StatusCode.DEADLINE_EXCEEDED)]
    for what, attack in attacks:
        t0 = time.monotonic()
        assert attack(), what
        assert time.monotonic() - t0 < 0.05 + SLACK_S, what
        status, _, body = http_call(f"http://{gw.http}/v2/health/ready")
        assert status == 200, (what, body)
    for r in gw.replicas():
        assert not r["ejected"] and r["consecutive_failures"] == 0 and r["ejection_count"] == 0, r
    assert gw.metric("geogate_upstream_attempts_total", outcome="deadline_client") >= 12
    assert gw.metric("geogate_requests_total", outcome="deadline_client") >= 24
    assert gw.metric("geogate_upstream_attempts_total", outcome="timeout") == 0
    set_faults(rep)
    t0 = time.monotonic()
    status, _, resp = raw_http(gw.http, "/v2/models/demo/infer", json_body([fp32_input()]))
    assert status == 200 and time.monotonic() - t0 < 2.0, resp
    assert_nothing_held(gw)


def _deadline_exceeded(client, inp) -> bool:
    try:
        client.infer("demo", [inp], client_timeout=0.05)
    except InferenceServerException as exc:
        return "Deadline" in str(exc) or "DEADLINE" in str(exc.status())
    return False


@pytest.mark.parametrize(("headers", "body", "named"), [
    ([("Accept-Encoding", b"gz\xe9ip")], None, "Accept-Encoding"),
    ([("Accept-Encoding", "gzip, \u2603")], None, "Accept-Encoding"),
    ([("Content-Encoding", b"\xff")], None, "Content-Encoding"),
    ([("Inference-Header-Content-Length", "\uff11\uff10")], None, "Inference-Header-Content-Length"),
    ([("Inference-Header-Content-Length", "\u0663")], None, "Inference-Header-Content-Length"),
    ([("geogate-hops", "\uff11")], None, "geogate-hops"),
    ([("geogate-hops", "1_0")], None, "geogate-hops"),
    ([("geogate-hops", "-1")], None, "geogate-hops"),
    ([], json_body([fp32_input()], parameters=[1]), "'parameters'"),
    ([], json_body([fp32_input()], parameters="timeout"), "'parameters'"),
    ([], b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":' + b"[" * 990 + b"1"
     + b"]" * 990 + b"}]}", "nested"),
    ([], json_body([{**fp32_input(), "data": X16[:15]}]), "needs 16 elements"),
    ([], json_body([{**fp32_input(), "datatype": "BYTES", "data": [419430400] * 16}]), "data-type"),
])
def test_malformed_headers_and_bodies_are_4xx(clean, headers, body, named):
    gw, _ = clean
    status, _, resp = raw_http(gw.http, "/v2/models/demo/infer", body or json_body([fp32_input()]), headers)
    assert 400 <= status < 500, resp
    assert named in error_of(resp)
    assert_quiet_log(gw)


def test_malformed_grpc_metadata_is_invalid_argument(clean):
    gw, _ = clean
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc))
    for hops in ("x", "1_0", "9999", "-1"):
        code, details = grpc_infer(stub, grpc_request(), metadata=(("geogate-hops", hops),))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "geogate-hops" in details, (hops, details)
    code, details = grpc_infer(stub, grpc_request(), metadata=(("geogate-priority", "urgent!"),))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    req = grpc_request("ids")
    req.raw_input_contents[0] = req.raw_input_contents[0][:-8]  # 3 of the 4 INT64 elements
    code, details = grpc_infer(stub, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "byte size" in details, details
    assert_quiet_log(gw)


def test_malformed_http_is_one_rate_limited_warning(clean):
    """60 requests aiohttp cannot parse: each a 400 and a closed connection; the log gets a few
    one-line warnings and a count, never a traceback at error level."""
    gw, _ = clean
    host, port = gw.http.rsplit(":", 1)
    bad = [b"POST /v2/models/demo/infer HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}",
           b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\n{}",
           b"POST /v2/models/demo/infer HTTP/1.1\r\nHo st: x\r\nContent-Length: 2\r\n\r\n{}"]
    before = gw.output().count("malformed HTTP request")
    for i in range(60):
        status, _, _ = _exchange(host, int(port), bad[i % 3], 5.0)
        assert status == 400
    wait_for(lambda: gw.output().count("malformed HTTP request") > before, "a warning line", [gw])
    lines = [ln for ln in gw.output().splitlines() if "malformed HTTP request" in ln]
    assert 1 <= len(lines) - before <= 10, lines[-12:]
    assert all('"level":"warning"' in ln for ln in lines)
    assert_quiet_log(gw)
    status, _, resp = raw_http(gw.http, "/v2/models/demo/infer", json_body([fp32_input()]))
    assert status == 200, resp


# ---------------------------------------------------------------------------- real failures still count


def test_real_replica_failures_still_eject(tmp_path, procs):
    """The attribution does not blind passive health: the gateway's own per-try timeout and a
    killed replica eject; with every replica out, readiness is 503 with the reason."""
    repo = demo_repository(tmp_path)
    slow, other = start_replicas(procs, repo, 2)
    gw = Gateway(tmp_path, [f"http://{slow.http_url}", f"http://{other.http_url}"],
                 health=SENSITIVE_HEALTH.replace("consecutive_failures = 2", "consecutive_failures = 1")
                 .replace("interval_ms = 2000", "interval_ms = 30000"),
                 gateway_extra="per_try_timeout_ms = 300")
    procs.append(gw)
    gw.wait_ready()
    wait_for(lambda: all(r["healthy"] for r in gw.replicas()), "replicas healthy", [gw])
    # A client deadline shorter than the per-try timeout runs out: nothing against anyone.
    set_faults(slow, delay_ms=1500)
    set_faults(other, delay_ms=1500)
    for _ in range(4):
        status, _, _ = raw_http(gw.http, "/v2/models/demo/infer", json_body([fp32_input()]),
                                [("geogate-timeout-ms", "100")])
        assert status == 504
    assert not any(r["ejected"] for r in gw.replicas())
    set_faults(other)
    # The gateway's own per-try timeout (300 ms, no client deadline): the slow one is ejected.
    wait_for(lambda: raw_http(gw.http, "/v2/models/demo/infer", json_body([fp32_input()]))[0] == 200
             and any(r["ejected"] for r in gw.replicas()), "the slow replica ejected", [gw], timeout_s=30)
    (ejected,) = [r for r in gw.replicas() if r["ejected"]]
    assert ejected["url"].endswith(slow.http_url) and "timeout" in ejected["eject_reason"], ejected
    # The other replica is killed: connect failures eject it too, and the region is not ready.
    other.kill()
    status, _, resp = raw_http(gw.http, "/v2/models/demo/infer", json_body([fp32_input()]))
    assert status >= 500, resp
    wait_for(lambda: all(r["ejected"] for r in gw.replicas()), "both ejected", [gw], timeout_s=10)
    killed = next(r for r in gw.replicas() if r["url"].endswith(other.http_url))
    assert "connect failure" in killed["eject_reason"], killed
    status, _, body = http_call(f"http://{gw.http}/v2/health/ready")
    assert status == 503 and "ejected" in error_of(body), body


# ---------------------------------------------------------------------------- BYTES and translation (Triton)

STRLEN_CONFIG = """name: "strlen"
backend: "python"
max_batch_size: 0
input [{ name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] }]
output [{ name: "LEN" data_type: TYPE_INT64 dims: [ -1 ] }]
instance_group [{ count: 1 kind: KIND_CPU }]
"""
STRLEN_PY = '''import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            t = pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy()
            n = np.array([len(x) for x in t.reshape(-1)], dtype=np.int64)
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("LEN", n)]))
        return out
'''


@pytest.fixture(scope="module")
def triton_world(tmp_path_factory):
    """A real Triton (python backend: `strlen` BYTES -> INT64, `demo` FP32) behind two
    gateways: one reaching it over gRPC only (HTTP clients are translated), one over HTTP only
    (gRPC clients are translated)."""
    tmp = tmp_path_factory.mktemp("hardening-triton")
    repo = tmp / "repo"
    (repo / "strlen" / "1").mkdir(parents=True)
    (repo / "strlen" / "config.pbtxt").write_text(STRLEN_CONFIG)
    (repo / "strlen" / "1" / "model.py").write_text(STRLEN_PY)
    write_python_backend_entry(repo, 1)
    started: list = []
    try:
        tri = TritonProc(str(repo), load=("strlen", "demo"))
        started.append(tri)
        tri.wait_ready()
        via_grpc = Gateway(tmp, [f"grpc://{tri.grpc_url}"], kind="triton", name="gw-grpc")
        via_http = Gateway(tmp, [f"http://{tri.http_url}"], kind="triton", name="gw-http")
        started += [via_grpc, via_http]
        for gw in (via_grpc, via_http):
            gw.wait_ready()
            wait_for(lambda gw=gw: http_call(f"http://{gw.http}/v2/models/strlen")[0] == 200, "strlen metadata",
                     [gw, tri])
        yield via_grpc, via_http, tri
    finally:
        for p in reversed(started):
            p.stop()


def bytes_blob(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


@pytest.mark.parametrize("data", [[419430400], [[419430400]], ["ok", 419430400], [True], [None], [{"a": 1}],
                                  419430400])
def test_bytes_element_that_is_not_a_string_is_400_and_allocates_nothing(triton_world, data):
    """86 bytes once made the gateway allocate 1.2 GB (bytes(419430400) while translating to
    gRPC). Now: 400 naming the problem, on both gateways, and the peak memory does not move."""
    via_grpc, via_http, _ = triton_world
    shape = [len(data)] if isinstance(data, list) else [1]
    body = json_body([{"name": "TEXT", "datatype": "BYTES", "shape": shape, "data": data}])
    for gw in (via_grpc, via_http):
        before = gw.peak_rss_kib()
        for _ in range(3):
            status, _, resp = raw_http(gw.http, "/v2/models/strlen/infer", body)
            assert status == 400, resp
            assert "BYTES elements" in error_of(resp) and "strings" in error_of(resp)
        assert gw.peak_rss_kib() - before < 32 * 1024, (before, gw.peak_rss_kib())
        assert_quiet_log(gw)


def test_bytes_strings_are_served_on_every_path(triton_world):
    via_grpc, via_http, _ = triton_world
    words = ["a", "héllo", ""]
    for gw in (via_grpc, via_http):
        status, _, resp = raw_http(gw.http, "/v2/models/strlen/infer",
                                   json_body([{"name": "TEXT", "datatype": "BYTES", "shape": [3], "data": words}]))
        assert status == 200, resp
        assert json.loads(resp)["outputs"][0]["data"] == [1, 6, 0]
        blob = bytes_blob([w.encode() for w in words])
        head = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [3],
                                       "parameters": {"binary_data_size": len(blob)}}]}).encode()
        status, _, resp = raw_http(gw.http, "/v2/models/strlen/infer", head + blob,
                                   [("Inference-Header-Content-Length", str(len(head)))])
        assert status == 200, resp
        client = tgrpc.InferenceServerClient(gw.grpc)
        inp = tgrpc.InferInput("TEXT", [3], "BYTES")
        inp.set_data_from_numpy(np.array([w.encode() for w in words], dtype=object))
        assert client.infer("strlen", [inp]).as_numpy("LEN").tolist() == [1, 6, 0]


@pytest.mark.parametrize(("blob", "shape", "problem"), [
    (struct.pack("<I", 1000) + b"short", [1], "past the end"),
    (bytes_blob([b"ab", b"cd"]), [3], "BYTES"),
    (bytes_blob([b"ab", b"cd"]) + b"xx", [2], "left over"),
    (b"\x01\x00", [1], "BYTES"),
])
def test_bytes_length_prefixes_are_checked(triton_world, blob, shape, problem):
    via_grpc, via_http, _ = triton_world
    head = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": shape,
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    for gw in (via_grpc, via_http):
        status, _, resp = raw_http(gw.http, "/v2/models/strlen/infer", head + blob,
                                   [("Inference-Header-Content-Length", str(len(head)))])
        assert status == 400 and problem in error_of(resp), resp
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc))
        req = service_pb2.ModelInferRequest(model_name="strlen")
        req.inputs.add(name="TEXT", datatype="BYTES", shape=shape)
        req.raw_input_contents.append(blob)
        code, details = grpc_infer(stub, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and problem in details, details
        assert_quiet_log(gw)


def test_typed_contents_counts_are_checked_when_translating(triton_world):
    _, via_http, _ = triton_world
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(via_http.grpc))
    req = service_pb2.ModelInferRequest(model_name="strlen")
    t = req.inputs.add(name="TEXT", datatype="BYTES", shape=[5])
    t.contents.bytes_contents.extend([b"a", b"b"])
    code, details = grpc_infer(stub, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs 5 elements" in details, details
    req = service_pb2.ModelInferRequest(model_name="demo")
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    t.contents.fp32_contents.extend([0.5] * 16)
    assert grpc_infer(stub, req)[0] == grpc.StatusCode.OK


@pytest.mark.parametrize(("body", "named"), [
    (json_body([fp32_input()], parameters=[1]), "'parameters'"),
    (b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":' + b"[" * 990 + b"1" + b"]" * 990
     + b"}]}", "nested"),
    (json_body([{**fp32_input(), "data": [X16] * 2}]), "needs 16 elements"),
    (json_body([{**fp32_input(), "data": ["x"] * 16}]), "FP32"),
    (json_body([fp32_input()], outputs=[{"name": "OUTPUT0", "parameters": [1]}]), "'parameters'"),
])
def test_translated_fp32_requests_are_4xx(triton_world, body, named):
    """The HTTP -> gRPC translation path (a RecursionError and AttributeErrors were 500s)."""
    via_grpc, _, _ = triton_world
    status, _, resp = raw_http(via_grpc.http, "/v2/models/demo/infer", body)
    assert 400 <= status < 500, resp
    assert named in error_of(resp)
    assert_quiet_log(via_grpc)
    status, _, resp = raw_http(via_grpc.http, "/v2/models/demo/infer", json_body([fp32_input(2)]))
    assert status == 200, resp


# ---------------------------------------------------------------------------- two regions behind GeoDNS

EU, US = "192.0.2.10", "192.0.2.20"


def _two_region_config(path: Path, dns_port: int, ports, replicas, mmdb: str) -> None:
    regions = [("eu-west", (53.35, -6.26), EU), ("us-east", (38.9, -77.0), US)]
    lines = ["[deployment]", 'name = "hardening-dns"', "", "[routing]", 'mode = "local-first"',
             f'geoip_database = "{mmdb}"', "failback_hold_ms = 500", "", SENSITIVE_HEALTH,
             "[dns]", f'listen = "127.0.0.1:{dns_port}"', 'zone = "geogate.test."',
             'service = "infer.geogate.test."', "check_interval_ms = 200", "check_timeout_ms = 1000",
             "fall = 1", "rise = 1", ""]
    for (name, loc, addr), (http, grpc_port, admin), replica in zip(regions, ports, replicas, strict=True):
        lines += ["[[regions]]", f'name = "{name}"', f"location = [{loc[0]}, {loc[1]}]",
                  f'http = "127.0.0.1:{http}"', f'grpc = "127.0.0.1:{grpc_port}"', f'admin = "127.0.0.1:{admin}"',
                  f'addresses = ["{addr}"]', "", "  [[regions.pools]]", f'  name = "{name}-ort"',
                  '  kind = "geogate"', f'  replicas = ["http://{replica.http_url}", "grpc://{replica.grpc_url}"]',
                  ""]
    path.write_text("\n".join(lines))


def test_client_deadlines_cannot_take_a_region_out_of_dns(tmp_path, procs):
    """Two regions behind GeoDNS (checks every 200 ms, one failed check withdraws a region).
    Clients with short deadlines against us-east's slow replica, directly and through eu-west
    (failover to the peer with what is left of the deadline): us-east stays ready, its replica
    un-ejected, eu-west keeps seeing it healthy, and DNS keeps answering us-east throughout."""
    from geo.mmdb_build import DEMO_NETWORKS, build_city_db

    mmdb = str(tmp_path / "city.mmdb")
    build_city_db(mmdb, DEMO_NETWORKS)
    repo = tmp_path / "repo"
    write_repository_entry(repo, 1)
    replicas = [ReplicaProc(str(repo), extra=["--enable-test-faults"]) for _ in range(2)]
    procs.extend(replicas)
    for r in replicas:
        r.wait_ready()
    eu_rep, us_rep = replicas
    ports = [(free_port(), free_port(), free_port()) for _ in replicas]
    dns_port = free_port()
    config = tmp_path / "world.toml"
    _two_region_config(config, dns_port, ports, replicas, mmdb)
    gateways = [Proc([*GEOGATE, "gateway", "--config", str(config), "--region", name], name=f"gw-{name}")
                for name in ("eu-west", "us-east")]
    procs.extend(gateways)
    (eu_http, _, eu_admin), (us_http, us_grpc, us_admin) = ports
    for gw, (http, _, _) in zip(gateways, ports, strict=True):
        gw.wait_until(lambda h=http: http_ok(f"http://127.0.0.1:{h}/v2/health/ready"), WAIT_S)
    dns = start_dns(str(config))
    procs.append(dns)
    wait_dns(dns, dns_port)
    everything = [*replicas, *gateways, dns]

    def new_york() -> list[str]:
        return dig(dns_port, "infer.geogate.test", "A", f"+subnet={NEW_YORK_NET}").addresses

    def us_summary() -> dict:
        return get_json(f"http://127.0.0.1:{us_admin}/geogate/v1/region")

    def eu_sees_us_healthy() -> bool:
        peers = get_json(f"http://127.0.0.1:{eu_admin}/geogate/v1/region")["peers"]
        return next(p for p in peers if p["region"] == "us-east")["healthy"]

    wait_for(lambda: new_york() == [US] and eu_sees_us_healthy(), "us-east answered and seen healthy",
             everything)
    set_faults(us_rep, delay_ms=400)
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{us_grpc}")
    inp = tgrpc.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.full((1, 16), 0.25, dtype=np.float32))
    for i in range(30):  # directly at us-east, HTTP and gRPC
        if i % 3 == 2:
            assert _deadline_exceeded(client, inp)
        else:
            value = "0.15" if i % 3 else "50"
            status, _, _ = raw_http(f"127.0.0.1:{us_http}", "/v2/models/demo/infer", json_body([fp32_input()]),
                                    [("geogate-timeout-ms", value)])
            assert status == 504
        if i % 5 == 0:
            assert new_york() == [US]
    # Through eu-west, whose own replica is gone: failover to us-east with what is left.
    eu_rep.kill()
    for _ in range(10):
        status, _, resp = raw_http(f"127.0.0.1:{eu_http}", "/v2/models/demo/infer",
                                         json_body([fp32_input()]), [("geogate-timeout-ms", "150")])
        assert status == 504, resp
        assert new_york() == [US]
    summary = us_summary()
    assert summary["ready"], summary["reason"]
    for r in summary["pools"][0]["replicas"]:
        assert not r["ejected"] and r["ejection_count"] == 0 and r["consecutive_failures"] == 0, r
    assert eu_sees_us_healthy()
    assert http_ok(f"http://127.0.0.1:{us_http}/v2/health/ready")
    assert metric_total(f"http://127.0.0.1:{eu_admin}/metrics", "geogate_cross_region_requests_total",
                        to_region="us-east", outcome="deadline_client") >= 1
    # And DNS never withdrew us-east over a few more checks.
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        assert new_york() == [US]
        time.sleep(0.1)
    set_faults(us_rep)
    status, _, resp = raw_http(f"127.0.0.1:{us_http}", "/v2/models/demo/infer", json_body([fp32_input()]))
    assert status == 200, resp
