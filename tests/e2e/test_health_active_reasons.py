"""Active checker against small in-process servers that misbehave on purpose (503 with a body,
slow answers, no repository API, NOT_SERVING), to pin down rise/fall and the reasons operators
read. The real replica processes are covered in test_health_active.py."""

import asyncio

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from core.config import HealthSection
from health.active import ActiveHealthChecker
from health.replica_state import ReplicaState
from tests.procs import async_wait_until, free_port

SETTINGS = HealthSection(interval_ms=100, timeout_ms=300, rise=2, fall=2)
WAIT_S = 15.0


class FakeHttpReplica:
    """/v2/health/ready and /v2/repository/index with switchable answers."""

    def __init__(self):
        self.port = free_port()
        self.ready_status = 200
        self.ready_delay_s = 0.0
        self.index: list[dict] | None = [{"name": "demo", "version": "1", "state": "READY"}]
        self.ready_calls = 0

    async def ready(self, request):
        self.ready_calls += 1
        if self.ready_delay_s:
            await asyncio.sleep(self.ready_delay_s)
        if self.ready_status != 200:
            return web.json_response({"error": "model demo is still loading"}, status=self.ready_status)
        return web.Response(status=200)

    async def index_handler(self, request):
        body = await request.json()
        assert body == {"ready": True}
        if self.index is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(self.index)

    async def __aenter__(self):
        app = web.Application()
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_post("/v2/repository/index", self.index_handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def checker():
    changes = []
    c = ActiveHealthChecker(SETTINGS, on_change=lambda s: changes.append((s.healthy, dict(s.ready_versions))))
    c.changes = changes
    await c.start()
    yield c
    await c.close()


async def test_http_rise_fall_and_readiness_reason(checker):
    async with FakeHttpReplica() as fake:
        state = ReplicaState(fake.url, pool="p")
        checker.add(state)
        await async_wait_until(lambda: state.healthy, WAIT_S, "healthy")  # first success: healthy at once
        assert state.ready_versions == {"demo": {"1"}} and state.ready_versions_known
        assert state.probe_rtt_ewma_s > 0
        assert checker.changes[0] == (True, {"demo": {"1"}})

        fake.ready_status = 503
        calls = fake.ready_calls
        await async_wait_until(lambda: not state.healthy, WAIT_S, "unhealthy")
        assert fake.ready_calls - calls >= SETTINGS.fall  # not after a single failure
        assert state.health_reason == "readiness 503: model demo is still loading"
        assert state.health_cause == "readiness 503"

        fake.ready_status = 200
        calls = fake.ready_calls
        await async_wait_until(lambda: state.healthy, WAIT_S, "healthy again")
        assert fake.ready_calls - calls >= SETTINGS.rise
        assert [h for h, _ in checker.changes] == [True, False, True]

        # Ready versions change -> on_change, without a health flip.
        fake.index = [{"name": "demo", "version": "1", "state": "READY"},
                      {"name": "demo", "version": "2", "state": "READY"},
                      {"name": "demo", "version": "3", "state": "LOADING"}]
        await async_wait_until(lambda: state.ready_versions == {"demo": {"1", "2"}}, WAIT_S, "new versions")
        assert checker.changes[-1] == (True, {"demo": {"1", "2"}})


async def test_http_probe_timeout_and_no_index(checker):
    async with FakeHttpReplica() as fake:
        fake.ready_delay_s = 1.0
        state = ReplicaState(fake.url)
        checker.add(state)
        await async_wait_until(lambda: state.last_probe_s > 0, WAIT_S, "probed")
        assert not state.healthy
        assert state.health_reason == "probe timeout after 300 ms"
        fake.ready_delay_s = 0.0
        fake.index = None  # no repository API: versions unknown, any model accepted
        await async_wait_until(lambda: state.healthy, WAIT_S, "healthy")
        assert not state.ready_versions_known and state.has_model("whatever", "7")


async def test_connect_refused_http_and_grpc(checker):
    states = [ReplicaState(f"http://127.0.0.1:{free_port()}"), ReplicaState(f"grpc://127.0.0.1:{free_port()}")]
    for s in states:
        checker.add(s)
    await async_wait_until(lambda: all(s.last_probe_s > 0 for s in states), WAIT_S, "probed")
    for s in states:
        assert not s.healthy
        assert s.health_reason == "connect refused", s.url
    checker.remove(states[0].url)
    assert states[0].url not in checker.states


async def test_grpc_health_service_states(checker):
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    try:
        state = ReplicaState(f"grpc://127.0.0.1:{port}")
        checker.add(state)
        await async_wait_until(lambda: state.last_probe_s > 0, WAIT_S, "probed")
        assert not state.healthy and state.health_reason.startswith("not SERVING")
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        await async_wait_until(lambda: state.healthy, WAIT_S, "healthy")
        # This server has no RepositoryIndex (UNIMPLEMENTED): versions unknown.
        assert not state.ready_versions_known
        await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await async_wait_until(lambda: not state.healthy, WAIT_S, "unhealthy")
        assert state.health_cause == "not SERVING"
    finally:
        await server.stop(None)


