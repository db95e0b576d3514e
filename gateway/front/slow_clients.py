"""Slow and malformed clients on the client listener: a guard around aiohttp's protocol of each
connection reads the request stream with llhttp (httptools) to bound every request-head phase
(timeout, size) that aiohttp itself does not, pipelined requests included, and refuses a
malformed head early; the listener's logger turns a client's malformed HTTP that aiohttp meets
into one rate-limited warning line."""

from __future__ import annotations

import asyncio
import logging

import httptools
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.front.request_checks import ClientErrorLog

JSON = "application/json"
LISTENER_LOGGER = "geogate.gateway.http.listener"


_408 = "request head not received within {ms} ms ([limits] request_head_timeout_ms)"
_431 = "request line and headers are larger than {n} bytes ([limits] max_header_bytes)"
_REQUEST_LINE = len(b"  HTTP/1.1\r\n") + len(b"\r\n")  # around method and target; the blank line
_HEADER_LINE = len(b": \r\n")


def _raw_error(status: int, reason: str, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {JSON}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class _Refused(Exception):
    """Raised in a parser callback to stop parsing the packet (the refusal is on the guard)."""


class SlowClientGuard(asyncio.Protocol):
    """Wraps aiohttp's protocol of one client connection and watches each request's HEAD phase,
    which aiohttp itself does not bound (its keep-alive timer only covers silence): from the
    first byte of a request (or the connection opening) to its blank line must take at most
    ``head_timeout_s`` and ``max_head_bytes``. A slowloris sender dribbling header bytes gets 408
    and a closed connection; an oversized head 431; a malformed one 400 (JSON bodies). Every byte
    goes through an llhttp request parser (its callbacks mark where heads begin and end and where
    requests end; bodies cost it almost nothing), so pipelined requests and every request on a
    keep-alive connection are held to the same bounds.

    The head's size is the request line and header lines as llhttp reads them (method, target,
    names and values, their separators), and at least every byte of the packets that arrived
    wholly inside the head (padding between tokens cannot hide a long head across packets).

    Order on the wire: a refusal is written only when aiohttp has answered every earlier request
    on the connection (the front calls ``request_done`` after each): a pipelined oversized head
    waits for that, its bytes dropped; a pipelined malformed one is left to aiohttp, which
    answers it in order (400, logged by ``ListenerLog``); a pipelined head's clock starts then.
    The request body is bounded by the handler (``request_body_timeout_ms``). One sweep task per
    listener checks deadlines (no timer per request on the hot path)."""

    __slots__ = ("_answered", "_began", "_parser", "_passed", "_pending", "_raw", "_since", "_size", "guards",
                 "inner", "limits", "state", "transport")

    HEAD, IN_REQUEST, IDLE, CLOSED, REFUSING, PASS = range(6)

    def __init__(self, inner: asyncio.Protocol, limits: GuardLimits, guards: dict) -> None:
        self.inner = inner
        self.limits = limits
        self.guards = guards
        self.transport: asyncio.Transport | None = None
        self.state = self.HEAD  # waiting for the first request from the connection's opening
        self._parser = httptools.HttpRequestParser(self)
        self._since = 0.0  # when the current head phase began
        self._began = False  # a byte of the current head arrived
        self._size = 0  # the current head's size as llhttp read it so far
        self._raw = 0  # bytes of packets wholly inside the current head (-1: it began in this packet)
        self._passed = 0  # request heads handed to aiohttp
        self._answered = 0  # requests the front has answered (request_done)
        self._pending: tuple[int, str, str] | None = None  # a refusal waiting for earlier answers

    # asyncio.Protocol, delegated
    def connection_made(self, transport) -> None:
        self.transport = transport
        self._since = asyncio.get_running_loop().time()
        self.guards[transport] = self
        self.inner.connection_made(transport)

    def connection_lost(self, exc) -> None:
        self.state = self.CLOSED
        self._parser = None  # it holds our callbacks: no cycle keeps aiohttp's protocol alive
        self.guards.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def eof_received(self):
        return self.inner.eof_received()

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state >= self.CLOSED:  # CLOSED, REFUSING: dropped; PASS: aiohttp reads it alone
            if state == self.PASS:
                self.inner.data_received(data)
            return
        passed = self._passed
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.state = self.PASS  # Upgrade / CONNECT: what follows is not HTTP/1.1 (aiohttp decides)
        except httptools.HttpParserError as exc:
            if not self._refused(exc, earlier_bytes=state == self.IN_REQUEST or self._passed > passed):
                return
        else:
            if self.state == self.HEAD and self._began:  # the head goes on in the next packet
                if self._raw < 0:
                    self._raw = 0
                    if self._since < 0:
                        self._since = self.limits.loop.time()
                else:
                    self._raw += len(data)
                    if self._raw > self.limits.max_head_bytes:
                        self._refuse_in_order(431, "Request Header Fields Too Large",
                                              _431.format(n=self.limits.max_head_bytes))
                        return
        self.inner.data_received(data)

    def _refused(self, exc: Exception, earlier_bytes: bool) -> bool:
        """A parse error or a callback's refusal (431): refuse now, or after aiohttp's earlier
        answers. Whether the packet still goes to aiohttp: only when it may hold bytes of an
        earlier request (aiohttp may then read the refused one too: the connection closes after
        the earlier answer all the same)."""
        if self._pending is None:  # malformed
            if self._passed == self._answered:
                self._log_malformed(exc)
                self.refuse(400, "Bad Request", f"malformed HTTP request: {_reason(exc)}")
                return False
            self.state = self.PASS  # behind a request aiohttp has not answered: it answers in order
            return True
        if self._passed == self._answered:
            self.refuse(*self._pending)
            return False
        self.state = self.REFUSING
        return earlier_bytes

    # llhttp callbacks (httptools calls only those defined)
    def on_message_begin(self) -> None:
        if self.state != self.HEAD or self._began:  # not the connection's first head (timed from its opening)
            self._since = -1.0  # read the clock after the packet, only if this head goes on past it
        self.state = self.HEAD
        self._began = True
        self._size = 0
        self._raw = -1

    def on_url(self, url: bytes) -> None:
        self._size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + _HEADER_LINE
        if self._size > self.limits.max_head_bytes:
            self._too_large()

    def on_headers_complete(self) -> None:
        if self._size + _REQUEST_LINE + len(self._parser.get_method()) > self.limits.max_head_bytes:
            self._too_large()
        self.state = self.IN_REQUEST
        self._began = False
        self._passed += 1

    def on_message_complete(self) -> None:
        if self.state == self.IN_REQUEST:
            self.state = self.IDLE

    def _too_large(self) -> None:
        self._pending = (431, "Request Header Fields Too Large", _431.format(n=self.limits.max_head_bytes))
        raise _Refused

    # called by the front
    def request_done(self) -> None:
        """The front answered one request: a refusal waiting for it goes out after its answer
        (aiohttp writes that answer before it next yields to the loop), and a pipelined head's
        clock starts now."""
        self._answered += 1
        if self._passed != self._answered:
            return
        if self.state == self.REFUSING and self._pending is not None:
            self.limits.loop.call_soon(self.refuse, *self._pending)
        elif self.state == self.HEAD:
            self._since = self.limits.loop.time()

    def _refuse_in_order(self, status: int, reason: str, message: str) -> None:
        if self._passed == self._answered:
            self.refuse(status, reason, message)
        else:
            self._pending = (status, reason, message)
            self.state = self.REFUSING  # the rest is dropped: aiohttp gets no more of this connection

    def refuse(self, status: int, reason: str, message: str) -> None:
        if self.state == self.CLOSED or self.transport is None:
            return
        self.state = self.CLOSED
        if self._began or status != 408:  # nothing was sent: nothing to answer
            self.transport.write(_raw_error(status, reason, message))
        self.transport.close()

    def expired(self, now_s: float) -> bool:
        return (self.state == self.HEAD and self._passed == self._answered
                and now_s - self._since > self.limits.head_timeout_s)

    def _log_malformed(self, exc: Exception) -> None:
        log = self.limits.malformed_log
        if log is not None:
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            who = f" from {peer[0]}" if isinstance(peer, tuple) and peer else ""
            log.refused(f"a malformed HTTP request{who}", _reason(exc))


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


class GuardLimits:
    """The guard's bounds, shared by the guards of one listener; ``malformed_log`` is where
    refused malformed requests are counted (the listener's rate-limited log by default)."""

    __slots__ = ("head_timeout_s", "loop", "malformed_log", "max_head_bytes")

    def __init__(self, head_timeout_s: float, max_head_bytes: int, malformed_log: ClientErrorLog | None = None
                 ) -> None:
        self.head_timeout_s = head_timeout_s
        self.max_head_bytes = max_head_bytes
        self.malformed_log = malformed_log if malformed_log is not None else \
            ClientErrorLog(logging.getLogger(LISTENER_LOGGER))
        self.loop: asyncio.AbstractEventLoop | None = None


class GuardedSockSite(web.BaseSite):
    """A listening socket whose every connection's protocol is aiohttp's, wrapped in a
    SlowClientGuard. A site of its own (aiohttp's extension point for listeners: ``BaseSite``
    subclasses create their server in ``start``) over the runner's public ``server`` factory."""

    __slots__ = ("_guards", "_limits", "_listen_sock", "_listen_ssl", "_site_name", "_web_runner")

    def __init__(self, runner: web.BaseRunner, sock, *, limits: GuardLimits, guards: dict,
                 ssl_context=None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self._web_runner = runner
        self._listen_sock = sock
        self._listen_ssl = ssl_context
        self._limits = limits
        self._guards = guards
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
        limits, guards = self._limits, self._guards
        kw = {"ssl_handshake_timeout": limits.head_timeout_s} if self._listen_ssl is not None else {}
        # BaseSite.stop() closes what start() puts in _server (the contract of a site)
        self._server = await loop.create_server(lambda: SlowClientGuard(factory(), limits, guards),
                                               sock=self._listen_sock, ssl=self._listen_ssl, backlog=1024, **kw)


async def sweep_slow_clients(guards: dict, limits: GuardLimits) -> None:
    """Cut off connections whose request head is overdue (run as a task per worker)."""
    interval = min(1.0, max(0.05, limits.head_timeout_s / 4))
    message = _408.format(ms=round(limits.head_timeout_s * 1000))
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        now = loop.time()
        for guard in [g for g in guards.values() if g.expired(now)]:
            guard.refuse(408, "Request Timeout", message)


class ListenerLog:
    """The client listener's aiohttp server logger. aiohttp logs a request it cannot parse (a
    client's malformed HTTP: 400) with a traceback at error level; here that is one rate-limited
    warning line. A handler that raised (a gateway bug: 500) stays at error with its traceback,
    rate-limited too, so a client that finds one cannot flood the log with it."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.malformed = ClientErrorLog(logger)
        self.crashes = ClientErrorLog(logger)

    def debug(self, *args, **kw) -> None:
        self.logger.debug(*args, **kw)

    def warning(self, *args, **kw) -> None:
        self.logger.warning(*args, **kw)

    def exception(self, msg: str, *args, exc_info=True, **kw) -> None:
        if isinstance(exc_info, HttpProcessingError):
            peer = f" from {args[0]}" if args else ""
            self.malformed.refused(f"a malformed HTTP request{peer}", exc_info.message or str(exc_info))
        elif self.crashes.allow():
            self.logger.error(msg, *args, exc_info=exc_info, **kw)
