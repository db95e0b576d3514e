"""One client connection on the HTTP listener: every byte is parsed once, by llhttp (httptools);
inference requests are answered here, everything else is handed to aiohttp.

Why not aiohttp for everything: profiling a proxied request (perf_analyzer, one replica) put
two thirds of the gateway's CPU per request in aiohttp's per-request machinery (its parser, the
request and response objects, the response writer) and in a second parse of the same bytes by
the slow-client guard; a connection that parses once and writes each answer as one buffer costs
a fraction of that. aiohttp keeps what it does well and what is not hot: metadata, health,
statistics, generate streams, 404/405 answers, upgrades (``InferDoor.route`` says which requests
stay here: POST /v2/models/{m}[/versions/{v}]/infer).

A request that goes to aiohttp is handed over whole, once its body has arrived, re-serialized
from what llhttp read (same method, target, header lines and body; a chunked body as one with a
Content-Length; ``Expect`` dropped, the 100 Continue already sent), to an aiohttp protocol of
this connection made on first use (aiohttp writes its answers on this connection's transport).
An ``Upgrade`` hands the whole connection to aiohttp from there on.

Bounds (README "Security"): each request head must arrive within ``request_head_timeout_ms``
and ``max_header_bytes`` (408 / 431), each body within ``request_body_timeout_ms`` and
``max_body_bytes`` (408 / 413), a malformed request is answered 400; those answers close the
connection (after draining what the client still sends for a moment, so that it reads the
answer). The head's size is the request line and header lines as llhttp reads them, and at
least every byte of the packets that arrived wholly inside the head (padding cannot hide a long
head across packets). Requests are answered one at a time and in order (pipelined ones wait,
at most PIPELINE_DEPTH before the connection stops reading); a refusal of a pipelined request
goes out after the earlier answers. One sweep task per listener (gateway.front.slow_clients)
checks the deadlines: no timer per request on the hot path.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Protocol

import httptools
from aiohttp import web

from gateway.front.slow_clients import GuardLimits, raw_error

WRITE_JOIN_MAX = 64 * 1024
PIPELINE_DEPTH = 8  # complete requests held while an earlier one is answered; then reading pauses
LINGER_S = 2.0  # after a refusal, what the client still sends is read and dropped this long, then close
_REQUEST_LINE = len(b"  HTTP/1.1\r\n") + len(b"\r\n")  # around method and target; the blank line
_HEADER_LINE = len(b": \r\n")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_408_HEAD = "request head not received within {ms} ms ([limits] request_head_timeout_ms)"
_408_BODY = "request body not received within {ms} ms ([limits] request_body_timeout_ms)"
_413 = "request body of {n} bytes is larger than the gateway's limit of {limit} bytes"
_413_STREAM = "request body is larger than the gateway's limit of {limit} bytes"
_431 = "request line and headers are larger than {n} bytes ([limits] max_header_bytes)"
_REASONS = {408: "Request Timeout", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
            400: "Bad Request"}


class ParsedRequest:
    """A whole request as llhttp read it: header names and values as received (bytes)."""

    __slots__ = ("body", "headers", "keep_alive", "method", "target", "url", "version")

    def __init__(self, method: bytes, url: bytes, version: str, headers: list[tuple[bytes, bytes]],
                 body: bytes, keep_alive: bool, target: tuple[str, str | None] | None) -> None:
        self.method = method
        self.url = url
        self.version = version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.target = target  # (model, version) when the infer door serves it

    def serialized(self) -> bytes:
        """The request as bytes again, for aiohttp (Expect and Transfer-Encoding dropped: the
        100 Continue went out already; the body is whole)."""
        lines = [b"%s %s HTTP/%s\r\n" % (self.method, self.url, self.version.encode())]
        for name, value in self.headers:
            low = name.lower()
            if low in (b"expect", b"transfer-encoding", b"content-length"):
                continue
            lines.append(b"%s: %s\r\n" % (name, value))
        if self.body or self.method not in (b"GET", b"HEAD"):
            lines.append(b"Content-Length: %d\r\n" % len(self.body))
        lines.append(b"\r\n")
        lines.append(self.body)
        return b"".join(lines)


class InferDoor(Protocol):
    """What the connection asks of the HTTP front for the requests it answers itself."""

    def route(self, method: bytes, url: bytes) -> tuple[str, str | None] | None:
        """(model, version or None) when this request is an inference the door answers."""

    async def answer(self, req: ParsedRequest, conn: ClientConnection) -> tuple[tuple[bytes, bytes], bool]:
        """The response (head, body) and whether to close the connection after it."""


class _Refused(Exception):
    """Raised in a parser callback to stop parsing the packet (the refusal is on the connection)."""


class ClientConnection(asyncio.Protocol):
    HEAD, BODY, CLOSED, REFUSING, PASS = range(5)

    __slots__ = ("_began", "_body", "_body_size", "_busy", "_continue", "_first", "_half_closed", "_headers",
                 "_inner", "_method", "_parser", "_paused_reading", "_pending", "_queue", "_raw", "_since", "_size",
                 "_target", "_task", "_upgrade", "_url", "_write_paused", "conns", "door", "inner_factory", "limits",
                 "peer", "state", "transport")

    def __init__(self, door: InferDoor | None, inner_factory: Callable[[], asyncio.Protocol], limits: GuardLimits,
                 conns: dict) -> None:
        self.door = door  # None: every request goes to aiohttp
        self.inner_factory = inner_factory
        self.limits = limits
        self.conns = conns  # transport -> connection, for the sweep and the drain
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.state = self.HEAD
        self._parser = httptools.HttpRequestParser(self)
        self._inner: asyncio.Protocol | None = None  # aiohttp's protocol, made on first use
        self._queue: collections.deque[ParsedRequest] = collections.deque()
        self._busy = False  # a request is being answered (here or by aiohttp)
        self._pending: tuple[int, str] | None = None  # a refusal waiting for the earlier answers
        self._paused_reading = False
        self._write_paused = False
        self._since = 0.0  # when the current head or body phase began (-1: read the clock after this packet)
        self._began = False  # a byte of the current head arrived
        self._size = 0  # the current head's size as llhttp read it so far
        self._raw = 0  # bytes of packets wholly inside the current head (-1: it began in this packet)
        self._continue = False  # a 100 Continue is owed once this request's turn comes
        self._first = True
        self._task: asyncio.Task | None = None  # the request answered here (a reference keeps it alive)
        self._upgrade: ParsedRequest | None = None
        self._half_closed = False  # the client shut down its side (eof) while requests were pending
        self._method = b""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._target: tuple[str, str | None] | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) and peer else ""
        self._since = self.limits.loop.time()
        self.conns[transport] = self

    def connection_lost(self, exc) -> None:
        self.state = self.CLOSED
        self._parser = None  # it holds our callbacks: no cycle keeps the connection alive
        self._queue.clear()
        self.conns.pop(self.transport, None)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._inner is not None:
            self._inner.resume_writing()
        if not self._busy:
            self._next()

    def eof_received(self):
        if self._inner is not None and self.state == self.PASS:
            return self._inner.eof_received()
        if (self._busy or self._queue) and self.state != self.CLOSED:
            self._half_closed = True  # the client sent all it will: answer what it asked, then close
            return True
        return None  # nothing left to answer: the transport closes

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state >= self.CLOSED:  # CLOSED, REFUSING: dropped; PASS: aiohttp reads it alone
            if state == self.PASS:
                self._inner.data_received(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._pass_upgrade(data[upgrade.args[0]:] if upgrade.args else b"")
            return
        except httptools.HttpParserError as exc:
            self._malformed(exc)
            return
        if self.state == self.HEAD and self._began:  # the head goes on in the next packet
            if self._raw < 0:
                self._raw = 0
                if self._since < 0:
                    self._since = self.limits.loop.time()
            else:
                self._raw += len(data)
                if self._raw > self.limits.max_head_bytes:
                    self._refuse_in_order(431, _431.format(n=self.limits.max_head_bytes))
        elif self.state == self.BODY and self._since < 0:
            self._since = self.limits.loop.time()

    # ------------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        if self._first:
            self._first = False  # the connection's first head is timed from its opening
        else:
            self._since = -1.0  # read the clock after the packet, only if this head goes on past it
        self.state = self.HEAD
        self._url = b""
        self._began = True
        self._size = 0
        self._raw = -1
        self._headers = []
        self._body = []
        self._body_size = 0
        self._continue = False

    def on_url(self, url: bytes) -> None:
        self._size += len(url)
        self._url += url  # llhttp may give the target in pieces (split across packets)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + _HEADER_LINE
        if self._size > self.limits.max_head_bytes:
            self._too_large()
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        method = parser.get_method()
        if self._size + _REQUEST_LINE + len(method) > self.limits.max_head_bytes:
            self._too_large()
        self._method = method
        self._began = False
        self.state = self.BODY
        self._since = -1.0
        door = self.door
        self._target = door.route(method, self._url) if door is not None else None
        limit = self.limits.max_body_bytes
        expect = False
        for name, value in self._headers:
            if len(name) == 14 and name.lower() == b"content-length":
                if value.isdigit() and int(value) > limit:
                    self._pending = (413, _413.format(n=int(value), limit=limit))
                    raise _Refused
            elif len(name) == 6 and name.lower() == b"expect":
                expect = value.lower() == b"100-continue" and parser.get_http_version() == "1.1"
        if expect:
            if self._busy or self._queue:
                self._continue = True  # sent when this request's turn comes
            else:
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.limits.max_body_bytes:
            self._pending = (413, _413_STREAM.format(limit=self.limits.max_body_bytes))
            raise _Refused
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        body = self._body
        req = ParsedRequest(self._method, self._url, parser.get_http_version(), self._headers,
                            body[0] if len(body) == 1 else b"".join(body), parser.should_keep_alive(),
                            self._target)
        self._body = []
        self.state = self.HEAD
        self._since = -1.0 if (self._busy or self._queue) else self.limits.loop.time()
        if parser.should_upgrade():
            self._upgrade = req  # handed to aiohttp with what follows (data_received)
            return
        if self._busy or self._queue or self._write_paused:
            self._queue.append(req)
            if len(self._queue) >= PIPELINE_DEPTH and not self._paused_reading:
                self._paused_reading = True
                self.transport.pause_reading()
        else:
            self._start(req)

    def _too_large(self) -> None:
        self._pending = (431, _431.format(n=self.limits.max_head_bytes))
        raise _Refused

    # ------------------------------------------------------------------ answering

    def _start(self, req: ParsedRequest) -> None:
        self._busy = True
        if req.target is not None:
            self._task = self.limits.loop.create_task(self._answer_here(req))
        else:
            inner = self._inner
            if inner is None:
                inner = self._inner = self.inner_factory()
                inner.connection_made(self.transport)
            inner.data_received(req.serialized())  # aiohttp answers, then calls request_done

    async def _answer_here(self, req: ParsedRequest) -> None:
        try:
            response, close = await self.door.answer(req, self)
        except BaseException:
            self._busy = False
            self.close()
            raise
        self._task = None
        transport = self.transport
        if self.state != self.CLOSED and not transport.is_closing():
            head, body = response
            if len(body) < WRITE_JOIN_MAX:
                transport.write(head + body)  # one send; a copy of a small body costs less than a second syscall
            else:
                transport.writelines((head, body))
            if close or not req.keep_alive:
                self.state = self.CLOSED
                transport.close()
        self._done()

    def request_done(self) -> None:
        """aiohttp answered one request of this connection (the front calls this after each):
        the next one goes after it (aiohttp writes its answer before it next yields to the loop)."""
        self.limits.loop.call_soon(self._done)

    def _done(self) -> None:
        self._busy = False
        if self.state == self.CLOSED:
            return
        self._next()

    def _next(self) -> None:
        if self._busy or self._write_paused or self.state == self.CLOSED:
            return
        if self._half_closed and not self._queue:
            self.close()
            return
        if self._queue:
            req = self._queue.popleft()
            if self._paused_reading and len(self._queue) < PIPELINE_DEPTH // 2:
                self._paused_reading = False
                self.transport.resume_reading()
            self._start(req)
            return
        if self.state == self.REFUSING and self._pending is not None:
            self.refuse(*self._pending)
        elif self.state == self.HEAD:
            self._since = self.limits.loop.time()  # idle from now, or a pipelined head's clock starts now
        elif self.state == self.BODY:
            if self._since < 0:
                self._since = self.limits.loop.time()
            if self._continue:
                self._continue = False
                self.transport.write(_CONTINUE)

    # ------------------------------------------------------------------ refusals

    def _malformed(self, exc: Exception) -> None:
        if self._pending is None:  # llhttp's own error, not a callback's refusal
            self._log_malformed(exc)
            self._pending = (400, f"malformed HTTP request: {str(exc) or type(exc).__name__}")
        self._refuse_in_order(*self._pending)

    def _refuse_in_order(self, status: int, message: str) -> None:
        if not self._busy and not self._queue:
            self.refuse(status, message)
        else:
            self._pending = (status, message)
            self.state = self.REFUSING  # the rest is dropped; the refusal follows the earlier answers

    def refuse(self, status: int, message: str) -> None:
        """Answer `status` with ``{"error": message}`` and close: at once when the client sent
        nothing of this request (a silent connection gets no answer), else after LINGER_S of
        reading and dropping what it still sends, so that it reads the answer, not a reset."""
        if self.state == self.CLOSED or self.transport is None:
            return
        silent = self.state == self.HEAD and not self._began
        self.state = self.CLOSED
        transport = self.transport
        if silent and status == 408:
            transport.close()
            return
        transport.write(raw_error(status, _REASONS.get(status, "Error"), message))
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.limits.loop.call_later(LINGER_S, transport.close)

    def overdue(self, now_s: float) -> tuple[int, str] | None:
        """The refusal this connection's client has earned by being slow, if any."""
        if self._busy or self._queue or self._since < 0:
            return None
        state = self.state
        if state == self.HEAD:
            if not self._began and not self._first:  # idle between requests: closed without an answer
                return (408, "idle") if now_s - self._since > self.limits.idle_timeout_s else None
            if now_s - self._since > self.limits.head_timeout_s:
                return 408, _408_HEAD.format(ms=round(self.limits.head_timeout_s * 1000))
        if state == self.BODY and now_s - self._since > self.limits.body_timeout_s:
            return 408, _408_BODY.format(ms=round(self.limits.body_timeout_s * 1000))
        return None

    def close(self) -> None:
        """Close now (the drain's end, a failure)."""
        self.state = self.CLOSED
        if self.transport is not None:
            self.transport.close()

    def _pass_upgrade(self, rest: bytes) -> None:
        """Upgrade / CONNECT: what follows is not HTTP/1.1; aiohttp gets the head and the rest,
        and the connection from then on."""
        req, self._upgrade = self._upgrade, None
        if req is None or self._busy or self._queue:
            self._refuse_in_order(400, "malformed HTTP request: an upgrade must be a connection's only request")
            return
        self.state = self.PASS
        inner = self._inner
        if inner is None:
            inner = self._inner = self.inner_factory()
            inner.connection_made(self.transport)
        inner.data_received(req.serialized() + rest)

    def _log_malformed(self, exc: Exception) -> None:
        log = self.limits.malformed_log
        if log is not None:
            who = f" from {self.peer}" if self.peer else ""
            log.refused(f"a malformed HTTP request{who}", str(exc) or type(exc).__name__)


class ClientSite(web.BaseSite):
    """A listening socket whose every connection is a ClientConnection over the runner's
    aiohttp server (aiohttp's extension point for listeners: ``BaseSite`` subclasses create
    their server in ``start``; the runner's public ``server`` makes aiohttp's protocols)."""

    __slots__ = ("_conns", "_door", "_limits", "_listen_sock", "_listen_ssl", "_site_name", "_web_runner")

    def __init__(self, runner: web.BaseRunner, sock, *, door: InferDoor | None, limits: GuardLimits, conns: dict,
                 ssl_context=None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self._web_runner = runner
        self._listen_sock = sock
        self._listen_ssl = ssl_context
        self._door = door
        self._limits = limits
        self._conns = conns
        host, port = sock.getsockname()[:2]
        self._site_name = f"{'https' if ssl_context else 'http'}://{host}:{port}"

    @property
    def name(self) -> str:
        return self._site_name

    async def start(self) -> None:
        await super().start()  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._limits.loop = loop
        factory = self._web_runner.server
        door, limits, conns = self._door, self._limits, self._conns
        kw = {"ssl_handshake_timeout": limits.head_timeout_s} if self._listen_ssl is not None else {}
        # BaseSite.stop() closes what start() puts in _server (the contract of a site)
        self._server = await loop.create_server(lambda: ClientConnection(door, factory, limits, conns),
                                               sock=self._listen_sock, ssl=self._listen_ssl, backlog=1024, **kw)
