"""The replica's inference hot path: the lean HTTP/1.1 path in front of aiohttp (pipelining, the
hand-over to aiohttp on one connection, errors, limits) over raw sockets against a real replica,
which request heads it takes, and the batcher's worker threads (cancelled and unloaded requests)."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket

import numpy as np
import orjson
import pytest

from replicas.demo.onnx_model import reference_outputs, write_repository_entry
from replicas.server.batcher import Scheduler
from replicas.server.http_wire import infer_target
from replicas.server.onnx_runner import OrtRunner
from tests.procs import ReplicaProc

ATOL = 1e-4
MAX_BODY_BYTES = 4096
TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------- which paths are fast

@pytest.mark.parametrize(("url", "target"), [
    (b"/v2/models/demo/infer", ("demo", "")),
    (b"/v2/models/demo-heavy/versions/2/infer", ("demo-heavy", "2")),
    (b"/v2/models/a_b.c/versions/x/infer", ("a_b.c", "x")),  # the repository answers for the version
])
def test_infer_target_takes_inference_paths(url, target):
    assert infer_target(url) == target


@pytest.mark.parametrize("url", [
    b"/v2/models/demo/ready", b"/v2/models/de%6Do/infer", b"/v2/models/demo/infer?x=1", b"/v2/models//infer",
    b"/v2/models/demo/versions//infer", b"/v2/models/demo/versions/1/2/infer", b"/v2/models/demo/vers/1/infer",
    b"http://h/v2/models/demo/infer", b"/v2/models/d\xc3\xa9mo/infer",
])
def test_infer_target_leaves_everything_else_to_aiohttp(url):
    assert infer_target(url) is None


# ---------------------------------------------------------------------------- a real replica, raw sockets

@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_repository_entry(repo, 1)
    write_repository_entry(repo, 2)
    proc = ReplicaProc(str(repo), extra=["--max-body-bytes", str(MAX_BODY_BYTES)])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _x(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


def _binary_request(path: str, x: np.ndarray, *, extra_headers: str = "", body_override: bytes | None = None
                    ) -> bytes:
    header = orjson.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": list(x.shape),
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    body = header + x.tobytes() if body_override is None else body_override
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nInference-Header-Content-Length: {len(header)}\r\n"
            f"{extra_headers}Content-Length: {len(body)}\r\n\r\n").encode() + body


def _json_request(path: str, x: np.ndarray) -> bytes:
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


class _Conn:
    """One raw keep-alive connection that reads answers framed by Content-Length."""

    def __init__(self, url: str):
        host, port = url.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split()[1]), headers, body

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the replica closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def _binary_output(headers: dict[str, str], body: bytes) -> np.ndarray:
    n = int(headers["inference-header-content-length"])
    meta = json.loads(body[:n])
    out = meta["outputs"][0]
    return np.frombuffer(body[n:], dtype=np.float32).reshape(out["shape"])


def test_pipelined_requests_are_answered_in_order(replica):
    conn = _Conn(replica.http_url)
    try:
        xs = [_x(1 + i % 3, seed=i) for i in range(6)]
        versions = ["1", "2", "1", "2", "1", "2"]
        conn.send(b"".join(_binary_request(f"/v2/models/demo/versions/{v}/infer", x)
                           for v, x in zip(versions, xs, strict=True)))
        for v, x in zip(versions, xs, strict=True):
            status, headers, body = conn.answer()
            assert status == 200, body
            assert headers["geogate-model-version"] == v
            assert headers["content-type"] == "application/octet-stream"
            assert "date" in headers
            np.testing.assert_allclose(_binary_output(headers, body), reference_outputs("tiny", int(v), x),
                                       atol=ATOL)
    finally:
        conn.close()


def test_a_connection_is_handed_to_aiohttp_and_keeps_working(replica):
    conn = _Conn(replica.http_url)
    try:
        x = _x(2, seed=21)
        conn.send(_binary_request("/v2/models/demo/infer", x))  # the fast path
        status, headers, body = conn.answer()
        assert status == 200 and headers["geogate-model-version"] == "2"
        assert "server" not in headers  # aiohttp would have named itself
        np.testing.assert_allclose(_binary_output(headers, body), reference_outputs("tiny", 2, x), atol=ATOL)
        # Another shape: aiohttp takes the connection over, bytes already sent included.
        conn.send(b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n" + _json_request("/v2/models/demo/infer", x))
        status, _, _ = conn.answer()
        assert status == 200
        status, headers, body = conn.answer()
        assert status == 200 and headers["geogate-model-version"] == "2"
        got = np.asarray(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(2, 8)
        np.testing.assert_allclose(got, reference_outputs("tiny", 2, x), atol=ATOL)
        conn.send(_binary_request("/v2/models/demo/versions/1/infer", x))  # now served by aiohttp
        status, headers, body = conn.answer()
        assert status == 200 and headers["geogate-model-version"] == "1"
        assert "aiohttp" in headers["server"]
        np.testing.assert_allclose(_binary_output(headers, body), reference_outputs("tiny", 1, x), atol=ATOL)
    finally:
        conn.close()


def test_chunked_and_gzip_bodies_are_served_by_aiohttp(replica):
    x = _x(3, seed=5)
    whole = _binary_request("/v2/models/demo/infer", x)
    head, body = whole.split(b"\r\n\r\n", 1)
    header_length = next(h for h in head.split(b"\r\n") if h.startswith(b"Inference-Header-Content-Length"))
    chunked = (b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: t\r\n" + header_length
               + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    zipped = gzip.compress(body)
    gz = (b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: t\r\n" + header_length
          + f"\r\nContent-Encoding: gzip\r\nContent-Length: {len(zipped)}\r\n\r\n".encode() + zipped)
    for request in (chunked, gz):
        conn = _Conn(replica.http_url)
        try:
            conn.send(request)
            status, headers, answer = conn.answer()
            assert status == 200, answer
            np.testing.assert_allclose(_binary_output(headers, answer), reference_outputs("tiny", 2, x), atol=ATOL)
        finally:
            conn.close()


def test_fast_path_errors_and_limits(replica):
    conn = _Conn(replica.http_url)
    try:
        x = _x(1, seed=3)
        bad_name = _binary_request("/v2/models/demo/infer", x).replace(b'"INPUT0"', b'"NOPE00"')
        conn.send(bad_name)
        status, headers, body = conn.answer()
        assert status == 400 and headers["content-type"] == "application/json"
        assert "NOPE00" in json.loads(body)["error"]
        conn.send(_binary_request("/v2/models/missing/infer", x))
        status, _, body = conn.answer()
        assert status == 404 and "missing" in json.loads(body)["error"]
        conn.send(_binary_request("/v2/models/demo/infer", x, body_override=b"x" * 10)
                  .replace(b"Inference-Header-Content-Length: ", b"Inference-Header-Content-Length: z"))
        status, _, body = conn.answer()
        assert status == 400 and "Inference-Header-Content-Length" in json.loads(body)["error"]
        conn.send(_binary_request("/v2/models/demo/infer", x))  # the connection still serves
        status, _, _ = conn.answer()
        assert status == 200
    finally:
        conn.close()
    conn = _Conn(replica.http_url)
    try:  # over the body limit: aiohttp's answer, 413
        big = _x(MAX_BODY_BYTES // 64 + 1, seed=4)
        conn.send(_binary_request("/v2/models/demo/infer", big))
        status, _, body = conn.answer()
        assert status == 413 and "limit" in json.loads(body)["error"]
    finally:
        conn.close()


# ---------------------------------------------------------------------------- batcher worker threads

@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    model_dir = write_repository_entry(tmp_path_factory.mktemp("repo"), 1)
    r = OrtRunner(model_dir / "1" / "model.onnx", count=1, want_gpu=False, label="demo/1")
    yield r
    r.close()


async def test_cancelled_requests_are_not_run(runner):
    runs: list[int] = []
    s = Scheduler(runner, batching=True, max_batch_size=8, max_queue_delay_us=200_000, slots=1,
                  on_batch=lambda rows, ns: runs.append(rows))
    kept = asyncio.ensure_future(s.submit({"INPUT0": _x(1, 1)}, 1, "k"))
    gone = asyncio.ensure_future(s.submit({"INPUT0": _x(2, 2)}, 2, "k"))
    await asyncio.sleep(0.05)  # both wait inside the delay window
    gone.cancel()
    out = await asyncio.wait_for(kept, TIMEOUT_S)
    assert out.batch_rows == 1 and runs == [1]
    s.close()


async def test_close_fails_queued_requests_and_refuses_new_ones(runner):
    s = Scheduler(runner, batching=True, max_batch_size=8, max_queue_delay_us=10_000_000, slots=1)
    waiting = [asyncio.ensure_future(s.submit({"INPUT0": _x(1, i)}, 1, "k")) for i in range(3)]
    await asyncio.sleep(0.05)
    assert s.queue_depth == 3
    s.close()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "unloaded" in str(r) for r in results)
    with pytest.raises(RuntimeError, match="unloaded"):
        await s.submit({"INPUT0": _x(1, 9)}, 1, "k")
