"""A minimal HTTP/1.1 keep-alive client for the inference hot path.

Why not aiohttp's ClientSession here: profiling the gateway showed ClientSession's request
machinery (request/response objects, header multidicts, timers, tracing hooks, stream
readers) costing about as much CPU per proxied request as everything else the gateway does
(PLATFORM-NOTES: a naive aiohttp proxy reached 0.55x HAProxy). Forwarding an inference needs
much less: write one request with a known body, read one response on a pooled connection.
ClientSession is still used for everything else. Answers are parsed by llhttp (httptools, the
parser uvicorn and aiohttp use): status, headers, Content-Length, chunked and read-until-close
bodies, keep-alive, answers without a body (HEAD, 1xx, 204, 304); a malformed answer fails the
request (UpstreamReset) and the connection is dropped.

Per replica a ``ConnectionPool`` keeps idle connections (LIFO, so few stay warm) up to a
limit; callers beyond the limit wait for a connection to come back. A reused connection that
dies before any byte of the answer arrived (the replica closed it while idle) is retried
once on a fresh connection: nothing was processed, and inference is idempotent anyway.
"""

from __future__ import annotations

import asyncio
import collections
import math
import socket
import ssl

import httptools

CRLF = b"\r\n"
MAX_HEADER_BYTES = 64 * 1024  # an answer's status line and headers (llhttp itself has no bound)


class UpstreamConnectError(ConnectionError):
    """Could not open a connection (nothing was sent)."""


class UpstreamReset(ConnectionError):
    """The connection died before the whole answer arrived, or the answer was malformed."""


class UpstreamTimeout(TimeoutError):
    """No complete answer within the time given."""


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers  # lower-case names
        self.body = body


class _Conn(asyncio.Protocol):
    """One pooled connection: an asyncio protocol that hands each answer to the waiter of the
    request in flight. It is also the httptools parser's callback object (on_* methods); the
    parser lives as long as the connection (llhttp keeps its state across answers)."""

    __slots__ = ("_body", "_got_bytes", "_head_bytes", "_head_only", "_headers", "_parser", "_status", "_waiter",
                 "closed", "keep_alive", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future | None = None
        self._status = 0  # 0 until the current answer's head is complete
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._head_bytes = 0  # bytes of an answer head that spans packets, against MAX_HEADER_BYTES
        self._head_only = False  # the request was HEAD: its answer has no body, whatever it says
        self._got_bytes = False
        self.closed = False
        self.keep_alive = True

    # -------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._waiter is not None:
            self._try_parse(data)
        elif data:  # bytes nobody asked for: the connection is unusable
            self.keep_alive = False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._parser = None  # it holds our callbacks: break the cycle
        w = self._waiter
        if w is None or w.done():
            return
        if self._status >= 200 and "content-length" not in self._headers \
                and "chunked" not in self._headers.get("transfer-encoding", "").lower():
            self._finish()  # an answer without a length ends when the connection does
            return
        w.set_exception(UpstreamReset(f"connection closed by the replica{': ' + str(exc) if exc else ''}"))

    # -------------------------------------------------------------- parsing (llhttp)

    def _try_parse(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamReset("the replica switched protocols (101) on an inference request"))
            return
        except httptools.HttpParserError as exc:
            self._fail(UpstreamReset(f"malformed answer from the replica: {exc}"))
            return
        if self._waiter is None:
            return
        if self._status == 0:  # the head goes on in the next packet
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._fail(UpstreamReset(f"answer head larger than {MAX_HEADER_BYTES} bytes"))
        elif self._head_only:
            # The answer to a HEAD ends with its head, but llhttp does not know the request was
            # HEAD and would read Content-Length bytes as its body: a fresh parser reads the next.
            self._parser = httptools.HttpResponseParser(self)
            if self._body or self._headers.get("connection", "").lower() == "close":
                self.keep_alive = False
            self._body = []
            self._finish()

    def on_message_begin(self) -> None:
        if self._waiter is None:  # a second answer to one request: the connection is out of step
            self.keep_alive = False
        self._headers = {}
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._waiter is None:  # bytes after the answer (a HEAD answer with a body, say)
            self.keep_alive = False
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._waiter is None:
            self.keep_alive = False
            return
        if self._status < 200:  # an interim answer (100 Continue, 103): the real one follows
            self._status = 0
            self._headers = {}
            return
        if not self._parser.should_keep_alive():
            self.keep_alive = False
        if self._head_only and self._body:  # a body after a HEAD answer: out of step from here on
            self.keep_alive = False
            self._body = []
        self._finish()

    def _finish(self) -> None:
        parts = self._body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        w = self._waiter
        resp = Response(self._status, self._headers, body)
        self._reset_state()
        if w is not None and not w.done():
            w.set_result(resp)

    def _fail(self, exc: Exception) -> None:
        self.keep_alive = False
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _reset_state(self) -> None:
        self._waiter = None
        self._status = 0
        self._head_bytes = 0
        self._body = []

    # -------------------------------------------------------------- one exchange

    def send(self, data: bytes | list[bytes], waiter: asyncio.Future, head_only: bool = False) -> None:
        self._waiter = waiter
        self._head_only = head_only
        self._got_bytes = False
        transport = self.transport
        assert transport is not None
        # The peer may have closed the connection with its connection_lost not yet delivered
        # (uvloop then refuses the write with RuntimeError): a reset, which post() retries on a
        # fresh connection when this one was reused and nothing was sent.
        if transport.is_closing():
            raise UpstreamReset("connection closed by the replica")
        try:
            if isinstance(data, list):
                transport.writelines(data)
            else:
                transport.write(data)
        except RuntimeError as exc:
            raise UpstreamReset(f"connection closed by the replica: {exc}") from None

    def abort(self) -> None:
        self.keep_alive = False
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


SMALL_BODY_BYTES = 32 * 1024  # below this, header and body go out in one write


class ConnectionPool:
    """Keep-alive connections to one HOST:PORT.

    Invariant, on every path (errors and cancellation at any step included): each connection
    counted in ``_open`` is idle in ``_idle``, being opened, or held by exactly one ``post`` that
    gives it back (``_release``) before it returns or raises; ``stats()`` shows it (``busy`` is 0
    whenever no request is in flight)."""

    def __init__(self, address: str, *, max_connections: int, connect_timeout_s: float = 2.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.ssl_context = ssl_context  # set: TLS (mutual when it holds a client certificate)
        self.host_header = address.encode()
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[_Conn] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._tasks: set[asyncio.Task] = set()  # connections being opened for a waiter
        self._closed = False

    def stats(self) -> dict[str, int]:
        """Connections: open (idle + busy + being opened), idle, busy, and callers waiting for one."""
        idle = len(self._idle)
        return {"open": self._open, "idle": idle, "busy": self._open - idle - len(self._tasks),
                "waiting": sum(1 for w in self._waiters if not w.done())}

    async def _connect(self, timeout_s: float) -> _Conn:
        loop = asyncio.get_running_loop()
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the connection when a
        # cancellation (a hedge that lost) lands just as the connection completes, and the
        # cancelled attempt would then send its request and wait for an answer nobody reads.
        try:
            async with asyncio.timeout(timeout_s):
                if self.ssl_context is None:
                    _, conn = await loop.create_connection(_Conn, self.host, self.port)
                else:
                    _, conn = await loop.create_connection(
                        _Conn, self.host, self.port, ssl=self.ssl_context, server_hostname=self.host,
                        ssl_handshake_timeout=timeout_s)
        except TimeoutError:
            if timeout_s < self.connect_timeout_s:  # the request's own time ran out, not the replica's chance
                raise UpstreamTimeout(f"no connection to {self.host}:{self.port} within the {timeout_s * 1000:.2g} ms "
                                      "left") from None
            raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: no connection within "
                                       f"{timeout_s * 1000:.0f} ms") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: "
                                       f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
                                       ) from None
        return conn

    def _take_idle(self) -> _Conn | None:
        """An idle connection still fit to carry a request (the unfit ones are dropped), or None."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.keep_alive and not conn.transport.is_closing():
                return conn
            self._open -= 1
            conn.abort()
        return None

    async def _acquire(self, connect_timeout_s: float) -> tuple[_Conn, bool]:
        """(connection, reused?)."""
        conn = self._take_idle()
        if conn is not None:
            return conn, True
        if self._open >= self.max_connections:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                return await fut, True
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._release(fut.result())  # handed to us just as we gave up: pass it on
                raise
        self._open += 1
        try:
            return await self._connect(connect_timeout_s), False
        except BaseException:
            self._open -= 1
            self._wake_one()  # the slot is free again
            raise

    def _next_waiter(self) -> asyncio.Future | None:
        """The oldest caller still waiting (those that gave up are skipped)."""
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                return w
        return None

    def _wake_one(self) -> None:
        """A slot came free: open a new connection for the oldest waiter, if any."""
        if self._closed or self._open >= self.max_connections:
            return
        w = self._next_waiter()
        if w is not None:
            self._open += 1  # reserved now, so no other caller takes the slot meanwhile
            task = asyncio.get_running_loop().create_task(self._hand_new(w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _release(self, conn: _Conn) -> None:
        if conn.closed or not conn.keep_alive or self._closed:
            self._open -= 1
            conn.abort()
            self._wake_one()
            return
        w = self._next_waiter()
        if w is not None:
            w.set_result(conn)
            return
        self._idle.append(conn)

    async def _hand_new(self, w: asyncio.Future) -> None:
        """Open a connection for waiter `w` (its slot is already counted in ``_open``)."""
        try:
            conn = await self._connect(self.connect_timeout_s)
        except BaseException as exc:
            self._open -= 1
            if not w.done():
                if isinstance(exc, Exception):
                    w.set_exception(exc)
                else:
                    w.cancel()
            else:
                self._wake_one()  # that waiter gave up: the next one may still want the slot
            if not isinstance(exc, Exception):
                raise
            return
        if w.done():
            self._release(conn)
        else:
            w.set_result(conn)

    def _request_bytes(self, path: str, body: bytes, headers: dict[str, str],
                       method: bytes = b"POST") -> bytes | list[bytes]:
        head = [method, b" ", path.encode(), b" HTTP/1.1\r\nHost: ", self.host_header,
                b"\r\nContent-Length: ", str(len(body)).encode(), CRLF]
        for k, v in headers.items():
            head += [k.encode(), b": ", v.encode("latin-1"), CRLF]
        head.append(CRLF)
        if len(body) <= SMALL_BODY_BYTES:
            head.append(body)
            return b"".join(head)
        return [b"".join(head), body]

    async def post(self, path: str, body: bytes, headers: dict[str, str], timeout_s: float, *,
                   method: bytes = b"POST") -> Response:
        """One POST (or `method`: the answer to HEAD has no body, whatever its headers say) and its
        answer within `timeout_s` (UpstreamTimeout after it, UpstreamReset or UpstreamConnectError
        when the connection fails or the answer is malformed). The connection taken from the pool
        goes back to it whatever happens after (dropped unless it can carry the next request)."""
        if not 0.0 < timeout_s < math.inf:  # NaN included: loop.call_at(NaN) raises
            raise UpstreamTimeout(f"no time to send the request (timeout {timeout_s!r} s)")
        loop = asyncio.get_running_loop()
        data = self._request_bytes(path, body, headers, method)
        head_only = method == b"HEAD"
        deadline = loop.time() + timeout_s
        for _try in range(2):
            # An idle connection is taken without a coroutine (the usual case under load).
            conn, reused = self._take_idle(), True
            if conn is None:
                conn, reused = await self._acquire_until(deadline)
            try:
                waiter = loop.create_future()
                timer = _arm_timer(loop, deadline, waiter)
                try:
                    conn.send(data, waiter, head_only)
                    resp = await waiter
                finally:
                    timer.cancel()
            except UpstreamReset:
                got_bytes = conn._got_bytes
                conn.abort()
                self._release(conn)
                if reused and not got_bytes and loop.time() < deadline:
                    continue  # the replica had closed this idle connection: try a fresh one
                raise
            except BaseException:
                conn.abort()  # timeout, cancellation or anything else: the answer may still come; drop it
                self._release(conn)
                raise
            self._release(conn)
            return resp
        raise UpstreamReset("connection closed by the replica twice")

    async def _acquire_until(self, deadline: float) -> tuple[_Conn, bool]:
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if not left > 0:
            raise UpstreamTimeout("no time left")
        if self._idle or self._open < self.max_connections:
            return await self._acquire(min(left, self.connect_timeout_s))
        try:
            async with asyncio.timeout(left):  # not wait_for: see _connect
                return await self._acquire(min(left, self.connect_timeout_s))
        except TimeoutError:
            raise UpstreamTimeout(f"all {self.max_connections} connections to {self.host}:{self.port} "
                                  "stayed busy") from None

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.abort()
        self._open -= len(self._idle)
        self._idle.clear()
        for w in self._waiters:
            if not w.done():
                w.cancel()
        self._waiters.clear()


def _arm_timer(loop: asyncio.AbstractEventLoop, deadline: float, waiter: asyncio.Future) -> asyncio.TimerHandle:
    """The answer's timeout (loop.call_at raises for a NaN deadline: once outside the try that
    gives the connection back, which leaked it)."""
    return loop.call_at(deadline, _expire, waiter)


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("timed out"))
