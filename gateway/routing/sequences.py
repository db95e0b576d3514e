"""Sequence affinity for stateful models (Triton's sequence batcher): every request of a
sequence goes to the replica that holds the sequence's state.

A request is part of a sequence when it carries ``sequence_id`` (an unsigned integer, non-zero,
or a non-empty string), with ``sequence_start`` / ``sequence_end`` flags (bools). Placement:

    members  every replica of the region's pools that serve the model and speak the client's
             protocol (healthy or not: a dead replica keeps its share, so its sequences are
             reported lost instead of silently moving to a replica that never saw their START)
    rank     rendezvous (highest-random-weight) hashing of (model, sequence id) over the members'
             URLs, weighted (Thaler and Ravishankar, "Using name-based mappings to increase hit
             rates", 1998; the weighted form -w / ln(u) as in Schindelhauer and Schomaker 2005):
             a stable hash (blake2b), so every gateway worker and every gateway restart ranks
             alike, and adding or removing one replica moves only the sequences it ranks first
             on (consistent hashing without a ring; Maglev was the alternative: O(1) lookups,
             but a table to rebuild and slightly more movement)
    START    the top-ranked ROUTABLE member; one that refuses the connection (nothing was sent)
             lets the START go to the next routable member. When the START did not go to the
             top-ranked member, the choice is remembered in this worker (bounded LRU map, expired
             after the model's sequence idle timeout, from its config; else
             DEFAULT_SEQUENCE_IDLE_S)
    step     the remembered member, else the top-ranked one; exactly one attempt: never retried
             elsewhere, never hedged. Not routable, gone, refusing or failing: 503 / UNAVAILABLE
             "sequence <id> of model <m> lost: replica <url> <why>; restart the sequence
             (sequence_start)"
    END      forgets the remembered choice

Several gateway workers agree without sharing memory as long as the START went to the
top-ranked member (the usual case). A remembered choice (top-ranked member not routable at START)
lives only in the worker that routed the START: a step arriving at another worker goes to the
top-ranked member and is reported lost (or refused by the replica for lack of a START) when that
member is not the holder.
"""

from __future__ import annotations

import collections
import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc

from gateway.upstream.pool import RegionPools, Upstream
from gateway.upstream.proto_peek import InferRequestPeek
from gateway.upstream.types import InferCall, Reply, SequenceParams
from health.outcomes import Outcome

SEQUENCE_ID = "sequence_id"
SEQUENCE_START = "sequence_start"
SEQUENCE_END = "sequence_end"
UINT64_MAX = 2**64 - 1
TWO_POW_64 = float(2**64)
# How long a remembered START choice outlives the sequence's last request when the model's
# config does not say (a replica that is not Triton, or its config could not be read).
DEFAULT_SEQUENCE_IDLE_S = 60.0
# Triton's own default for sequence_batching.max_sequence_idle_microseconds.
TRITON_DEFAULT_IDLE_US = 1_000_000
US_PER_S = 1_000_000.0
MAX_REMEMBERED = 100_000  # remembered START choices per worker; the least recently used go first
# Outcomes that mean the replica is gone or refuses: the sequence's state cannot be reached.
LOST_OUTCOMES = frozenset({Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.UNAVAILABLE})


# ---------------------------------------------------------------------- parameters

def _sequence(seq_id: object, start: object, end: object, *, negative_ok: bool) -> SequenceParams | None:
    """The parameters as a SequenceParams (None: no sequence), or one whose ``error`` says why not."""
    if seq_id is None:
        return None
    if isinstance(seq_id, bool) or not isinstance(seq_id, int | str):
        return SequenceParams(0, error=f"parameter '{SEQUENCE_ID}' must be an unsigned integer or a string, "
                                       f"got {type(seq_id).__name__}")
    if isinstance(seq_id, int):
        if seq_id < 0 and negative_ok:
            seq_id &= UINT64_MAX  # gRPC's int64_param carries a uint64 correlation id
        if not 0 <= seq_id <= UINT64_MAX:
            return SequenceParams(0, error=f"parameter '{SEQUENCE_ID}' must be an unsigned 64-bit integer or "
                                           f"a string, got {seq_id}")
    if seq_id == 0 or seq_id == "":
        return None  # Triton's "no sequence"
    for name, flag in ((SEQUENCE_START, start), (SEQUENCE_END, end)):
        if flag is not None and not isinstance(flag, bool):
            return SequenceParams(seq_id, error=f"parameter '{name}' must be a bool, got {type(flag).__name__}")
    return SequenceParams(seq_id, bool(start), bool(end))


def sequence_from_http(parameters: dict | None) -> SequenceParams | None:
    """The sequence of an HTTP request (its JSON header's "parameters" object)."""
    if not parameters or SEQUENCE_ID not in parameters:
        return None
    return _sequence(parameters[SEQUENCE_ID], parameters.get(SEQUENCE_START), parameters.get(SEQUENCE_END),
                     negative_ok=False)


def sequence_from_grpc(peek: InferRequestPeek | None) -> SequenceParams | None:
    """The sequence of a gRPC request (the peeked request-level parameters)."""
    if peek is None:
        return None
    ints, others = peek.int_parameters, peek.other_parameters
    if SEQUENCE_ID not in ints and SEQUENCE_ID not in others:
        return None
    seq_id = ints[SEQUENCE_ID] if SEQUENCE_ID in ints else others.get(SEQUENCE_ID)
    start = ints[SEQUENCE_START] if SEQUENCE_START in ints else others.get(SEQUENCE_START)
    end = ints[SEQUENCE_END] if SEQUENCE_END in ints else others.get(SEQUENCE_END)
    return _sequence(seq_id, start, end, negative_ok=True)


# ---------------------------------------------------------------------- placement

def _key_bytes(model: str, seq_id: int | str) -> bytes:
    # The id's type is part of the key: Triton keeps uint64 and string correlation ids apart.
    kind = "u" if isinstance(seq_id, int) else "s"
    return f"{model}\0{kind}{seq_id}\0".encode()


def rendezvous_score(key: bytes, url: str, weight: int = 1) -> float:
    """Weighted rendezvous score of one member for one key: -weight / ln(u), u uniform in (0, 1)
    from a stable hash, so the same everywhere and across restarts."""
    h = int.from_bytes(hashlib.blake2b(key + url.encode(), digest_size=8).digest(), "big")
    u = (h + 0.5) / TWO_POW_64
    return -max(1, weight) / math.log(u)


def rank(model: str, seq_id: int | str, members: Sequence[Upstream]) -> list[Upstream]:
    """`members` best first for the sequence (ties, never seen in practice, broken by URL)."""
    key = _key_bytes(model, seq_id)
    return sorted(members, key=lambda u: (-rendezvous_score(key, u.url, u.state.weight), u.url))


class RememberedSequences:
    """Bounded map sequence key -> replica URL, each entry expiring `idle_s` after its last use."""

    def __init__(self, max_entries: int = MAX_REMEMBERED) -> None:
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[tuple, tuple[str, float, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple, now_s: float) -> str | None:
        """The remembered URL (its expiry pushed back: the sequence is in use), or None."""
        hit = self._entries.get(key)
        if hit is None:
            return None
        url, idle_s, expires_s = hit
        if now_s >= expires_s:
            del self._entries[key]
            return None
        self._entries[key] = (url, idle_s, now_s + idle_s)
        self._entries.move_to_end(key)
        return url

    def remember(self, key: tuple, url: str, idle_s: float, now_s: float) -> None:
        self._entries[key] = (url, idle_s, now_s + idle_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, key: tuple) -> None:
        self._entries.pop(key, None)


def idle_timeout_s(config: dict | None) -> float | None:
    """A Triton model config's sequence idle timeout in seconds (None: the config says nothing)."""
    if not isinstance(config, dict):
        return None
    batching = config.get("sequence_batching")
    if not isinstance(batching, dict):
        return None
    us = batching.get("max_sequence_idle_microseconds", TRITON_DEFAULT_IDLE_US)
    try:
        us = int(us)  # protobuf's JSON writes uint64 as a string
    except (TypeError, ValueError):
        return None
    return (us or TRITON_DEFAULT_IDLE_US) / US_PER_S


def _serves(up: Upstream, model: str) -> bool:
    st = up.state
    return not st.ready_versions_known or model in st.ready_versions


Attempt = Callable[[Upstream, InferCall, float], Awaitable[Reply]]
ConfigFetch = Callable[[str, "str | None"], Awaitable[tuple[int, dict]]]


class SequenceRouter:
    """Routes the requests of sequences (see the module docstring); one per worker."""

    def __init__(self, pools: RegionPools, metrics, *, config_of: ConfigFetch | None = None,
                 max_remembered: int = MAX_REMEMBERED, default_idle_s: float = DEFAULT_SEQUENCE_IDLE_S) -> None:
        self.pools = pools
        self.metrics = metrics  # gateway.server.metrics.GatewayMetrics (sequence_pinned / sequence_lost)
        self.config_of = config_of  # the model's config (gateway.upstream.catalog.ModelCatalog.config)
        self.remembered = RememberedSequences(max_remembered)
        self.default_idle_s = default_idle_s

    def members(self, model: str, protocol: str) -> list[Upstream]:
        """Every member (healthy or not) of the pools serving `model`, those speaking `protocol`
        (else, when none does, the others: the request is translated)."""
        same: list[Upstream] = []
        other: list[Upstream] = []
        for pool in self.pools.pools:
            ups = list(pool.members.values())
            if not any(_serves(u, model) for u in ups):
                continue
            for u in ups:
                (same if u.state.scheme == protocol else other).append(u)
        return same or other

    async def _idle_s(self, model: str, version: str | None) -> float:
        if self.config_of is None:
            return self.default_idle_s
        try:
            status, body = await self.config_of(model, version)
        except Exception:
            return self.default_idle_s
        idle = idle_timeout_s(body) if status == 200 else None
        return idle if idle is not None else self.default_idle_s

    def _lost(self, call: InferCall, url: str, why: str) -> Reply:
        seq = call.sequence
        assert seq is not None
        self.metrics.sequence_lost(call.model)
        return Reply(Outcome.UNAVAILABLE, 503, grpc.StatusCode.UNAVAILABLE,
                     message=f"sequence {seq.id} of model {call.model} lost: replica {url} {why}; "
                             f"restart the sequence (sequence_start)")

    async def place(self, model: str, version: str | None, protocol: str,
                    seq: SequenceParams) -> tuple[Upstream | None, str]:
        """Where a request of a sequence goes when it is not sent by ``route`` (a request on a
        ModelStreamInfer stream: written to a stream, never retried): (replica, "") or (None,
        why: the sequence is lost, or no replica can start it). Same ranking and memory as
        ``route``; a START goes to the best-ranked routable member."""
        key = (protocol, model, seq.id)
        members = self.members(model, protocol)
        if not members:
            return None, f"no replica can serve sequence {seq.id} of model {model}: no pool in this region serves it"
        ranked = rank(model, seq.id, members)
        now = time.monotonic()
        if seq.start:
            self.remembered.forget(key)
            up = next((u for u in ranked if u.state.routable(now)[0]), None)
            if up is None:
                return None, f"no replica can start sequence {seq.id} of model {model}: none is routable"
            self.metrics.sequence_pinned(model)
            if up is not ranked[0] and not seq.end:
                self.remembered.remember(key, up.url, await self._idle_s(model, version), now)
            return up, ""
        url = self.remembered.get(key, now) or ranked[0].url
        if seq.end:
            self.remembered.forget(key)
        up = next((u for u in members if u.url == url), None)
        why = "left the pool" if up is None else (
            "" if up.state.routable(now)[0] else f"is not routable ({up.state.unroutable_detail(now)})")
        if why:
            self.metrics.sequence_lost(model)
            return None, (f"sequence {seq.id} of model {model} lost: replica {url} {why}; "
                          f"restart the sequence (sequence_start)")
        return up, ""

    def lost_on_stream(self, model: str, seq_id: int | str, url: str, why: str) -> str:
        """The answer for a sequence request whose replica's stream failed (never sent elsewhere)."""
        self.metrics.sequence_lost(model)
        self.remembered.forget(("grpc", model, seq_id))
        return f"sequence {seq_id} of model {model} lost: replica {url} failed ({why}); restart the sequence " \
               f"(sequence_start)"

    async def route(self, call: InferCall, attempt: Attempt) -> tuple[Reply, int, Upstream | None]:
        """(reply, attempts made, the replica that answered) for one request of a sequence."""
        seq = call.sequence
        assert seq is not None and not seq.error
        key = (call.protocol, call.model, seq.id)
        members = self.members(call.model, call.protocol)
        if not members:
            return Reply(Outcome.UNAVAILABLE, 503, grpc.StatusCode.UNAVAILABLE,
                         message=f"no replica can serve sequence {seq.id} of model {call.model}: "
                                 f"no pool in this region serves the model"), 0, None
        ranked = rank(call.model, seq.id, members)
        if seq.start:
            return await self._start(call, key, ranked, attempt)
        now = time.monotonic()
        url = self.remembered.get(key, now) or ranked[0].url
        up = next((u for u in members if u.url == url), None)
        if seq.end:
            self.remembered.forget(key)
        if up is None:
            return self._lost(call, url, "left the pool"), 0, None
        ok, _ = up.state.routable(now)
        if not ok:
            return self._lost(call, url, f"is not routable ({up.state.unroutable_detail(now)})"), 0, None
        reply = await attempt(up, call, max(0.001, call.deadline_s - time.monotonic()))
        if reply.outcome in LOST_OUTCOMES:
            self.remembered.forget(key)
            return self._lost(call, url, f"failed ({reply.outcome.value}: {reply.message})"), 1, up
        return reply, 1, up

    async def _start(self, call: InferCall, key: tuple, ranked: list[Upstream],
                     attempt: Attempt) -> tuple[Reply, int, Upstream | None]:
        seq = call.sequence
        assert seq is not None
        self.remembered.forget(key)  # a START begins the sequence afresh
        attempts = 0
        last: Reply | None = None
        last_up: Upstream | None = None
        not_routable: list[str] = []
        for up in ranked:
            now = time.monotonic()
            ok, _ = up.state.routable(now)
            if not ok:
                not_routable.append(f"{up.url} {up.state.unroutable_detail(now)}")
                continue
            remaining_s = call.deadline_s - now
            if remaining_s <= 0:
                break
            if attempts == 0:
                self.metrics.sequence_pinned(call.model)
            attempts += 1
            reply = await attempt(up, call, remaining_s)
            last, last_up = reply, up
            if reply.outcome is Outcome.CONNECT_FAILURE:
                continue  # nothing was sent: the START may begin on the next member
            if reply.outcome is Outcome.SUCCESS and up is not ranked[0] and not seq.end:
                idle_s = await self._idle_s(call.model, call.version)
                self.remembered.remember(key, up.url, idle_s, time.monotonic())
            return reply, attempts, up
        if last is not None:
            return last, attempts, last_up
        why = "; ".join(not_routable) or "the deadline ran out"
        return Reply(Outcome.UNAVAILABLE, 503, grpc.StatusCode.UNAVAILABLE,
                     message=f"no replica can start sequence {seq.id} of model {call.model}: {why}"), attempts, None
