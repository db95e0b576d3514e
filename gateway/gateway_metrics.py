"""Prometheus metrics of the gateway's data path (prefix ``geogate_``).

With ``--workers N`` (N > 1) the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before the
workers start, so prometheus-client's multiprocess mode aggregates every worker's counters
and histograms into one ``/metrics`` answer whichever worker serves it (gauges: in-flight is
summed over live workers, replica health is the max over workers). With one worker the
ordinary in-process registry is used.

Labelled children are cached in dicts: ``labels(...)`` costs a few microseconds per call,
too much to pay several times per proxied request.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
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
        self.rejected = Counter(
            "geogate_rejected_requests", "Requests answered by the gateway itself with an error",
            ["region", "protocol", "status"], registry=r)
        self.cross_region = Counter(
            "geogate_cross_region_requests", "Requests sent to another region's gateway (failover or spill)",
            ["region", "to_region", "outcome"], registry=r)
        self.peer_healthy = Gauge(
            "geogate_peer_region_healthy", "1 if this gateway sees the peer region's gateway as able to serve",
            ["region", "peer"], registry=r, multiprocess_mode="livemax")
        self._req: dict[tuple, object] = {}
        self._lat: dict[tuple, object] = {}
        self._att: dict[tuple, object] = {}
        self._inflight = {p: self.in_flight.labels(region, p) for p in ("http", "grpc")}
        self._inflight_counts = {"http": 0, "grpc": 0}
        if not self._multiprocess:
            # Read at scrape time: no lock-taking gauge update per request.
            for p, child in self._inflight.items():
                child.set_function(lambda p=p: self._inflight_counts[p])

    # ------------------------------------------------------------------ hot path

    def request(self, model: str, version: str, replica: str, protocol: str, outcome: str,
                duration_s: float) -> None:
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
        if self._multiprocess:
            self._inflight[protocol].inc(delta)
        else:
            self._inflight_counts[protocol] += delta

    # ------------------------------------------------------------------ rare events

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
        self.rejected.labels(self.region, protocol, status).inc()

    def exposition(self) -> tuple[bytes, str]:
        if multiprocess_mode():
            from prometheus_client import multiprocess

            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            return generate_latest(reg), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
