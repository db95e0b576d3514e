"""Security end to end, with real processes: one `geogate gateway` with API keys (keys file
reloaded without restart), TLS on its HTTP and gRPC listeners (a CA made here), mutual TLS to a
replica that accepts only the gateway's client certificate, request limits (body, headers,
tensor elements, slow clients, requests in flight), named operators on the admin listener with
an audit trail, and a `geogate sync` agent that refuses versions a trusted key did not sign.

Clients: tritonclient HTTP (ssl) and gRPC (ssl), raw TLS sockets for slowloris senders."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from gateway.front.api_keys import hash_field, new_key
from replicas.demo.onnx_model import reference_outputs
from replicas.releases.manifest import generate_key_pair, load_private_key
from replicas.releases.models_cli import push_version
from replicas.releases.records import Releases
from replicas.releases.site_status import read_site
from replicas.store import open_store
from tests.e2e.test_tls import make_ca, make_leaf, rotate_server_cert, write_pair
from tests.gateway_procs import FAST_HEALTH, demo_repository
from tests.procs import GEOGATE, Proc, ReplicaProc, free_port, wait_until

HOST = "127.0.0.1"
HEAD_TIMEOUT_MS = 1000
BODY_TIMEOUT_MS = 1000
MAX_BODY_BYTES = 256 * 1024
MAX_HEADER_BYTES = 4096
MAX_IN_FLIGHT = 2
MAX_ELEMENTS = 4096
RELOAD_MS = 200
WAIT_S = 10.0


# ---------------------------------------------------------------------------- helpers


def key_entry(name: str, **limits) -> tuple[str, dict]:
    key, kid, salt, digest = new_key()
    return key, {"name": name, "id": kid, "hash": hash_field(salt, digest), **limits}


def write_keys(path: Path, entries: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}))
    os.replace(tmp, path)  # a new inode, as editors and config management write


def wait_for(check, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s} s (last: {last!r})")


class Pki:
    def __init__(self, d: Path) -> None:
        self.dir = str(d)
        self.ca_pair = make_ca("geogate e2e CA")
        self.other_ca_pair = make_ca("geogate e2e CA 2")
        self.ca, _ = write_pair(self.dir, "ca", self.ca_pair)
        self.other_ca, _ = write_pair(self.dir, "ca2", self.other_ca_pair)
        self.gw_cert, self.gw_key = write_pair(self.dir, "server", make_leaf(self.ca_pair, "gateway-one"))
        self.replica_cert, self.replica_key = write_pair(self.dir, "replica", make_leaf(self.ca_pair, "replica"))
        self.client_cert, self.client_key = write_pair(self.dir, "gw-client", make_leaf(self.ca_pair, "gateway",
                                                                                        client=True))
        self.rogue_cert, self.rogue_key = write_pair(self.dir, "rogue", make_leaf(self.other_ca_pair, "rogue",
                                                                                  client=True))

    def client_ctx(self, *, cert: bool = False, ca: str | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=ca or self.ca)
        if cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def https(url: str, ctx: ssl.SSLContext, body: bytes | None = None, headers: dict | None = None,
          method: str | None = None, timeout_s: float = 15.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def infer_body(n: int = 1, value: float = 0.25) -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [n, 16],
                                   "data": [value] * (16 * n)}]}).encode()


class SecureGateway(Proc):
    def __init__(self, tmp: Path, pki: Pki, replica: ReplicaProc, keys_file: Path, operators_file: Path,
                 store: Path):
        self.http_port, self.grpc_port, self.admin_port = free_port(), free_port(), free_port()
        self.pki = pki
        text = f"""
[deployment]
name = "secure"
[store]
url = "file://{store}"
{FAST_HEALTH}
[gateway]
max_body_bytes = {MAX_BODY_BYTES}
max_concurrent_requests = {MAX_IN_FLIGHT}
[admin]
operators_file = "{operators_file}"
[auth]
keys_file = "{keys_file}"
reload_interval_ms = {RELOAD_MS}
[tls]
cert_file = "{pki.gw_cert}"
key_file = "{pki.gw_key}"
check_interval_ms = {RELOAD_MS}
[tls.upstream]
enabled = true
ca_file = "{pki.ca}"
cert_file = "{pki.client_cert}"
key_file = "{pki.client_key}"
[limits]
max_header_bytes = {MAX_HEADER_BYTES}
max_tensor_elements = {MAX_ELEMENTS}
request_head_timeout_ms = {HEAD_TIMEOUT_MS}
request_body_timeout_ms = {BODY_TIMEOUT_MS}

[[regions]]
name = "r1"
http = "{HOST}:{self.http_port}"
grpc = "{HOST}:{self.grpc_port}"
admin = "{HOST}:{self.admin_port}"
  [[regions.pools]]
  name = "tls-pool"
  replicas = ["http://{replica.http_url}", "grpc://{replica.grpc_url}"]
"""
        self.config_path = tmp / "secure.toml"
        self.config_path.write_text(text)
        super().__init__([*GEOGATE, "gateway", "--config", str(self.config_path), "--region", "r1"],
                         name=f"secure-gw-{self.http_port}")

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.http_port}"

    def ready(self) -> bool:
        try:
            return https(self.url + "/v2/health/ready", self.pki.client_ctx(), timeout_s=1)[0] == 200
        except (OSError, urllib.error.URLError):
            return False


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    pki = Pki(tmp)
    started: list[Proc] = []
    try:
        replica = ReplicaProc(demo_repository(tmp), extra=[
            "--enable-test-faults", "--tls-cert", pki.replica_cert, "--tls-key", pki.replica_key,
            "--tls-client-ca", pki.ca])
        started.append(replica)
        keys_file = tmp / "keys.json"
        team_key, team = key_entry("team-a", models=["demo*"], priority="critical")
        slow_key, slow = key_entry("trickle", models=["demo"], rate_per_s=0.001, burst=2)
        write_keys(keys_file, [team, slow])
        operators_file = tmp / "operators.json"
        op_key, op = key_entry("ops-ann")
        write_keys(operators_file, [op])
        store = tmp / "store"
        store.mkdir()
        ctx = pki.client_ctx(cert=True)
        replica.wait_until(lambda: _replica_ready(replica, ctx), 60)
        gw = SecureGateway(tmp, pki, replica, keys_file, operators_file, store)
        started.append(gw)
        gw.wait_until(gw.ready, 60)
        yield {"gw": gw, "replica": replica, "pki": pki, "keys_file": keys_file, "team": team,
               "team_key": team_key, "slow_key": slow_key, "op_key": op_key, "store": store, "tmp": tmp}
    finally:
        for p in reversed(started):
            p.stop()


def _replica_ready(replica: ReplicaProc, ctx: ssl.SSLContext) -> bool:
    try:
        return https(f"https://{replica.http_url}/v2/health/ready", ctx, timeout_s=1)[0] == 200
    except (OSError, urllib.error.URLError):
        return False


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------------------- TLS, mTLS, tritonclient


def test_tritonclient_over_tls_through_mtls_replica(world):
    gw, pki, key = world["gw"], world["pki"], world["team_key"]
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    want = reference_outputs("tiny", 1, x)

    client = thttp.InferenceServerClient(f"{HOST}:{gw.http_port}", ssl=True,
                                         ssl_context_factory=lambda: pki.client_ctx())
    try:
        inp = thttp.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        res = client.infer("demo", [inp], headers=_auth(key))
        np.testing.assert_allclose(res.as_numpy("OUTPUT0"), want, rtol=1e-5, atol=1e-5)
        assert client.is_server_ready()  # health: no key needed
        assert client.get_model_metadata("demo", headers=_auth(key))["name"] == "demo"
    finally:
        client.close()

    gclient = tgrpc.InferenceServerClient(f"{HOST}:{gw.grpc_port}", ssl=True, root_certificates=pki.ca)
    try:
        inp = tgrpc.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = gclient.infer("demo", [inp], headers={"authorization": f"Bearer {key}"})
        np.testing.assert_allclose(res.as_numpy("OUTPUT0"), want, rtol=1e-5, atol=1e-5)
        assert gclient.is_server_live()
    finally:
        gclient.close()

    # The gateway really went to the TLS replica (both of its URLs are the replica's).
    status, headers, _ = https(gw.url + "/v2/models/demo/infer", pki.client_ctx(), infer_body(), _auth(key))
    assert status == 200 and headers["geogate-replica"].endswith(world["replica"].http_url)
    # A client that does not trust the gateway's CA, or speaks plaintext, gets nowhere.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        https(gw.url + "/v2/health/ready", pki.client_ctx(ca=pki.other_ca))
    with socket.create_connection((HOST, gw.http_port), timeout=5) as s:
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not s.recv(100).startswith(b"HTTP/1.1 200")


def test_replica_accepts_only_the_gateways_client_certificate(world):
    replica, pki = world["replica"], world["pki"]
    url = f"https://{replica.http_url}/v2/health/ready"
    assert https(url, pki.client_ctx(cert=True))[0] == 200
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        https(url, pki.client_ctx())  # no client certificate
    rogue = pki.client_ctx()
    rogue.load_cert_chain(pki.rogue_cert, pki.rogue_key)  # another CA's client certificate
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        https(url, rogue)
    # gRPC too: without a client certificate the handshake fails (UNAVAILABLE), with it the call works.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ca = Path(pki.ca).read_bytes()
    for creds, ok in ((grpc.ssl_channel_credentials(root_certificates=ca), False),
                      (grpc.ssl_channel_credentials(root_certificates=ca,
                                                    private_key=Path(pki.client_key).read_bytes(),
                                                    certificate_chain=Path(pki.client_cert).read_bytes()), True)):
        with grpc.secure_channel(replica.grpc_url, creds) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            if ok:
                assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                    health_pb2.HealthCheckResponse.SERVING
            else:
                with pytest.raises(grpc.RpcError) as exc:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


def test_gateway_certificate_reloads_without_restart(world):
    gw, pki = world["gw"], world["pki"]
    pid = gw.pid

    def cn() -> str:
        ctx = pki.client_ctx()
        with socket.create_connection((HOST, gw.http_port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=HOST) as s:
            from cryptography import x509
            from cryptography.x509.oid import NameOID

            cert = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
        return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    assert cn() == "gateway-one"
    rotate_server_cert({"server_key": pki.gw_key, "server_cert": pki.gw_cert}, pki.ca_pair, "gateway-two")
    wait_for(lambda: cn() == "gateway-two", "new certificate served")
    assert gw.alive() and gw.pid == pid


# ---------------------------------------------------------------------------- API keys


def test_api_keys_http_and_grpc(world):
    gw, pki, key, slow_key = world["gw"], world["pki"], world["team_key"], world["slow_key"]
    ctx = pki.client_ctx()
    url = gw.url + "/v2/models/demo/infer"
    status, headers, body = https(url, ctx, infer_body())
    assert status == 401 and "missing API key" in json.loads(body)["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, body = https(url, ctx, infer_body(), {"Authorization": "Bearer gk_0123456789ab_nope"})
    assert status == 401 and "unknown API key id" in json.loads(body)["error"]
    status, _, body = https(gw.url + "/v2/models/other/infer", ctx, infer_body(), {"x-api-key": key})
    assert status == 403 and "may not call model 'other'" in json.loads(body)["error"]
    # metadata needs a key too; health and the region summary do not
    assert https(gw.url + "/v2", ctx)[0] == 401
    assert https(gw.url + "/v2", ctx, headers=_auth(key))[0] == 200
    assert https(gw.url + "/v2/models/demo/ready", ctx)[0] == 401
    assert https(gw.url + "/v2/health/live", ctx)[0] == 200
    assert https(gw.url + "/geogate/v1/region", ctx)[0] == 200
    # rate limit: burst of 2, then 429 with Retry-After
    got = [https(url, ctx, infer_body(), _auth(slow_key)) for _ in range(3)]
    assert [g[0] for g in got] == [200, 200, 429], [g[2][:200] for g in got]
    assert int(got[2][1]["Retry-After"]) >= 1 and "rate limit" in json.loads(got[2][2])["error"]

    gclient = tgrpc.InferenceServerClient(f"{HOST}:{gw.grpc_port}", ssl=True, root_certificates=pki.ca)
    inp = tgrpc.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    try:
        for headers, code, words in ((None, "UNAUTHENTICATED", "missing API key"),
                                     ({"authorization": f"Bearer {slow_key}"}, "RESOURCE_EXHAUSTED", "rate limit")):
            with pytest.raises(InferenceServerException) as exc:
                gclient.infer("demo", [inp], headers=headers)
            assert code in str(exc.value.status()) and words in exc.value.message()
        with pytest.raises(InferenceServerException) as exc:
            gclient.get_model_metadata("demo")
        assert "UNAUTHENTICATED" in str(exc.value.status())
    finally:
        gclient.close()
    # the retry-after trailer, read with a raw channel
    creds = grpc.ssl_channel_credentials(root_certificates=Path(pki.ca).read_bytes())
    with grpc.secure_channel(f"{HOST}:{gw.grpc_port}", creds) as ch:
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        req = service_pb2.ModelInferRequest(model_name="demo")
        with pytest.raises(grpc.RpcError) as exc:
            service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                req, metadata=(("x-api-key", slow_key),), timeout=10)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(exc.value.trailing_metadata())["retry-after"].isdigit()


def test_keys_file_reloads_without_restart(world):
    gw, pki, keys_file, team = world["gw"], world["pki"], world["keys_file"], world["team"]
    pid = gw.pid
    ctx = pki.client_ctx()
    url = gw.url + "/v2/models/demo/infer"
    new, entry = key_entry("newcomer", models=["demo"])
    assert https(url, ctx, infer_body(), _auth(new))[0] == 401
    write_keys(keys_file, [team, entry])  # added; "trickle" revoked
    wait_for(lambda: https(url, ctx, infer_body(), _auth(new))[0] == 200, "new key accepted")
    status, _, body = https(url, ctx, infer_body(), _auth(world["slow_key"]))
    assert status == 401 and "revoked" in json.loads(body)["error"]
    keys_file.write_text("{ not json")  # a broken edit: logged, the previous keys stay in force
    wait_for(lambda: "keys file not reloaded" in gw.output(), "broken keys file reported")
    assert https(url, ctx, infer_body(), _auth(new))[0] == 200
    write_keys(keys_file, [team])
    wait_for(lambda: https(url, ctx, infer_body(), _auth(new))[0] == 401, "removed key refused")
    assert gw.alive() and gw.pid == pid


# ---------------------------------------------------------------------------- limits


def _tls_socket(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection((HOST, port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=HOST)


def _read_all(s: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything until the server closes (and how long that took)."""
    t0 = time.monotonic()
    s.settimeout(timeout_s)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ssl.SSLError, ConnectionResetError):
        pass
    return out, time.monotonic() - t0


def test_request_limits(world):
    gw, pki, key = world["gw"], world["pki"], world["team_key"]
    ctx = pki.client_ctx()
    url = gw.url + "/v2/models/demo/infer"
    h = _auth(key)
    # body size (declared), and a gzip bomb that expands past it
    status, _, body = https(url, ctx, b"{" + b" " * MAX_BODY_BYTES + b"}", h)
    assert status == 413 and str(MAX_BODY_BYTES) in json.loads(body)["error"]
    bomb = gzip.compress(b" " * (MAX_BODY_BYTES * 4))
    status, _, body = https(url, ctx, bomb, {**h, "Content-Encoding": "gzip"})
    assert status == 413 and "expands to more than" in json.loads(body)["error"]
    # header size
    status, _, body = https(gw.url + "/v2/health/live", ctx, headers={"x-junk": "a" * (MAX_HEADER_BYTES + 10)})
    assert status in (400, 431), body
    with _tls_socket(gw.http_port, ctx) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"x-a: b\r\n" * (MAX_HEADER_BYTES // 6))
        reply, _ = _read_all(s, 10)
    assert reply.startswith(b"HTTP/1.1 431") and b"max_header_bytes" in reply
    # tensor element count (a BYTES tensor has no byte size to check a huge shape against)
    huge = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, MAX_ELEMENTS + 1],
                                   "data": ["x"]}]}).encode()
    status, _, body = https(url, ctx, huge, h)
    assert status == 400 and "max_tensor_elements" in json.loads(body)["error"]
    # names that could walk out of a model repository (or hide in it): 400 before any lookup
    for name, words in (("..%2F..%2Fetc", "'..'"), ("demo%2F..%2Fdemo", "'/'"), ("a..b", "'..'"),
                        ("-rf", "starts with '-'"), ("%2Ehidden", "starts with '.'"), ("a%00b", "NUL"),
                        ("x%5Cy", "'\\\\'")):
        for path, body in ((f"/v2/models/{name}/infer", infer_body()), (f"/v2/models/{name}/config", None)):
            status, _, text = https(gw.url + path, ctx, body, {"x-api-key": key})
            assert status == 400 and words in json.loads(text)["error"], (path, status, text)
    status, _, body = https(gw.url + "/v2/models/demo/versions/01/infer", ctx, infer_body(), h)
    assert status == 400 and "positive integer" in json.loads(body)["error"]


def test_slow_clients_are_cut_off(world):
    gw, pki, key = world["gw"], world["pki"], world["team_key"]
    ctx = pki.client_ctx()
    # slowloris: header bytes trickle in and never finish
    with _tls_socket(gw.http_port, ctx) as s:
        s.sendall(b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        reply = b""
        s.settimeout(0.25)
        while time.monotonic() - t0 < HEAD_TIMEOUT_MS / 1000 * 6:
            try:
                reply = s.recv(4096)
                break  # the answer, or the end of the connection
            except TimeoutError:
                try:
                    s.sendall(b"x-slow: 1\r\n")  # one more header line, a quarter second apart
                except OSError:
                    pass  # closed: the next recv says how
        elapsed = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408") and b"request_head_timeout_ms" in reply, reply
    assert HEAD_TIMEOUT_MS / 1000 * 0.9 <= elapsed < HEAD_TIMEOUT_MS / 1000 * 6
    # a body that never completes
    with _tls_socket(gw.http_port, ctx) as s:
        s.sendall(b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
                  + b"\r\nContent-Length: 1000\r\n\r\n{\"inputs\":")
        reply, elapsed = _read_all(s, 10)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_body_timeout_ms" in reply, reply[:300]
    assert elapsed < 8
    # a connection that says nothing at all is closed too
    with _tls_socket(gw.http_port, ctx) as s:
        reply, elapsed = _read_all(s, 10)
    assert elapsed < 8
    # and the gateway still serves
    assert https(gw.url + "/v2/models/demo/infer", ctx, infer_body(), _auth(key))[0] == 200


def _set_replica_delay(world, delay_ms: int) -> None:
    replica, pki = world["replica"], world["pki"]
    status, _, body = https(f"https://{replica.http_url}/geogate/test/faults", pki.client_ctx(cert=True),
                            json.dumps({"delay_ms": delay_ms}).encode(), {"Content-Type": "application/json"})
    assert status == 200, body


def test_too_many_in_flight_is_shed_with_a_reason(world):
    gw, pki, key = world["gw"], world["pki"], world["team_key"]
    _set_replica_delay(world, 1500)
    results: list[tuple[int, dict, bytes]] = []
    lock = threading.Lock()

    def one() -> None:
        r = https(gw.url + "/v2/models/demo/infer", pki.client_ctx(), infer_body(), _auth(key))
        with lock:
            results.append(r)

    try:
        threads = [threading.Thread(target=one) for _ in range(MAX_IN_FLIGHT + 3)]
        for t in threads:
            t.start()
        # gRPC, while the HTTP ones hold the slots (full once the first one over the limit is refused)
        wait_until(lambda: len(results) >= 1, 30, "an HTTP request over the limit refused")
        creds = grpc.ssl_channel_credentials(root_certificates=Path(pki.ca).read_bytes())
        with grpc.secure_channel(f"{HOST}:{gw.grpc_port}", creds) as ch:
            from tritonclient.grpc import service_pb2, service_pb2_grpc

            req = service_pb2.ModelInferRequest(model_name="demo")
            with pytest.raises(grpc.RpcError) as exc:
                service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                    req, metadata=(("x-api-key", key),), timeout=10)
        for t in threads:
            t.join(30)
    finally:
        _set_replica_delay(world, 0)
    codes = sorted(r[0] for r in results)
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    shed = next(r for r in results if r[0] == 503)
    assert "overloaded" in json.loads(shed[2])["error"] and shed[1]["Retry-After"] == "1"
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in exc.value.details()


# ---------------------------------------------------------------------------- peers: mutual TLS + peer key


def test_failover_to_a_peer_gateway_over_mutual_tls(world, tmp_path):
    """Two regions whose client listeners require client certificates ([tls] client_ca_file):
    "eu" has no working replica, so it forwards to "us" over mutual TLS ([tls.peers]), presenting
    the peer key ([auth] peer_key_env) that us's keys file lists. Region health (eu probing us)
    goes over the same TLS: us is seen healthy, not merely tried in panic."""
    pki, replica, team, team_key = world["pki"], world["replica"], world["team"], world["team_key"]
    peer_key, peer = key_entry("peer-gateways")
    keys_file = tmp_path / "keys.json"
    write_keys(keys_file, [team, peer])
    ports = {r: (free_port(), free_port(), free_port()) for r in ("eu", "us")}
    regions = []
    for name, (h, g, a) in ports.items():
        replicas = [f"http://{HOST}:{free_port()}"] if name == "eu" else [f"http://{replica.http_url}"]
        regions.append(f"""
[[regions]]
name = "{name}"
http = "{HOST}:{h}"
grpc = "{HOST}:{g}"
admin = "{HOST}:{a}"
  [[regions.pools]]
  name = "{name}-pool"
  replicas = {json.dumps(replicas)}
""")
    cfg = tmp_path / "two.toml"
    cfg.write_text(f"""{FAST_HEALTH}
[dns]
check_interval_ms = 200
check_timeout_ms = 500
fall = 1
rise = 1
[auth]
keys_file = "{keys_file}"
[tls]
cert_file = "{pki.gw_cert}"
key_file = "{pki.gw_key}"
client_ca_file = "{pki.ca}"
[tls.upstream]
enabled = true
ca_file = "{pki.ca}"
cert_file = "{pki.client_cert}"
key_file = "{pki.client_key}"
[tls.peers]
enabled = true
ca_file = "{pki.ca}"
cert_file = "{pki.client_cert}"
key_file = "{pki.client_key}"
""" + "".join(regions))
    env = {"GEOGATE_PEER_KEY": peer_key}
    gws = [Proc([*GEOGATE, "gateway", "--config", str(cfg), "--region", r], name=f"peer-gw-{r}", env=env)
           for r in ports]
    try:
        ctx = pki.client_ctx(cert=True)

        def admin_json(region: str) -> dict:
            with urllib.request.urlopen(f"http://{HOST}:{ports[region][2]}/geogate/v1/region", timeout=2) as r:
                return json.loads(r.read())

        def us_seen_healthy() -> bool:
            try:
                return any(p.get("region") == "us" and p.get("healthy") for p in admin_json("eu")["peers"])
            except (OSError, ValueError, KeyError):
                return False

        wait_for(us_seen_healthy, "eu sees us healthy over TLS", 60)
        status, headers, body = https(f"https://{HOST}:{ports['eu'][0]}/v2/models/demo/infer", ctx,
                                      infer_body(), _auth(team_key))
        assert status == 200 and headers["geogate-region"] == "us", (status, body[:300])
        # the client listener itself requires a client certificate now
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            https(f"https://{HOST}:{ports['eu'][0]}/v2/health/live", pki.client_ctx())
    finally:
        for p in gws:
            p.stop()


# ---------------------------------------------------------------------------- admin: operators + audit


def test_admin_operators_and_audit(world):
    gw, store, op_key = world["gw"], world["store"], world["op_key"]
    src = demo_repository(world["tmp"] / "adm") + "/demo"
    asyncio.run(_push(f"file://{store}", src, "1", who="builder"))
    admin = f"http://{HOST}:{gw.admin_port}/admin/v1/models/demo/promote"
    body = json.dumps({"version": "1", "who": "someone-else"}).encode()
    code, _, text = _admin(admin, body, "gk_0123456789ab_forged")
    assert code == 403 and "invalid operator token" in text
    code, _, text = _admin(admin, body, op_key)
    assert code == 200, text
    history = json.loads(text)["release"]["history"]
    assert history[-1]["who"] == "ops-ann" and history[-1]["action"] == "promote" and history[-1]["when"]

    def audit_lines() -> list[dict]:
        lines = []
        for line in gw.output().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and "audit" in doc:
                lines.append(doc["audit"])
        return lines

    lines = wait_for(lambda: len(audit_lines()) >= 2 and audit_lines(), "two audit lines")
    refused, applied = lines[-2], lines[-1]
    assert refused["status"] == 403 and refused["action"] == "promote" and refused["remote"] == HOST
    assert applied == {**applied, "who": "ops-ann", "action": "promote", "model": "demo", "status": 200,
                       "version": "1"} and applied["when"]


def _admin(url: str, body: bytes, token: str) -> tuple[int, dict, str]:
    req = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {token}"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


async def _push(url: str, src: str, version: str, *, who: str = "test", signing_key=None) -> None:
    store = open_store(url)
    try:
        await push_version(store, "demo", src, version=version, who=who, signing_key=signing_key)
    finally:
        await store.close()


# ---------------------------------------------------------------------------- store integrity


def test_sync_agent_refuses_unsigned_and_wrongly_signed_versions(tmp_path):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    url = f"file://{store_dir}"
    good_priv, good_pub = generate_key_pair(str(tmp_path / "release"))
    bad_priv, _ = generate_key_pair(str(tmp_path / "intruder"))
    src = demo_repository(tmp_path) + "/demo/1"  # a version directory: pushed as any --version
    # v1: signed by the trusted key, through the CLI
    push = subprocess.run([*GEOGATE, "models", "--store", url, "push", "demo", src, "--version", "1",
                           "--sign-key", good_priv, "--quiet"], capture_output=True, text=True, timeout=60)
    assert push.returncode == 0 and "signed by key" in push.stdout, push.stderr

    async def setup() -> None:
        await _push(url, src, "2")  # unsigned
        await _push(url, src, "3", signing_key=load_private_key(bad_priv))  # another key
        await _push(url, src, "4", signing_key=load_private_key(good_priv))  # altered after signing
        await _push(url, src, "5", signing_key=load_private_key(good_priv))  # a file changed after push
        store = open_store(url)
        try:
            rel = Releases(store)
            for v in ("1", "2", "3", "4"):
                await rel.promote("demo", v, who="test")
            await rel.set_canary("demo", "5", 0.1, who="test")
        finally:
            await store.close()

    asyncio.run(setup())
    m4 = store_dir / "models/demo/4/MANIFEST.json"
    m4.write_text(m4.read_text().replace('"who": "test"', '"who": "mallory"'))
    onnx5 = store_dir / "models/demo/5/model.onnx"
    onnx5.write_bytes(onnx5.read_bytes()[:-1] + b"\x00")
    cfg = tmp_path / "sync.toml"
    cfg.write_text(f"""
[store]
url = "{url}"
[signing]
public_key_file = "{good_pub}"
[sync]
keep_previous = 3
[[regions]]
name = "eu"
  [[regions.pools]]
  name = "eu-ort"
  replicas = ["http://{HOST}:{free_port()}"]
  repository = "eu/models"
""")
    agent = subprocess.run([*GEOGATE, "sync", "--config", str(cfg), "--site", "eu", "--once"],
                           capture_output=True, text=True, timeout=60)
    assert agent.returncode == 1, agent.stderr[-2000:]  # some versions failed

    async def status():
        store = open_store(url)
        try:
            return await read_site(store, "eu")
        finally:
            await store.close()

    site = asyncio.run(status())
    failed = site.models["demo"].failed
    assert "unsigned manifest" in failed["2"], failed
    assert "signed by key" in failed["3"] and "not by the trusted key" in failed["3"], failed
    assert "altered after signing" in failed["4"], failed
    assert "sha256" in failed["5"] and "corrupt" in failed["5"], failed
    assert "1" not in failed
    installed = sorted(p.name for p in (tmp_path / "eu/models/demo").iterdir() if p.name.isdigit())
    assert installed == ["1"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
