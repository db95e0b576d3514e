"""A lean HTTP/1.1 path for inference requests, in front of aiohttp on the same port.

aiohttp costs about 30 us of event-loop CPU per request here (parser objects, Request and
Response objects, a task per request, routing), as much as the rest of the replica's work per
inference; on a 2-core machine that CPU is taken from the model. Every connection therefore
starts on `FastInferProtocol`, which serves the one hot request shape itself:

    POST /v2/models/{model}[/versions/{version}]/infer HTTP/1.1, with a Content-Length body
    (no Transfer-Encoding, Content-Encoding, Expect, Upgrade or Connection: close)

with the same inference code, answers and headers as the aiohttp handler. The first request of
any other shape (another path or method, HTTP/1.0, chunked or compressed bodies, a body over the
limit, a malformed or unusual head) hands the connection over to aiohttp, with every byte not
yet consumed: from then on aiohttp serves that connection alone, exactly as before. Requests on
one connection are answered in order (a pipelined request waits until the previous answer is
written). Idle keep-alive connections close after `KEEPALIVE_TIMEOUT_S`, as aiohttp's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.tcp_helpers import tcp_nodelay

log = logging.getLogger("geogate.replica.http")

# path -> (model, version); names outside this charset (percent-encoding, ...) go to aiohttp
_INFER_PATH = re.compile(rb"/v2/models/([A-Za-z0-9_.\-]+)(?:/versions/([A-Za-z0-9_.\-]+))?/infer")
MAX_HEAD_BYTES = 8192  # a longer head is not the hot path: aiohttp applies its own limits
KEEPALIVE_TIMEOUT_S = 75.0  # aiohttp's default
SWEEP_INTERVAL_S = 15.0
PAUSE_READING_BYTES = 1 << 20  # a client pipelining this much waits for our answers
_REFUSED_HEADERS = frozenset((b"transfer-encoding", b"expect", b"upgrade"))

# (status, body, content type, served version or "", Inference-Header-Content-Length or None)
InferAnswer = tuple[int, bytes, str, str, "int | None"]
InferFn = Callable[[str, str, bytes, "str | None", str], Awaitable[InferAnswer]]


class _DateCache:
    """The Date header, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


_DATE = _DateCache()


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


_STATUS_LINES = {s: _status_line(s) for s in (200, 400, 404, 413, 500, 503)}


class _Head:
    __slots__ = ("content_length", "header_length", "model", "request_id", "version")

    def __init__(self, model: str, version: str, content_length: int, header_length: str | None,
                 request_id: str):
        self.model = model
        self.version = version
        self.content_length = content_length
        self.header_length = header_length
        self.request_id = request_id


def parse_head(head: bytes) -> _Head | None:
    """The request head if this is the hot request shape, else None (aiohttp serves it)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        return None
    m = _INFER_PATH.fullmatch(parts[1])
    if m is None:
        return None
    content_length = -1
    header_length = None
    request_id = b""
    x_request_id = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in b" \t" or line[:1] in b" \t":
            return None  # malformed, or obsolete line folding
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if content_length >= 0 or not value.isdigit():
                return None
            content_length = int(value)
        elif name == b"inference-header-content-length":
            if header_length is not None:
                return None
            header_length = value.decode("latin-1")
        elif name == b"geogate-request-id":
            request_id = value
        elif name == b"x-request-id":
            x_request_id = value
        elif name in _REFUSED_HEADERS:
            return None
        elif name == b"content-encoding":
            if value.lower() != b"identity":
                return None
        elif name == b"connection":
            tokens = value.lower()
            if b"close" in tokens or b"upgrade" in tokens:
                return None
    if content_length < 0:
        return None
    version = m.group(2)
    return _Head(m.group(1).decode(), version.decode() if version is not None else "", content_length, header_length,
                 (request_id or x_request_id).decode("latin-1"))


class FastInferProtocol(asyncio.Protocol):
    """One client connection, served here while its requests are the hot shape."""

    def __init__(self, server: FastPathServer):
        self._server = server
        self._loop = server.loop
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False  # a request is being answered (the next one waits in the buffer)
        self._paused = False
        self._closing = False
        self._task: asyncio.Task | None = None  # the answer in progress (held: the loop keeps weak refs)
        self.last_active = 0.0

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        tcp_nodelay(self._transport, True)
        self.last_active = self._loop.time()
        self._server.fast_connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._busy:
            if len(self._buf) > PAUSE_READING_BYTES and not self._paused:
                self._paused = True
                self._transport.pause_reading()
            return
        self._next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.fast_connections.discard(self)
        self._transport = None

    # ------------------------------------------------------------------ requests

    def _next_request(self) -> None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                self._hand_over()
            return
        head = parse_head(bytes(buf[:end]))
        if head is None or head.content_length > self._server.max_body_bytes:
            self._hand_over()
            return
        total = end + 4 + head.content_length
        if len(buf) < total:
            return
        with memoryview(buf) as view:
            body = bytes(view[end + 4:total])
        del buf[:total]
        self._busy = True
        self.last_active = self._loop.time()
        self._task = self._loop.create_task(self._answer(head, body))

    async def _answer(self, head: _Head, body: bytes) -> None:
        try:
            status, payload, content_type, version, json_length = await self._server.infer(
                head.model, head.version, body, head.header_length, head.request_id)
        except Exception:  # the shared path turns every failure into an answer; this is a last resort
            log.exception("inference failed on the fast path")
            status, payload, content_type, version, json_length = 500, b'{"error":"internal error"}', \
                "application/json", "", None
        self._task = None
        transport = self._transport
        if transport is None or transport.is_closing():
            self._busy = False
            self._server.answered()
            return  # the client went away
        parts = [_STATUS_LINES.get(status) or _status_line(status), b"Content-Type: ", content_type.encode(),
                 b"\r\nContent-Length: ", str(len(payload)).encode(), b"\r\nDate: ", _DATE.get(), b"\r\n"]
        if version:
            parts += (b"geogate-model-version: ", version.encode(), b"\r\n")
        if json_length is not None:
            parts += (b"Inference-Header-Content-Length: ", str(json_length).encode(), b"\r\n")
        parts.append(b"\r\n")
        transport.writelines([b"".join(parts), payload])
        self._busy = False
        self.last_active = self._loop.time()
        self._server.answered()
        if self._closing:
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._buf:
            self._next_request()

    def _hand_over(self) -> None:
        """From now on aiohttp serves this connection, starting with the bytes not yet consumed."""
        transport = self._transport
        self._server.fast_connections.discard(self)
        self._transport = None
        handler = self._server.aiohttp_server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._paused:
            transport.resume_reading()
        data = bytes(self._buf)
        self._buf.clear()
        if data:
            handler.data_received(data)

    # ------------------------------------------------------------------ lifecycle

    def close_when_idle(self) -> None:
        """Shutdown or keep-alive expiry: close now if idle, else right after the current answer."""
        self._closing = True
        if not self._busy and self._transport is not None:
            self._transport.close()

    @property
    def busy(self) -> bool:
        return self._busy


class FastPathServer:
    """aiohttp's `web.Server` (the protocol factory a site listens with), with connections
    starting on the fast path. Everything else is aiohttp's, and shutdown covers both kinds."""

    def __init__(self, aiohttp_server: web.Server, infer: InferFn, max_body_bytes: int):
        self.aiohttp_server = aiohttp_server
        self.infer = infer
        self.max_body_bytes = max_body_bytes
        self.loop = asyncio.get_running_loop()
        self.fast_connections: set[FastInferProtocol] = set()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)
        self._all_idle: asyncio.Event | None = None  # set during shutdown, once no answer is pending

    def __call__(self) -> FastInferProtocol:
        return FastInferProtocol(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.aiohttp_server, name)

    def _sweep(self) -> None:
        deadline = self.loop.time() - KEEPALIVE_TIMEOUT_S
        for conn in list(self.fast_connections):
            if not conn.busy and conn.last_active < deadline:
                conn.close_when_idle()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def answered(self) -> None:
        if self._all_idle is not None and not any(c.busy for c in self.fast_connections):
            self._all_idle.set()

    def pre_shutdown(self) -> None:
        for conn in list(self.fast_connections):
            conn.close_when_idle()
        self.aiohttp_server.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """Answers in progress finish (bounded by `timeout`), then every connection closes."""
        self._sweeper.cancel()
        self._all_idle = asyncio.Event()
        self.answered()
        if timeout and not self._all_idle.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_idle.wait(), timeout)
        for conn in list(self.fast_connections):
            with contextlib.suppress(Exception):
                conn._closing = True
                if conn._transport is not None:
                    conn._transport.close()
        self.fast_connections.clear()
        await self.aiohttp_server.shutdown(timeout)


class FastPathAppRunner(web.AppRunner):
    """An AppRunner whose sites start every connection on the fast inference path."""

    def __init__(self, app: web.Application, infer: InferFn, max_body_bytes: int, **kwargs: Any):
        super().__init__(app, **kwargs)
        self._infer = infer
        self._max_body_bytes = max_body_bytes

    async def _make_server(self) -> Any:
        return FastPathServer(await super()._make_server(), self._infer, self._max_body_bytes)
