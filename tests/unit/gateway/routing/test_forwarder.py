"""gateway.routing.forwarder.Forwarder.forward driven in-process: the gateway's own RegionPools
(health, outlier detection, P2C), retry budget, hedging, peer failover and deadline attribution,
over fake replica clients (no sockets, no processes). Each fake replica answers from a script:
a reply, a hang until the attempt's timer (what the real clients report as TIMEOUT), or a
delay then a reply.

The end-to-end versions of these paths (real replicas, real sockets) stay in tests/e2e
(test_upstream_safety.py, test_gateway_failover.py, test_multi_region.py)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from core.config import parse_config
from gateway.routing.forwarder import Forwarder
from gateway.routing.load_window import LoadWindow
from gateway.routing.targets import TARGET_LOCAL, TARGET_PEER, Router, Target
from gateway.server.metrics import GatewayMetrics
from gateway.upstream.pool import RegionPools, Upstream
from gateway.upstream.types import PROTOCOL_GRPC, PROTOCOL_HTTP, InferCall, Reply
from health.active import ProbeResult
from health.outcomes import Outcome

URLS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"]
# Far above what any in-process step takes, even on a loaded 2-core machine.
LONG_S = 30.0


def ok() -> Reply:
    return Reply(Outcome.SUCCESS, body=b'{"outputs": []}', model_version="1")


def unavailable() -> Reply:
    return Reply(Outcome.UNAVAILABLE, 503, grpc.StatusCode.UNAVAILABLE, message="replica says not now")


def refused() -> Reply:
    return Reply(Outcome.CONNECT_FAILURE, 503, grpc.StatusCode.UNAVAILABLE, message="connection refused")


def bad_request() -> Reply:
    return Reply(Outcome.CLIENT_ERROR, 400, grpc.StatusCode.INVALID_ARGUMENT, message="bad input")


HANG = "hang"  # never answers: the attempt's timer ends it, as the real clients' does


class Turns(list):
    """A script shared by several replicas: the Nth attempt of the request gets the Nth step,
    whichever replica P2C picked for it."""


class FakeReplica:
    """A replica client (HttpUpstream / GrpcUpstream's infer_* interface) answering from a script;
    the last step repeats. A step is a reply factory (ok, unavailable, ...), HANG, or
    (delay_s, factory)."""

    def __init__(self, url: str, script: list) -> None:
        self.url = url
        self.script = script if isinstance(script, Turns) else list(script)
        self.calls: list[tuple[str, float, dict[str, str]]] = []  # (protocol, timeout_s, headers)
        self.cancelled = 0

    async def _answer(self, protocol: str, timeout_s: float, headers: dict[str, str]) -> Reply:
        self.calls.append((protocol, timeout_s, dict(headers)))
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        try:
            if step == HANG:
                await asyncio.sleep(timeout_s)
                return Reply(Outcome.TIMEOUT, 504, grpc.StatusCode.DEADLINE_EXCEEDED,
                             message=f"replica {self.url} did not answer within {timeout_s * 1000:.0f} ms")
            if isinstance(step, tuple):
                delay_s, step = step
                await asyncio.sleep(delay_s)
            return step()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def infer_http(self, call: InferCall, timeout_s: float, headers: dict[str, str]) -> Reply:
        return await self._answer(PROTOCOL_HTTP, timeout_s, headers)

    async def infer_grpc(self, call: InferCall, timeout_s: float, headers: dict[str, str]) -> Reply:
        return await self._answer(PROTOCOL_GRPC, timeout_s, headers)


class FakePeerLink:
    """A peer region's gateway (gateway.upstream.peer_links.PeerLink's forward interface)."""

    def __init__(self, region: str, reply: Reply, *, is_down: bool = False) -> None:
        self.region = region
        self.reply = reply
        self.is_down = is_down
        self.forwarded: list[float] = []  # the time left each call was given

    async def forward(self, call: InferCall, remaining_s: float) -> Reply:
        self.forwarded.append(remaining_s)
        return self.reply


class FakePeers:
    def __init__(self, *links: FakePeerLink) -> None:
        self.links = {link.region: link for link in links}

    def link(self, region: str) -> FakePeerLink | None:
        return self.links.get(region)


class LocalThenPeers(Router):
    """Targets as the multi-region router gives them: the local pools, then peer gateways."""

    def __init__(self, local: str, peers: list[str]) -> None:
        super().__init__(local)
        self._targets = (Target(TARGET_LOCAL, local),
                         *(Target(TARGET_PEER, p, f"{p}.example:8000") for p in peers))

    def targets_for(self, call) -> tuple[Target, ...]:
        return self._targets


def config_toml(urls: list[str], gateway: str, health: str = "") -> str:
    return f"""
[health]
rise = 1
fall = 1
consecutive_failures = 2
max_ejection_percent = 100
{health}

[gateway]
retry_backoff_base_ms = 0
{gateway}

[[regions]]
name = "r1"
location = [50.0, 8.0]
http = "127.0.0.1:1"
grpc = "127.0.0.1:2"

  [[regions.pools]]
  name = "p1"
  kind = "geogate"
  replicas = {list(urls)!r}
""".replace("'", '"')


class Region:
    """One gateway worker's data path below the fronts: real RegionPools (static replicas,
    marked healthy by one good probe each), a real Forwarder, fake replica clients."""

    def __init__(self, scripts: dict[str, list], gateway: str = "", *, health: str = "",
                 router: Router | None = None, peers: FakePeers | None = None) -> None:
        self.cfg = parse_config(config_toml(list(scripts), gateway, health))
        self.fakes = {url: FakeReplica(url, script) for url, script in scripts.items()}
        self.pools = RegionPools(self.cfg, self.cfg.regions[0], client_factory=lambda st: self.fakes[st.url])
        for pool in self.pools.pools:
            pool.start()  # static lists: adds the members, no I/O
        now = time.monotonic()
        for state in self.pools.all_states():
            if self.pools.checker.record(state, ProbeResult(ok=True), now):
                self.pools.replica_health_changed(state)
        self.metrics = GatewayMetrics("r1")
        self.load = LoadWindow()
        self.forwarder = Forwarder(self.pools, self.cfg.gateway, self.metrics, router or Router("r1"), self.load,
                                   peers)
        self.cross_region: list[tuple[str, Outcome, str]] = []
        self.forwarder.on_cross_region = lambda region, reply, why: self.cross_region.append(
            (region, reply.outcome, why))

    def upstream(self, url: str) -> Upstream:
        return next(u for u in self.pools.upstreams() if u.url == url)

    def failures(self) -> dict[str, int]:
        return {s.url: s.consecutive_failures for s in self.pools.all_states()}

    def tried(self) -> list[str]:
        return [url for url, fake in self.fakes.items() if fake.calls]

    def counter(self, name: str, **labels: str) -> float:
        total = 0.0
        for metric in self.metrics.registry.collect():
            for sample in metric.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def assert_whole(self) -> None:
        """Every attempt gave its replica's in-flight count back, whatever happened."""
        assert {u.url: u.load.outstanding for u in self.pools.upstreams()} == {u: 0 for u in self.fakes}


async def wait_until(pred, timeout_s: float = LONG_S) -> None:
    """Yield to the loop until `pred()` holds (the forwarder's tasks run meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0)


def call(timeout_s: float = LONG_S, *, protocol: str = PROTOCOL_HTTP, client_deadline: bool = False) -> InferCall:
    now = time.monotonic()
    return InferCall(protocol, "demo", None, None, "rid-1", now + timeout_s, started_s=now,
                     client_deadline=client_deadline, body=b"{}", header={})


# ---------------------------------------------------------------- answers and retries


@pytest.mark.parametrize("protocol", [PROTOCOL_HTTP, PROTOCOL_GRPC])
async def test_a_good_answer_is_returned_after_one_attempt(protocol):
    region = Region({URLS[0]: [ok]})
    result = await region.forwarder.forward(call(protocol=protocol))
    assert result.reply.outcome is Outcome.SUCCESS and result.attempts == 1
    assert result.upstream is region.upstream(URLS[0])
    fake = region.fakes[URLS[0]]
    assert [c[0] for c in fake.calls] == [protocol]
    assert fake.calls[0][2] == {"x-request-id": "rid-1"}
    assert region.counter("geogate_upstream_attempts_total", outcome="success") == 1
    region.assert_whole()


async def test_a_retryable_answer_is_retried_on_a_different_replica():
    turns = Turns([unavailable, unavailable, ok])
    region = Region(dict.fromkeys(URLS, turns))
    result = await region.forwarder.forward(call())
    assert result.reply.outcome is Outcome.SUCCESS and result.attempts == 3
    assert sorted(region.tried()) == sorted(URLS)  # each replica once: never the same one again
    assert all(len(f.calls) == 1 for f in region.fakes.values())
    # the failures are recorded against the replicas that failed (passive outlier detection)
    failures = region.failures()
    assert failures[result.upstream.url] == 0 and sorted(failures.values()) == [0, 1, 1]
    assert region.counter("geogate_retries_total") == 2
    region.assert_whole()


async def test_max_attempts_bounds_the_retries():
    region = Region({u: [unavailable] for u in URLS}, "max_attempts = 2")
    result = await region.forwarder.forward(call())
    assert result.attempts == 2 and len(region.tried()) == 2
    assert result.reply.outcome is Outcome.UNAVAILABLE and result.reply.http_status == 503
    region.assert_whole()


async def test_a_client_error_is_answered_not_retried():
    region = Region({URLS[0]: [bad_request], URLS[1]: [bad_request]})
    result = await region.forwarder.forward(call())
    assert result.attempts == 1 and result.reply.http_status == 400
    assert region.failures() == {URLS[0]: 0, URLS[1]: 0}  # the request's fault, not the replica's
    region.assert_whole()


async def test_the_per_try_timeout_ends_each_attempt():
    region = Region({URLS[0]: [HANG], URLS[1]: [HANG]}, "per_try_timeout_ms = 50")
    result = await region.forwarder.forward(call())
    assert result.attempts == 2
    assert result.reply.outcome is Outcome.TIMEOUT  # neither answered: the last timeout, not the client's
    assert [f.calls[0][1] for f in region.fakes.values()] == [0.05, 0.05]  # the per-try limit, not the deadline
    assert region.failures() == {URLS[0]: 1, URLS[1]: 1}
    region.assert_whole()


# ---------------------------------------------------------------- retry budget


async def test_an_exhausted_retry_budget_stops_retries_but_not_connect_failures():
    gw = "retry_budget_percent = 0\nretry_budget_min_per_s = 0"
    region = Region({URLS[0]: [unavailable], URLS[1]: [unavailable]}, gw)
    result = await region.forwarder.forward(call())
    assert result.attempts == 1 and result.reply.outcome is Outcome.UNAVAILABLE
    assert "retry budget exhausted: not retried" in result.reply.message
    assert region.counter("geogate_retry_budget_exhausted_total") == 1
    # a refused connection sent nothing to anyone: retried without spending budget
    region = Region(dict.fromkeys(URLS, Turns([refused, refused, ok])), gw)
    result = await region.forwarder.forward(call())
    assert result.attempts == 3 and result.reply.outcome is Outcome.SUCCESS
    region.assert_whole()


async def test_the_budget_grows_with_recent_requests():
    """Retries may add about `retry_budget_percent` of recent requests: with 50%, two requests
    earn one retry."""
    gw = "retry_budget_percent = 50\nretry_budget_min_per_s = 0"
    region = Region({URLS[0]: [unavailable], URLS[1]: [unavailable]}, gw)
    first = await region.forwarder.forward(call())  # 1 request: 0.5 retries, none allowed
    assert first.attempts == 1 and "retry budget exhausted" in first.reply.message
    second = await region.forwarder.forward(call())  # 2 requests: one retry, then spent again
    assert second.attempts == 2
    assert sum(len(f.calls) for f in region.fakes.values()) == 3  # 1 + 2 attempts in all
    assert region.counter("geogate_retries_total", reason="unavailable") == 1
    assert region.counter("geogate_retry_budget_exhausted_total") == 2
    region.assert_whole()


# ---------------------------------------------------------------- hedging


def _seed_latencies(region: Region, seconds: float, n: int = 60) -> None:
    now = time.monotonic()
    for _ in range(n):
        region.load.record(seconds, now)


async def test_a_slow_attempt_is_hedged_and_the_loser_is_cancelled_not_failed():
    region = Region({URLS[0]: [(LONG_S, ok)], URLS[1]: [(LONG_S, ok)]}, "hedge_after_percentile = 50")
    _seed_latencies(region, 0.005)
    slow = region.fakes
    result_task = asyncio.ensure_future(region.forwarder.forward(call()))
    # Whichever replica P2C picks first is slow; once it is known, the other gets a fast script
    # (the hedge, 5 ms later at the earliest, can only go there).
    await wait_until(lambda: any(f.calls for f in slow.values()))
    first_url = next(u for u, f in slow.items() if f.calls)
    other = next(u for u in slow if u != first_url)
    slow[other].script = [ok]
    result = await asyncio.wait_for(result_task, LONG_S)
    assert result.reply.outcome is Outcome.SUCCESS and result.attempts == 2
    assert result.upstream is region.upstream(other)
    assert slow[first_url].cancelled == 1  # the losing attempt was cancelled ...
    assert region.failures() == {URLS[0]: 0, URLS[1]: 0}  # ... and not counted against its replica
    assert region.counter("geogate_retries_total", reason="hedge") == 1
    assert region.counter("geogate_upstream_attempts_total", outcome="cancelled") == 1
    region.assert_whole()


async def test_no_hedge_without_enough_latency_samples():
    region = Region({URLS[0]: [(0.05, ok)], URLS[1]: [ok]}, "hedge_after_percentile = 50")
    _seed_latencies(region, 0.001, n=10)  # fewer than HEDGE_MIN_SAMPLES
    result = await region.forwarder.forward(call())
    assert result.attempts == 1 and len(region.tried()) == 1
    region.assert_whole()


# ---------------------------------------------------------------- deadlines and attribution


async def test_the_clients_own_deadline_is_deadline_client_not_a_replica_failure():
    region = Region({URLS[0]: [HANG], URLS[1]: [HANG]}, "per_try_timeout_ms = 30000")
    result = await region.forwarder.forward(call(0.05, client_deadline=True))
    assert result.reply.outcome is Outcome.DEADLINE_CLIENT
    assert (result.reply.http_status, result.reply.grpc_code) == (504, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert "the client's deadline of 50 ms" in result.reply.message
    assert result.attempts == 1  # no time left for another: not retried
    assert region.failures() == {URLS[0]: 0, URLS[1]: 0}
    assert region.counter("geogate_upstream_attempts_total", outcome="deadline_client") == 1
    region.assert_whole()


async def test_the_gateways_deadline_is_a_timeout():
    region = Region({URLS[0]: [HANG], URLS[1]: [HANG]}, "per_try_timeout_ms = 30000")
    result = await region.forwarder.forward(call(0.05, client_deadline=False))
    assert result.reply.outcome is Outcome.TIMEOUT and result.reply.http_status == 504
    assert "deadline of 50 ms exceeded after 1 attempt(s)" in result.reply.message
    assert sum(region.failures().values()) == 1  # the replica that did not answer in time
    region.assert_whole()


async def test_a_per_try_timeout_shorter_than_the_clients_deadline_is_the_replicas_failure():
    region = Region({URLS[0]: [HANG], URLS[1]: [HANG]}, "per_try_timeout_ms = 50\nmax_attempts = 2")
    result = await region.forwarder.forward(call(LONG_S, client_deadline=True))
    # the per-try timer, not the client's deadline, ended both attempts: TIMEOUT, retried, counted
    assert result.reply.outcome is Outcome.TIMEOUT and result.attempts == 2
    assert region.failures() == {URLS[0]: 1, URLS[1]: 1}
    assert region.counter("geogate_upstream_attempts_total", outcome="deadline_client") == 0
    region.assert_whole()


# ---------------------------------------------------------------- other regions


async def test_local_failures_fail_over_to_a_peer_region():
    peer = FakePeerLink("r2", Reply(Outcome.SUCCESS, body=b"{}", region="r2", replica="http://r2-a"))
    region = Region({URLS[0]: [unavailable], URLS[1]: [unavailable]}, "max_attempts = 2",
                    router=LocalThenPeers("r1", ["r2"]), peers=FakePeers(peer))
    result = await region.forwarder.forward(call())
    assert result.reply.outcome is Outcome.SUCCESS and result.reply.region == "r2"
    assert result.attempts == 3 and result.upstream is None
    assert len(peer.forwarded) == 1 and 0 < peer.forwarded[0] <= LONG_S  # the time left travels
    assert region.cross_region == [("r2", Outcome.SUCCESS, "replica says not now")]
    assert region.counter("geogate_cross_region_requests_total", to_region="r2", outcome="success") == 1
    region.assert_whole()


async def test_no_local_replica_goes_to_the_peer_without_spending_budget():
    peer = FakePeerLink("r2", Reply(Outcome.SUCCESS, body=b"{}", region="r2"))
    region = Region({URLS[0]: [ok]}, "retry_budget_percent = 0\nretry_budget_min_per_s = 0",
                    health="panic_threshold = 0.0", router=LocalThenPeers("r1", ["r2"]), peers=FakePeers(peer))
    state = region.pools.all_states()[0]
    region.pools.checker.record(state, ProbeResult(ok=False, cause="refused", reason="refused"), time.monotonic())
    region.pools.replica_health_changed(state)
    result = await region.forwarder.forward(call())
    assert result.reply.outcome is Outcome.SUCCESS and result.attempts == 1
    assert region.fakes[URLS[0]].calls == []
    assert region.cross_region[0][0] == "r2" and region.cross_region[0][2]  # why not local is said


async def test_a_retryable_peer_answer_moves_on_to_the_next_region():
    bad = FakePeerLink("r2", unavailable())
    good = FakePeerLink("r3", Reply(Outcome.SUCCESS, body=b"{}", region="r3"))
    region = Region({URLS[0]: [refused]}, "max_attempts = 1",
                    router=LocalThenPeers("r1", ["r2", "r3"]), peers=FakePeers(bad, good))
    result = await region.forwarder.forward(call())
    assert result.reply.region == "r3" and result.attempts == 3
    assert [r for r, _, _ in region.cross_region] == ["r2", "r3"]


async def test_a_peer_that_runs_out_of_the_clients_deadline_is_deadline_client():
    peer = FakePeerLink("r2", Reply(Outcome.TIMEOUT, 504, grpc.StatusCode.DEADLINE_EXCEEDED, message="peer timed out"))
    nxt = FakePeerLink("r3", Reply(Outcome.SUCCESS, body=b"{}", region="r3"))
    region = Region({URLS[0]: [refused]}, "max_attempts = 1",
                    router=LocalThenPeers("r1", ["r2", "r3"]), peers=FakePeers(peer, nxt))
    result = await region.forwarder.forward(call(5.0, client_deadline=True))
    assert result.reply.outcome is Outcome.DEADLINE_CLIENT
    assert "the client's deadline" in result.reply.message
    assert nxt.forwarded == []  # no time left for another region
    # the gateway's own deadline: a peer timeout is retryable, the next region gets it
    peer.reply = Reply(Outcome.TIMEOUT, 504, grpc.StatusCode.DEADLINE_EXCEEDED, message="peer timed out")
    result = await region.forwarder.forward(call(5.0, client_deadline=False))
    assert result.reply.region == "r3"


async def test_nothing_to_serve_is_503_with_the_reason():
    region = Region({URLS[0]: [ok]}, health="panic_threshold = 0.0")
    state = region.pools.all_states()[0]
    region.pools.checker.record(state, ProbeResult(ok=False, cause="refused", reason="refused"), time.monotonic())
    region.pools.replica_health_changed(state)
    result = await region.forwarder.forward(call())
    assert (result.reply.http_status, result.reply.grpc_code) == (503, grpc.StatusCode.UNAVAILABLE)
    assert result.reply.message.startswith("no replica can serve: ") and result.attempts == 0
    assert region.fakes[URLS[0]].calls == []
