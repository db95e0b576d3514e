"""Priority classes and the per-request admit / shed / spill decision under overload.

A request's class comes from the ``geogate-priority`` header (HTTP) or metadata key (gRPC):
``critical``, ``standard`` or ``sheddable``; without one, the API key's default priority
(gateway.front.auth ``AuthDecision.priority``), else ``[capacity] default_priority``. A header may
lower a key's priority but not raise it: a key for batch jobs cannot promote itself to
critical. An unknown value is a 400 / INVALID_ARGUMENT naming the allowed values.

The decision reads the local pool's load (gateway.routing.capacity ``PoolLoad``: utilization and
expected queueing delay) and whether a peer region could take the request
(gateway.routing.load_spill)::

    sheddable  over sheddable_max_utilization or sheddable_max_queue_ms  -> refused (429)
    standard   over standard_max_utilization or standard_max_queue_ms    -> spill if a peer has
                                                                            capacity, else queued
               over standard_max_utilization AND standard_max_queue_ms   -> spill if a peer has
                                                                            capacity, else refused
    critical   never refused: over the standard bound it spills when a peer has capacity,
               otherwise it waits in the local queue

Why standard needs both: a concurrency limit learned from the latency knee of a small model is
small (1-2 per replica), so 32 concurrent clients are "2000% utilization" while the replica,
batching, answers each of them in a few milliseconds. Being past the knee is not overload;
requests expected to wait longer than the latency objective (standard_max_queue_ms, 5 s) at
replicas that are past their limits are. The expected wait is Little's law over the pool's
in-flight (scaled by the number of gateway workers, so N workers decide as one would).

Refusals are HTTP 429 / gRPC RESOURCE_EXHAUSTED with ``Retry-After`` (seconds until the local
queue is expected to be back under the bound, at least 1) and an operator-readable reason.
Counters per class and outcome feed ``geogate_admission_decisions``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from core.config import CapacitySection
from core.kserve import PRIORITY_HEADER

CRITICAL = "critical"
STANDARD = "standard"
SHEDDABLE = "sheddable"
PRIORITIES = (CRITICAL, STANDARD, SHEDDABLE)  # most important first
RANK = {CRITICAL: 0, STANDARD: 1, SHEDDABLE: 2}

OUTCOME_ADMIT = "admitted"
OUTCOME_SHED = "shed"
OUTCOME_SPILL = "spilled"
OUTCOMES = (OUTCOME_ADMIT, OUTCOME_SHED, OUTCOME_SPILL)

MS_PER_S = 1000.0
MIN_RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 60


class PriorityError(ValueError):
    """The request named a priority class that does not exist."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


def request_priority(value: str | None, *, key_priority: str | None = None, default: str = STANDARD) -> str:
    """The class of one request: the header/metadata value, capped at the key's priority;
    else the key's priority; else the default. Raises PriorityError for unknown values."""
    if value:
        v = value.strip().lower()
        if v not in RANK:
            raise PriorityError(f"{PRIORITY_HEADER}: unknown priority {value!r}; "
                                f"use one of {', '.join(PRIORITIES)}")
        if key_priority in RANK and RANK[v] < RANK[key_priority]:
            return key_priority  # a key may lower its requests' priority, never raise it
        return v
    if key_priority in RANK:
        return key_priority
    return default


def priority_from_headers(headers: Mapping[str, str], *, key_priority: str | None = None,
                          default: str = STANDARD) -> str:
    return request_priority(headers.get(PRIORITY_HEADER), key_priority=key_priority, default=default)


def priority_from_metadata(metadata, *, key_priority: str | None = None, default: str = STANDARD) -> str:
    """gRPC invocation metadata (a sequence of (key, value)) -> class."""
    value = None
    for k, v in metadata or ():
        if k == PRIORITY_HEADER:
            value = v.decode() if isinstance(v, bytes) else v
    return request_priority(value, key_priority=key_priority, default=default)


@dataclass(frozen=True, slots=True)
class AdmissionDecision:
    priority: str
    outcome: str  # OUTCOME_ADMIT | OUTCOME_SHED | OUTCOME_SPILL
    reason: str = ""
    retry_after_s: int = 0
    peer: str = ""  # OUTCOME_SPILL: the region to send it to ("" : any peer with capacity)

    @property
    def admitted(self) -> bool:
        return self.outcome != OUTCOME_SHED

    @property
    def spill(self) -> bool:
        return self.outcome == OUTCOME_SPILL

    @property
    def http_status(self) -> int:
        return 429 if self.outcome == OUTCOME_SHED else 200

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED if self.outcome == OUTCOME_SHED else grpc.StatusCode.OK

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.outcome == OUTCOME_SHED else {}

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after", str(self.retry_after_s)),) if self.outcome == OUTCOME_SHED else ()


ADMIT = {p: AdmissionDecision(p, OUTCOME_ADMIT) for p in PRIORITIES}


@dataclass(frozen=True, slots=True)
class Bound:
    max_utilization: float
    max_queue_ms: float

    def exceeded(self, utilization: float, queue_ms: float) -> str:
        """Empty when within the bound, else what is over it."""
        if queue_ms > self.max_queue_ms:
            q = "unbounded (no capacity)" if math.isinf(queue_ms) else f"{queue_ms:.0f} ms"
            return f"expected queueing {q} is over {self.max_queue_ms:g} ms"
        if utilization > self.max_utilization:
            u = "no capacity" if math.isinf(utilization) else f"{utilization:.0%}"
            return f"utilization {u} is over {self.max_utilization:.0%} of the replicas' concurrency limits"
        return ""

    def deep(self, utilization: float, queue_ms: float) -> str:
        """Empty unless BOTH bounds are exceeded, else what is over them."""
        if queue_ms <= self.max_queue_ms or utilization <= self.max_utilization:
            return ""
        q = "unbounded (no capacity)" if math.isinf(queue_ms) else f"{queue_ms:.0f} ms"
        u = "no capacity" if math.isinf(utilization) else f"{utilization:.0%}"
        return (f"expected queueing {q} is over {self.max_queue_ms:g} ms at utilization {u} "
                f"(over {self.max_utilization:.0%} of the replicas' concurrency limits)")


def retry_after_s(queue_ms: float, bound_ms: float) -> int:
    """Seconds until the queue should have drained below the bound (at least 1)."""
    if math.isinf(queue_ms):
        return MAX_RETRY_AFTER_S
    excess_s = max(0.0, queue_ms - bound_ms) / MS_PER_S
    return int(min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, math.ceil(excess_s))))


class AdmissionController:
    """Admit / shed / spill per request; counts every decision by class and outcome."""

    def __init__(self, sec: CapacitySection, *, region: str = "") -> None:
        self.region = region
        self.default_priority = sec.default_priority
        self.bounds = {SHEDDABLE: Bound(sec.sheddable_max_utilization, sec.sheddable_max_queue_ms),
                       STANDARD: Bound(sec.standard_max_utilization, sec.standard_max_queue_ms)}
        self.counts: dict[tuple[str, str], int] = {(p, o): 0 for p in PRIORITIES for o in OUTCOMES}

    def decide(self, priority: str, utilization: float, queue_ms: float, *,
               peer_available: bool = False, peer: str = "") -> AdmissionDecision:
        """One request of class `priority` against the local pool's `utilization` and
        expected queueing `queue_ms`; `peer_available`: a peer region (`peer`) could take it
        sooner (gateway.routing.load_spill said so)."""
        d = self._decide(priority, utilization, queue_ms, peer_available, peer)
        self.counts[(d.priority, d.outcome)] += 1
        return d

    def _decide(self, priority: str, utilization: float, queue_ms: float, peer_available: bool,
                peer: str) -> AdmissionDecision:
        where = f"region {self.region!r}" if self.region else "this region"
        to_peer = f" to region {peer!r}" if peer else " to a peer region"
        if priority == SHEDDABLE:
            over = self.bounds[SHEDDABLE].exceeded(utilization, queue_ms)
            if over:
                return AdmissionDecision(SHEDDABLE, OUTCOME_SHED,
                                         f"overloaded: sheddable request refused in {where}: {over}",
                                         retry_after_s(queue_ms, self.bounds[SHEDDABLE].max_queue_ms))
            return ADMIT[SHEDDABLE]
        over = self.bounds[STANDARD].exceeded(utilization, queue_ms)
        if not over:
            return ADMIT[priority] if priority in ADMIT else ADMIT[STANDARD]
        if peer_available:
            return AdmissionDecision(priority, OUTCOME_SPILL, f"{where} overloaded ({over}): spilled{to_peer}",
                                     peer=peer)
        if priority == CRITICAL:
            return AdmissionDecision(CRITICAL, OUTCOME_ADMIT,
                                     f"{where} overloaded ({over}) and no peer has capacity: critical request queued")
        deep = self.bounds[STANDARD].deep(utilization, queue_ms)
        if not deep:  # past one bound only: the replicas still answer within the objective
            return AdmissionDecision(STANDARD, OUTCOME_ADMIT, f"{where} busy ({over}): standard request queued")
        return AdmissionDecision(STANDARD, OUTCOME_SHED,
                                 f"overloaded: standard request refused in {where} and no peer region has "
                                 f"capacity: {deep}",
                                 retry_after_s(queue_ms, self.bounds[STANDARD].max_queue_ms))

    def counters(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {p: {} for p in PRIORITIES}
        for (p, o), n in self.counts.items():
            out[p][o] = n
        return out


class AdmissionMetrics:
    """``geogate_admission_decisions{region, priority, outcome}`` from a controller's counts and
    ``geogate_load_spill_fraction{region}`` (share of admitted requests sent to a peer region
    because local queueing is long; 0 when not spilling). The hot path only bumps a dict entry;
    ``flush()`` (on the capacity sampler's timer) moves the increments into real prometheus
    metrics, which also works in the gateway's multi-worker (multiprocess) mode."""

    def __init__(self, controller: AdmissionController, registry, *, guard: OverloadGuard | None = None) -> None:
        from prometheus_client import Counter, Gauge

        self.controller = controller
        self.guard = guard
        region = controller.region
        counter = Counter("geogate_admission_decisions",
                          "Admission decisions under overload by priority class and outcome",
                          ["region", "priority", "outcome"], registry=registry)
        self._children = {key: counter.labels(region, *key) for key in controller.counts}
        self._flushed = dict.fromkeys(controller.counts, 0)
        self._fraction = None
        if guard is not None:
            self._fraction = Gauge("geogate_load_spill_fraction",
                                   "Share of admitted requests sent to a peer region because local queueing is long",
                                   ["region"], registry=registry, multiprocess_mode="livemax").labels(region)

    def flush(self) -> None:
        for key, n in self.controller.counts.items():
            delta = n - self._flushed[key]
            if delta > 0:
                self._children[key].inc(delta)
                self._flushed[key] = n
        if self._fraction is not None and self.guard is not None:
            spill = self.guard.spill
            self._fraction.set(spill.fraction if spill.spilling else 0.0)


class OverloadGuard:
    """The one per-request call of the data path: priority class -> admit / shed / spill.

    ``refresh()`` runs on the capacity sampler's timer: it reads the region's load from a
    gateway.routing.capacity ``CapacityTracker``, feeds the local expected queueing to a
    gateway.routing.load_spill ``LoadSpill`` (hysteresis) and picks the peer that would answer
    soonest from ``peers()`` (the peers' advertised load: ``load_spill.peer_loads`` over the
    gateway's RegionHealthMonitor). ``check()`` is cheap: cached numbers, at most one random
    draw, one dict increment.

    Two reasons to send a request to a peer: the request's class is over its bound here and a
    peer has capacity (overload spill: standard and critical are never refused while a peer can
    take them), or the region is spilling its load-aware share (``LoadSpill.fraction``) of
    requests it would otherwise have admitted. A region with no routable replica at all is not
    "overloaded": health-based failover (the router) moves its traffic, and nothing is shed.

    Where spilled requests go: every peer that would answer sooner (``LoadSpill.spill_targets``),
    drawn by its spare in-flight capacity, and the load-aware share is capped at what those peers
    have room for (their spare in-flight over this region's in-flight). Found by the planet
    simulation (loadtests/sim): sending the whole spilled share to the single best-looking peer
    let a big region (and several at once) bury a small idle peer, which then spilled in turn; the
    loss of the busiest region at 80% peak load cascaded over twenty regions. Peers that do not
    advertise ``concurrency_limit`` (older gateways) get the previous behaviour: the best one,
    uncapped.
    """

    def __init__(self, controller: AdmissionController, tracker, spill, peers=None, *,
                 has_peers: bool | None = None) -> None:
        self.controller = controller
        self.tracker = tracker
        self.spill = spill
        self.peers_fn = peers or (lambda: [])
        self.has_peers = peers is not None if has_peers is None else has_peers
        self.utilization = 0.0
        self.queue_ms = 0.0
        self.no_capacity = False
        self._best = None  # load_spill.PeerLoad that would answer sooner, or None
        self._best_reason = "no peer region"
        self._targets: tuple = ()  # peers spilled requests may go to (load_spill.PeerLoad)
        self._cum_spare: list[float] = []  # their cumulative spare in-flight (weights of the draw)
        self._cap = 1.0  # share of local requests the targets have room for

    @property
    def default_priority(self) -> str:
        return self.controller.default_priority

    def classify(self, value: str | None, key_priority: str | None = None) -> str:
        """The request's class (header / metadata value, the API key's default, the config's
        default); raises PriorityError for an unknown value."""
        if not value and key_priority is None:
            return self.controller.default_priority  # the common case, without parsing
        return request_priority(value, key_priority=key_priority, default=self.controller.default_priority)

    def refresh(self, now_s: float | None = None) -> None:
        load = self.tracker.region_load()
        q = load["expected_queue_ms"]
        self.no_capacity = q < 0
        # No routable replica here: health failover's business, not overload.
        self.queue_ms = 0.0 if self.no_capacity else q
        self.utilization = 0.0 if self.no_capacity else load["utilization"]
        if not self.has_peers:
            self.spill.reason = "no peer region to spill to"
            return
        self.spill.update(self.queue_ms, now_s)
        peers = list(self.peers_fn())
        peer, why = self.spill.best_peer(peers)
        self._best, self._best_reason = peer, why
        targets = [p for p in self.spill.spill_targets(peers) if p.spare_in_flight > 0]
        if peer is None or not targets or any(math.isinf(p.spare_in_flight) for p in targets):
            self._targets, self._cum_spare, self._cap = ((peer,) if peer is not None else ()), [], 1.0
            return
        acc = 0.0
        self._cum_spare = [acc := acc + p.spare_in_flight for p in targets]
        self._targets = tuple(targets)
        local_in_flight = self.utilization * load.get("concurrency_limit", 0)
        self._cap = min(1.0, acc / local_in_flight) if local_in_flight > 0 else 1.0

    def _target(self) -> str:
        """A spill target, drawn by spare capacity (one random draw; only when spilling is possible)."""
        targets = self._targets
        if len(targets) == 1:
            return targets[0].region
        x = self.spill.rng.random() * self._cum_spare[-1]
        return targets[min(len(targets) - 1, bisect.bisect_right(self._cum_spare, x))].region

    def check(self, priority: str, *, may_spill: bool = True) -> AdmissionDecision:
        """`may_spill`: False for requests that must be served here (they came from a peer)."""
        peer = self._target() if may_spill and self._targets else ""
        d = self.controller.decide(priority, self.utilization, self.queue_ms, peer_available=bool(peer), peer=peer)
        if d.outcome == OUTCOME_ADMIT and peer and self.spill.spilling:
            f = min(self.spill.fraction, self._cap)
            if f >= 1.0 or (f > 0.0 and self.spill.rng.random() < f):
                # under the class's bound, but the local queue is past the spill bound and a
                # peer answers sooner: load-aware geo-routing sends this share there
                self.controller.counts[(d.priority, OUTCOME_ADMIT)] -= 1
                self.controller.counts[(d.priority, OUTCOME_SPILL)] += 1
                return AdmissionDecision(d.priority, OUTCOME_SPILL, f"{self.spill.reason}; {self._best_reason}",
                                         peer=peer)
        return d

    def spill_state(self) -> dict:
        return {"spilling": self.spill.spilling, "fraction": round(self.spill.fraction, 4),
                "targets": [p.region for p in self._targets], "capped_at": round(self._cap, 4),
                "reason": self.spill.reason, "peer": self._best.region if self._best is not None else "",
                "peer_reason": self._best_reason, "local_expected_queue_ms": round(self.queue_ms, 3),
                "utilization": round(self.utilization, 4), "no_local_capacity": self.no_capacity}
