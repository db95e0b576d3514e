"""Issue 17, the admin side, against real processes: the admin listener with admin credentials
(every path with and without them, open_metrics, the region summary's public view, the status
page's login and session cookie, `geogate status` and peer gateways with the token), the admin
API's name rules and bad input (400/401/413, never 500), rolling restarts under gRPC load
(zero failed calls, true cut-off counts, no prometheus-client warning, dead workers' metric
files merged), and logs rotated by size (the access log, `geogate up`'s children)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from gateway.front.admin_auth import ADMIN_SESSION_COOKIE
from gateway.front.api_keys import hash_field, new_key
from loadtests.grpc_rolling_restart import GrpcLoad, cut_off_counts
from replicas.releases.models_cli import push_version
from replicas.store import open_store
from tests.gateway_load import Stream
from tests.gateway_procs import FAST_HEALTH, GatewayProc, demo_repository, replica_urls, set_faults, start_replicas
from tests.procs import GEOGATE, Proc, free_port

TOKEN = "shared-admin-token-0123456789abcdef"
WAIT_S = 60.0
SESSION_TTL_S = 5
PROMETHEUS_WARNING = "Removal of labels has not been implemented"
BODY = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}).encode()


def wait_for(check, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s} s (last: {last!r})")


def request(address: str, path: str, *, method: str = "GET", headers: dict | None = None,
            body: bytes | None = None, timeout_s: float = 10.0) -> tuple[int, dict, bytes]:
    """One HTTP request, redirects not followed; header values may be bytes (sent as they are)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def operator_entry(name: str) -> tuple[str, dict]:
    key, kid, salt, digest = new_key()
    return key, {"name": name, "id": kid, "hash": hash_field(salt, digest)}


def write_operators(path: Path, entries: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}))
    os.replace(tmp, path)


def admin_gateway(tmp: Path, replicas: list[str], *, admin: str, extra: str = "", workers: int = 1,
                  name: str = "gw") -> GatewayProc:
    """A gateway whose config has `admin` as its [admin] section (and `extra` in [gateway])."""
    store = tmp / "store"
    store.mkdir(exist_ok=True)
    gateway_extra = f"{extra}\n\n[store]\nurl = \"file://{store}\"\n\n[admin]\n{admin}\n"
    return GatewayProc(tmp, replicas=replicas, workers=workers, gateway_extra=gateway_extra, name=name)


# ---------------------------------------------------------------------------- the admin listener


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    """One replica, a demo model in the store, and a gateway with a shared admin token, an
    operators file and a separate metrics listener."""
    tmp = tmp_path_factory.mktemp("admin")
    procs: list = []
    try:
        reps = start_replicas(procs, demo_repository(tmp), 1)
        op_key, op = operator_entry("ops-ann")
        operators = tmp / "operators.json"
        write_operators(operators, [op])
        metrics = f"127.0.0.1:{free_port()}"
        gw = admin_gateway(tmp, replica_urls(reps), extra=f'metrics = "{metrics}"',
                           admin=f'token = "{TOKEN}"\noperators_file = "{operators}"\nsession_ttl_s = {SESSION_TTL_S}')
        procs.append(gw)
        gw.wait_ready()
        store = open_store(f"file://{tmp / 'store'}")
        asyncio.run(push_version(store, "demo", Path(demo_repository(tmp / "src")) / "demo", version="1", who="ci"))
        asyncio.run(store.close())
        yield {"gw": gw, "op_key": op_key, "op": op, "operators": operators, "metrics": metrics,
               "replica": reps[0], "tmp": tmp}
    finally:
        for p in reversed(procs):
            p.stop()


# (path, status without credentials); every one of them answers 2xx (or 404 for /nope) with them
PROTECTED = [("/metrics", 401), ("/ui/static/app.js", 401), ("/ui/static/style.css", 401),
             ("/geogate/v1/world", 401), ("/geogate/v1/events", 401), ("/geogate/v1/region-events", 401),
             ("/geogate/v1/capacity", 401), ("/admin/v1/models", 401), ("/admin/v1/models/demo", 401),
             ("/admin/v1/status", 401), ("/nope", 401)]
OPEN = ["/v2/health/live", "/v2/health/ready", "/geogate/v1/region", "/ui/login"]


def test_every_admin_path_with_and_without_credentials(protected):
    gw, op_key = protected["gw"], protected["op_key"]
    for path, status in PROTECTED:
        code, headers, body = request(gw.admin, path)
        assert code == status, (path, code, body[:200])
        assert "admin credentials" in json.loads(body)["error"] or "Authorization" in json.loads(body)["error"]
        assert headers.get("www-authenticate", "").startswith("Bearer"), path
        code, _, body = request(gw.admin, path, headers=bearer("not-the-token"))
        assert code == 403 and "invalid admin token" in json.loads(body)["error"], (path, code, body[:200])
        for token in (TOKEN, op_key):
            headers = bearer(token)
            if path == "/geogate/v1/events":
                continue  # a stream: read below
            code, _, body = request(gw.admin, path, headers=headers)
            assert code == (404 if path == "/nope" else 200), (path, code, body[:200])
    for path in OPEN:
        code, _, body = request(gw.admin, path)
        assert code == 200, (path, code, body[:200])
    # /ui without a session: to the login form (with one, the page)
    code, headers, _ = request(gw.admin, "/ui")
    assert code == 303 and headers["location"] == "/ui/login"
    code, _, body = request(gw.admin, "/ui", headers=bearer(TOKEN))
    assert code == 200 and b"app.js" in body
    # the event stream with credentials: its first world arrives
    host, port = gw.admin.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/geogate/v1/events", headers=bearer(TOKEN))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    seen = b""
    while b"event: world" not in seen:
        seen += resp.fp.readline()
    conn.close()
    # the separate metrics listener follows the same rule
    assert request(protected["metrics"], "/metrics")[0] == 401
    code, _, body = request(protected["metrics"], "/metrics", headers=bearer(op_key))
    assert code == 200 and b"geogate_requests" in body


def test_region_summary_without_credentials_reveals_no_topology(protected):
    gw, replica = protected["gw"], protected["replica"]
    for address in (gw.admin, gw.http):  # the client listener serves it too (peers, GeoDNS)
        code, _, body = request(address, "/geogate/v1/region")
        doc = json.loads(body)
        assert code == 200 and doc["ready"] is True and doc["replicas"]["total"] == 2
        assert doc["models"]["demo"]["ready_versions"] == ["1"]
        assert not {"pools", "routing", "peers"} & set(doc) and "admin credentials" in doc["redacted"]
        assert replica.grpc_url not in body.decode() and replica.http_url not in body.decode()
    # with the admin token: complete on the admin listener; the client listener never takes it
    code, _, body = request(gw.admin, "/geogate/v1/region", headers=bearer(TOKEN))
    doc = json.loads(body)
    assert code == 200 and "redacted" not in doc
    assert {p["replicas"][0]["url"] for p in doc["pools"]} <= {f"http://{replica.http_url}",
                                                               f"grpc://{replica.grpc_url}"}
    code, _, body = request(gw.http, "/geogate/v1/region", headers=bearer(TOKEN))
    assert code == 200 and "pools" not in json.loads(body)


def _login_link(gw) -> tuple[dict, str]:
    """GET /ui?token=...: (the session cookie as a request header, the Set-Cookie line)."""
    code, headers, _ = request(gw.admin, f"/ui?token={urllib.parse.quote(TOKEN)}")
    assert code == 303 and headers["location"] == "/ui", (code, headers)
    return {"Cookie": headers["set-cookie"].split(";", 1)[0]}, headers["set-cookie"]


def test_status_page_login_with_the_token_link_and_the_form(protected):
    gw, op_key = protected["gw"], protected["op_key"]
    # the link `geogate up` prints: a session cookie, and the token leaves the address bar
    session, cookie = _login_link(gw)
    assert cookie.startswith(f"{ADMIN_SESSION_COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert f"Max-Age={SESSION_TTL_S}" in cookie and "Path=/" in cookie
    for path in ("/ui", "/ui/static/app.js", "/geogate/v1/world", "/geogate/v1/capacity", "/metrics"):
        assert request(gw.admin, path, headers=session)[0] == 200, path
    doc = json.loads(request(gw.admin, "/geogate/v1/region", headers=session)[2])
    assert "pools" in doc  # the full summary with a session too
    # the cookie is for reading: the admin API still wants the bearer token
    session, _ = _login_link(gw)
    code, _, body = request(gw.admin, "/admin/v1/models/demo/promote", method="POST", headers=session,
                            body=b'{"version": "1"}')
    assert code == 401, body
    # a wrong token on the link, or in the form: the form again, with the reason
    code, _, body = request(gw.admin, "/ui?token=wrong")
    assert code == 403 and b"invalid admin token" in body and b"<form" in body
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    code, headers, _ = request(gw.admin, "/ui/login", method="POST", headers=form,
                               body=urllib.parse.urlencode({"token": op_key}).encode())
    assert code == 303 and headers["set-cookie"].startswith(ADMIN_SESSION_COOKIE)
    op_session = {"Cookie": headers["set-cookie"].split(";", 1)[0]}
    assert request(gw.admin, "/geogate/v1/world", headers=op_session)[0] == 200
    code, _, body = request(gw.admin, "/ui/login", method="POST", headers=form, body=b"token=%FF%FE")
    assert code == 401 and b"printable ASCII" in body
    code, _, body = request(gw.admin, "/ui/login", method="POST", headers=form, body=b"x" * 10000)
    assert code == 413
    # a forged or altered cookie is refused; so is one that expired ([admin] session_ttl_s)
    session, _ = _login_link(gw)
    name, value = session["Cookie"].split("=", 1)
    forged = value[:-1] + ("0" if value[-1] != "0" else "1")
    code, _, body = request(gw.admin, "/geogate/v1/world", headers={"Cookie": f"{name}={forged}"})
    assert code == 401 and "not valid" in json.loads(body)["error"]
    code, _, body = request(gw.admin, "/geogate/v1/world",
                            headers={"Cookie": f"{name}=v1.-.99999999999.x\u00e9".encode()})
    assert code == 401
    expires_s = int(value.split(".")[2])
    time.sleep(max(0.0, expires_s + 1.2 - time.time()))  # the session's expiry is wall-clock time passing
    code, _, body = request(gw.admin, "/geogate/v1/world", headers=session)
    assert code == 401 and "expired" in json.loads(body)["error"]
    code, headers, _ = request(gw.admin, "/ui", headers=session)
    assert code == 303 and headers["location"] == "/ui/login"
    code, headers, _ = request(gw.admin, "/ui/logout", method="POST")
    assert code == 303 and f"{ADMIN_SESSION_COOKIE}=" in headers["set-cookie"] and "Max-Age=0" in headers["set-cookie"]


def test_operator_session_ends_when_the_key_is_revoked(protected):
    gw, op_key = protected["gw"], protected["op_key"]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    code, headers, _ = request(gw.admin, "/ui/login", method="POST", headers=form,
                               body=urllib.parse.urlencode({"token": op_key}).encode())
    session = {"Cookie": headers["set-cookie"].split(";", 1)[0]}
    assert code == 303 and request(gw.admin, "/geogate/v1/world", headers=session)[0] == 200
    _, other = operator_entry("ops-bob")
    write_operators(protected["operators"], [other])  # ops-ann's key revoked
    try:
        wait_for(lambda: request(gw.admin, "/geogate/v1/world", headers=session)[0] == 401,
                 "the revoked operator's session refused", 20)
        assert request(gw.admin, "/geogate/v1/world", headers=bearer(op_key))[0] == 403
    finally:
        write_operators(protected["operators"], [protected["op"]])
        wait_for(lambda: request(gw.admin, "/geogate/v1/world", headers=bearer(op_key))[0] == 200,
                 "the operator key back", 20)


def test_admin_api_name_rules_tokens_and_bad_input(protected):
    gw = protected["gw"]
    auth = bearer(TOKEN)
    json_auth = {**auth, "Content-Type": "application/json"}
    # malformed names and versions: 400 with the rule, before any store lookup (no 404, no 500)
    # ("..": the URL itself resolves to another path; an encoded '/' may be no {name} at all.)
    normalized_away = {"..", "a%2F..%2Fb"}
    for name in ("a" * 300, "..", "-x", ".hidden", "d%C3%A9j%C3%A0", "a%00b", "a%20b", "a%2F..%2Fb"):
        for method, suffix, body in (("GET", "", None), ("POST", "/promote", b'{"version": "1"}'),
                                     ("POST", "/canary", b'{"version": "1", "weight": 0.1}'),
                                     ("POST", "/rollback", b"{}")):
            code, _, raw = request(gw.admin, f"/admin/v1/models/{name}{suffix}", method=method, headers=json_auth,
                                   body=body)
            error = json.loads(raw)["error"]  # always JSON, 404s and 405s too
            if name in normalized_away and code in (404, 405):
                continue
            assert code == 400 and "model name" in error, (name, suffix, code, raw[:200])
    code, _, raw = request(gw.admin, "/admin/v1/models/" + "a" * 300, headers=auth)
    assert code == 400 and "300 characters long" in json.loads(raw)["error"]
    for version in ("01", "0", "-1", "../1", "1" * 40, "1e400", "١٢", None, True, [1], {"v": 1}):
        code, _, raw = request(gw.admin, "/admin/v1/models/demo/promote", method="POST", headers=json_auth,
                               body=json.dumps({"version": version}).encode() if version != "1e400"
                               else b'{"version": 1e400}')
        assert code == 400, (version, code, raw[:200])
    bad_bodies = [b"not json", b"[1, 2]", b'"x"', b'{"version": "1", "who": "' + b"w" * 1000 + b'"}',
                  b'{"version": "1", "who": 42}', b'{"version": "1", "who": "a\\u0000b"}',
                  b'{"version": "1", "if_generation": -1}', b'{"version": "1", "if_generation": "3"}',
                  b'{"version": "1", "if_generation": 99999999999999999999}', b"\xff\xfe{}", b"{" * 5000]
    for body in bad_bodies:
        for action, extra in (("promote", b""), ("canary", b', "weight": 0.1')):
            if body.startswith(b'{"version"'):
                body = body[:-1] + extra + b"}"
            code, _, raw = request(gw.admin, f"/admin/v1/models/demo/{action}", method="POST", headers=json_auth,
                                   body=body)
            assert code == 400 and json.loads(raw)["error"], (action, body[:60], code, raw[:200])
    for weight in (b"NaN", b"Infinity", b"2", b"-0.5", b'"0.1"', b"true", b"null", b"1e400"):
        code, _, raw = request(gw.admin, "/admin/v1/models/demo/canary", method="POST", headers=json_auth,
                               body=b'{"version": "1", "weight": ' + weight + b"}")
        assert code == 400 and json.loads(raw)["error"], (weight, code, raw[:200])
    code, _, raw = request(gw.admin, "/admin/v1/models/demo/promote", method="POST", headers=json_auth,
                           body=b'{"version": "1", "pad": "' + b"x" * (2 << 20) + b'"}')
    assert code == 413 and "too large" in json.loads(raw)["error"]
    # query strings are ignored, undecodable ones too
    for query in ("?x=1", "?%FF%FE=%00", "?version=../../etc"):
        assert request(gw.admin, f"/admin/v1/models{query}", headers=auth)[0] == 200, query
        assert request(gw.admin, f"/admin/v1/models/demo{query}", headers=auth)[0] == 200, query
    # tokens: not printable ASCII (raw header bytes), too long, wrong scheme: 401; wrong: 403
    for value in (b"Bearer \xc3\xa9t\xc3\xa9", b"Bearer \xff\xfe", "Bearer tok\u00e9n".encode("latin-1"),
                  b"Bearer " + b"x" * 300, b"Basic abc", b"Bearer"):
        for path in ("/admin/v1/models", "/geogate/v1/world", "/metrics"):
            code, _, raw = request(gw.admin, path, headers={"Authorization": value})
            assert code == 401, (value[:30], path, code, raw[:200])
    assert request(gw.admin, "/admin/v1/models", headers=bearer("gk_0123456789ab_forged"))[0] == 403
    # and a valid request still works: promote version 1 (the audit records the body's who)
    code, _, raw = request(gw.admin, "/admin/v1/models/demo/promote", method="POST", headers=json_auth,
                           body=b'{"version": "1", "who": "test"}')
    assert code in (200, 409), raw  # 409: promoted already by an earlier run of this module
    out = gw.output()
    assert "Traceback" not in out and not [line for line in out.splitlines()
                                           if '"level":"error"' in line and "geogate.admin" in line]


ADMIN_PATHS = ["/metrics", "/ui", "/ui/", "/ui/login", "/ui/logout", "/ui/static/app.js", "/ui/static/..%2F..%2Fx",
               "/geogate/v1/world", "/geogate/v1/region-events", "/geogate/v1/capacity", "/geogate/v1/region",
               "/v2/health/ready", "/admin/v1/models", "/admin/v1/models/demo", "/admin/v1/models/demo/promote",
               "/admin/v1/models/demo/canary", "/admin/v1/models/demo/rollback", "/admin/v1/status", "/nope"]


def test_no_admin_path_answers_500_to_bad_input(protected):
    """Every admin path x method x body x query string, with and without credentials: a 2xx,
    3xx or 4xx, always with a body that says what happened (JSON, or the login page)."""
    gw = protected["gw"]
    bodies = [None, b"", b"{", b"\xff\xfe\x00", b"[" * 3000, json.dumps({"version": "1", "weight": 0.5}).encode()]
    queries = ["", "?%FF%FE=%00&x", "?token=", "?token=%FF", "?" + "a=1&" * 500]
    headers_sets = [{}, bearer(TOKEN), {**bearer(TOKEN), "Content-Type": "multipart/form-data; boundary=x"},
                    {"Content-Type": "application/x-www-form-urlencoded", "Cookie": "geogate_admin_session=%FF;;="}]
    for path in ADMIN_PATHS:
        for method in ("GET", "POST", "PUT", "DELETE"):
            for body in bodies:
                for query in queries[:2] if body else queries:
                    for headers in headers_sets:
                        code, h, raw = request(gw.admin, path + query, method=method, headers=headers, body=body)
                        where = (path, query[:20], method, body[:10] if body else body, headers)
                        assert code < 500, (where, code, raw[:200])
                        if code >= 400:
                            ctype = h.get("content-type", "")
                            assert ctype.startswith(("application/json", "text/html")), (where, code, ctype, raw[:100])
                            if ctype.startswith("application/json"):
                                assert json.loads(raw)["error"], where


def test_open_metrics_opens_metrics_only(tmp_path, procs):
    reps = start_replicas(procs, demo_repository(tmp_path), 1)
    metrics = f"127.0.0.1:{free_port()}"
    gw = admin_gateway(tmp_path, replica_urls(reps, ("grpc",)), extra=f'metrics = "{metrics}"',
                       admin=f'token = "{TOKEN}"\nopen_metrics = true')
    procs.append(gw)
    gw.wait_ready()
    for address in (gw.admin, metrics):
        code, _, body = request(address, "/metrics")
        assert code == 200 and b"geogate_requests" in body
    for path in ("/geogate/v1/world", "/geogate/v1/capacity", "/ui/static/app.js", "/admin/v1/models"):
        assert request(gw.admin, path)[0] == 401, path




def test_geogate_status_and_peers_with_the_admin_token(tmp_path, procs):
    """Two regions with one admin token: `geogate status` needs it, and each gateway's world
    view shows the other's replicas and events because gateways present it to each other."""
    reps = start_replicas(procs, demo_repository(tmp_path), 1)
    ports = {r: (free_port(), free_port(), free_port()) for r in ("eu", "us")}
    regions = "".join(f"""
[[regions]]
name = "{r}"
http = "127.0.0.1:{h}"
grpc = "127.0.0.1:{g}"
admin = "127.0.0.1:{a}"
  [[regions.pools]]
  name = "{r}-pool"
  replicas = ["grpc://{reps[0].grpc_url}"]
""" for r, (h, g, a) in ports.items())
    cfg = tmp_path / "two.toml"
    (tmp_path / "store").mkdir()
    cfg.write_text(f'{FAST_HEALTH}\n[store]\nurl = "file://{tmp_path / "store"}"\n[admin]\ntoken_env = '
                   f'"TEST_ADMIN_TOKEN"\n[dns]\ncheck_interval_ms = 200\n{regions}')
    env = {"TEST_ADMIN_TOKEN": TOKEN}
    gws = {r: Proc([*GEOGATE, "gateway", "--config", str(cfg), "--region", r], name=f"gw-{r}", env=env)
           for r in ports}
    procs.extend(gws.values())
    eu_admin = f"127.0.0.1:{ports['eu'][2]}"
    us_admin = f"127.0.0.1:{ports['us'][2]}"

    def peer_with_replicas() -> bool:
        try:
            code, _, body = request(eu_admin, "/geogate/v1/world", headers=bearer(TOKEN))
        except OSError:  # not listening yet
            return False
        if code != 200:
            return False
        us = next(r for r in json.loads(body)["regions"] if r["name"] == "us")
        return bool(us["summary"] and us["summary"].get("pools"))

    wait_for(peer_with_replicas, "eu's world shows us's replicas (fetched with the token)")
    assert "pools" not in json.loads(request(us_admin, "/geogate/v1/region")[2])
    base = [sys.executable, "-m", "gateway", "status", "--url", f"http://{eu_admin}", "--json"]
    clean_env = {k: v for k, v in os.environ.items() if k not in ("GEOGATE_ADMIN_TOKEN", "TEST_ADMIN_TOKEN")}
    out = subprocess.run(base, capture_output=True, text=True, env=clean_env, timeout=60)
    assert out.returncode == 1 and "401" in out.stderr and "GEOGATE_ADMIN_TOKEN" in out.stderr, out.stderr
    out = subprocess.run(base, capture_output=True, text=True, env={**clean_env, "GEOGATE_ADMIN_TOKEN": TOKEN},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert {r["name"] for r in json.loads(out.stdout)["regions"]} == {"eu", "us"}
    out = subprocess.run([*base[:-3], "--config", str(cfg)], capture_output=True, text=True,
                         env={**clean_env, **env}, timeout=60)  # the config's token_env
    assert out.returncode == 0 and "eu" in out.stdout, out.stderr
    out = subprocess.run([*base, "--token-env", "NOT_SET_ANYWHERE"], capture_output=True, text=True,
                         env={**clean_env, "GEOGATE_ADMIN_TOKEN": TOKEN}, timeout=60)
    assert out.returncode == 1 and "$NOT_SET_ANYWHERE" in out.stderr, out.stderr


# ---------------------------------------------------------------------------- rolling restarts


def _worker_pids(supervisor_pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()}
    except OSError:
        return set()


def _rolling_restart(gw: GatewayProc, workers: int = 2) -> None:
    old = _worker_pids(gw.pid)
    os.kill(gw.pid, signal.SIGUSR2)
    wait_for(lambda: len(now := _worker_pids(gw.pid)) == workers and not now & old, "every worker replaced", 90)


def _metrics_dir(gw: GatewayProc) -> Path:
    pid = min(_worker_pids(gw.pid))
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return Path(next(e for e in env if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).split(b"=", 1)[1].decode())


def _sum_samples(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_grpc_rolling_restarts_fail_no_call_and_count_true(tmp_path, procs):
    """Several SIGUSR2 restarts while 6 gRPC channels (and 2 HTTP clients) send without pause:
    zero non-OK calls; every stopped worker says it cut off 0 requests; no prometheus-client
    warning; the dead workers' metric files merged, and /metrics still counts every call once."""
    reps = start_replicas(procs, demo_repository(tmp_path), 2)
    gw = GatewayProc(tmp_path, replicas=replica_urls(reps, ("grpc",)), workers=2,
                     gateway_extra="drain_timeout_ms = 15000\ngrpc_max_connection_age_ms = 1500\naccess_log = false")
    procs.append(gw)
    gw.wait_ready()
    wait_for(lambda: len(_worker_pids(gw.pid)) == 2, "two workers")
    restarts = 3
    with GrpcLoad(gw.grpc, channels=6, rate=60.0) as load, Stream(gw, http_threads=1, grpc_threads=0,
                                                                   pause_s=0.02) as http_load:
        load.wait_for(100)
        for _ in range(restarts):
            _rolling_restart(gw)
            load.wait_for(load.log.total + 100)
        calls = load.stop()
        http_results = http_load.stop()
    assert calls.failures == [] and calls.codes["OK"] > 300, (calls.codes, calls.failures[:5])
    assert http_results.failures == [], http_results.failures[:5]
    output = gw.output()
    cut = cut_off_counts(output)
    assert len(cut) == 2 * restarts and cut == [0] * len(cut), cut
    assert "handover" in output and "grpc/grpc#41785" not in output  # no connection left open at a stop
    assert PROMETHEUS_WARNING not in output
    # the metric files: the live workers' own, the dead workers' merged totals, the lock
    directory = _metrics_dir(gw)
    live = _worker_pids(gw.pid)
    for f in directory.iterdir():
        pid = re.search(r"_(\d+)\.db$", f.name)
        assert f.name in ("merge.lock", "counter_dead.db", "histogram_dead.db") or \
            (pid is not None and int(pid.group(1)) in live), f.name
    assert (directory / "counter_dead.db").exists()
    text = request(gw.admin, "/metrics")[2].decode()
    assert _sum_samples(text, "geogate_requests_total", protocol="grpc") == calls.codes["OK"]
    assert _sum_samples(text, "geogate_requests_total", protocol="http") == http_results.ok
    assert _sum_samples(text, "geogate_request_duration_seconds_count", protocol="grpc") == calls.codes["OK"]
    assert _sum_samples(text, "geogate_in_flight_requests") == 0


@pytest.mark.parametrize("how", ["rolling restart", "SIGTERM"])
def test_cut_off_count_is_true_when_the_drain_times_out(tmp_path, procs, how):
    """Requests slower than the drain are cut off, at a rolling restart (handover) or a stop:
    the workers say so, by protocol, and the numbers are what the clients saw."""
    reps = start_replicas(procs, demo_repository(tmp_path), 1)
    gw = GatewayProc(tmp_path, replicas=replica_urls(reps, ("grpc",)), workers=2,
                     gateway_extra="drain_timeout_ms = 1500\ngrpc_max_connection_age_ms = 1000")
    procs.append(gw)
    gw.wait_ready()
    wait_for(lambda: all(f"worker {i} serving" in gw.output() for i in (0, 1)), "both workers serving")
    set_faults(reps[0], delay_ms=20000)
    outcomes: dict[str, str] = {}

    def slow_grpc() -> None:
        req = service_pb2.ModelInferRequest(model_name="demo")
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
        req.raw_input_contents.append(np.zeros((1, 16), np.float32).tobytes())
        with grpc.insecure_channel(gw.grpc) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                       request_serializer=req.__class__.SerializeToString,
                                       response_deserializer=lambda b: b)
            try:
                call(req, timeout=60)
                outcomes["grpc"] = "OK"
            except grpc.RpcError as exc:
                outcomes["grpc"] = exc.code().name

    def slow_http() -> None:
        try:
            code, _, _ = request(gw.http, "/v2/models/demo/infer", method="POST", body=BODY, timeout_s=60)
            outcomes["http"] = str(code)
        except (OSError, http.client.HTTPException) as exc:
            outcomes["http"] = type(exc).__name__

    threads = [threading.Thread(target=slow_grpc), threading.Thread(target=slow_http)]
    for t in threads:
        t.start()
    wait_for(lambda: _sum_samples(request(gw.admin, "/metrics")[2].decode(), "geogate_in_flight_requests") == 2,
             "both slow requests in flight", 20)
    if how == "SIGTERM":
        os.kill(gw.pid, signal.SIGTERM)
        assert gw.popen.wait(30) == 0, gw.output()[-3000:]
    else:
        _rolling_restart(gw)
    for t in threads:
        t.join(60)
    set_faults(reps[0])
    assert outcomes["grpc"] in ("CANCELLED", "UNAVAILABLE") and outcomes["http"] != "200", outcomes
    output = gw.output()
    assert sum(cut_off_counts(output)) == 2, [m for m in output.splitlines() if "cut off" in m]
    assert re.search(r"\(1 requests cut off: 1 HTTP, 0 gRPC\)|\(2 requests cut off: 1 HTTP, 1 gRPC\)", output)
    assert re.search(r"cut off: 0 HTTP, 1 gRPC\)|cut off: 1 HTTP, 1 gRPC\)", output)


# ---------------------------------------------------------------------------- logs


def test_access_log_rotates_at_its_size(tmp_path, procs):
    reps = start_replicas(procs, demo_repository(tmp_path), 1)
    log = tmp_path / "logs" / "access.log"
    log.parent.mkdir()
    gw = GatewayProc(tmp_path, replicas=replica_urls(reps, ("http",)),
                     gateway_extra=f'access_log_file = "{log}"\naccess_log_max_bytes = 8192\naccess_log_backups = 2')
    procs.append(gw)
    gw.wait_ready()
    ids = []
    for i in range(150):
        rid = f"rotation-test-{i:04d}"
        code, _, body = request(gw.http, "/v2/models/demo/infer", method="POST", body=BODY,
                                headers={"x-request-id": rid})
        assert code == 200, body
        ids.append(rid)
    wait_for(lambda: ids[-1] in log.read_text(), "the last request in the access log", 10)
    files = sorted(p.name for p in log.parent.iterdir())
    assert files == ["access.log", "access.log.1", "access.log.2"], files
    seen = []
    for name in ("access.log.2", "access.log.1", "access.log"):
        text = (log.parent / name).read_text()
        assert text.endswith("\n") and (log.parent / name).stat().st_size <= 8192, name
        seen += [json.loads(line)["request_id"] for line in text.splitlines()]
    assert seen == ids[-len(seen):] and len(seen) < len(ids)  # the newest lines, in order; older ones rotated out
    assert "rotation-test" not in gw.output()  # not on stderr as well




def test_geogate_up_children_logs_rotate(tmp_path):
    """The `geogate up` supervisor copies a child's output into logs/<name>.log, rotated by size,
    whole lines (invalid UTF-8 kept, escaped), nothing lost across a restart of the child."""
    from gateway.world.supervisor import Child, Supervisor

    script = ("import sys, time\n"
              "for i in range(400):\n"
              "    sys.stdout.buffer.write(b'child line %05d \\xff ' % i + b'z' * 30 + b'\\n')\n"
              "    if i % 50 == 0: sys.stdout.flush(); time.sleep(0.01)\n"
              "sys.stdout.flush(); time.sleep(30)\n")
    events: list[str] = []

    async def run() -> None:
        sup = Supervisor(on_event=events.append)
        child = Child("chatty", [sys.executable, "-c", script], tmp_path / "logs" / "chatty.log",
                      log_max_bytes=4096, log_backups=2)
        await sup.start(child)
        for _ in range(600):  # up to 30 s for the child's last line
            if "child line 00399" in child.log_path.read_text(errors="replace"):
                break
            await asyncio.sleep(0.05)
        await sup.stop_all()

    asyncio.run(run())
    names = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert names == ["chatty.log", "chatty.log.1", "chatty.log.2"], names
    text = "".join((tmp_path / "logs" / n).read_text() for n in ("chatty.log.2", "chatty.log.1", "chatty.log"))
    numbers = [int(m) for m in re.findall(r"child line (\d{5}) \\xff", text)]
    assert numbers == list(range(numbers[0], 400)) and numbers[0] > 0  # contiguous, oldest rotated out
    assert all((tmp_path / "logs" / n).stat().st_size <= 4096 for n in names)


# ---------------------------------------------------------------------------- in-process logic


