"""gateway.front.generate driven in-process: the gateway's own RegionPools and Forwarder (the
forwarder tests' Region harness) and GenerateFront in front of small aiohttp replicas on
loopback sockets, whose answers each test scripts: failover before the first byte, a replica
breaking the stream after it (the client sees a broken stream), a client leaving while the
replica is silent (the replica's connection is closed), and the path and body rules."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from gateway.front.access_log import AccessLog
from gateway.front.auth import Authenticator
from gateway.front.generate import GenerateFront, check_generate_body, split_generate_path
from gateway.front.http_adapter import HttpLimits
from gateway.front.pipeline import PipelineSettings
from gateway.front.request_checks import RequestError
from gateway.upstream.http_stream import HttpStreamClient
from tests.auth_keys import make_key
from tests.unit.gateway.routing.test_forwarder import Region, wait_until

PER_TRY_MS = 300  # time to the first byte each replica is given
EVENT = b'data: {"model_name":"m","model_version":"1","text_output":"%d"}\n\n'


class Replica:
    """An aiohttp server answering /v2/models/m/generate_stream with `behaviour`."""

    def __init__(self, behaviour) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self.gone = False  # the gateway closed the connection while this replica was streaming
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Replica:
        app = web.Application()
        app.router.add_post("/v2/models/m/generate_stream", self.handle)
        app.router.add_post("/v2/models/m/generate", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        return await self.behaviour(self, request)


async def sse(replica: Replica, request: web.Request, n: int) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    for i in range(n):
        await resp.write(EVENT % i)
    return resp


async def three_events(replica, request):
    resp = await sse(replica, request, 3)
    await resp.write_eof()
    return resp


async def hangs(replica, request):
    """Never answers: the gateway's per-try timeout (or deadline) ends the attempt and closes
    the connection."""
    await wait_until(lambda: request.transport is None or request.transport.is_closing())
    raise asyncio.CancelledError


async def busy(replica, request):
    return web.json_response({"error": "busy"}, status=503)


async def breaks_after_two(replica, request):
    resp = await sse(replica, request, 2)
    request.transport.close()  # no final chunk: a broken stream
    return resp


async def one_then_silent(replica, request):
    await sse(replica, request, 1)
    await wait_until(lambda: request.transport is None or request.transport.is_closing())
    replica.gone = True
    raise asyncio.CancelledError


class World:
    def __init__(self, replicas: list[Replica], auth: Authenticator | None = None) -> None:
        self.replicas = replicas
        self.region = Region({r.url: ["unused"] for r in replicas},
                             f"max_attempts = 3\nper_try_timeout_ms = {PER_TRY_MS}")
        cfg = self.region.cfg
        self.front = GenerateFront(PipelineSettings.from_config(cfg, "r1"), auth=auth, models=_AllKnown(),
                                   forwarder=self.region.forwarder, metrics=self.region.metrics,
                                   load=self.region.load, access_log=AccessLog(enabled=False),
                                   client=HttpStreamClient(), limits=HttpLimits(cfg))
        self.runner: web.AppRunner | None = None
        self.base = ""

    async def start(self) -> World:
        app = web.Application()

        async def route(request: web.Request) -> web.StreamResponse:
            target = self.front.target(request.path)
            assert target is not None
            return await self.front.handle(request, *target)

        app.router.add_post("/{tail:.*}", route)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        await self.front.close()
        for r in [self, *self.replicas]:
            await r.runner.cleanup()


class _AllKnown:
    def unknown_model(self, model, version, hops=0):
        return None

    def resolve_version(self, model, requested):
        return requested


@pytest.fixture
async def world_of():
    worlds: list[World] = []

    async def make(*behaviours, auth: Authenticator | None = None) -> World:
        replicas = [await Replica(b).start() for b in behaviours]
        w = await World(replicas, auth).start()
        worlds.append(w)
        return w

    yield make
    for w in worlds:
        await w.close()


async def test_a_replica_failing_before_the_first_byte_is_retried_on_another(world_of):
    w = await world_of(busy, three_events)
    async with aiohttp.ClientSession() as s:
        for _ in range(4):  # P2C may pick either first: the busy one must never show through
            async with s.post(w.base + "/v2/models/m/generate_stream", data=b'{"text_input": "x"}') as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                assert resp.headers["geogate-replica"] == w.replicas[1].url
                assert await resp.read() == b"".join(EVENT % i for i in range(3))
    assert w.replicas[0].requests >= 1  # it was tried, and its 503 retried
    w.region.assert_whole()


async def test_a_replica_silent_past_the_per_try_timeout_is_retried_and_the_deadline_holds(world_of):
    w = await world_of(hangs, three_events)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(w.base + "/v2/models/m/generate", data=b"{}") as resp:
                assert resp.status == 200 and resp.headers["geogate-replica"] == w.replicas[1].url
    assert w.replicas[0].requests >= 1
    w.region.assert_whole()
    # the client's deadline shorter than one try: a silent replica means a 504 in time
    alone = await world_of(hangs)
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(alone.base + "/v2/models/m/generate_stream", data=b"{}",
                          headers={"geogate-timeout-ms": "100"}) as resp:
            assert resp.status == 504 and "deadline of 100 ms" in (await resp.json())["error"]
        assert time.monotonic() - t0 < PER_TRY_MS / 1000
    await wait_until(lambda: alone.region.counter("geogate_requests_total", outcome="deadline_client") == 1)
    alone.region.assert_whole()


async def test_a_replica_breaking_the_stream_after_the_first_byte_ends_the_clients_stream(world_of):
    w = await world_of(breaks_after_two)
    async with aiohttp.ClientSession() as s:
        async with s.post(w.base + "/v2/models/m/generate_stream", data=b'{"text_input": "x"}') as resp:
            assert resp.status == 200
            got = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    got += chunk
    assert got == EVENT % 0 + EVENT % 1  # relayed as they came, then the stream broke
    assert w.replicas[0].requests == 1  # never retried once a byte was relayed
    assert w.region.counter("geogate_requests_total", outcome="reset") == 1
    assert w.region.counter("geogate_stream_responses_relayed_total") == 2
    w.region.assert_whole()


async def test_a_client_leaving_while_the_replica_is_silent_closes_the_replicas_connection(world_of):
    w = await world_of(one_then_silent)
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        resp = await s.post(w.base + "/v2/models/m/generate_stream", data=b'{"text_input": "x"}')
        assert await resp.content.readuntil(b"\n\n") == EVENT % 0
        resp.close()  # the client goes away mid-stream, while the replica sends nothing
    await wait_until(lambda: w.replicas[0].gone)
    assert time.monotonic() - t0 < 5.0
    await wait_until(lambda: w.region.counter("geogate_requests_total", outcome="cancelled") == 1)
    w.region.assert_whole()


async def test_api_keys_and_request_rules_are_checked_before_any_replica_is_asked(world_of):
    key, entry = make_key("team-a", models=["m"])
    w = await world_of(three_events, auth=Authenticator(table={"keys": [entry]}))
    url = w.base + "/v2/models/m/generate_stream"
    async with aiohttp.ClientSession() as s:
        for headers, body, status, words in (
                ({}, b'{"text_input": "x"}', 401, "missing API key"),
                ({"x-api-key": key}, b"[1]", 400, "JSON object"),
                ({"x-api-key": key, "geogate-timeout-ms": "-5"}, b"{}", 400, "geogate-timeout-ms"),
                ({"x-api-key": key}, b"{}", 200, "")):
            async with s.post(url, data=body, headers=headers) as resp:
                text = await resp.text()
                assert resp.status == status, text
                assert words in text
        async with s.post(w.base + "/v2/models/other/generate", data=b"{}", headers={"x-api-key": key}) as resp:
            assert resp.status == 403 and resp.headers["geogate-attempts"] == "0"
    assert w.replicas[0].requests == 1  # only the good request reached it
    assert w.region.counter("geogate_rejected_requests_total", status="400") == 2


def test_generate_paths_and_bodies():
    assert split_generate_path("/v2/models/m/generate") == ("m", None, False)
    assert split_generate_path("/v2/models/m/versions/2/generate_stream") == ("m", "2", True)
    for bad in ("/v2/models//generate", "/v2/models/m/versions//generate", "/v2/models/m/infer",
                "/v2/models/m/x/generate", "/v2/generate"):
        assert split_generate_path(bad) is None, bad
    check_generate_body(b'{"text_input": "x", "parameters": {"stream": true}}', None)
    check_generate_body(b"\x1f\x8b not json", "gzip")  # compressed: the replica reads it
    for body, why in ((b"{", "not valid JSON"), (b"[1]", "JSON object")):
        with pytest.raises(RequestError, match=why):
            check_generate_body(body, None)
