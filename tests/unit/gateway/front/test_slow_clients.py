"""The slow-client guard (gateway.front.slow_clients): llhttp marks where each request head
begins and ends, so the head timeout and size bound hold for every request on a keep-alive
connection, pipelined ones included; malformed heads are refused early with a JSON 400; every
byte reaches aiohttp untouched otherwise. Driven with a fake transport, then once through a real
aiohttp server on loopback (the order of answers on the wire)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiohttp import web

from gateway.front.request_checks import ClientErrorLog
from gateway.front.slow_clients import GuardedSockSite, GuardLimits, SlowClientGuard, sweep_slow_clients

LIMIT = 400


def request(path: str = "/v2/models/m/infer", body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n" + extra + b"\r\n" + body)


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name, default=None):
        return ("203.0.113.7", 5555) if name == "peername" else default


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

    def time(self) -> float:
        return self.now

    def call_soon(self, fn, *args) -> None:
        self.soon.append((fn, args))

    def run_soon(self) -> None:
        while self.soon:
            fn, args = self.soon.pop(0)
            fn(*args)


@pytest.fixture
def guard():
    limits = GuardLimits(1.0, LIMIT, ClientErrorLog(logging.getLogger("test.slow_clients")))
    limits.loop = Clock()
    g = SlowClientGuard(Inner(), limits, {})
    g.transport = FakeTransport()
    g._since = limits.loop.now  # what connection_made does
    return g


def status_of(written: bytes) -> tuple[int, dict]:
    head, _, body = written.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_keep_alive_requests_each_get_the_bounds(guard):
    clock = guard.limits.loop
    guard.data_received(request())
    assert guard.state == guard.IDLE and guard._passed == 1
    guard.request_done()
    clock.now += 50  # idle for long: aiohttp's keep-alive timer, not the head clock
    assert not guard.expired(clock.now)
    guard.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nHo")  # the second head starts now
    assert guard.state == guard.HEAD and not guard.expired(clock.now + 0.9) and guard.expired(clock.now + 1.1)
    guard.data_received(b"st: gw\r\nx-big: " + b"a" * LIMIT + b"\r\n\r\n")
    assert guard.transport.closed
    status, body = status_of(guard.transport.written)
    assert status == 431 and "max_header_bytes" in body["error"]


def test_pipelined_requests_pass_untouched_and_are_each_counted(guard):
    data = request(body=b"a") + request(body=b"") + request(body=b"bc")
    for i in range(0, len(data), 7):
        guard.data_received(data[i:i + 7])
    assert guard.inner.fed == data and guard._passed == 3 and guard.state == guard.IDLE
    assert not guard.transport.written


def test_a_malformed_head_is_refused_early_with_json(guard, caplog):
    with caplog.at_level(logging.WARNING, "test.slow_clients"):
        guard.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nHo st: x\r\n\r\n")
    status, body = status_of(guard.transport.written)
    assert status == 400 and "malformed HTTP request" in body["error"] and guard.transport.closed
    assert guard.inner.fed == b""  # aiohttp never saw it
    assert any("malformed HTTP request from 203.0.113.7" in r.getMessage() for r in caplog.records)


def test_a_pipelined_oversized_head_waits_for_the_earlier_answer(guard):
    first = request()
    guard.data_received(first + b"POST /x HTTP/1.1\r\nx-big: " + b"a" * LIMIT + b"\r\n\r\n")
    assert guard.state == guard.REFUSING and not guard.transport.written  # request 1 is not answered yet
    assert guard.inner.fed.startswith(first)
    guard.data_received(b"more bytes")  # dropped
    assert not guard.inner.fed.endswith(b"more bytes")
    guard.request_done()
    assert not guard.transport.written  # after aiohttp writes its answer (call_soon)
    guard.limits.loop.run_soon()
    assert status_of(guard.transport.written)[0] == 431 and guard.transport.closed


def test_a_pipelined_malformed_head_is_left_to_aiohttp(guard):
    data = request() + b"GARBAGE\r\n\r\n"
    guard.data_received(data)
    assert guard.state == guard.PASS and guard.inner.fed == data and not guard.transport.written


def test_a_pipelined_head_clock_starts_when_the_earlier_request_is_answered(guard):
    clock = guard.limits.loop
    guard.data_received(request() + b"POST /x HTTP/1.1\r\n")
    clock.now += 5  # request 1 is slow to answer: not the second head's fault
    assert guard.state == guard.HEAD and not guard.expired(clock.now)
    guard.request_done()
    assert not guard.expired(clock.now + 0.9) and guard.expired(clock.now + 1.1)


def test_padding_cannot_hide_a_long_head_across_packets(guard):
    guard.data_received(b"POST /x HTTP/1.1\r\nx-a:")
    for _ in range(LIMIT // 50 + 1):
        assert not guard.transport.closed
        guard.data_received(b" " * 50)  # optional whitespace llhttp does not report
    assert guard.transport.closed and status_of(guard.transport.written)[0] == 431


def test_silence_is_closed_without_an_answer_and_upgrade_passes(guard):
    clock = guard.limits.loop
    assert guard.expired(clock.now + 1.5)
    guard.refuse(408, "Request Timeout", "late")
    assert guard.transport.closed and guard.transport.written == b""

    limits = guard.limits
    g = SlowClientGuard(Inner(), limits, {})
    g.transport = FakeTransport()
    data = b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello"
    g.data_received(data)
    g.data_received(b"\x00\xff not http")
    assert g.state == g.PASS and g.inner.fed == data + b"\x00\xff not http"


async def test_answers_stay_in_order_on_a_real_aiohttp_server():
    """Two pipelined requests on one connection, the second one's head oversized: the client
    reads the first answer, then the JSON 431, then the end of the connection."""
    guards: dict = {}

    async def handler(request: web.Request) -> web.Response:
        guard = guards.get(request.transport)
        try:
            await request.read()
            await asyncio.sleep(0.05)  # the second request's head arrives meanwhile
            return web.Response(text="first")
        finally:
            if guard is not None:
                guard.request_done()

    app = web.Application()
    app.router.add_post("/a", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    limits = GuardLimits(5.0, LIMIT)
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = GuardedSockSite(runner, sock, limits=limits, guards=guards)
    await site.start()
    sweep = asyncio.get_running_loop().create_task(sweep_slow_clients(guards, limits))
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
