"""Triton's generate extension through the gateway, with two real Tritons serving a decoupled
python-backend model (tests/triton_models/token_stream.py): generate answers equal Triton's own,
generate_stream events arrive in order, equal to direct, and the first one long before the last
is produced; a replica killed before the request costs nothing; a client closing mid-stream
makes Triton cancel the request; a pool of gRPC replicas only refuses with its reason."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.test_triton_gateway import TritonGatewayProc, all_healthy, wait_for
from tests.procs import TritonProc, wait_until
from tests.triton_models.token_stream import MODEL_NAME, model_log, write_token_model

DELAY_MS = 25  # between two responses of one request
LONG_WORDS = 120  # a stream of about 3 s


def words(tag: str, n: int) -> str:
    return " ".join([tag, *(f"w{i}" for i in range(1, n))])


def post(address: str, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def stream_events(address: str, text: str, *, model: str = MODEL_NAME) -> tuple[list[dict], list[float], dict, float]:
    """(events, arrival time of each since the request, response headers, duration)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        t0 = time.monotonic()
        conn.request("POST", f"/v2/models/{model}/generate_stream", json.dumps({"text_input": text}).encode())
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        events, arrived = [], []
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                events.append(json.loads(line[len(b"data: "):]))
                arrived.append(time.monotonic() - t0)
        return events, arrived, {k.lower(): v for k, v in resp.getheaders()}, time.monotonic() - t0
    finally:
        conn.close()


@pytest.fixture
def generate_world(tmp_path: Path, procs):
    repo, logs = tmp_path / "repo", tmp_path / "model-logs"
    write_token_model(repo, logs, delay_ms=DELAY_MS)
    tritons = [TritonProc(str(repo), load=(MODEL_NAME,)) for _ in range(2)]
    procs.extend(tritons)
    for t in tritons:
        t.wait_ready()
    gw = TritonGatewayProc(tmp_path, [f"http://{t.http_url}" for t in tritons])
    procs.append(gw)
    gw.wait_ready()
    wait_for(lambda: all_healthy(gw, 2), "both Tritons healthy", procs=[gw])
    yield tritons, gw, logs
    gw.stop()
    assert "Traceback" not in gw.output(), gw.output()[-4000:]  # broken streams end cleanly
    for t in tritons:
        t.kill()


def test_generate_and_generate_stream_equal_direct_and_stream_as_produced(generate_world):
    tritons, gw, _ = generate_world
    # generate: one JSON answer (a decoupled model that sends one response), equal to Triton's own
    status, headers, body = post(gw.http, f"/v2/models/{MODEL_NAME}/generate", {"text_input": "hello"})
    d_status, _, d_body = post(tritons[0].http_url, f"/v2/models/{MODEL_NAME}/generate", {"text_input": "hello"})
    assert (status, json.loads(body)) == (d_status, json.loads(d_body)) == \
        (200, {"model_name": MODEL_NAME, "model_version": "1", "text_output": "0:hello"})
    assert headers["geogate-region"] == "r1" and headers["geogate-attempts"] == "1"
    assert headers["geogate-replica"] in {f"http://{t.http_url}" for t in tritons}
    # versioned path, and Triton's own answer to a model producing several responses passes through
    status, _, body = post(gw.http, f"/v2/models/{MODEL_NAME}/versions/1/generate", {"text_input": "a b"})
    assert status == 200 and "exactly 1 response" in json.loads(body)["error"]

    text = words("first", 40)  # 40 responses, DELAY_MS apart: about 1 s
    direct, _, _, _ = stream_events(tritons[1].http_url, text)
    events, arrived, headers, total_s = stream_events(gw.http, text)
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["geogate-attempts"] == "1" and headers["geogate-model-version"] == "1"
    assert events == direct  # every event, in order
    assert [e["text_output"] for e in events] == [f"{i}:{w}" for i, w in enumerate(text.split())]
    # relayed as produced: the first event long before the stream's end (39 x 25 ms later)
    assert arrived[0] < 0.25 * total_s, (arrived[0], total_s)
    assert arrived == sorted(arrived) and arrived[-1] - arrived[0] > 0.5 * 39 * DELAY_MS / 1000

    # many streams at once, each complete and in order
    texts = [words(f"s{i}", 15) for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda t: stream_events(gw.http, t)[0], texts))
    for t, evs in zip(texts, results, strict=True):
        assert [e["text_output"] for e in evs] == [f"{i}:{w}" for i, w in enumerate(t.split())]

    metrics = http.client.HTTPConnection(*gw.admin.rsplit(":", 1))
    metrics.request("GET", "/metrics")
    text_metrics = metrics.getresponse().read().decode()
    relayed = [line for line in text_metrics.splitlines()
               if line.startswith("geogate_stream_responses_relayed_total{") and 'protocol="http"' in line]
    assert relayed and float(relayed[0].rsplit(" ", 1)[1]) >= 40 + 8 * 15, relayed


def test_replica_killed_before_the_request_is_served_by_the_other(generate_world):
    tritons, gw, _ = generate_world
    dead, live = tritons
    dead.kill()
    texts = [words(f"k{i}", 5) for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda t: stream_events(gw.http, t), texts))
    for t, (events, _, headers, _) in zip(texts, results, strict=True):
        assert [e["text_output"] for e in events] == [f"{i}:{w}" for i, w in enumerate(t.split())]
        assert headers["geogate-replica"] == f"http://{live.http_url}"
    # some of them went to the dead Triton first (refused) and were retried on the live one
    assert max(int(h["geogate-attempts"]) for _, _, h, _ in results) == 2


def test_client_closing_mid_stream_cancels_the_triton_request(generate_world):
    _, gw, logs = generate_world
    host, port = gw.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", f"/v2/models/{MODEL_NAME}/generate_stream",
                 json.dumps({"text_input": words("gone", LONG_WORDS)}).encode())
    resp = conn.getresponse()
    got = 0
    while got < 3:
        if resp.readline().startswith(b"data: "):
            got += 1
    conn.sock.close()  # the client goes away after 3 of 120 events
    conn.close()
    # Triton saw the cancellation: the model stopped early and said so (well before 3 s of stream)
    wait_until(lambda: any(line.startswith("gone ") for line in model_log(logs)), timeout_s=10)
    line = next(line for line in model_log(logs) if line.startswith("gone "))
    sent = int(line.split("sent=")[1].split()[0])
    assert line.endswith("cancelled=1") and sent < LONG_WORDS // 2, line


def test_deadline_ends_the_stream_and_grpc_only_pool_refuses(generate_world, tmp_path):
    tritons, gw, logs = generate_world
    # The deadline covers the whole stream: the client sees it end early, without the final chunk.
    host, port = gw.http.rsplit(":", 1)
    body = json.dumps({"text_input": words("late", LONG_WORDS)}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v2/models/{MODEL_NAME}/generate_stream HTTP/1.1\r\nHost: x\r\n"
                     f"geogate-timeout-ms: 400\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    got = raw.count(b"data: ")
    assert 0 < got < LONG_WORDS // 2 and not raw.endswith(b"0\r\n\r\n"), (got, raw[-100:])
    wait_until(lambda: any(line.startswith("late ") for line in model_log(logs)), timeout_s=10)

    grpc_gw = TritonGatewayProc(tmp_path, [f"grpc://{t.grpc_url}" for t in tritons], name="grpc-only")
    try:
        grpc_gw.wait_ready()
        wait_for(lambda: all_healthy(grpc_gw, 2), "both Tritons healthy over gRPC", procs=[grpc_gw])
        status, headers, body = post(grpc_gw.http, f"/v2/models/{MODEL_NAME}/generate_stream", {"text_input": "x"})
        assert status == 503 and "only by gRPC replicas" in json.loads(body)["error"], body
        assert headers["geogate-attempts"] == "0"
        status, _, body = post(grpc_gw.http, f"/v2/models/{MODEL_NAME}/generate", [1, 2])
        assert status == 400 and "JSON object" in json.loads(body)["error"]
        status, _, body = post(grpc_gw.http, "/v2/models/nope/generate", {"text_input": "x"})
        assert status == 404
    finally:
        grpc_gw.stop()
