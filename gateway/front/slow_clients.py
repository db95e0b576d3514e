"""Slow and malformed clients on the client listener: a guard around aiohttp's protocol of each
connection bounds the request-head phase (timeout, size) that aiohttp itself does not, and the
listener's logger turns a client's malformed HTTP into one rate-limited warning line."""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.front.request_checks import ClientErrorLog

JSON = "application/json"


_408 = "request head not received within {ms} ms ([limits] request_head_timeout_ms)"
_431 = "request line and headers are larger than {n} bytes ([limits] max_header_bytes)"


def _raw_error(status: int, reason: str, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {JSON}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class SlowClientGuard(asyncio.Protocol):
    """Wraps aiohttp's protocol of one client connection and watches the request HEAD phase,
    which aiohttp itself does not bound (its keep-alive timer only covers silence): from the
    first byte of a request (or the connection opening) to its blank line must take at most
    ``head_timeout_s`` and ``max_head_bytes``. A slowloris sender dribbling header bytes gets 408
    and a closed connection; an oversized head 431. The request body is bounded by the handler
    (``request_body_timeout_ms``). One sweep task per listener checks deadlines (no timer per
    request on the hot path)."""

    __slots__ = ("_seen", "_since", "_tail", "guards", "inner", "limits", "state", "transport")

    IDLE, HEAD, IN_REQUEST, CLOSED = range(4)

    def __init__(self, inner: asyncio.Protocol, limits: GuardLimits, guards: dict) -> None:
        self.inner = inner
        self.limits = limits
        self.guards = guards
        self.transport: asyncio.Transport | None = None
        self.state = self.HEAD
        self._since = 0.0
        self._seen = 0
        self._tail = b""

    # asyncio.Protocol, delegated
    def connection_made(self, transport) -> None:
        self.transport = transport
        self._since = asyncio.get_running_loop().time()
        self.guards[transport] = self
        self.inner.connection_made(transport)

    def connection_lost(self, exc) -> None:
        self.state = self.CLOSED
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
        if state == self.IN_REQUEST:
            self.inner.data_received(data)
            return
        if state == self.IDLE:
            self.state = self.HEAD
            self._since = self.limits.loop.time()
            self._seen = 0
            self._tail = b""
        elif state == self.CLOSED:
            return
        buf = self._tail + data if self._tail else data
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            if self._seen + end - len(self._tail) + 4 > self.limits.max_head_bytes:
                self.refuse(431, "Request Header Fields Too Large", _431.format(n=self.limits.max_head_bytes))
                return
            self.state = self.IN_REQUEST
        else:
            self._seen += len(data)
            if self._seen > self.limits.max_head_bytes:
                self.refuse(431, "Request Header Fields Too Large", _431.format(n=self.limits.max_head_bytes))
                return
            self._tail = buf[-3:]
        self.inner.data_received(data)

    # called by the front
    def request_started(self) -> None:
        self.state = self.IN_REQUEST

    def request_done(self) -> None:
        if self.state == self.IN_REQUEST:
            self.state = self.IDLE

    def refuse(self, status: int, reason: str, message: str) -> None:
        if self.state == self.CLOSED or self.transport is None:
            return
        self.state = self.CLOSED
        if self._seen or self._tail or status != 408:  # nothing was sent: nothing to answer
            self.transport.write(_raw_error(status, reason, message))
        self.transport.close()

    def expired(self, now_s: float) -> bool:
        return self.state == self.HEAD and now_s - self._since > self.limits.head_timeout_s


class GuardLimits:
    __slots__ = ("head_timeout_s", "loop", "max_head_bytes")

    def __init__(self, head_timeout_s: float, max_head_bytes: int) -> None:
        self.head_timeout_s = head_timeout_s
        self.max_head_bytes = max_head_bytes
        self.loop: asyncio.AbstractEventLoop | None = None


class GuardedSockSite(web.SockSite):
    """aiohttp's SockSite with every connection's protocol wrapped in a SlowClientGuard."""

    __slots__ = ("_guards", "_limits")

    def __init__(self, runner: web.BaseRunner, sock, *, limits: GuardLimits, guards: dict,
                 ssl_context=None) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context, backlog=1024)
        self._limits = limits
        self._guards = guards

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._limits.loop = loop
        factory = self._runner.server
        limits, guards = self._limits, self._guards
        kw = {"ssl_handshake_timeout": limits.head_timeout_s} if self._ssl_context is not None else {}
        self._server = await loop.create_server(lambda: SlowClientGuard(factory(), limits, guards),
                                               sock=self._sock, ssl=self._ssl_context, backlog=self._backlog, **kw)


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
