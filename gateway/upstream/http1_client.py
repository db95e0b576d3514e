"""A minimal HTTP/1.1 keep-alive client for the inference hot path.

Why not aiohttp's ClientSession here: profiling the gateway showed ClientSession's request
machinery (request/response objects, header multidicts, timers, tracing hooks, stream
readers) costing about as much CPU per proxied request as everything else the gateway does
(PLATFORM-NOTES: a naive aiohttp proxy reached 0.55x HAProxy). Forwarding an inference needs
much less: write one POST with a known body, read one response with Content-Length (or
chunked) on a pooled connection. ClientSession is still used for everything else.

Per replica a ``ConnectionPool`` keeps idle connections (LIFO, so few stay warm) up to a
limit; callers beyond the limit wait for a connection to come back. A reused connection that
dies before any byte of the answer arrived (the replica closed it while idle) is retried
once on a fresh connection: nothing was processed, and inference is idempotent anyway.
"""

from __future__ import annotations

import asyncio
import collections
import math
import re
import socket
import ssl

CRLF = b"\r\n"
_HEADER_LINE = re.compile(r"\r\n([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)")
HEADER_END = b"\r\n\r\n"
MAX_HEADER_BYTES = 64 * 1024


class UpstreamConnectError(ConnectionError):
    """Could not open a connection (nothing was sent)."""


class UpstreamReset(ConnectionError):
    """The connection died before the whole answer arrived."""


class UpstreamTimeout(TimeoutError):
    """No complete answer within the time given."""


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers  # lower-case names
        self.body = body


class _Conn(asyncio.Protocol):
    __slots__ = ("_body_len", "_buf", "_chunked", "_got_bytes", "_head", "_waiter", "closed", "keep_alive",
                 "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future | None = None
        self._head: tuple[int, dict[str, str]] | None = None
        self._body_len = -1
        self._chunked = False
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
        self._buf += data
        if self._waiter is not None:
            self._try_parse()
        elif len(self._buf) > 0:  # bytes nobody asked for: the connection is unusable
            self.keep_alive = False

    def connection_lost(self, exc) -> None:
        self.closed = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(UpstreamReset(f"connection closed by the replica{': ' + str(exc) if exc else ''}"))

    # -------------------------------------------------------------- parsing

    def _try_parse(self) -> None:
        buf = self._buf
        if self._head is None:
            end = buf.find(HEADER_END)
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    self._fail(UpstreamReset("response header too large"))
                return
            head = bytes(buf[:end + 2]).decode("latin-1")
            del buf[:end + 4]
            try:
                status = int(head[9:12]) if head.startswith("HTTP/1.") else int("x")
            except ValueError:
                self._fail(UpstreamReset(f"malformed status line {head[:80]!r}"))
                return
            # One regex pass over the header block: far fewer Python-level calls than a
            # split/partition/strip/lower loop (this runs once per proxied request).
            headers = {name.lower(): value for name, value in _HEADER_LINE.findall(head)}
            self._head = (status, headers)
            if headers.get("connection", "").lower() == "close":
                self.keep_alive = False
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._chunked = True
            else:
                cl = headers.get("content-length")
                self._body_len = int(cl) if cl is not None else -1
                if self._body_len < 0 and status not in (204, 304):
                    self.keep_alive = False  # body ends when the connection closes
                    self._body_len = -2
        if self._chunked:
            self._parse_chunked()
            return
        n = self._body_len
        if n == -2:
            return  # wait for connection_lost
        if n <= 0 and self._head[0] in (204, 304):
            n = 0
        if len(buf) >= max(0, n):
            body = bytes(buf[:n]) if len(buf) != n else bytes(buf)
            del buf[:n]
            if buf:  # bytes beyond the answer: the connection cannot be trusted any more
                self.keep_alive = False
            self._finish(body)

    def _parse_chunked(self) -> None:
        buf = self._buf
        out = bytearray()
        pos = 0
        while True:
            eol = buf.find(CRLF, pos)
            if eol < 0:
                return
            try:
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            except ValueError:
                self._fail(UpstreamReset("malformed chunked encoding"))
                return
            start = eol + 2
            if size == 0:
                end = buf.find(HEADER_END, eol)  # trailers end with an empty line
                if end < 0:
                    if buf[start:start + 2] == CRLF:
                        end = eol
                    else:
                        return
                del buf[:end + 4]
                self._finish(bytes(out))
                return
            if len(buf) < start + size + 2:
                return
            out += buf[start:start + size]
            pos = start + size + 2

    def _finish(self, body: bytes) -> None:
        status, headers = self._head  # type: ignore[misc]
        w = self._waiter
        self._reset_state()
        if w is not None and not w.done():
            w.set_result(Response(status, headers, body))

    def _fail(self, exc: Exception) -> None:
        self.keep_alive = False
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _reset_state(self) -> None:
        self._waiter = None
        self._head = None
        self._body_len = -1
        self._chunked = False

    # -------------------------------------------------------------- one exchange

    def send(self, data: bytes | list[bytes], waiter: asyncio.Future) -> None:
        self._waiter = waiter
        self._got_bytes = False
        assert self.transport is not None
        if isinstance(data, list):
            self.transport.writelines(data)
        else:
            self.transport.write(data)

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
        try:
            if self.ssl_context is None:
                _, conn = await asyncio.wait_for(loop.create_connection(_Conn, self.host, self.port), timeout_s)
            else:
                _, conn = await asyncio.wait_for(loop.create_connection(
                    _Conn, self.host, self.port, ssl=self.ssl_context, server_hostname=self.host,
                    ssl_handshake_timeout=timeout_s), timeout_s)
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

    async def _acquire(self, connect_timeout_s: float) -> tuple[_Conn, bool]:
        """(connection, reused?)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.keep_alive:
                return conn, True
            self._open -= 1
            conn.abort()
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

    def _request_bytes(self, path: str, body: bytes, headers: dict[str, str]) -> bytes | list[bytes]:
        head = [b"POST ", path.encode(), b" HTTP/1.1\r\nHost: ", self.host_header,
                b"\r\nContent-Length: ", str(len(body)).encode(), CRLF]
        for k, v in headers.items():
            head += [k.encode(), b": ", v.encode("latin-1"), CRLF]
        head.append(CRLF)
        if len(body) <= SMALL_BODY_BYTES:
            head.append(body)
            return b"".join(head)
        return [b"".join(head), body]

    async def post(self, path: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Response:
        """One POST and its answer within `timeout_s` (UpstreamTimeout after it, UpstreamReset
        or UpstreamConnectError when the connection fails). The connection taken from the pool
        goes back to it whatever happens after."""
        if not 0.0 < timeout_s < math.inf:  # NaN included: loop.call_at(NaN) raises
            raise UpstreamTimeout(f"no time to send the request (timeout {timeout_s!r} s)")
        loop = asyncio.get_running_loop()
        data = self._request_bytes(path, body, headers)
        deadline = loop.time() + timeout_s
        for _try in range(2):
            conn, reused = await self._acquire_until(deadline)
            try:
                waiter = loop.create_future()
                timer = _arm_timer(loop, deadline, waiter)
                try:
                    conn.send(data, waiter)
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
            return await asyncio.wait_for(self._acquire(min(left, self.connect_timeout_s)), left)
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
