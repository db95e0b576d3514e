"""The client connection (gateway.front.http_connection): llhttp reads every byte once; the
head, body and idle bounds hold for every request on a keep-alive connection, pipelined ones
included; malformed and oversized requests are refused with JSON; requests the infer door takes
are answered on the connection, the others handed to aiohttp whole and in order. Driven with a
fake transport, then through a real aiohttp server on loopback (the order of answers on the wire)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest
from aiohttp import web

from gateway.front.http_connection import ClientConnection, ClientSite, ParsedRequest
from gateway.front.request_checks import ClientErrorLog
from gateway.front.slow_clients import GuardLimits, sweep_slow_clients

LIMIT = 400
MAX_BODY = 100


def request(path: str = "/v2/models/m/infer", body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n" + extra + b"Content-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.eof = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, data) -> None:
        self.written += b"".join(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name, default=None):
        return ("203.0.113.7", 5555) if name == "peername" else default

    @property
    def done(self) -> bool:
        """The connection ends: closed now, or its answer complete and the rest read and dropped."""
        return self.closed or self.eof


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.fed = b""

    def connection_made(self, transport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.fed += data


class Clock:
    """A loop stand-in: time set by the test, call_soon run by the test."""

    def __init__(self) -> None:
        self.now = 100.0
        self.soon: list = []
        self.later: list = []

    def time(self) -> float:
        return self.now

    def call_soon(self, fn, *args) -> None:
        self.soon.append((fn, args))

    def call_later(self, delay, fn, *args) -> None:
        self.later.append((delay, fn, args))

    def run_soon(self) -> None:
        while self.soon:
            fn, args = self.soon.pop(0)
            fn(*args)


class Conn(ClientConnection):
    """With a __dict__, for the test's own attributes."""


def make(door=None, clock=None) -> ClientConnection:
    limits = GuardLimits(1.0, LIMIT, ClientErrorLog(logging.getLogger("test.http_connection")), body_timeout_s=2.0,
                         max_body_bytes=MAX_BODY, idle_timeout_s=60.0)
    limits.loop = clock or Clock()
    inner = Inner()
    conn = Conn(door, lambda: inner, limits, {})
    conn.connection_made(FakeTransport())
    conn.test_inner = inner  # what aiohttp would have been fed
    return conn


def answered_by_aiohttp(conn: ClientConnection) -> None:
    conn.request_done()
    conn.limits.loop.run_soon()


@pytest.fixture
def conn():
    return make()


def status_of(written: bytes) -> tuple[int, dict]:
    head, _, body = written.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_keep_alive_requests_each_get_the_bounds(conn):
    clock = conn.limits.loop
    conn.data_received(request())
    assert conn.test_inner.fed == request() and conn._busy
    answered_by_aiohttp(conn)
    clock.now += 50  # idle for long, within the idle timeout: not the head clock
    assert conn.overdue(clock.now) is None and conn.overdue(clock.now + 11) == (408, "idle")
    conn.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nHo")  # the second head starts now
    assert conn.state == conn.HEAD and conn.overdue(clock.now + 0.9) is None
    assert conn.overdue(clock.now + 1.1)[0] == 408
    conn.data_received(b"st: gw\r\nx-big: " + b"a" * LIMIT + b"\r\n\r\n")
    assert conn.transport.done
    status, body = status_of(conn.transport.written)
    assert status == 431 and "max_header_bytes" in body["error"]


def test_pipelined_requests_are_handed_over_one_at_a_time_in_order(conn):
    reqs = [request(body=b"a"), request(body=b""), request(body=b"bc")]
    data = b"".join(reqs)
    for i in range(0, len(data), 7):
        conn.data_received(data[i:i + 7])
    assert conn.test_inner.fed == reqs[0] and len(conn._queue) == 2  # the others wait for its answer
    answered_by_aiohttp(conn)
    assert conn.test_inner.fed == reqs[0] + reqs[1]
    answered_by_aiohttp(conn)
    answered_by_aiohttp(conn)
    assert conn.test_inner.fed == data and not conn._busy and not conn.transport.written


def test_a_chunked_body_is_handed_over_whole_and_expect_is_answered_here(conn):
    conn.data_received(b"POST /v2/models/m/generate HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
    assert conn.transport.written == b"HTTP/1.1 100 Continue\r\n\r\n" and conn.test_inner.fed == b""
    conn.data_received(b"2\r\n{}\r\n0\r\n\r\n")
    assert conn.test_inner.fed == b"POST /v2/models/m/generate HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}"


def test_a_malformed_head_is_refused_early_with_json(conn, caplog):
    with caplog.at_level(logging.WARNING, "test.http_connection"):
        conn.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nHo st: x\r\n\r\n")
    status, body = status_of(conn.transport.written)
    assert status == 400 and "malformed HTTP request" in body["error"] and conn.transport.done
    assert conn.test_inner.fed == b""  # aiohttp never saw it
    assert any("malformed HTTP request from 203.0.113.7" in r.getMessage() for r in caplog.records)


def test_a_pipelined_oversized_head_waits_for_the_earlier_answer(conn):
    first = request()
    conn.data_received(first + b"POST /x HTTP/1.1\r\nx-big: " + b"a" * LIMIT + b"\r\n\r\n")
    assert conn.state == conn.REFUSING and not conn.transport.written  # request 1 is not answered yet
    assert conn.test_inner.fed == first
    conn.data_received(b"more bytes")  # dropped
    conn.request_done()
    assert not conn.transport.written  # after aiohttp writes its answer (call_soon)
    conn.limits.loop.run_soon()
    assert status_of(conn.transport.written)[0] == 431 and conn.transport.done


def test_a_pipelined_malformed_request_is_refused_after_the_earlier_answer(conn):
    conn.data_received(request() + b"GARBAGE\r\n\r\n")
    assert conn.test_inner.fed == request() and not conn.transport.written
    answered_by_aiohttp(conn)
    assert status_of(conn.transport.written)[0] == 400 and conn.transport.done


def test_a_pipelined_head_clock_starts_when_the_earlier_request_is_answered(conn):
    clock = conn.limits.loop
    conn.data_received(request() + b"POST /x HTTP/1.1\r\n")
    clock.now += 5  # request 1 is slow to answer: not the second head's fault
    assert conn.state == conn.HEAD and conn.overdue(clock.now) is None
    answered_by_aiohttp(conn)
    assert conn.overdue(clock.now + 0.9) is None and conn.overdue(clock.now + 1.1)[0] == 408


def test_padding_cannot_hide_a_long_head_across_packets(conn):
    conn.data_received(b"POST /x HTTP/1.1\r\nx-a:")
    for _ in range(LIMIT // 50 + 1):
        assert not conn.transport.done
        conn.data_received(b" " * 50)  # optional whitespace llhttp does not report
    assert conn.transport.done and status_of(conn.transport.written)[0] == 431


def test_silence_is_closed_without_an_answer_and_upgrade_passes(conn):
    clock = conn.limits.loop
    refusal = conn.overdue(clock.now + 1.5)
    assert refusal is not None
    conn.refuse(*refusal)
    assert conn.transport.closed and conn.transport.written == b""

    c = make()
    data = b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    c.data_received(data + b"\x81\x05hello")
    c.data_received(b"\x00\xff not http")
    assert c.state == c.PASS and c.test_inner.fed == data + b"\x81\x05hello\x00\xff not http"


def test_bodies_are_bounded_in_size_and_time(conn):
    conn.data_received(request(body=b"x" * (MAX_BODY + 1)))
    status, body = status_of(conn.transport.written)
    assert status == 413 and f"{MAX_BODY + 1} bytes" in body["error"] and conn.transport.done

    c = make()  # no Content-Length: counted as it arrives
    c.data_received(b"POST /a HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(MAX_BODY // 10 + 1):
        c.data_received(b"a\r\n" + b"x" * 10 + b"\r\n")
    assert status_of(c.transport.written)[0] == 413 and c.test_inner.fed == b""

    c = make()
    clock = c.limits.loop
    c.data_received(request(body=b"{}")[:-1])  # the body's last byte never comes
    assert c.overdue(clock.now + 1.9) is None
    status, body = c.overdue(clock.now + 2.1)
    assert status == 408 and "request_body_timeout_ms" in body
    c.refuse(status, body)
    assert status_of(c.transport.written)[0] == 408 and c.transport.eof


class Door:
    """An infer door answering from a queue of futures the test resolves."""

    def __init__(self) -> None:
        self.seen: list[ParsedRequest] = []
        self.answers: list[asyncio.Future] = []

    def route(self, method: bytes, url: bytes):
        return ("m", None) if url.endswith(b"/infer") else None

    async def answer(self, req: ParsedRequest, conn: ClientConnection):
        self.seen.append(req)
        fut = asyncio.get_running_loop().create_future()
        self.answers.append(fut)
        return await fut, False


async def test_the_door_answers_its_requests_in_order_with_the_rest():
    door = Door()
    conn = make(door, asyncio.get_running_loop())
    conn.data_received(request(body=b"1") + request("/v2/health/ready", body=b"") + request(body=b"3"))
    await asyncio.sleep(0)
    assert [r.body for r in door.seen] == [b"1"] and conn.test_inner.fed == b""
    door.answers[0].set_result((b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", b"a"))
    await asyncio.sleep(0)
    assert conn.transport.written.endswith(b"a") and conn.test_inner.fed == request("/v2/health/ready", body=b"")
    assert len(door.seen) == 1  # the third waits for aiohttp's answer
    conn.request_done()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [r.body for r in door.seen] == [b"1", b"3"]
    door.answers[1].set_result((b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", b"c"))
    await asyncio.sleep(0)
    assert conn.transport.written.endswith(b"c") and not conn.transport.closed

    # HTTP/1.0 (no keep-alive): answered, then closed
    conn = make(door, asyncio.get_running_loop())
    conn.data_received(b"POST /v2/models/m/infer HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    await asyncio.sleep(0)
    door.answers[2].set_result((b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b""))
    await asyncio.sleep(0)
    assert conn.transport.closed


async def test_answers_stay_in_order_on_a_real_aiohttp_server():
    """Two pipelined requests on one connection, the second one's head oversized: the client
    reads the first answer, then the JSON 431, then the end of the connection."""
    conns: dict = {}

    async def handler(request: web.Request) -> web.Response:
        conn = conns.get(request.transport)
        try:
            await request.read()
            await asyncio.sleep(0.05)  # the second request's head arrives meanwhile
            return web.Response(text="first")
        finally:
            if conn is not None:
                conn.request_done()

    app = web.Application()
    app.router.add_post("/a", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    limits = GuardLimits(5.0, LIMIT)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = ClientSite(runner, sock, door=None, limits=limits, conns=conns)
    await site.start()
    sweep = asyncio.get_running_loop().create_task(sweep_slow_clients(conns, limits))
    try:
        reader, writer = await asyncio.open_connection(*sock.getsockname())
        writer.write(request("/a") + b"POST /a HTTP/1.1\r\nHost: gw\r\nx-big: " + b"a" * LIMIT + b"\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        first, _, rest = raw.partition(b"first")
        assert first.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 431"), raw
        assert "max_header_bytes" in json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        # and a plain request on a new connection is served
        reader, writer = await asyncio.open_connection(*sock.getsockname())
        writer.write(request("/a", extra=b"Connection: close\r\n"))
        assert (await asyncio.wait_for(reader.read(-1), 10)).endswith(b"first")
        writer.close()
    finally:
        sweep.cancel()
        await runner.cleanup()


async def test_a_half_closed_client_gets_its_answer_then_the_end():
    """A client that shuts down its sending side right after its request (HTTP/1.0 tools,
    `nc -N`) still reads the answer; then the connection closes."""
    door = Door()
    conn = make(door, asyncio.get_running_loop())
    conn.data_received(request(body=b"1"))
    await asyncio.sleep(0)
    assert conn.eof_received() is True and not conn.transport.closed  # answering: keep the transport
    door.answers[0].set_result((b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", b"a"))
    await asyncio.sleep(0)
    assert conn.transport.written.endswith(b"a") and conn.transport.closed
    idle = make(door, asyncio.get_running_loop())
    assert not idle.eof_received()  # nothing pending: the transport closes itself
