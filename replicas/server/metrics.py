"""Prometheus metrics of a replica (names prefixed `geogate_replica_`), per model and version.

Label children are cached per (model, version, protocol) so the hot path does one dict lookup
instead of prometheus-client's label resolution on every request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "geogate_replica_"
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OUTCOMES = ("success", "invalid", "not_found", "too_large", "unavailable", "error", "fault")
UNKNOWN = "unknown"  # model/version label for requests naming no loaded model (bounded cardinality)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _RequestChildren:
    __slots__ = ("latency", "outcomes")

    def __init__(self, metrics: ReplicaMetrics, model: str, version: str, protocol: str):
        self.latency = metrics.latency.labels(model, version, protocol)
        self.outcomes = {o: metrics.requests.labels(model, version, protocol, o) for o in OUTCOMES}


class ReplicaMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series double the exposition for no use here
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "Inference requests by outcome",
                                ["model", "version", "protocol", "outcome"], registry=r)
        self.latency = Histogram(PREFIX + "request_duration_seconds",
                                 "Inference request latency, receive to answer",
                                 ["model", "version", "protocol"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram(PREFIX + "batch_size", "Rows per ONNX Runtime run",
                                    ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge(PREFIX + "queue_depth", "Requests waiting for a batch",
                                 ["model", "version"], registry=r)
        self.inflight = Gauge(PREFIX + "inflight_requests", "Inference requests being handled",
                              ["model", "version"], registry=r)
        self.provider = Gauge(PREFIX + "execution_provider_info",
                              "1 for the execution provider ONNX Runtime really uses",
                              ["model", "version", "provider"], registry=r)
        self.model_ready = Gauge(PREFIX + "model_ready", "1 when the model version is ready",
                                 ["model", "version"], registry=r)
        self.ready = Gauge(PREFIX + "ready", "1 when the replica reports ready", registry=r)
        self.load_failures = Counter(PREFIX + "model_load_failures", "Failed model version loads",
                                     ["model"], registry=r)
        self._children: dict[tuple[str, str, str], _RequestChildren] = {}

    def request_children(self, model: str, version: str, protocol: str) -> _RequestChildren:
        key = (model, version, protocol)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = _RequestChildren(self, model, version, protocol)
        return c

    def observe(self, model: str, version: str, protocol: str, outcome: str, seconds: float) -> None:
        c = self.request_children(model, version, protocol)
        c.outcomes[outcome].inc()
        c.latency.observe(seconds)

    def version_loaded(self, model: str, version: str, provider: str) -> None:
        self.provider.labels(model, version, provider).set(1)
        self.model_ready.labels(model, version).set(1)

    def version_unloaded(self, model: str, version: str, provider: str) -> None:
        self.model_ready.labels(model, version).set(0)
        for gauge, labels in ((self.provider, (model, version, provider)),
                              (self.queue_depth, (model, version)), (self.inflight, (model, version))):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
