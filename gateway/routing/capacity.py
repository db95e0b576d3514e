"""Capacity model of a region's replica pools, and the replica count each pool should have.

Per replica, a **concurrency limit**: configured (``[capacity] replica_concurrency_limit``) or
learned from where its latency knee is. Learning (Vegas / gradient style): keep an EWMA of
latency per in-flight level, and the replica's base latency: the lowest of those averages
among the levels seen in the last two ``MIN_LATENCY_WINDOW_S`` (so it can rise again after a
model change; the windowed minimum of single samples until a level has enough of them). An
average, not the fastest single sample: when service times vary (batching, input sizes, CV
~0.3), the fastest sample is far below what an unqueued request takes and every level looked
past the knee (a 16-slot replica at half load learned a limit of 4). By Little's law a
replica with c parallel slots answers n > c concurrent requests in about n/c times its base
latency, so each level estimates ``c ~ n * base_latency / latency(n)``; once some level's
latency is past ``latency_knee_factor`` x the base (the knee is seen), the limit is the largest
such estimate. Before the knee is seen the limit is the highest level observed without slowing
down (at least the initial limit).

Per pool: in-flight (the gateway's outstanding requests to the pool's replicas), the sum of
the routable replicas' limits, **utilization** = in-flight / sum(limits), requests queued
beyond the limits, and the **expected queueing delay** of a new arrival (Little's law: the
pool completes about sum(limits) / service_time requests per second, so ``queued`` requests
ahead take ``queued * service_time / sum(limits)``).

**Desired replicas** (``DesiredReplicas``), in the way Knative's concurrency target and
Kubernetes HPA's behaviour work::

    want = ceil(average in-flight / (target_utilization * limit per replica)), in [min, max]
    scale up:   at once, to the largest `want` of the last scale_up_window_s
    scale down: only to the largest `want` of the last scale_down_window_s (stabilization)

Every answer carries an operator-readable reason ("in-flight 37.0 over 4 replicas at target
70% of limit 8: want 7", "holding 6 during the 60 s scale-down window (want 3)").

Where the gateway feeds it (see ``CapacityTracker``): the forwarder calls ``observe()`` after
every successful attempt (the attempt's latency and the replica's in-flight count when it was
sent) and the gateway state runs ``sample_gateway`` + ``OverloadGuard.refresh`` on a timer
(every ``sample_interval_ms``: every pool's outstanding counters and routable replicas).
``gateway.admin.capacity_api.mount`` (called by the composition root) serves
``GET /geogate/v1/capacity`` on the admin listener.

Utilization and expected queueing use a short moving average of in-flight (``IN_FLIGHT_EWMA_ALPHA``
per sample), so one unlucky sample does not shed or spill; desired replicas use the average over
``in_flight_window_s``. A pool with no routable replica has no capacity to queue for: it is
not "overloaded" (health-based failover moves its traffic), and it advertises
``expected_queue_ms = -1`` (no capacity) to peers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from core.config import CapacitySection

log = logging.getLogger("geogate.gateway.capacity")

MS_PER_S = 1000.0
MIN_LATENCY_WINDOW_S = 30.0  # base latency: levels seen in this window and the previous one
LEVEL_EWMA_ALPHA = 0.2  # weight of a new latency sample in its in-flight level's average
LEVEL_MIN_SAMPLES = 5  # a level's average is trusted after this many samples
SERVICE_EWMA_ALPHA = 0.1  # weight of a new sample in the unqueued service-time average
MAX_TRACKED_LEVEL = 4096
IN_FLIGHT_EWMA_ALPHA = 0.5  # weight of the newest in-flight sample in utilization / queueing
CAPACITY_PATH = "/geogate/v1/capacity"


# ---------------------------------------------------------------------------- per replica


class ConcurrencyLimit:
    """One replica's concurrency limit, configured or learned from its latency knee."""

    __slots__ = ("_last_limit", "_last_s", "_levels", "_min_cur_s", "_min_prev_s", "_window_start_s",
                 "configured", "initial", "knee_factor", "max_limit", "service_s")

    def __init__(self, *, configured: int = 0, initial: int = 8, max_limit: int = 256,
                 knee_factor: float = 2.0) -> None:
        self.configured = configured
        self.initial = max(1, initial)
        self.max_limit = max(1, max_limit)
        self.knee_factor = knee_factor
        self._levels: dict[int, list[float]] = {}  # in-flight level -> [ewma_s, samples, last seen s]
        self._last_s = 0.0  # time of the latest observation
        self._min_cur_s = math.inf
        self._min_prev_s = math.inf
        self._window_start_s: float | None = None
        self.service_s = 0.0  # EWMA latency of requests that did not queue (level <= limit)
        # The limit as last computed (by `limit`, on the sampling timer): the hot path reads it.
        self._last_limit = configured if configured > 0 else self.initial

    def observe(self, latency_s: float, in_flight: int, now_s: float) -> None:
        """One finished attempt: its latency and the replica's in-flight count (itself
        included) when it was sent."""
        if latency_s <= 0 or in_flight <= 0:
            return
        if self._window_start_s is None:
            self._window_start_s = now_s
        elif now_s - self._window_start_s >= MIN_LATENCY_WINDOW_S:
            self._min_prev_s, self._min_cur_s = self._min_cur_s, math.inf
            self._window_start_s = now_s
        self._min_cur_s = min(self._min_cur_s, latency_s)
        self._last_s = now_s
        level = min(in_flight, MAX_TRACKED_LEVEL)
        entry = self._levels.get(level)
        if entry is None:
            self._levels[level] = [latency_s, 1, now_s]
        else:
            entry[0] += LEVEL_EWMA_ALPHA * (latency_s - entry[0])
            entry[1] += 1
            entry[2] = now_s
        if in_flight <= self._last_limit:
            self.service_s = latency_s if self.service_s == 0 else \
                self.service_s + SERVICE_EWMA_ALPHA * (latency_s - self.service_s)

    @property
    def min_latency_s(self) -> float:
        m = min(self._min_cur_s, self._min_prev_s)
        return 0.0 if m == math.inf else m

    @property
    def base_latency_s(self) -> float:
        """Latency without queueing: the lowest trusted level average of the last two windows
        (the windowed minimum of single samples while no level is trusted yet)."""
        since = self._last_s - 2 * MIN_LATENCY_WINDOW_S
        base = math.inf
        for ewma_s, n, seen_s in self._levels.values():
            if n >= LEVEL_MIN_SAMPLES and seen_s >= since and ewma_s < base:
                base = ewma_s
        return self.min_latency_s if base == math.inf else base

    @property
    def service_estimate_s(self) -> float:
        """Service time of an unqueued request: the EWMA at or under the limit, or (a replica
        that has only ever been seen over its limit) its minimum latency."""
        return self.service_s if self.service_s > 0 else self.min_latency_s

    def _learned(self) -> tuple[int, str]:
        base_s = self.base_latency_s
        if base_s <= 0:
            return self.initial, f"initial {self.initial} (no latency measured yet)"
        knee_level = 0
        estimate = 0.0
        best_ok = 0
        for level, (ewma_s, n, _) in self._levels.items():
            if n < LEVEL_MIN_SAMPLES:
                continue
            if ewma_s > self.knee_factor * base_s:
                knee_level = level if knee_level == 0 else min(knee_level, level)
            else:
                best_ok = max(best_ok, level)
            estimate = max(estimate, level * base_s / ewma_s)
        if knee_level:
            limit = max(1, min(self.max_limit, round(estimate)))
            return limit, (f"learned {limit}: latency passes {self.knee_factor:g}x the base "
                           f"{base_s * MS_PER_S:.1f} ms at in-flight {knee_level}")
        limit = max(self.initial, min(self.max_limit, best_ok))
        return limit, (f"learning: {limit} (no latency knee seen up to in-flight {best_ok}, "
                       f"base {base_s * MS_PER_S:.1f} ms)")

    @property
    def limit(self) -> int:
        if self.configured > 0:
            return self.configured
        self._last_limit = self._learned()[0]
        return self._last_limit

    def explain(self) -> str:
        if self.configured > 0:
            return f"configured {self.configured}"
        return self._learned()[1]


# ---------------------------------------------------------------------------- desired count


@dataclass(frozen=True, slots=True)
class Recommendation:
    desired: int  # what the pool should run now (after the stabilization windows)
    want: int  # this instant's raw recommendation (bounded by min/max)
    current: int
    reason: str


class DesiredReplicas:
    """Desired replica count for one pool with HPA-style stabilization windows."""

    def __init__(self, *, target_utilization: float, min_replicas: int, max_replicas: int,
                 scale_up_window_s: float, scale_down_window_s: float) -> None:
        self.target = target_utilization
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.up_window_s = scale_up_window_s
        self.down_window_s = scale_down_window_s
        self._history: deque[tuple[float, int]] = deque()  # (time, want)

    @classmethod
    def from_section(cls, sec: CapacitySection) -> DesiredReplicas:
        return cls(target_utilization=sec.target_utilization, min_replicas=sec.min_replicas,
                   max_replicas=sec.max_replicas, scale_up_window_s=sec.scale_up_window_s,
                   scale_down_window_s=sec.scale_down_window_s)

    def _max_since(self, since_s: float) -> int:
        return max((w for t, w in self._history if t >= since_s), default=0)

    def update(self, in_flight_avg: float, current: int, limit_per_replica: float, now_s: float) -> Recommendation:
        per_replica = self.target * max(limit_per_replica, 1e-9)
        raw = math.ceil(round(in_flight_avg / per_replica, 6)) if in_flight_avg > 0 else 0
        want = min(self.max_replicas, max(self.min_replicas, raw))
        why = (f"in-flight {in_flight_avg:.1f} over {current} replicas at target {self.target:.0%} "
               f"of limit {limit_per_replica:g}: want {raw}")
        if raw > self.max_replicas:
            why += f", capped at max_replicas {self.max_replicas}"
        elif raw < self.min_replicas:
            why += f", raised to min_replicas {self.min_replicas}"
        self._history.append((now_s, want))
        horizon_s = now_s - max(self.up_window_s, self.down_window_s)
        while self._history and self._history[0][0] < horizon_s:
            self._history.popleft()
        up = self._max_since(now_s - self.up_window_s)
        down = self._max_since(now_s - self.down_window_s)
        if up > current:
            desired = up
            if up > want:
                why += f"; scaling up to {up}, the largest wanted in the last {self.up_window_s:g} s"
        elif down < current:
            desired = down
            if down > want:
                why += f"; scaling down to {down}, the largest wanted in the last {self.down_window_s:g} s"
        else:
            desired = current
            if want < current:
                why = f"holding {current} during the {self.down_window_s:g} s scale-down window ({why})"
        desired = min(self.max_replicas, max(self.min_replicas, desired))
        return Recommendation(desired, want, current, why)


# ---------------------------------------------------------------------------- per pool


@dataclass(slots=True)
class PoolLoad:
    """A pool's load at one moment (JSON-able via ``as_dict``)."""

    pool: str
    replicas: int  # routable replicas
    in_flight: int
    in_flight_avg: float
    limit_total: int
    limit_per_replica: float
    utilization: float
    queued: int
    service_ms: float
    expected_queue_ms: float
    limits: dict[str, str] = field(default_factory=dict)  # replica URL -> explanation

    def as_dict(self) -> dict:
        return {"pool": self.pool, "replicas": self.replicas, "in_flight": self.in_flight,
                "in_flight_avg": round(self.in_flight_avg, 3), "concurrency_limit": self.limit_total,
                "limit_per_replica": round(self.limit_per_replica, 3),
                "utilization": round(self.utilization, 4), "queued": self.queued,
                "service_ms": round(self.service_ms, 3), "expected_queue_ms": round(self.expected_queue_ms, 3),
                "limits": dict(self.limits)}


def expected_queue_ms(in_flight: float, limit_total: int, service_s: float) -> float:
    """Little's law: requests beyond the limits wait for `queued` completions of a pool that
    finishes about limit_total / service_s requests per second."""
    if limit_total <= 0:
        return math.inf if in_flight > 0 else 0.0
    queued = max(0, in_flight - limit_total)
    return queued * service_s / limit_total * MS_PER_S


class PoolCapacity:
    def __init__(self, name: str, sec: CapacitySection) -> None:
        self.name = name
        self.sec = sec
        self.limits: dict[str, ConcurrencyLimit] = {}
        self.samples: deque[tuple[float, int]] = deque()  # (time, in-flight)
        self.routable: list[str] = []
        self.in_flight = 0
        self.in_flight_ewma = 0.0
        self.desired = DesiredReplicas.from_section(sec)
        self.recommendation: Recommendation | None = None
        # The pool's load as of the last sample: the recommendation, the gauges and the region
        # load (peers, admission) all read it, so each replica's limit is learned once per
        # sample, not once per reader (a 1,000-replica pool took 33 ms per sample, 13% of a core).
        self._load: PoolLoad | None = None

    def limit_of(self, url: str) -> ConcurrencyLimit:
        lim = self.limits.get(url)
        if lim is None:
            s = self.sec
            lim = self.limits[url] = ConcurrencyLimit(
                configured=s.replica_concurrency_limit, initial=s.initial_concurrency_limit,
                max_limit=s.max_concurrency_limit, knee_factor=s.latency_knee_factor)
        return lim

    def sample(self, in_flight_by_url: dict[str, int], routable: Iterable[str], now_s: float) -> None:
        self.routable = list(routable)
        for url in list(self.limits):
            if url not in in_flight_by_url:
                del self.limits[url]  # left the pool
        self.in_flight = sum(in_flight_by_url.values())
        if self.samples:
            self.in_flight_ewma += IN_FLIGHT_EWMA_ALPHA * (self.in_flight - self.in_flight_ewma)
        else:
            self.in_flight_ewma = float(self.in_flight)
        self.samples.append((now_s, self.in_flight))
        while self.samples and self.samples[0][0] < now_s - self.sec.in_flight_window_s:
            self.samples.popleft()
        self._load = None

    def load(self, *, explain: bool = False) -> PoolLoad:
        """The pool's load as of the last sample (computed once per sample). `explain`: also
        why each replica has its limit (``limits``; the snapshot's readers want it, the
        sampler does not), computed afresh."""
        if not explain and self._load is not None:
            return self._load
        urls = self.routable
        lims = [self.limit_of(u) for u in urls]
        limit_total = sum(lim.limit for lim in lims)
        services = [s for s in (lim.service_estimate_s for lim in lims) if s > 0]
        service_s = sum(services) / len(services) if services else 0.0
        avg = sum(n for _, n in self.samples) / len(self.samples) if self.samples else float(self.in_flight)
        per = limit_total / len(urls) if urls else float(
            self.sec.replica_concurrency_limit or self.sec.initial_concurrency_limit)
        now_n = max(self.in_flight_ewma, 0.0)
        util = now_n / limit_total if limit_total else (math.inf if now_n > 0 else 0.0)
        load = PoolLoad(self.name, len(urls), self.in_flight, avg, limit_total, per, util,
                        max(0, self.in_flight - limit_total), service_s * MS_PER_S,
                        expected_queue_ms(now_n, limit_total, service_s),
                        {u: lim.explain() for u, lim in zip(urls, lims, strict=True)} if explain else {})
        if not explain:
            self._load = load
        return load

    def recommend(self, current: int, now_s: float) -> Recommendation:
        load = self.load()
        self.recommendation = self.desired.update(load.in_flight_avg, current, load.limit_per_replica, now_s)
        return self.recommendation


# ---------------------------------------------------------------------------- the region


class CapacityTracker:
    """Every pool of one gateway: limits, load, desired counts, Prometheus gauges."""

    def __init__(self, sec: CapacitySection, *, region: str = "", registry=None,
                 clock: Callable[[], float] = time.monotonic, workers: int = 1) -> None:
        self.sec = sec
        self.region = region
        self.clock = clock
        # With N gateway workers sharing the ports (SO_REUSEPORT spreads connections evenly),
        # each worker sees about 1/N of the region's in-flight requests: scale back up.
        self.workers = max(1, workers)
        self.pools: dict[str, PoolCapacity] = {}
        self.members: dict[str, int] = {}  # pool -> replicas in it (not draining)
        self._gauges = _Gauges(registry, region) if registry is not None else None

    def pool(self, name: str) -> PoolCapacity:
        p = self.pools.get(name)
        if p is None:
            p = self.pools[name] = PoolCapacity(name, self.sec)
        return p

    # hot path: one call per finished attempt
    def observe(self, pool: str, url: str, latency_s: float, in_flight: int, now_s: float) -> None:
        self.pool(pool).limit_of(url).observe(latency_s, in_flight, now_s)

    def sample(self, pools: Iterable[tuple[str, dict[str, int], list[str], int]], now_s: float | None = None) -> None:
        """pools: (name, in-flight by replica URL, routable URLs, members not draining)."""
        now = self.clock() if now_s is None else now_s
        for name, in_flight, routable, members in pools:
            p = self.pool(name)
            if self.workers > 1:
                in_flight = {u: n * self.workers for u, n in in_flight.items()}
            p.sample(in_flight, routable, now)
            self.members[name] = members
            rec = p.recommend(members, now)
            if self._gauges is not None:
                self._gauges.set(name, p.load(), rec)

    def pool_loads(self) -> list[PoolLoad]:
        return [p.load() for p in self.pools.values()]

    def region_load(self) -> dict:
        """Fields for the region summary's ``load`` object (peers' spill decisions read
        ``utilization`` and ``expected_queue_ms``). Pools without a routable replica are left
        out; none at all: ``expected_queue_ms`` -1 and ``utilization`` 1.0 (no capacity here)."""
        loads = [ld for ld in self.pool_loads() if ld.replicas]
        if not loads:
            return {"utilization": 1.0, "expected_queue_ms": -1.0, "concurrency_limit": 0, "queued": 0}
        limit = sum(ld.limit_total for ld in loads)
        busy = sum(ld.utilization * ld.limit_total for ld in loads)  # smoothed in-flight
        queue_ms = min(ld.expected_queue_ms for ld in loads)
        return {"utilization": round(busy / limit, 4) if limit else 1.0,
                "expected_queue_ms": round(queue_ms, 3) if math.isfinite(queue_ms) else -1.0,
                "concurrency_limit": limit, "queued": sum(ld.queued for ld in loads)}

    def snapshot(self) -> dict:
        """``GET /geogate/v1/capacity``: what the autoscaler and operators read."""
        pools = {}
        for name, p in self.pools.items():
            rec = p.recommendation
            pools[name] = {**p.load(explain=True).as_dict(), "members": self.members.get(name, 0),
                           "desired_replicas": rec.desired if rec else None,
                           "want_replicas": rec.want if rec else None,
                           "reason": rec.reason if rec else "no sample yet"}
        return {"region": self.region, "target_utilization": self.sec.target_utilization,
                "min_replicas": self.sec.min_replicas, "max_replicas": self.sec.max_replicas,
                "pools": pools, "load": self.region_load()}


class _Gauges:
    def __init__(self, registry, region: str) -> None:
        from prometheus_client import Gauge

        r = registry
        labels = ["region", "pool"]
        self.region = region
        self.desired = Gauge("geogate_pool_desired_replicas", "Replicas the pool should run (autoscaling target)",
                             labels, registry=r, multiprocess_mode="livemax")
        self._last_reason: dict[str, str] = {}
        self.reason = _ReasonCollector(region, self._last_reason)
        r.register(self.reason)
        self.members = Gauge("geogate_pool_replicas", "Replicas in the pool (not draining)", labels,
                             registry=r, multiprocess_mode="livemax")
        self.utilization = Gauge("geogate_pool_utilization", "In-flight / sum of replica concurrency limits",
                                 labels, registry=r, multiprocess_mode="livemax")
        self.limit = Gauge("geogate_pool_concurrency_limit", "Sum of routable replicas' concurrency limits",
                           labels, registry=r, multiprocess_mode="livemax")
        self.queue = Gauge("geogate_pool_expected_queue_seconds", "Expected queueing delay of a new request",
                           labels, registry=r, multiprocess_mode="livemax")

    def set(self, pool: str, load: PoolLoad, rec: Recommendation) -> None:
        reg = self.region
        self.desired.labels(reg, pool).set(rec.desired)
        self.members.labels(reg, pool).set(rec.current)
        self.utilization.labels(reg, pool).set(load.utilization if math.isfinite(load.utilization) else 1e9)
        self.limit.labels(reg, pool).set(load.limit_total)
        q_ms = load.expected_queue_ms
        self.queue.labels(reg, pool).set(q_ms / MS_PER_S if math.isfinite(q_ms) else 1e9)
        self._last_reason[pool] = rec.reason


REASON_METRIC = "geogate_pool_desired_replicas_reason"


class _ReasonCollector:
    """``geogate_pool_desired_replicas_reason{region,pool,reason} 1``: each pool's current
    reason, read at scrape time. A Gauge would need ``.remove()`` of the previous reason's
    series, which prometheus-client's multiprocess mode does not implement (it warned at every
    rolling restart and kept every old reason at 1 in the worker's file). Process-local: with
    --workers N the reason is that of the worker answering the scrape."""

    def __init__(self, region: str, reasons: dict[str, str]) -> None:
        self.region = region
        self.reasons = reasons  # pool -> reason, updated by _Gauges.set

    def _family(self):
        from prometheus_client.core import GaugeMetricFamily

        return GaugeMetricFamily(REASON_METRIC, "1 for the reason behind geogate_pool_desired_replicas",
                                 labels=["region", "pool", "reason"])

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        for pool, reason in list(self.reasons.items()):
            family.add_metric([self.region, pool, reason], 1.0)
        yield family


# ---------------------------------------------------------------------------- gateway wiring


def sample_gateway(tracker: CapacityTracker, gw, now_s: float | None = None) -> None:
    """Read a GatewayState's pools (outstanding counters, routability) into the tracker."""
    now = time.monotonic() if now_s is None else now_s
    rows = []
    for pool in gw.pools.pools:
        in_flight: dict[str, int] = {}
        routable: list[str] = []
        members = 0
        for up in pool.members.values():
            in_flight[up.url] = up.load.outstanding
            if not up.state.draining:
                members += 1
                if up.state.routable(now)[0]:
                    routable.append(up.url)
        rows.append((pool.name, in_flight, routable, members))
    tracker.sample(rows, now)


class CapacityControl:
    """One gateway worker's capacity tracker, admission controller and overload guard, and
    the timer that samples the pools and refreshes the guard. The gateway state owns it
    (``start`` / ``close``); the forwarder calls ``tracker.observe`` after each attempt and
    ``guard.check`` once per request."""

    def __init__(self, sec: CapacitySection, *, region: str, registry=None, peers: Callable[[], list] | None = None,
                 has_peers: bool = False, workers: int = 1) -> None:
        from gateway.routing.admission import AdmissionController, AdmissionMetrics, OverloadGuard
        from gateway.routing.load_spill import LoadSpill

        self.sec = sec
        self.tracker = CapacityTracker(sec, region=region, registry=registry, workers=workers)
        self.controller = AdmissionController(sec, region=region)
        self.guard = OverloadGuard(self.controller, self.tracker, LoadSpill(sec), peers, has_peers=has_peers)
        self.metrics = AdmissionMetrics(self.controller, registry, guard=self.guard) if registry is not None else None
        self.interval_s = sec.sample_interval_ms / MS_PER_S
        self._task: asyncio.Task | None = None

    def sample(self, gw, now_s: float | None = None) -> None:
        sample_gateway(self.tracker, gw, now_s)
        self.guard.refresh(now_s)
        if self.metrics is not None:
            self.metrics.flush()

    async def _run(self, gw) -> None:
        while True:
            try:
                self.sample(gw)
            except Exception:  # never let a bookkeeping bug stop sampling for good
                log.exception("capacity sample failed")
            await asyncio.sleep(self.interval_s)

    def start(self, gw) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(gw), name="capacity sampler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def document(self) -> dict:
        """``GET /geogate/v1/capacity``: pools (limits, load, desired replicas with reasons),
        admission decisions by class, the load-spill state."""
        snap = self.tracker.snapshot()
        snap["admission"] = self.controller.counters()
        snap["spill"] = self.guard.spill_state()
        return snap
