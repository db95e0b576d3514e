"""The hot-path HTTP/1.1 client (gateway.upstream.http1_client) against a scripted loopback
server: answers parsed by llhttp (lengths, chunked, until close, no body for HEAD/204/304/1xx),
keep-alive decided per answer, and a replica that misbehaves (garbage, closing mid-answer, an
oversized head, bytes nobody asked for) gives a clear UpstreamReset, its connection dropped and
the pool whole (nothing busy, nobody waiting), the next request served."""

from __future__ import annotations

import asyncio

import pytest

from gateway.upstream.http1_client import MAX_HEADER_BYTES, ConnectionPool, UpstreamReset

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Script:
    """A loopback server: for each request (head + Content-Length body) it writes the next
    scripted answer, in the given pieces; a piece `None` closes the connection there."""

    def __init__(self, answers: list) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Script:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                    return  # the client went away, or the test ended
                length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                              if ln.lower().startswith(b"content-length"))
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                for piece in answer if isinstance(answer, list) else [answer]:
                    if piece is None:
                        return
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.001)
        finally:
            writer.close()


def assert_whole(pool: ConnectionPool) -> None:
    st = pool.stats()
    assert st["busy"] == 0 and st["waiting"] == 0 and st["open"] == st["idle"], st


async def test_lengths_chunked_and_keep_alive_on_one_connection():
    async with Script([
        [b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 5\r\nX-A:  padded \r\nx-a: last\r\n\r\nhel", b"lo"],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n", b"2\r\nde\r\n0\r\n",
         b"Trailer-X: 1\r\n\r\n"],
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\n!",
    ]) as srv:
        pool = ConnectionPool(srv.address, max_connections=2)
        try:
            r = await pool.post("/a", b"x", {"x-request-id": "r1"}, 5.0)
            assert (r.status, r.body, r.headers["x-a"]) == (200, b"hello", "last")
            assert (await pool.post("/a", b"", {}, 5.0)).body == b"abcde"
            r = await pool.post("/a", b"", {}, 5.0)
            assert (r.status, r.body) == (204, b"")
            r = await pool.post("/a", b"", {}, 5.0)
            assert (r.status, r.body) == (304, b"")
            r = await pool.post("/a", b"", {}, 5.0)
            assert (r.status, r.body) == (201, b"!")  # the interim 100 is skipped
            assert srv.connections == 1 and pool.stats()["open"] == 1
            assert srv.requests[0].startswith(b"POST /a HTTP/1.1\r\n") and b"x-request-id: r1" in srv.requests[0]
            assert_whole(pool)
        finally:
            await pool.close()


async def test_head_answers_have_no_body_and_keep_the_connection():
    async with Script([b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", OK]) as srv:
        pool = ConnectionPool(srv.address, max_connections=1)
        try:
            r = await pool.post("/h", b"", {}, 5.0, method=b"HEAD")
            assert (r.status, r.body, r.headers["content-length"]) == (200, b"", "1234")
            assert srv.requests[0].startswith(b"HEAD /h HTTP/1.1")
            assert (await pool.post("/a", b"", {}, 5.0)).body == b"ok"
            assert srv.connections == 1
            assert_whole(pool)
        finally:
            await pool.close()


@pytest.mark.parametrize("answer", [
    [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", None],
    [b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", None],
    [b"HTTP/1.1 200 OK\r\n\r\no", b"k", None],  # no length: the body ends with the connection
])
async def test_answers_that_end_the_connection(answer):
    async with Script([answer, OK]) as srv:
        pool = ConnectionPool(srv.address, max_connections=1)
        try:
            assert (await pool.post("/a", b"", {}, 5.0)).body == b"ok"
            assert pool.stats()["open"] == 0  # not kept
            assert (await pool.post("/a", b"", {}, 5.0)).body == b"ok"
            assert srv.connections == 2
        finally:
            await pool.close()


@pytest.mark.parametrize(("answer", "words"), [
    (b"garbage\r\n\r\n", "malformed answer"),
    (b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok", "malformed answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "malformed answer"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed answer"),
    ([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", None], "connection closed"),
    ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", None], "connection closed"),
    ([b"HTTP/1.1 200 OK\r\n", b"x-big: " + b"a" * (MAX_HEADER_BYTES + 10)], "larger than"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n", "switched protocols"),
])
async def test_a_misbehaving_replica_gives_a_reset_and_leaves_the_pool_whole(answer, words):
    async with Script([answer, OK]) as srv:
        pool = ConnectionPool(srv.address, max_connections=1)
        try:
            with pytest.raises(UpstreamReset, match=words):
                await pool.post("/a", b"", {}, 5.0)
            assert_whole(pool)
            assert pool.stats()["open"] == 0  # the connection was dropped, not pooled
            assert (await pool.post("/a", b"", {}, 5.0)).body == b"ok"
            assert_whole(pool)
        finally:
            await pool.close()


async def test_bytes_after_the_answer_make_the_connection_unusable():
    async with Script([OK + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", OK]) as srv:
        pool = ConnectionPool(srv.address, max_connections=1)
        try:
            assert (await pool.post("/a", b"", {}, 5.0)).body == b"ok"
            assert (await pool.post("/a", b"", {}, 5.0)).body == b"ok"  # on a new connection
            assert srv.connections == 2
            assert_whole(pool)
        finally:
            await pool.close()


async def test_a_connection_closed_before_its_loss_is_delivered_is_retried_on_a_fresh_one():
    """The peer (a replica, or a peer region's gateway) went away: its idle connection's
    transport is closed but connection_lost has not run yet. Taking it from the pool, or writing
    on it (uvloop: RuntimeError "the handler is closed"), must not fail the request: it is a
    reset of a reused connection, retried on a new one."""
    async with Script([OK, OK, OK]) as srv:
        pool = ConnectionPool(srv.address, max_connections=2)
        try:
            assert (await pool.post("/a", b"", {}, 5.0)).body == b"ok"
            (idle,) = pool._idle
            real = idle.transport

            class Closing:  # closed under the pool's feet, loss not yet delivered
                def is_closing(self) -> bool:
                    return True

                def abort(self) -> None:
                    real.abort()

            idle.transport = Closing()
            assert (await pool.post("/a", b"", {}, 5.0)).body == b"ok"  # skipped at acquire
            (idle,) = pool._idle
            real = idle.transport

            class RefusesWrites:  # looks open, but uvloop refuses the write
                def is_closing(self) -> bool:
                    return False

                def write(self, data) -> None:
                    raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; "
                                       "the handler is closed")

                def abort(self) -> None:
                    real.abort()

            idle.transport = RefusesWrites()
            assert (await pool.post("/a", b"", {}, 5.0)).body == b"ok"  # reset, retried fresh
            assert srv.connections == 3
            assert_whole(pool)
        finally:
            await pool.close()


async def test_a_cancelled_attempt_sends_nothing_even_when_its_connection_just_completed(monkeypatch):
    """A hedge that lost is cancelled; when the cancellation lands just as its new connection
    completes, it must still end there (Python 3.11's wait_for returned the connection instead,
    and the cancelled attempt sent its request and waited for the answer until its deadline,
    holding up the hedged request's cleanup: seen in CI as a 10 s answer)."""
    async with Script([OK, OK]) as srv:
        pool = ConnectionPool(srv.address, max_connections=2)
        loop = asyncio.get_running_loop()
        real = loop.create_connection
        gate = loop.create_future()
        at_gate = asyncio.Event()

        async def connected_then_gated(*args, **kwargs):
            transport, protocol = await real(*args, **kwargs)
            at_gate.set()
            try:
                await gate
            except asyncio.CancelledError:
                transport.close()
                raise
            return transport, protocol

        monkeypatch.setattr(loop, "create_connection", connected_then_gated)
        try:
            task = asyncio.ensure_future(pool.post("/a", b"", {}, 2.0))
            await at_gate.wait()  # connected; the attempt waits at the gate
            gate.set_result(None)
            task.cancel()  # in the same step: the connection is complete when the cancel lands
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)
            assert srv.requests == []
            assert_whole(pool)
            assert pool.stats()["open"] == 0
            monkeypatch.undo()
            assert (await pool.post("/a", b"", {}, 2.0)).body == b"ok"  # the pool still serves
        finally:
            await pool.close()
