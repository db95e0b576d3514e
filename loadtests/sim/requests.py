"""One sampled request through a region's gateway: the control flow of
``gateway.routing.forwarder.Forwarder.forward`` with the simulation answering for replicas and peers.

The forwarder itself is async and talks to sockets, so its loop is followed here step by step;
every decision in it is a call into the product:

    admission      OverloadGuard.classify + check (shed / spill / admit), once per request
    region order   MultiRegionRouter.targets (local-first, or the client's location), and
                   gateway.routing.forwarder.spill_first when admission spills to a peer
    replica pick   RegionPools.candidates + gateway.routing.balancer.pick_p2c, never a replica already
                   tried for this request
    outcome        LoadStats.observe, OutlierDetector.record, CapacityTracker.observe (success)
    retries        Outcome.retryable, [gateway] max_attempts, RetryBudget.record_request /
                   try_spend (connect failures are free, as in the forwarder), full-jitter backoff
    peers          a request sent to a peer region carries hops = 1: the peer admits it without
                   spilling and serves it from its own replicas only

``decision_ns`` is the real time (``time.perf_counter_ns``) spent in those product calls for
this request, the simulation's own bookkeeping excluded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.routing.admission import OUTCOME_SHED
from gateway.routing.balancer import pick_p2c
from gateway.routing.forwarder import FAILURE_LATENCY_PENALTY_S, spill_first
from gateway.routing.targets import TARGET_PEER
from geo.client_locator import Location
from health.outcomes import Outcome
from loadtests.sim.gateway import SimGateway
from loadtests.sim.world import MODEL

SCHEME = "grpc"
CONNECT_REFUSED_S = 0.001  # a refused connection inside a region answers within about a millisecond

OK = "ok"
SHED = "shed"
FAILED = "failed"
UNREACHABLE = "unreachable"


@dataclass(slots=True)
class Request:
    metro: str
    priority: str
    t_s: float
    weight: float  # real requests this sampled one stands for
    client: Location | None = None  # nearest-to-client routing only


@dataclass(slots=True)
class Served:
    outcome: str  # OK | SHED | FAILED | UNREACHABLE
    entry: str
    region: str = ""  # the region whose replica answered (OK) or refused (SHED)
    latency_s: float = 0.0
    attempts: int = 0
    reason: str = ""
    decision_ns: int = 0
    # SHED: whether a sheddable request would have been refused too by the gateway that refused
    # this one, at that moment (the refusal order: sheddable before standard, critical never)
    sheddable_refused_too: bool = True
    peers_tried: list[str] = field(default_factory=list)
    known_down_tried: list[str] = field(default_factory=list)  # peers tried while known down, healthy ones untried
    unhealthy_replicas_tried: int = 0  # replicas picked while known unhealthy outside panic routing


class _Attempts:
    """Per-request state shared by the local loops of the entry gateway and a peer."""

    __slots__ = ("attempts", "decision_ns", "elapsed_s", "unhealthy_tried")

    def __init__(self) -> None:
        self.attempts = 0
        self.elapsed_s = 0.0
        self.decision_ns = 0
        self.unhealthy_tried = 0


def _local(planet, gw: SimGateway, req: Request, st: _Attempts, deadline_s: float):
    """The forwarder's _forward_local on `gw`: (outcome or None when no replica was left,
    serving replica URL, reason)."""
    tried: list = []
    g = gw.cfg.gateway
    last: Outcome | None = None
    pc = time.perf_counter_ns
    while True:
        now = req.t_s + st.elapsed_s
        if st.elapsed_s >= deadline_s:
            return Outcome.TIMEOUT, "", f"deadline of {deadline_s * 1000:.0f} ms exceeded"
        t0 = pc()
        cands = gw.pools.candidates(MODEL, None, SCHEME, now)
        ups = cands.upstreams
        if tried:
            ups = [u for u in ups if u not in tried]
        up = pick_p2c(ups, now, gw.rng) if ups else None
        st.decision_ns += pc() - t0
        if up is None:
            return last, "", cands.reason or "no replica left to try"
        if not cands.panic and not up.state.routable(now)[0]:
            st.unhealthy_tried += 1
        st.attempts += 1
        tried.append(up)
        q = planet.queues[up.state.url]
        remaining = deadline_s - st.elapsed_s
        if not q.alive:
            outcome, took = Outcome.CONNECT_FAILURE, CONNECT_REFUSED_S
        else:
            took = q.sample_latency_s(planet.rng)
            outcome = Outcome.SUCCESS
            if took >= remaining:
                outcome, took = Outcome.TIMEOUT, remaining
        st.elapsed_s += took
        level = int(up.load.outstanding) + 1
        end = now + took
        t0 = pc()
        up.load.observe(took if outcome is Outcome.SUCCESS else max(took, FAILURE_LATENCY_PENALTY_S), end)
        up.load.requests += 1
        gw.pools.detector.record(up.state, outcome, up.pool.states, end)
        if outcome is Outcome.SUCCESS:
            gw.tracker.observe(up.pool.name, up.state.url, took, level, end)
        st.decision_ns += pc() - t0
        last = outcome
        if not outcome.retryable:
            return outcome, up.state.url, ""
        if st.elapsed_s >= deadline_s:
            return Outcome.TIMEOUT, up.state.url, f"deadline of {deadline_s * 1000:.0f} ms exceeded"
        if len(tried) >= g.max_attempts:
            return outcome, "", f"{len(tried)} attempts failed"
        t0 = pc()
        spend = outcome is Outcome.CONNECT_FAILURE or gw.budget.try_spend()
        st.decision_ns += pc() - t0
        if not spend:
            return outcome, "", "retry budget exhausted: not retried"
        backoff_s = min(g.retry_backoff_max_ms / 1000.0,
                        g.retry_backoff_base_ms / 1000.0 * (2 ** (st.attempts - 1))) * planet.rng.random()
        st.elapsed_s += backoff_s


def serve(planet, gw: SimGateway, req: Request, base_latency_s: float) -> Served:
    """`req` arriving at gateway `gw` after `base_latency_s` (the client's round trip)."""
    st = _Attempts()
    st.elapsed_s = base_latency_s
    deadline_s = base_latency_s + gw.cfg.gateway.default_timeout_ms / 1000.0
    pc = time.perf_counter_ns
    t0 = pc()
    cls = gw.guard.classify(req.priority)
    d = gw.guard.check(cls, may_spill=True)
    if d.outcome == OUTCOME_SHED:
        st.decision_ns += pc() - t0
        return Served(SHED, gw.name, gw.name, st.elapsed_s, 0, d.reason, st.decision_ns,
                      sheddable_refused_too=_sheddable_refused(gw))
    gw.budget.record_request()
    targets = gw.router.targets(MODEL, None, 0, client=req.client)
    if d.peer:
        targets = spill_first(targets, d.peer)
    st.decision_ns += pc() - t0
    out = Served(FAILED, gw.name)
    last: Outcome | None = None
    left_downed_region = False
    reason = ""
    for target in targets:
        if target.kind == TARGET_PEER:
            peer = target.region
            known_down = peer in gw.peer_down
            if last is not None and last is not Outcome.CONNECT_FAILURE and not left_downed_region:
                t0 = pc()
                spend = gw.budget.try_spend()
                st.decision_ns += pc() - t0
                if not spend:
                    reason += " (retry budget exhausted: not sent to another region)"
                    break
            if known_down and any(n not in gw.peer_down and n not in out.peers_tried
                                  for n in (t.region for t in targets if t.kind == TARGET_PEER)):
                out.known_down_tried.append(peer)
            st.attempts += 1
            out.peers_tried.append(peer)
            left_downed_region = known_down
            if not planet.reachable(gw.name, peer):
                # Blackholed (region lost, or a partition): the attempt hangs until the region
                # monitor withdraws the peer (PeerLink.mark), or to the deadline once it is known down.
                wait_s = planet.blackhole_wait_s(gw.name, peer, req.t_s + st.elapsed_s)
                wait_s = min(wait_s, deadline_s - st.elapsed_s)
                st.elapsed_s += wait_s
                last, reason = Outcome.RESET, f"peer region {peer!r} did not answer"
                left_downed_region = True
                if st.elapsed_s >= deadline_s:
                    break
                continue
            pgw = planet.gateways[peer]
            rtt_s = planet.rtt_s(gw.name, peer)
            st.elapsed_s += rtt_s
            t0 = pc()
            pd = pgw.guard.check(pgw.guard.classify(cls), may_spill=False)
            if pd.outcome != OUTCOME_SHED:
                pgw.budget.record_request()
            st.decision_ns += pc() - t0
            if pd.outcome == OUTCOME_SHED:
                last, reason = Outcome.UNAVAILABLE, pd.reason
                out.region = peer
                out.sheddable_refused_too = out.sheddable_refused_too and _sheddable_refused(pgw)
                continue
            outcome, _url, why = _local(planet, pgw, req, st, deadline_s)
            if outcome is None:
                last, reason = Outcome.UNAVAILABLE, f"peer region {peer!r}: {why}"
                continue
            last, reason = outcome, why
            if outcome is Outcome.SUCCESS:
                out.outcome, out.region = OK, peer
                break
            if not outcome.retryable or st.elapsed_s >= deadline_s:
                break
            continue
        outcome, _url, why = _local(planet, gw, req, st, deadline_s)
        if outcome is None:
            reason = reason or why
            continue
        last, reason = outcome, why
        if outcome is Outcome.SUCCESS:
            out.outcome, out.region = OK, gw.name
            break
        if not outcome.retryable or st.elapsed_s >= deadline_s:
            break
    if out.outcome != OK:
        out.outcome = SHED if last is Outcome.UNAVAILABLE and reason.startswith("overloaded") else FAILED
        out.reason = reason or (last.value if last is not None else "no region can serve")
    out.latency_s = st.elapsed_s
    out.attempts = st.attempts
    out.decision_ns = st.decision_ns
    out.unhealthy_replicas_tried = st.unhealthy_tried
    return out


def _sheddable_refused(gw: SimGateway) -> bool:
    """Would `gw` refuse a sheddable request right now (its admission bound for that class)?"""
    bound = gw.admission.bounds["sheddable"]
    return bool(bound.exceeded(gw.guard.utilization, gw.guard.queue_ms))
