"""The attempt loop: pick a replica, forward, classify, maybe retry elsewhere.

    admission (once per request, gateway.routing.admission OverloadGuard): the priority class
          (geogate-priority, else the API key's default, else [capacity] default_priority;
          unknown -> 400 / INVALID_ARGUMENT); shed -> 429 / RESOURCE_EXHAUSTED with Retry-After;
          spill -> the chosen peer region goes first in the target list (the local pools stay
          behind it as the fallback)
    for each target the router gives (the local pools, then peer regions' gateways)
      peer: one attempt through the peer gateway (gateway.upstream.peer_links), which retries among
            its own replicas; a retryable answer moves on to the next region
      repeat: pick (P2C over eligible replicas not tried yet) -> forward with
              min(per-try timeout, time left) -> classify (health.outcomes) -> record the
              outcome (passive outlier detection, latency EWMA, metrics)
              success / client error / non-retryable error: answer it
              retryable (connect failure, reset, 503, timeout): retry on a DIFFERENT replica
              after a jittered backoff, while attempts < max_attempts, the deadline leaves
              time and the retry budget (about 20% of recent requests) allows

Hedging (``hedge_after_percentile`` > 0): when an attempt has not answered after the recent
latency at that percentile, a second attempt goes to another replica (budget permitting) and
the first good answer wins.

Sequences (a request with Triton's ``sequence_id``): gateway.routing.sequences places them on
the replica holding the sequence, with one attempt (a START that could not connect excepted),
no hedge, and never in another region; a START may be shed under overload but never spilled,
later steps are admitted as critical. The deadline bounds everything: an answer never comes later than
the client's deadline (504 / DEADLINE_EXCEEDED instead).

Attribution (health.outcomes): an attempt whose limit was the CLIENT's remaining time (the
client chose a deadline shorter than the gateway's default, and shorter than the per-try
timeout) and that timed out is ``DEADLINE_CLIENT``: not a failure, not retried, not recorded
against the replica; the same for a peer region that runs out of the client's deadline. An
attempt cancelled (the client went away, a hedge lost) records nothing either. Every attempt
returns its replica's in-flight count on every path.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING

import grpc

from core.config import GatewaySection
from core.kserve import REQUEST_ID_HEADER
from gateway.routing.admission import CRITICAL, OUTCOME_SHED, PriorityError
from gateway.routing.balancer import pick_p2c
from gateway.routing.load_window import LoadWindow
from gateway.routing.retry_budget import RetryBudget
from gateway.routing.sequences import SequenceRouter
from gateway.routing.targets import TARGET_PEER, Target
from gateway.upstream.peer_links import PeerLinks
from gateway.upstream.pool import RegionPools, Upstream
from gateway.upstream.types import FAILURES, NO_VERDICT, OUTCOME_NAME, PROTOCOL_HTTP, RETRYABLE, InferCall, Reply
from health.outcomes import Outcome

if TYPE_CHECKING:  # the metrics live with the composition root (gateway.server), a layer above
    from gateway.server.metrics import GatewayMetrics

MS_PER_S = 1000.0
FAILURE_LATENCY_PENALTY_S = 0.25  # a failed attempt counts as at least this slow for the EWMA
HEDGE_MIN_SAMPLES = 50  # hedging starts once this many recent latencies are known
HEDGE_MIN_DELAY_S = 0.001
# An attempt whose timeout is within this of the time left was limited by the deadline, not by
# the per-try timeout.
DEADLINE_BOUND_SLACK_S = 0.001


def ms_text(ms: float) -> str:
    """"30000", "250", "0.15": whole milliseconds unless below 10."""
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.2g}"


def deadline_reply(deadline_ms: float, attempts: int, last: Reply | None, client: bool = False) -> Reply:
    """504 / DEADLINE_EXCEEDED; `client`: the client chose the deadline (outcome deadline_client)."""
    detail = f"; last attempt: {last.message}" if last is not None and last.message else ""
    whose = "the client's deadline" if client else "deadline"
    return Reply(Outcome.DEADLINE_CLIENT if client else Outcome.TIMEOUT, 504, grpc.StatusCode.DEADLINE_EXCEEDED,
                 message=f"{whose} of {ms_text(deadline_ms)} ms exceeded after {attempts} attempt(s){detail}")


def client_deadline_reply(reply: Reply, deadline_ms: float) -> Reply:
    """`reply` (a timeout) re-attributed to the client's own deadline."""
    reply.outcome = Outcome.DEADLINE_CLIENT
    reply.http_status = 504
    reply.grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    reply.message = f"the client's deadline of {ms_text(deadline_ms)} ms ran out: {reply.message}"
    return reply


def shed_reply(reason: str, retry_after_s: int) -> Reply:
    """429 / RESOURCE_EXHAUSTED with Retry-After: refused under overload (a peer gateway that
    gets this from us moves on to another region: UNAVAILABLE is retryable)."""
    return Reply(Outcome.UNAVAILABLE, 429, grpc.StatusCode.RESOURCE_EXHAUSTED, message=reason,
                 retry_after_s=retry_after_s)


def spill_first(targets: tuple[Target, ...], region: str) -> tuple[Target, ...]:
    """`targets` with `region`'s peer target moved to the front (unchanged if absent)."""
    for i, t in enumerate(targets):
        if t.region == region and t.kind == TARGET_PEER:
            return (t, *targets[:i], *targets[i + 1:]) if i else targets
    return targets


class ForwardResult:
    __slots__ = ("attempts", "reply", "upstream")

    def __init__(self, reply: Reply, attempts: int, upstream: Upstream | None) -> None:
        self.reply = reply
        self.attempts = attempts
        self.upstream = upstream


class Forwarder:
    def __init__(self, pools: RegionPools, gw: GatewaySection, metrics: GatewayMetrics,
                 router, load: LoadWindow, peers: PeerLinks | None = None, *,
                 capacity=None, overload=None, sequences: SequenceRouter | None = None) -> None:
        self.pools = pools
        # Requests of sequences (stateful models) go where their sequence lives.
        self.sequences = sequences if sequences is not None else SequenceRouter(pools, metrics)
        self.peers = peers
        # gateway.routing.capacity CapacityTracker (observe after each attempt) and gateway.routing.admission
        # OverloadGuard (check once per request); None: capacity handling is off.
        self.capacity = capacity
        self.overload = overload
        # Called after each request sent to another region: (region, reply, why not local).
        self.on_cross_region = None
        self.gw = gw
        self.metrics = metrics
        self.router = router
        self.load = load
        self.budget = RetryBudget(percent=gw.retry_budget_percent, min_per_s=gw.retry_budget_min_per_s)
        self.per_try_s = gw.per_try_timeout_ms / MS_PER_S
        self.backoff_base_s = gw.retry_backoff_base_ms / MS_PER_S
        self.backoff_max_s = gw.retry_backoff_max_ms / MS_PER_S
        self.hedge_percentile = gw.hedge_after_percentile
        self.grpc_scheme = gw.grpc_upstream  # the members gRPC unary calls go to first
        self._rng = random.Random()

    # ------------------------------------------------------------------ one attempt

    async def _attempt(self, up: Upstream, call: InferCall, timeout_s: float) -> Reply:
        load = up.load
        load.outstanding += 1
        try:
            level = load.outstanding  # the replica's in-flight count this attempt joins
            t0 = time.monotonic()
            # Limited by the client's own deadline rather than the per-try timeout: a timeout is
            # then the client's doing (health.outcomes: DEADLINE_CLIENT), whatever the replica did.
            client_bound = call.client_deadline and timeout_s >= call.deadline_s - t0 - DEADLINE_BOUND_SLACK_S
            headers = {REQUEST_ID_HEADER: call.request_id}
            try:
                if call.protocol == PROTOCOL_HTTP:
                    reply = await up.client.infer_http(call, timeout_s, headers)
                else:
                    reply = await up.client.infer_grpc(call, timeout_s, headers)
            except asyncio.CancelledError:
                # A hedge lost the race (or the client went away): nothing against the replica,
                # but it was at least this slow, which the balancer must learn (a peak), or a
                # stuck replica would keep looking fast.
                now = time.monotonic()
                if now - t0 > load.ewma_s:
                    load.observe(now - t0, now)
                self.metrics.attempt(up.state.url, call.protocol, OUTCOME_NAME[Outcome.CANCELLED])
                raise
        finally:
            load.outstanding -= 1
        now = time.monotonic()
        outcome = reply.outcome
        if outcome is Outcome.TIMEOUT and client_bound:
            reply = client_deadline_reply(reply, (call.deadline_s - (call.started_s or t0)) * MS_PER_S)
            outcome = reply.outcome
        rtt_s = now - t0
        if outcome in NO_VERDICT:
            if rtt_s > load.ewma_s:  # a lower bound of its latency: only a peak teaches anything
                load.observe(rtt_s, now)
        else:
            load.observe(rtt_s if outcome not in FAILURES else max(rtt_s, FAILURE_LATENCY_PENALTY_S), now)
            load.requests += 1
            self.pools.detector.record(up.state, outcome, up.pool.states, now)
        self.metrics.attempt(up.state.url, call.protocol, OUTCOME_NAME[outcome])
        if outcome is Outcome.SUCCESS and self.capacity is not None:
            self.capacity.observe(up.pool.name, up.state.url, rtt_s, level, now)
        return reply

    def _pick(self, call: InferCall, tried: list[Upstream], now_s: float) -> tuple[Upstream | None, str]:
        """(replica, "") or (None, why none); in panic routing the reason says so too."""
        scheme = call.protocol if call.protocol == PROTOCOL_HTTP else self.grpc_scheme
        cands = self.pools.candidates(call.model, call.version, scheme, now_s)
        ups = cands.upstreams
        if tried:
            ups = [u for u in ups if u not in tried]
        if not ups:
            return None, cands.reason
        return pick_p2c(ups, now_s, self._rng), cands.detail

    def _hedge_delay_s(self, now_s: float) -> float | None:
        if self.hedge_percentile <= 0:
            return None
        if self.load.sample_count(now_s) < HEDGE_MIN_SAMPLES:
            return None
        return max(HEDGE_MIN_DELAY_S, self.load.percentile_s(self.hedge_percentile, now_s))

    async def _attempt_hedged(self, first: Upstream, call: InferCall, timeout_s: float,
                              tried: list[Upstream], delay_s: float) -> tuple[Reply, Upstream, int]:
        """Run `first`; if it is still going after `delay_s`, race a second replica too. Every
        attempt still running when this returns or is cancelled is cancelled (CANCELLED: a
        losing hedge is not the replica's failure)."""
        t1 = asyncio.ensure_future(self._attempt(first, call, timeout_s))
        pending: set[asyncio.Future] = {t1}
        try:
            done, _ = await asyncio.wait((t1,), timeout=min(delay_s, timeout_s))
            if done:
                pending.clear()
                return t1.result(), first, 0
            second, _ = self._pick(call, tried, time.monotonic())
            if second is None or not self.budget.try_spend():
                reply = await t1
                pending.clear()
                return reply, first, 0
            tried.append(second)
            self.metrics.retry("hedge")
            remaining = max(0.001, call.deadline_s - time.monotonic())
            t2 = asyncio.ensure_future(self._attempt(second, call, min(timeout_s, remaining)))
            owner = {t1: first, t2: second}
            pending.add(t2)
            result: tuple[Reply, Upstream] | None = None
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    reply = t.result()
                    if result is None or reply.outcome not in RETRYABLE:
                        result = (reply, owner[t])
                    if reply.outcome not in RETRYABLE:
                        return reply, owner[t], 1
            assert result is not None
            return result[0], result[1], 1
        finally:
            for t in pending:
                t.cancel()
            if pending:  # their cleanup (in-flight counts, connections) is done when we return
                await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------------ the loop

    def admit(self, call: InferCall) -> tuple[Reply | None, str, str]:
        """(refusal or None, peer region to try first or "", why) for one request."""
        guard = self.overload
        # From a peer gateway: the API key (if any) is the peer's, so only a class the peer sent
        # along counts; without one, the peer admitted the request already.
        explicit = bool(call.priority) if call.hops else True
        try:
            cls = guard.classify(call.priority, call.key_priority)
        except PriorityError as exc:
            return Reply(Outcome.CLIENT_ERROR, 400, grpc.StatusCode.INVALID_ARGUMENT, message=str(exc)), "", ""
        call.priority = cls  # what a peer region is told, if the request goes there
        if not explicit:
            return None, "", ""
        d = guard.check(cls, may_spill=call.hops == 0)
        if d.outcome == OUTCOME_SHED:
            return shed_reply(d.reason, d.retry_after_s), "", ""
        return None, d.peer, d.reason

    async def _forward_sequence(self, call: InferCall) -> ForwardResult:
        """One request of a sequence: malformed parameters 400; a START admitted (never
        spilled: a sequence stays in the region that started it), later steps admitted as
        critical (refusing one would lose the sequence); then gateway.routing.sequences."""
        seq = call.sequence
        assert seq is not None
        if seq.error:
            return ForwardResult(Reply(Outcome.CLIENT_ERROR, 400, grpc.StatusCode.INVALID_ARGUMENT,
                                       message=seq.error), 0, None)
        guard = self.overload
        if guard is not None:
            try:
                cls = guard.classify(call.priority, call.key_priority) if seq.start else CRITICAL
            except PriorityError as exc:
                return ForwardResult(Reply(Outcome.CLIENT_ERROR, 400, grpc.StatusCode.INVALID_ARGUMENT,
                                           message=str(exc)), 0, None)
            d = guard.check(cls, may_spill=False)
            if d.outcome == OUTCOME_SHED:
                return ForwardResult(shed_reply(d.reason, d.retry_after_s), 0, None)
        reply, attempts, up = await self.sequences.route(call, self._attempt)
        return ForwardResult(reply, attempts, up)

    async def forward(self, call: InferCall) -> ForwardResult:
        if call.sequence is not None:
            return await self._forward_sequence(call)
        spill_to = spill_why = ""
        if self.overload is not None:
            refused, spill_to, spill_why = self.admit(call)
            if refused is not None:
                return ForwardResult(refused, 0, None)
        self.budget.record_request()
        tried: list[Upstream] = []
        attempts = 0
        last: Reply | None = None
        last_up: Upstream | None = None
        total_ms = (call.deadline_s - (call.started_s or time.monotonic())) * MS_PER_S
        panic_detail = ""
        no_local = ""  # why the local region could not serve, for the answer if nothing else can
        left_downed_region = False
        targets = self.router.targets_for(call)
        if spill_to:
            targets = spill_first(targets, spill_to)
        for target in targets:
            if target.kind == TARGET_PEER:
                link = self.peers.link(target.region) if self.peers is not None else None
                if link is None:
                    continue
                remaining = call.deadline_s - time.monotonic()
                if remaining <= 0.0005:
                    return ForwardResult(deadline_reply(total_ms, attempts, last, call.client_deadline),
                                         attempts, last_up)
                # Moving to another region after failures there is a retry like any other
                # (budgeted), unless nothing was sent anywhere yet, the failures never reached
                # a replica (refused connections add no load) or the region that failed is down.
                if last is not None and last.outcome is not Outcome.CONNECT_FAILURE and not left_downed_region \
                        and not self.budget.try_spend():
                    self.metrics.budget_exhausted()
                    last.message += " (retry budget exhausted: not sent to another region)"
                    break
                attempts += 1
                reply = await link.forward(call, remaining)
                if reply.outcome is Outcome.TIMEOUT and call.client_deadline:
                    # The peer ran out of the client's own deadline: not the peer's failure, and
                    # no time is left to try another region.
                    reply = client_deadline_reply(reply, total_ms)
                left_downed_region = link.is_down
                self.metrics.cross_region_request(target.region, OUTCOME_NAME[reply.outcome])
                if self.on_cross_region is not None:
                    why = spill_why if target.region == spill_to and last is None else ""
                    self.on_cross_region(target.region, reply, why or no_local or (last.message if last else ""))
                last, last_up = reply, None
                if reply.outcome not in RETRYABLE:
                    return ForwardResult(reply, attempts, None)
                continue
            result = await self._forward_local(call, tried, attempts, total_ms)
            if isinstance(result, ForwardResult):
                return result
            attempts, last, last_up, why, detail = result
            panic_detail = detail or panic_detail
            if last is None and why:
                no_local = why
        if last is None:
            return ForwardResult(Reply(Outcome.UNAVAILABLE, 503, grpc.StatusCode.UNAVAILABLE,
                                       message=f"no replica can serve: {no_local or 'no region can serve'}"),
                                 attempts, None)
        if panic_detail and last.outcome in FAILURES:
            last.message += f" ({panic_detail})"
        return ForwardResult(last, attempts, last_up)

    async def _forward_local(self, call: InferCall, tried: list[Upstream], attempts: int, total_ms: float):
        """Attempts on the local pools. A ForwardResult ends the request; otherwise (attempts,
        last reply, its upstream, why no replica was left, panic detail) lets the caller move
        on to the next region."""
        last: Reply | None = None
        last_up: Upstream | None = None
        panic_detail = ""
        max_attempts = self.gw.max_attempts
        while True:
            now = time.monotonic()
            remaining = call.deadline_s - now
            if remaining <= 0:
                return ForwardResult(deadline_reply(total_ms, attempts, last, call.client_deadline),
                                     attempts, last_up)
            up, reason = self._pick(call, tried, now)
            if up is not None and reason:
                panic_detail = reason
            if up is None:
                return attempts, last, last_up, reason, panic_detail
            attempts += 1
            tried.append(up)
            try_s = min(remaining, self.per_try_s) if self.per_try_s > 0 else remaining
            hedge_s = self._hedge_delay_s(now)
            if hedge_s is not None and hedge_s < try_s:
                reply, up, extra = await self._attempt_hedged(up, call, try_s, tried, hedge_s)
                attempts += extra
            else:
                reply = await self._attempt(up, call, try_s)
            last, last_up = reply, up
            if reply.outcome not in RETRYABLE:
                return ForwardResult(reply, attempts, up)
            left = call.deadline_s - time.monotonic()
            if left <= 0.0005:
                return ForwardResult(deadline_reply(total_ms, attempts, reply, call.client_deadline), attempts, up)
            if attempts >= max_attempts:
                return attempts, last, last_up, "", panic_detail
            if reply.outcome is not Outcome.CONNECT_FAILURE and not self.budget.try_spend():
                self.metrics.budget_exhausted()
                reply.message += " (retry budget exhausted: not retried)"
                return ForwardResult(reply, attempts, up)
            self.metrics.retry(OUTCOME_NAME[reply.outcome])
            backoff_s = min(self.backoff_max_s, self.backoff_base_s * (2 ** (attempts - 1)))
            backoff_s *= self._rng.random()  # full jitter
            if backoff_s >= left:
                return ForwardResult(deadline_reply(total_ms, attempts, reply, call.client_deadline), attempts, up)
            if backoff_s > 0:
                await asyncio.sleep(backoff_s)
