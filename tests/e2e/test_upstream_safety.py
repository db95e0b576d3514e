"""Exception safety of the data path, in-process against two real replica processes: the
gateway's own RegionPools, upstream clients and Forwarder, with an exception injected at each
step of the upstream clients (monkeypatched to raise, an unexpected error and a cancellation).
After each, the pools are whole (no attempt still counted in flight, no pooled HTTP connection
busy or lost, nobody waiting) and the next request succeeds. Also: real cancellations (a client
going away, a hedge losing its race) and client deadlines never count against a replica, while
the gateway's own timeouts do."""

from __future__ import annotations

import asyncio
import json
import math
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from core.config import parse_config
from gateway.routing.forwarder import Forwarder
from gateway.routing.load_window import LoadWindow
from gateway.routing.targets import Router
from gateway.server.metrics import GatewayMetrics
from gateway.upstream import grpc_upstream as ugrpc
from gateway.upstream import http1_client as http1
from gateway.upstream import http_upstream as uhttp
from gateway.upstream import translate
from gateway.upstream.http1_client import ConnectionPool, UpstreamTimeout, _Conn
from gateway.upstream.pool import RegionPools
from gateway.upstream.proto_peek import ProtoError, peek_infer_request
from gateway.upstream.types import PROTOCOL_GRPC, PROTOCOL_HTTP, InferCall
from health.outcomes import Outcome
from tests.gateway_procs import demo_repository, set_faults, start_replicas
from tests.procs import async_wait_until

WAIT_HEALTHY_S = 30.0
X = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 16)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    started: list = []
    try:
        yield start_replicas(started, demo_repository(tmp_path_factory.mktemp("safety")), 2)
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture
def clean(replicas):
    for r in replicas:
        set_faults(r)
    yield replicas
    for r in replicas:
        set_faults(r)


def _toml(urls: list[str], gateway_extra: str) -> str:
    return f"""
[health]
interval_ms = 200
timeout_ms = 1000
rise = 1
fall = 3
consecutive_failures = 2
max_ejection_percent = 100

[gateway]
{gateway_extra}

[[regions]]
name = "r1"
location = [50.0, 8.0]
http = "127.0.0.1:1"
grpc = "127.0.0.1:2"

  [[regions.pools]]
  name = "p1"
  kind = "geogate"
  replicas = {json.dumps(urls)}
"""


class Region:
    """The data path of one gateway worker, in this test's event loop."""

    def __init__(self, replicas, schemes: tuple[str, ...], gateway_extra: str = "") -> None:
        urls = [f"{s}://{r.http_url if s == 'http' else r.grpc_url}" for r in replicas for s in schemes]
        self.cfg = parse_config(_toml(urls, gateway_extra))
        self.pools = RegionPools(self.cfg, self.cfg.regions[0])
        self.metrics = GatewayMetrics("r1")
        self.load = LoadWindow()
        self.forwarder = Forwarder(self.pools, self.cfg.gateway, self.metrics, Router("r1"), self.load)

    async def __aenter__(self) -> Region:
        await self.pools.start()
        deadline = time.monotonic() + WAIT_HEALTHY_S
        while not all(s.healthy for s in self.pools.all_states()):
            assert time.monotonic() < deadline, [s.health_reason for s in self.pools.all_states()]
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.pools.close()

    def assert_whole(self) -> None:
        """Nothing in flight, no pooled connection busy or lost, nobody waiting for one."""
        for up in self.pools.upstreams():
            assert up.load.outstanding == 0, (up.url, up.load.outstanding)
            pool = getattr(up.client, "pool", None)
            if pool is not None:
                st = pool.stats()
                assert st["busy"] == 0 and st["waiting"] == 0 and st["open"] == st["idle"], (up.url, st)

    def failures(self) -> dict[str, int]:
        return {s.url: s.consecutive_failures for s in self.pools.all_states()}

    def attempts(self, outcome: str) -> float:
        total = 0.0
        for metric in self.metrics.registry.collect():
            for sample in metric.samples:
                if sample.name == "geogate_upstream_attempts_total" and sample.labels["outcome"] == outcome:
                    total += sample.value
        return total


def http_call(timeout_s: float = 10.0, *, client_deadline: bool = False, version: str | None = None) -> InferCall:
    header = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": X.ravel().tolist()}]}
    now = time.monotonic()
    return InferCall(PROTOCOL_HTTP, "demo", version, version, "rid", now + timeout_s, started_s=now,
                     client_deadline=client_deadline, body=json.dumps(header).encode(), header=header)


def grpc_call(timeout_s: float = 10.0, *, client_deadline: bool = False, version: str | None = None) -> InferCall:
    req = service_pb2.ModelInferRequest(model_name="demo")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    req.raw_input_contents.append(X.tobytes())
    raw = req.SerializeToString()
    now = time.monotonic()
    return InferCall(PROTOCOL_GRPC, "demo", None, version, "rid", now + timeout_s, started_s=now,
                     client_deadline=client_deadline, raw=raw, peek=peek_infer_request(raw))


def _raiser(exc: BaseException):
    def raise_it(*args, **kwargs):
        raise exc
    return raise_it


def _araiser(exc: BaseException):
    async def raise_it(*args, **kwargs):
        raise exc
    return raise_it


# (step name, client protocol, replica schemes, how to make that step raise)
STEPS = [
    ("http1 request bytes", "http", ("http",), lambda mp, reg, exc: mp.setattr(
        ConnectionPool, "_request_bytes", _raiser(exc))),
    ("http1 connect", "http", ("http",), lambda mp, reg, exc: mp.setattr(ConnectionPool, "_connect", _araiser(exc))),
    ("http1 answer timer", "http", ("http",), lambda mp, reg, exc: mp.setattr(http1, "_arm_timer", _raiser(exc))),
    ("http1 send", "http", ("http",), lambda mp, reg, exc: mp.setattr(_Conn, "send", _raiser(exc))),
    ("http1 parse answer", "http", ("http",), lambda mp, reg, exc: mp.setattr(_Conn, "_try_parse", _raiser(exc))),
    ("http answer version", "http", ("http",), lambda mp, reg, exc: mp.setattr(
        uhttp, "response_version", _raiser(exc))),
    ("http classify", "http", ("http",), lambda mp, reg, exc: mp.setattr(
        uhttp, "classify_http_status", _raiser(exc))),
    ("grpc->http translate request", "grpc", ("http",), lambda mp, reg, exc: mp.setattr(
        translate, "grpc_request_to_http", _raiser(exc))),
    ("grpc->http translate answer", "grpc", ("http",), lambda mp, reg, exc: mp.setattr(
        translate, "http_response_to_grpc", _raiser(exc))),
    ("grpc call", "grpc", ("grpc",), lambda mp, reg, exc: [
        mp.setattr(up.client, "_infer", _araiser(exc)) for up in reg.pools.upstreams()]),
    ("grpc set version", "grpc", ("grpc",), lambda mp, reg, exc: mp.setattr(
        ugrpc, "with_model_version", _raiser(exc))),
    ("grpc answer version", "grpc", ("grpc",), lambda mp, reg, exc: mp.setattr(
        ugrpc, "peek_response_version", _raiser(exc))),
    ("http->grpc translate request", "http", ("grpc",), lambda mp, reg, exc: mp.setattr(
        translate, "http_request_to_grpc", _raiser(exc))),
    ("http->grpc translate answer", "http", ("grpc",), lambda mp, reg, exc: mp.setattr(
        translate, "grpc_response_to_http", _raiser(exc))),
    ("outlier record", "http", ("http",), lambda mp, reg, exc: mp.setattr(
        reg.pools.detector, "record", _raiser(exc))),
]
EXCEPTIONS = {"unexpected": lambda: RuntimeError("injected"), "cancelled": lambda: asyncio.CancelledError(),
              "malformed": lambda: ProtoError("injected"), "closed channel": lambda: grpc.aio.UsageError("closed")}


# Every step with every exception (UsageError only where a gRPC channel is used).
CASES = [pytest.param(*step, kind, id=f"{step[0]}-{kind}") for step in STEPS for kind in EXCEPTIONS
         if kind != "closed channel" or "grpc" in step[2]]


@pytest.mark.parametrize(("step", "protocol", "schemes", "inject", "exc_kind"), CASES)
async def test_injected_exception_leaves_the_pools_whole(clean, monkeypatch, step, protocol, schemes, inject,
                                                         exc_kind):
    async with Region(clean, schemes) as region:
        make = http_call if protocol == "http" else grpc_call
        with monkeypatch.context() as mp:
            inject(mp, region, EXCEPTIONS[exc_kind]())
            try:
                result = await region.forwarder.forward(make(version="1"))
            except (RuntimeError, ProtoError, asyncio.CancelledError, grpc.aio.UsageError):
                result = None  # propagated: the front answers 500 / INTERNAL
            if result is not None:  # handled: a clear reply, never a success by accident
                assert result.reply.outcome is not Outcome.SUCCESS or step == "outlier record", result.reply
                assert result.reply.message or result.reply.outcome is Outcome.SUCCESS
            region.assert_whole()
        # The step works again: the next request succeeds on a pool that is whole.
        ok = await region.forwarder.forward(make(version="1"))
        assert ok.reply.outcome is Outcome.SUCCESS, ok.reply.message
        region.assert_whole()
        assert not any(s.ejected(time.monotonic()) for s in region.pools.all_states())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_client_cancel_mid_request(clean, protocol):
    """The client goes away while its attempt waits on a slow replica: nothing counts against
    the replica, nothing stays in flight, the connection is dropped, not leaked."""
    for r in clean:
        set_faults(r, delay_ms=600)
    async with Region(clean, (protocol,)) as region:
        make = http_call if protocol == "http" else grpc_call
        for _ in range(4):
            task = asyncio.ensure_future(region.forwarder.forward(make()))
            # cancelled while its attempt is in flight (the replica holds it for 600 ms)
            await async_wait_until(lambda: any(u.load.outstanding for u in region.pools.upstreams()), 10,
                                   "an attempt in flight")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            region.assert_whole()
        assert set(region.failures().values()) == {0}
        assert region.attempts("cancelled") == 4
        for r in clean:
            set_faults(r)
        assert (await region.forwarder.forward(make())).reply.outcome is Outcome.SUCCESS


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_client_deadline_is_not_a_replica_failure(clean, protocol):
    for r in clean:
        set_faults(r, delay_ms=400)
    async with Region(clean, (protocol,), "per_try_timeout_ms = 1000") as region:
        make = http_call if protocol == "http" else grpc_call
        for _ in range(5):  # 2 would eject (consecutive_failures = 2)
            res = await region.forwarder.forward(make(0.05, client_deadline=True))
            assert res.reply.outcome is Outcome.DEADLINE_CLIENT, res.reply
            assert res.reply.http_status == 504 and res.reply.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "client's deadline" in res.reply.message
        assert set(region.failures().values()) == {0}
        assert region.attempts("deadline_client") == 5
        region.assert_whole()
        # The gateway's OWN per-try timeout still counts: 1000 ms per try < the 1500 ms delay.
        for r in clean:
            set_faults(r, delay_ms=1500)
        res = await region.forwarder.forward(make(1.2))  # the gateway's default-like deadline
        assert res.reply.outcome is Outcome.TIMEOUT, res.reply
        assert max(region.failures().values()) == 1
        region.assert_whole()


async def test_losing_hedge_is_cancelled_not_failed(clean):
    set_faults(clean[0], delay_ms=400)
    async with Region(clean, ("http",), "hedge_after_percentile = 50\nretry_budget_min_per_s = 1000") as region:
        now = time.monotonic()
        for _ in range(100):
            region.load.record(0.002, now)  # recent latency: hedge after ~2 ms
        for _ in range(6):
            res = await region.forwarder.forward(http_call())
            assert res.reply.outcome is Outcome.SUCCESS, res.reply
            region.assert_whole()
        assert region.attempts("cancelled") >= 1  # the slow replica's attempts lost their races
        assert set(region.failures().values()) == {0}


async def test_waiters_that_gave_up_do_not_swallow_a_freed_connection(clean):
    """One connection; it is aborted (timeout) while one waiter has given up and another still
    waits: the one still waiting gets a new connection at once, not at its own timeout."""
    set_faults(clean[0], delay_ms=300)
    pool = ConnectionPool(clean[0].http_url, max_connections=1)
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                   "data": X.ravel().tolist()}]}).encode()
    try:
        first = asyncio.ensure_future(pool.post("/v2/models/demo/infer", body, {}, 0.15))
        await asyncio.sleep(0.02)
        quitter = asyncio.ensure_future(pool.post("/v2/models/demo/infer", body, {}, 0.05))
        waiter = asyncio.ensure_future(pool.post("/v2/models/demo/infer", body, {}, 5.0))
        with pytest.raises(UpstreamTimeout):
            await quitter
        with pytest.raises(UpstreamTimeout):
            await first
        t0 = time.monotonic()
        resp = await waiter
        assert resp.status == 200
        assert time.monotonic() - t0 < 2.0  # the 300 ms answer, not the 5 s timeout
        st = pool.stats()
        assert st["busy"] == 0 and st["waiting"] == 0 and st["open"] == st["idle"] == 1, st
    finally:
        await pool.close()


@pytest.mark.parametrize("timeout_s", [math.nan, math.inf, -math.inf, -1.0, 0.0])
async def test_pool_refuses_unusable_timeouts_before_taking_a_connection(clean, timeout_s):
    pool = ConnectionPool(clean[0].http_url, max_connections=2)
    try:
        with pytest.raises(UpstreamTimeout):
            await pool.post("/v2/models/demo/infer", b"{}", {}, timeout_s)
        assert pool.stats() == {"open": 0, "idle": 0, "busy": 0, "waiting": 0}
    finally:
        await pool.close()
