"""Prometheus metrics of the gateway's data path (prefix ``geogate_``).

With ``--workers N`` (N > 1) the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before the
workers start, so prometheus-client's multiprocess mode aggregates every worker's counters
and histograms into one ``/metrics`` answer whichever worker serves it (gauges: in-flight is
summed over live workers, replica health is the max over workers). With one worker the
ordinary in-process registry is used.

Dead workers (multiprocess mode): the supervisor calls ``merge_dead_worker`` when a worker
exits (rolling restart, crash): its live gauges' files go (``mark_process_dead``) and its
counters and histograms are added into ``<kind>_dead.db``, so the directory does not grow by
a few files per restart and totals never go backwards. Scrapes read the files under a shared
``flock`` and the merge happens under an exclusive one: no scrape sees a dead worker's counts
twice or not at all. Collectors that compute their samples at scrape time (e.g. the capacity
reason, gateway.routing.capacity) are process-local: ``exposition`` adds them to the merged answer.

Labelled children are cached in dicts: ``labels(...)`` costs a few microseconds per call,
too much to pay several times per proxied request.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MERGE_LOCK_FILE = "merge.lock"  # not *.db: prometheus-client never reads it
ADDITIVE_KINDS = ("counter", "histogram", "summary")  # file kinds whose values add up across processes
DEAD_SUFFIX = "dead"  # <kind>_dead.db: the merged values of every dead worker
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class GatewayMetrics:
    def __init__(self, region: str, registry: CollectorRegistry | None = None) -> None:
        self.region = region
        self._multiprocess = multiprocess_mode()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "geogate_requests", "Client inference requests by final outcome",
            ["model", "version", "region", "replica", "protocol", "outcome"], registry=r)
        self.latency = Histogram(
            "geogate_request_duration_seconds", "Client inference latency through the gateway",
            ["model", "region", "protocol"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.attempts = Counter(
            "geogate_upstream_attempts", "Attempts sent to replicas, by outcome",
            ["region", "replica", "protocol", "outcome"], registry=r)
        self.retries = Counter(
            "geogate_retries", "Retries (and hedged requests) sent to another replica",
            ["region", "reason"], registry=r)
        self.retry_budget_exhausted = Counter(
            "geogate_retry_budget_exhausted", "Retries not made because the retry budget was spent",
            ["region"], registry=r)
        self.ejections = Counter(
            "geogate_ejections", "Replicas ejected by passive outlier detection",
            ["region", "replica"], registry=r)
        self.replica_healthy = Gauge(
            "geogate_replica_healthy", "1 if the replica passes active health checks",
            ["region", "pool", "replica"], registry=r, multiprocess_mode="livemax")
        self.in_flight = Gauge(
            "geogate_in_flight_requests", "Client requests being served", ["region", "protocol"],
            registry=r, multiprocess_mode="livesum")
        self.sequences_pinned = Counter(
            "geogate_sequences_pinned", "Sequence STARTs routed to a replica (stateful models)",
            ["region", "model"], registry=r)
        self.sequences_lost = Counter(
            "geogate_sequences_lost", "Sequence requests answered 'sequence lost' (their replica is gone)",
            ["region", "model"], registry=r)
        self.rejected = Counter(
            "geogate_rejected_requests", "Requests answered by the gateway itself with an error",
            ["region", "protocol", "status"], registry=r)
        self.cross_region = Counter(
            "geogate_cross_region_requests", "Requests sent to another region's gateway (failover or spill)",
            ["region", "to_region", "outcome"], registry=r)
        self.peer_healthy = Gauge(
            "geogate_peer_region_healthy", "1 if this gateway sees the peer region's gateway as able to serve",
            ["region", "peer"], registry=r, multiprocess_mode="livemax")
        # Streams: gRPC ModelStreamInfer (gateway.front.stream_relay), HTTP generate_stream
        # (gateway.front.generate)
        self.streams_open = Gauge(
            "geogate_streams_open", "Client ModelStreamInfer streams open", ["region"], registry=r,
            multiprocess_mode="livesum")
        self.stream_relayed = Counter(
            "geogate_stream_responses_relayed", "Responses relayed to clients on streams (ModelStreamInfer "
            "responses, generate_stream events)", ["region", "protocol"], registry=r)
        self.stream_refusals = Counter(
            "geogate_stream_requests_refused", "Requests on ModelStreamInfer streams answered with an error "
            "by the gateway (refused, or their replica failed mid-answer)", ["region", "reason"], registry=r)
        self._streams_open = self.streams_open.labels(region)
        self._grpc_stream_responses = self.stream_relayed.labels(region, "grpc")
        self._req: dict[tuple, object] = {}
        self._lat: dict[tuple, object] = {}
        self._att: dict[tuple, object] = {}
        self._inflight = {p: self.in_flight.labels(region, p) for p in ("http", "grpc")}
        # This worker's own counts per protocol (the drain's cut-off accounting reads them):
        # requests in flight, and requests answered (request() or reject()).
        self.in_flight_now = {"http": 0, "grpc": 0}
        self.answered = {"http": 0, "grpc": 0}
        if not self._multiprocess:
            # Read at scrape time: no lock-taking gauge update per request.
            for p, child in self._inflight.items():
                child.set_function(lambda p=p: self.in_flight_now[p])

    # ------------------------------------------------------------------ hot path

    def request(self, model: str, version: str, replica: str, protocol: str, outcome: str,
                duration_s: float) -> None:
        self.answered[protocol] += 1
        key = (model, version, replica, protocol, outcome)
        c = self._req.get(key)
        if c is None:
            c = self._req[key] = self.requests.labels(model, version, self.region, replica, protocol, outcome)
        c.inc()  # type: ignore[attr-defined]
        lkey = (model, protocol)
        h = self._lat.get(lkey)
        if h is None:
            h = self._lat[lkey] = self.latency.labels(model, self.region, protocol)
        h.observe(duration_s)  # type: ignore[attr-defined]

    def attempt(self, replica: str, protocol: str, outcome: str) -> None:
        key = (replica, protocol, outcome)
        c = self._att.get(key)
        if c is None:
            c = self._att[key] = self.attempts.labels(self.region, replica, protocol, outcome)
        c.inc()  # type: ignore[attr-defined]

    def in_flight_add(self, protocol: str, delta: int) -> None:
        self.in_flight_now[protocol] += delta
        if self._multiprocess:
            self._inflight[protocol].inc(delta)

    def stream_response(self) -> None:
        """One ModelStreamInfer response relayed (hot path: a bound child)."""
        self._grpc_stream_responses.inc()

    def stream_responses(self, protocol: str, count: int) -> None:
        """`count` responses relayed on one stream (added once, when the stream ends)."""
        if count:
            self.stream_relayed.labels(self.region, protocol).inc(count)

    # ------------------------------------------------------------------ rare events

    def stream_open(self, delta: int) -> None:
        self._streams_open.inc(delta)

    def stream_refused(self, reason: str) -> None:
        """reason: refused (by the gateway's checks) | no-replica | replica-failed | sequence-lost."""
        self.stream_refusals.labels(self.region, reason).inc()

    def cross_region_request(self, to_region: str, outcome: str) -> None:
        self.cross_region.labels(self.region, to_region, outcome).inc()

    def peer_health(self, peer: str, healthy: bool) -> None:
        self.peer_healthy.labels(self.region, peer).set(1 if healthy else 0)

    def retry(self, reason: str) -> None:
        self.retries.labels(self.region, reason).inc()

    def budget_exhausted(self) -> None:
        self.retry_budget_exhausted.labels(self.region).inc()

    def ejected(self, replica: str) -> None:
        self.ejections.labels(self.region, replica).inc()

    def health(self, pool: str, replica: str, healthy: bool) -> None:
        self.replica_healthy.labels(self.region, pool, replica).set(1 if healthy else 0)

    def reject(self, protocol: str, status: str) -> None:
        self.answered[protocol] += 1
        self.rejected.labels(self.region, protocol, status).inc()

    def sequence_pinned(self, model: str) -> None:
        self.sequences_pinned.labels(self.region, model).inc()

    def sequence_lost(self, model: str) -> None:
        self.sequences_lost.labels(self.region, model).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The /metrics answer (blocking file reads in multiprocess mode: call it off the loop)."""
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg, directory)
        with _merge_lock(directory, fcntl.LOCK_SH):
            families = list(reg.collect())
        # Process-local collectors (samples computed at scrape time, no files): what this
        # registry has that the files do not.
        seen = {f.name for f in families}
        families += [f for f in self.registry.collect() if f.name not in seen and f.samples]
        return generate_latest(_Families(families)), CONTENT_TYPE_LATEST


class _Families:
    """A registry-like holder of already collected families, for generate_latest."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


@contextlib.contextmanager
def _merge_lock(directory: str, mode: int) -> Iterator[None]:
    with open(os.path.join(directory, MERGE_LOCK_FILE), "a") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge_dead_worker(directory: str, pid: int) -> list[str]:
    """A worker process `pid` is gone: remove its live gauges (``mark_process_dead``) and add
    its counters, histograms and summaries into ``<kind>_dead.db`` (then delete its files).
    Returns the files merged. Called by the supervisor, never by a worker."""
    from prometheus_client import multiprocess
    from prometheus_client.mmap_dict import MmapedDict

    multiprocess.mark_process_dead(pid, directory)
    merged = []
    with _merge_lock(directory, fcntl.LOCK_EX):
        for kind in ADDITIVE_KINDS:
            src = os.path.join(directory, f"{kind}_{pid}.db")
            if not os.path.exists(src):
                continue
            dst = os.path.join(directory, f"{kind}_{DEAD_SUFFIX}.db")
            tmp = dst + ".tmp"  # not *.db: invisible to scrapes until renamed
            if os.path.exists(dst):
                shutil.copyfile(dst, tmp)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
            into = MmapedDict(tmp)
            try:
                for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(src):
                    old, _ts = into.read_value(key)
                    into.write_value(key, old + value, timestamp)
            finally:
                into.close()
            os.replace(tmp, dst)
            os.remove(src)
            merged.append(src)
    return merged
