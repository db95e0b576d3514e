"""gateway.routing.sequences: parameters, rendezvous placement (stability, minimal movement,
weights), the remembered START choices, and the forwarder's sequence path driven in-process over
fake replicas (START / step / END, lost sequences, no retry, no hedge, no spill)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import grpc
import pytest
from tritonclient.grpc import service_pb2

from gateway.routing.sequences import (
    DEFAULT_SEQUENCE_IDLE_S,
    RememberedSequences,
    SequenceRouter,
    idle_timeout_s,
    rank,
    sequence_from_grpc,
    sequence_from_http,
)
from gateway.upstream.proto_peek import peek_infer_request
from gateway.upstream.types import PROTOCOL_GRPC, PROTOCOL_HTTP, InferCall, SequenceParams
from health.active import ProbeResult
from health.outcomes import Outcome
from tests.unit.gateway.routing.test_forwarder import (
    HANG,
    LONG_S,
    FakePeerLink,
    FakePeers,
    LocalThenPeers,
    Region,
    ok,
    refused,
    unavailable,
)

URLS = [f"http://127.0.0.1:{9001 + i}" for i in range(3)]


def member(url: str, weight: int = 1) -> SimpleNamespace:
    return SimpleNamespace(url=url, state=SimpleNamespace(weight=weight))


def top(model: str, seq_id, urls) -> str:
    return rank(model, seq_id, [member(u) for u in urls])[0].url


# ---------------------------------------------------------------- parameters


def test_http_parameters():
    assert sequence_from_http(None) is None
    assert sequence_from_http({"timeout": 5}) is None
    assert sequence_from_http({"sequence_id": 0, "sequence_start": True}) is None  # Triton's "none"
    assert sequence_from_http({"sequence_id": ""}) is None
    assert sequence_from_http({"sequence_id": 7, "sequence_start": True}) == SequenceParams(7, True, False)
    assert sequence_from_http({"sequence_id": "abc", "sequence_end": True}) == SequenceParams("abc", False, True)
    assert sequence_from_http({"sequence_id": 2**64 - 1}) == SequenceParams(2**64 - 1)
    for bad, word in (({"sequence_id": 1.5}, "float"), ({"sequence_id": True}, "bool"),
                      ({"sequence_id": [1]}, "list"), ({"sequence_id": -1}, "-1"), ({"sequence_id": 2**64}, "64"),
                      ({"sequence_id": 3, "sequence_start": "yes"}, "sequence_start"),
                      ({"sequence_id": 3, "sequence_end": 1}, "sequence_end")):
        got = sequence_from_http(bad)
        assert got is not None and word in got.error, (bad, got)


def peeked(**params) -> object:
    req = service_pb2.ModelInferRequest(model_name="acc")
    for name, value in params.items():
        if isinstance(value, bool):
            req.parameters[name].bool_param = value
        elif isinstance(value, int):
            req.parameters[name].int64_param = value
        else:
            req.parameters[name].string_param = value
    return peek_infer_request(req.SerializeToString())


def test_grpc_parameters():
    assert sequence_from_grpc(peeked()) is None
    assert sequence_from_grpc(peeked(sequence_start=True)) is None  # flags without an id: no sequence
    assert sequence_from_grpc(peeked(sequence_id=9, sequence_start=True)) == SequenceParams(9, True, False)
    assert sequence_from_grpc(peeked(sequence_id="s-1", sequence_end=True)) == SequenceParams("s-1", False, True)
    # A uint64 correlation id above 2**63 travels as a negative int64_param.
    assert sequence_from_grpc(peeked(sequence_id=-1)) == SequenceParams(2**64 - 1)
    got = sequence_from_grpc(peeked(sequence_id=9, sequence_start=1))
    assert got is not None and "'sequence_start' must be a bool" in got.error
    got = sequence_from_grpc(peeked(sequence_id=True))
    assert got is not None and "'sequence_id'" in got.error


def test_idle_timeout_from_triton_config():
    assert idle_timeout_s(None) is None
    assert idle_timeout_s({"name": "m"}) is None
    assert idle_timeout_s({"sequence_batching": {}}) == 1.0  # Triton's default
    assert idle_timeout_s({"sequence_batching": {"max_sequence_idle_microseconds": 30_000_000}}) == 30.0
    assert idle_timeout_s({"sequence_batching": {"max_sequence_idle_microseconds": "2500000"}}) == 2.5


# ---------------------------------------------------------------- placement


def test_ranking_is_stable_and_independent_of_member_order():
    urls = [f"http://10.0.0.{i}:8000" for i in range(1, 6)]
    first = [u.url for u in rank("acc", 42, [member(u) for u in urls])]
    assert [u.url for u in rank("acc", 42, [member(u) for u in reversed(urls)])] == first
    # A stable hash (not Python's salted hash()): the same ranking in every process, every restart.
    assert first[0] == "http://10.0.0.4:8000"
    # Model and id type are part of the key: the int 42 and the string "42" are other sequences.
    tops = {top("acc", i, urls) for i in range(50)}
    assert len(tops) == 5  # every member holds some sequences
    assert any(top("acc", i, urls) != top("acc", str(i), urls) for i in range(1, 20))
    assert any(top("acc", i, urls) != top("other", i, urls) for i in range(1, 20))


def test_adding_or_removing_one_replica_moves_only_its_share():
    urls = [f"http://10.0.0.{i}:8000" for i in range(1, 6)]
    ids = list(range(1, 3001)) + [f"seq-{i}" for i in range(1000)]
    before = {i: top("acc", i, urls) for i in ids}
    new = "http://10.0.0.9:8000"
    after = {i: top("acc", i, [*urls, new]) for i in ids}
    moved = [i for i in ids if after[i] != before[i]]
    assert all(after[i] == new for i in moved)  # only to the new member
    assert 0.10 < len(moved) / len(ids) < 0.24  # about 1/6
    gone = urls[2]
    without = {i: top("acc", i, [u for u in urls if u != gone]) for i in ids}
    changed = [i for i in ids if without[i] != before[i]]
    assert changed and all(before[i] == gone for i in changed)  # only the removed member's share
    assert len(changed) == sum(1 for i in ids if before[i] == gone)


def test_weights_set_the_share():
    heavy, light = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
    members = [member(heavy, 3), member(light, 1)]
    share = sum(1 for i in range(1, 4001) if rank("acc", i, members)[0].url == heavy) / 4000
    assert 0.70 < share < 0.80  # 3 / 4


def test_remembered_choices_are_bounded_and_expire():
    mem = RememberedSequences(max_entries=3)
    for i in range(5):
        mem.remember(("http", "m", i), f"u{i}", 10.0, 100.0)
    assert len(mem) == 3 and mem.get(("http", "m", 0), 100.0) is None
    assert mem.get(("http", "m", 4), 105.0) == "u4"  # used: expires 10 s after this use
    assert mem.get(("http", "m", 4), 114.0) == "u4"
    assert mem.get(("http", "m", 3), 111.0) is None  # idle past 10 s
    mem.forget(("http", "m", 4))
    assert mem.get(("http", "m", 4), 114.0) is None


# ---------------------------------------------------------------- routing through the forwarder


def seq_call(seq_id, *, start: bool = False, end: bool = False, protocol: str = PROTOCOL_HTTP,
             timeout_s: float = LONG_S, error: str = "") -> InferCall:
    now = time.monotonic()
    return InferCall(protocol, "demo", None, None, "rid-s", now + timeout_s, started_s=now, body=b"{}", header={},
                     sequence=SequenceParams(seq_id, start, end, error))


def set_health(region: Region, url: str, healthy: bool) -> None:
    state = next(s for s in region.pools.all_states() if s.url == url)
    if region.pools.checker.record(state, ProbeResult(ok=healthy), time.monotonic()):
        region.pools.replica_health_changed(state)
    assert state.healthy is healthy


def calls(region: Region) -> dict[str, int]:
    return {url: len(f.calls) for url, f in region.fakes.items()}


@pytest.mark.parametrize("protocol", [PROTOCOL_HTTP, PROTOCOL_GRPC])
async def test_start_steps_and_end_go_to_the_top_ranked_replica(protocol):
    region = Region({u: [ok] for u in URLS})
    holder = top("demo", 11, URLS)
    for start, end in ((True, False), (False, False), (False, False), (False, True)):
        res = await region.forwarder.forward(seq_call(11, start=start, end=end, protocol=protocol))
        assert res.reply.outcome is Outcome.SUCCESS and res.upstream.url == holder and res.attempts == 1
    assert calls(region) == {u: (4 if u == holder else 0) for u in URLS}
    assert region.counter("geogate_sequences_pinned_total", model="demo") == 1
    region.assert_whole()


async def test_many_sequences_spread_and_each_keeps_its_replica():
    region = Region({u: [ok] for u in URLS})
    served: dict[int, set[str]] = {}
    for step in range(3):
        for seq in range(1, 31):
            res = await region.forwarder.forward(seq_call(seq, start=step == 0))
            served.setdefault(seq, set()).add(res.upstream.url)
    assert all(len(urls) == 1 for urls in served.values())
    assert len({next(iter(u)) for u in served.values()}) == 3


async def test_start_on_an_unhealthy_top_goes_to_the_next_and_is_remembered_until_end():
    region = Region({u: [ok] for u in URLS})
    ranked = [u.url for u in rank("demo", "s-5", [member(u) for u in URLS])]
    set_health(region, ranked[0], False)
    res = await region.forwarder.forward(seq_call("s-5", start=True))
    assert res.upstream.url == ranked[1]
    set_health(region, ranked[0], True)  # back, but the sequence lives on ranked[1]
    for _ in range(3):
        res = await region.forwarder.forward(seq_call("s-5"))
        assert res.upstream.url == ranked[1]
    res = await region.forwarder.forward(seq_call("s-5", end=True))
    assert res.upstream.url == ranked[1]
    assert len(region.forwarder.sequences.remembered) == 0  # END forgot it
    assert calls(region)[ranked[0]] == 0


async def test_a_start_that_cannot_connect_begins_on_the_next_ranked_replica():
    ranked = [u.url for u in rank("demo", 8, [member(u) for u in URLS])]
    region = Region({ranked[0]: [refused], ranked[1]: [ok], ranked[2]: [ok]})
    res = await region.forwarder.forward(seq_call(8, start=True))
    assert res.reply.outcome is Outcome.SUCCESS and res.upstream.url == ranked[1] and res.attempts == 2
    res = await region.forwarder.forward(seq_call(8))
    assert res.upstream.url == ranked[1]  # remembered


async def test_a_start_refused_after_sending_is_not_moved():
    ranked = [u.url for u in rank("demo", 8, [member(u) for u in URLS])]
    region = Region({ranked[0]: [unavailable], ranked[1]: [ok], ranked[2]: [ok]})
    res = await region.forwarder.forward(seq_call(8, start=True))
    assert res.reply.http_status == 503 and res.attempts == 1
    assert calls(region) == {ranked[0]: 1, ranked[1]: 0, ranked[2]: 0}


async def test_a_step_whose_replica_is_not_routable_is_lost_with_the_reason():
    region = Region({u: [ok] for u in URLS})
    holder = top("demo", 3, URLS)
    await region.forwarder.forward(seq_call(3, start=True))
    set_health(region, holder, False)
    res = await region.forwarder.forward(seq_call(3))
    r = res.reply
    assert (r.http_status, r.grpc_code, res.attempts) == (503, grpc.StatusCode.UNAVAILABLE, 0)
    assert r.message.startswith(f"sequence 3 of model demo lost: replica {holder} is not routable")
    assert r.message.endswith("restart the sequence (sequence_start)")
    assert calls(region)[holder] == 1  # only the START
    assert region.counter("geogate_sequences_lost_total", model="demo") == 1
    # A new START goes to a live replica.
    res = await region.forwarder.forward(seq_call(3, start=True))
    assert res.reply.outcome is Outcome.SUCCESS and res.upstream.url != holder


@pytest.mark.parametrize("failure", [refused, unavailable])
async def test_a_failing_step_is_lost_and_never_retried_elsewhere(failure):
    holder = top("demo", 4, URLS)
    region = Region({u: ([ok, failure] if u == holder else [ok]) for u in URLS}, "max_attempts = 3")
    await region.forwarder.forward(seq_call(4, start=True))
    res = await region.forwarder.forward(seq_call(4))
    assert res.reply.http_status == 503 and "lost: replica" in res.reply.message and res.attempts == 1
    assert calls(region) == {u: (2 if u == holder else 0) for u in URLS}
    region.assert_whole()


async def test_a_slow_step_is_not_hedged():
    holder = top("demo", 6, URLS)
    region = Region({u: ([(0.05, ok)] if u == holder else [ok]) for u in URLS}, "hedge_after_percentile = 50")
    for _ in range(60):  # enough latency samples for hedging to be on
        region.load.record(0.001, time.monotonic())
    res = await region.forwarder.forward(seq_call(6))
    assert res.reply.outcome is Outcome.SUCCESS and res.attempts == 1
    assert calls(region) == {u: (1 if u == holder else 0) for u in URLS}


async def test_a_step_timing_out_is_answered_not_retried():
    holder = top("demo", 2, URLS)
    region = Region({u: ([HANG] if u == holder else [ok]) for u in URLS})
    res = await region.forwarder.forward(seq_call(2, timeout_s=0.05))
    assert res.reply.outcome is Outcome.TIMEOUT and res.attempts == 1
    assert sum(calls(region).values()) == 1


async def test_sequences_never_spill_to_another_region():
    peer = FakePeerLink("r2", ok())
    region = Region({URLS[0]: [unavailable]}, router=LocalThenPeers("r1", ["r2"]), peers=FakePeers(peer))
    res = await region.forwarder.forward(seq_call(5, start=True))
    assert res.reply.http_status == 503 and peer.forwarded == []
    set_health(region, URLS[0], False)
    res = await region.forwarder.forward(seq_call(5))
    assert "lost" in res.reply.message and peer.forwarded == []


async def test_bad_sequence_parameters_are_a_client_error():
    region = Region({u: [ok] for u in URLS})
    res = await region.forwarder.forward(seq_call(0, error="parameter 'sequence_start' must be a bool, got str"))
    assert (res.reply.http_status, res.reply.grpc_code) == (400, grpc.StatusCode.INVALID_ARGUMENT)
    assert "sequence_start" in res.reply.message and sum(calls(region).values()) == 0


async def test_idle_timeout_comes_from_the_models_config():
    region = Region({u: [ok] for u in URLS})

    async def config_of(model, version):
        return 200, {"sequence_batching": {"max_sequence_idle_microseconds": 5_000_000}}

    router = SequenceRouter(region.pools, region.metrics, config_of=config_of)
    assert await router._idle_s("demo", None) == 5.0
    assert await SequenceRouter(region.pools, region.metrics)._idle_s("demo", None) == DEFAULT_SEQUENCE_IDLE_S
