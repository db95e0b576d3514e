"""Closed-loop clients for bench_replica that cost the machine as little CPU as possible.

On a 2-core machine a Python client at concurrency 64 can take as much CPU per request as the
server it measures (tritonclient/aiohttp ~120 us, grpc.aio ~100-300 us per request seen here),
and then the figure measures the client. These send one prebuilt request over and over and
read just enough of each answer to know it is complete and whether it succeeded:

- `HttpClients`: raw HTTP/1.1 keep-alive connections (asyncio protocols), one per concurrent
  request, each writing the prebuilt binary-tensor request (what perf_analyzer sends) from
  data_received the moment the previous answer is complete; answers framed by Content-Length.
- `H2GrpcClients`: gRPC over one raw HTTP/2 connection (prior knowledge, as grpc clients do):
  a constant HPACK header block (literals, no dynamic table, so it never changes), the
  pre-serialized ModelInferRequest in one DATA frame, connection flow control honoured, PINGs
  and SETTINGS acknowledged. An answer counts as a success when a response message arrived
  before the trailers (a failed RPC is trailers-only or reset).
- `AioGrpcClients`: grpc.aio with the pre-serialized request (bytes in, bytes out), for
  comparison with the stock client.

Every client runs during a `Window` and records latencies of answers completed inside it.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from collections import deque

import numpy as np

INPUT_WIDTH = 1024
RPC_TIMEOUT_S = 30.0
GRPC_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)

# HTTP/2 (RFC 9113) frame types, flags and settings used here.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
F_DATA, F_HEADERS, F_RST_STREAM, F_SETTINGS, F_PING, F_GOAWAY, F_WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
FLAG_END_STREAM, FLAG_ACK, FLAG_END_HEADERS = 0x1, 0x1, 0x4
S_ENABLE_PUSH, S_INITIAL_WINDOW_SIZE = 0x2, 0x4
H2_DEFAULT_WINDOW = 65_535
H2_MAX_WINDOW = 2**31 - 1
H2_WINDOW_REFILL_BYTES = 1 << 20  # give the server connection window back in 1 MiB steps
_FRAME_HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id


def make_input(rows: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, INPUT_WIDTH)).astype(np.float32)


class Window:
    """One measured window: answers completed between `measure_from` and `stop_at` count; no new
    request starts after `stop_at`, and the window ends when every closed loop has stopped."""

    def __init__(self, measure_from: float, stop_at: float, active: int, done: asyncio.Future):
        self.measure_from = measure_from
        self.stop_at = stop_at
        self.latencies: list[float] = []
        self.errors = 0
        self._active = active
        self._done = done

    def record(self, t0: float, t1: float, ok: bool) -> None:
        if not ok:
            self.errors += 1
        elif self.measure_from <= t1 <= self.stop_at:
            self.latencies.append(t1 - t0)

    def idle(self) -> None:
        """One closed loop has stopped."""
        self._active -= 1
        if self._active <= 0 and not self._done.done():
            self._done.set_result(None)


# ------------------------------------------------------------------------------------ HTTP/1.1

def http_request(host: str, port: int, model: str, x: np.ndarray) -> bytes:
    """One binary-tensor inference request, as raw HTTP/1.1 bytes (header JSON + blob)."""
    import orjson

    header = orjson.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": list(x.shape),
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    body = header + x.tobytes()
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


class _HttpClosedLoop(asyncio.Protocol):
    """One keep-alive connection: the next request goes out from data_received as soon as the
    previous answer is complete (no task, no future per request)."""

    def __init__(self, request: bytes):
        self._request = request
        self._window: Window | None = None
        self._buf = bytearray()
        self._need = -1  # bytes of the current answer, once its head is in
        self._ok = False
        self._t0 = 0.0
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self, window: Window) -> None:
        self._window = window
        self._send()

    def _send(self) -> None:
        t = time.perf_counter()
        w = self._window
        if t >= w.stop_at or self.lost:
            self._window = None
            w.idle()
            return
        self._t0 = t
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            m = _CONTENT_LENGTH.search(buf, 0, end)
            self._need = end + 4 + (int(m.group(1)) if m else 0)
            self._ok = buf[9:12] == b"200"
        if len(buf) < self._need:
            return
        del buf[:self._need]
        self._need = -1
        self._window.record(self._t0, time.perf_counter(), self._ok)
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        w, self._window = self._window, None
        if w is not None:  # lost with a request in flight
            w.errors += 1
            w.idle()


class HttpClients:
    def __init__(self, host: str, port: int, model: str, concurrency: int):
        self._host, self._port, self._n = host, port, concurrency
        self._request = http_request(host, port, model, make_input(1))
        self._conns: list[_HttpClosedLoop] = []

    async def run(self, window: Window) -> None:
        loop = asyncio.get_running_loop()
        self._conns = [c for c in self._conns if not c.lost]
        while len(self._conns) < self._n:
            _, conn = await loop.create_connection(lambda: _HttpClosedLoop(self._request), self._host, self._port)
            self._conns.append(conn)
        for c in self._conns:
            c.start(window)

    async def close(self) -> None:
        for c in self._conns:
            if c.transport is not None:
                c.transport.close()


# ------------------------------------------------------------------------------------ gRPC

def grpc_message(model: str) -> bytes:
    """The serialized ModelInferRequest every gRPC client sends."""
    from tritonclient.grpc import service_pb2

    x = make_input(1)
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literals(headers: list[tuple[str, str]]) -> bytes:
    """HPACK "literal header field without indexing, new name" for each header: decoders store
    nothing, so the same block is valid on every stream."""
    out = bytearray()
    for name, value in headers:
        out.append(0x00)
        for s in (name.encode(), value.encode()):
            out += _hpack_int(len(s), 7, 0x00) + s
    return bytes(out)


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(len(payload) << 8 | ftype, flags, stream_id) + payload


class _H2Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying up to `concurrency` gRPC calls at once, closed loop: each
    finished call starts the next one (from data_received; no task or future per call)."""

    def __init__(self, header_block: bytes, message: bytes):
        self._header_block = header_block
        self._data = b"\x00" + struct.pack(">I", len(message)) + message  # gRPC length-prefixed message
        self._next_id = 1
        self._streams: dict[int, list] = {}  # stream id -> [t0, got a message]
        self._send_window = H2_DEFAULT_WINDOW  # connection-level, what the server lets us send
        self._blocked: deque[int] = deque()  # streams whose DATA waits for connection window
        self._buf = bytearray()
        self._unacked = 0
        self._window: Window | None = None
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = struct.pack(">HIHI", S_ENABLE_PUSH, 0, S_INITIAL_WINDOW_SIZE, H2_MAX_WINDOW)
        transport.write(H2_PREFACE + _frame(F_SETTINGS, 0, 0, settings)
                        + _frame(F_WINDOW_UPDATE, 0, 0, struct.pack(">I", H2_MAX_WINDOW - H2_DEFAULT_WINDOW)))

    def start(self, window: Window, calls: int) -> None:
        self._window = window
        for _ in range(calls):
            self._send()

    def _send(self) -> None:
        t = time.perf_counter()
        w = self._window
        if t >= w.stop_at or self.lost:
            w.idle()
            return
        sid = self._next_id
        self._next_id += 2
        self._streams[sid] = [t, False]
        head = _frame(F_HEADERS, FLAG_END_HEADERS, sid, self._header_block)
        size = len(self._data)
        if self._send_window >= size and not self._blocked:
            self._send_window -= size
            self.transport.write(head + _frame(F_DATA, FLAG_END_STREAM, sid, self._data))
        else:
            self.transport.write(head)
            self._blocked.append(sid)

    def _unblock(self) -> None:
        size = len(self._data)
        out = []
        while self._blocked and self._send_window >= size:
            self._send_window -= size
            out.append(_frame(F_DATA, FLAG_END_STREAM, self._blocked.popleft(), self._data))
        if out:
            self.transport.write(b"".join(out))

    def _finish(self, sid: int, failed: bool) -> None:
        s = self._streams.pop(sid, None)
        if s is None:
            return
        self._window.record(s[0], time.perf_counter(), s[1] and not failed)
        self._send()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, n = 0, len(buf)
        replies = []
        while n - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            end = pos + 9 + length
            if end > n:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            if ftype == F_DATA:
                self._unacked += length
                if length and sid in self._streams:
                    self._streams[sid][1] = True
                if flags & FLAG_END_STREAM:
                    self._finish(sid, False)
            elif ftype == F_HEADERS:
                if flags & FLAG_END_STREAM:  # trailers (or a trailers-only error answer)
                    self._finish(sid, False)
            elif ftype == F_RST_STREAM:
                self._finish(sid, True)
            elif ftype == F_WINDOW_UPDATE:
                if sid == 0:
                    self._send_window += int.from_bytes(buf[pos + 9:end], "big") & 0x7FFFFFFF
                    self._unblock()
            elif ftype == F_SETTINGS and not flags & FLAG_ACK:
                for i in range(pos + 9, end, 6):
                    key, value = struct.unpack_from(">HI", buf, i)
                    if key == S_INITIAL_WINDOW_SIZE and value < len(self._data):
                        raise RuntimeError(f"the server's stream window ({value} bytes) is smaller than one "
                                           "request; this client does not split requests")
                replies.append(_frame(F_SETTINGS, FLAG_ACK, 0, b""))
                if not self.ready.done():
                    self.ready.set_result(None)
            elif ftype == F_PING and not flags & FLAG_ACK:
                replies.append(_frame(F_PING, FLAG_ACK, 0, bytes(buf[pos + 9:end])))
            elif ftype == F_GOAWAY:
                self.lost = True
            pos = end
        del buf[:pos]
        if self._unacked >= H2_WINDOW_REFILL_BYTES:
            replies.append(_frame(F_WINDOW_UPDATE, 0, 0, struct.pack(">I", self._unacked)))
            self._unacked = 0
        if replies:
            self.transport.write(b"".join(replies))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("the gRPC connection closed before SETTINGS"))
        w = self._window
        if w is not None:
            for _ in self._streams:
                w.errors += 1
                w.idle()
            self._streams.clear()


class H2GrpcClients:
    """gRPC ModelInfer over one raw HTTP/2 connection (see the module docstring)."""

    def __init__(self, host: str, port: int, model: str, concurrency: int):
        self._host, self._port, self._n = host, port, concurrency
        self._message = grpc_message(model)
        self._block = hpack_literals([(":method", "POST"), (":scheme", "http"), (":path", GRPC_INFER_METHOD),
                                      (":authority", f"{host}:{port}"), ("content-type", "application/grpc"),
                                      ("te", "trailers")])
        self._conn: _H2Connection | None = None

    async def run(self, window: Window) -> None:
        if self._conn is None or self._conn.lost:
            loop = asyncio.get_running_loop()
            _, self._conn = await loop.create_connection(lambda: _H2Connection(self._block, self._message),
                                                         self._host, self._port)
            await asyncio.wait_for(self._conn.ready, RPC_TIMEOUT_S)
        self._conn.start(window, self._n)

    async def close(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()


class AioGrpcClients:
    """grpc.aio on one channel, the pre-serialized request, bytes in and out (no protobuf per call)."""

    def __init__(self, host: str, port: int, model: str, concurrency: int):
        import grpc

        self._payload = grpc_message(model)
        self._n = concurrency
        self._rpc_error = grpc.RpcError
        self._channel = grpc.aio.insecure_channel(f"{host}:{port}")
        # No serializers: the bytes go out as they are and answers stay bytes (checked non-empty).
        self._call = self._channel.unary_unary(GRPC_INFER_METHOD)
        self._tasks: list[asyncio.Future] = []

    async def run(self, window: Window) -> None:
        clock, call, payload = time.perf_counter, self._call, self._payload

        async def worker() -> None:
            try:
                while True:
                    t0 = clock()
                    if t0 >= window.stop_at:
                        return
                    try:
                        answer = await call(payload, timeout=RPC_TIMEOUT_S)
                    except self._rpc_error:
                        window.errors += 1
                        continue
                    window.record(t0, clock(), bool(answer))
            finally:
                window.idle()

        self._tasks = [asyncio.ensure_future(worker()) for _ in range(self._n)]  # the window waits on them

    async def close(self) -> None:
        await self._channel.close()


CLIENTS = {"http": HttpClients, "grpc": H2GrpcClients, "grpc-aio": AioGrpcClients}
