"""The one inference pipeline both client doors use (KServe's dataplane.py pattern).

An adapter (gateway.front.http_adapter, gateway.front.grpc_adapter) turns its wire request into
an ``InferRequest`` and the pipeline's ``InferAnswer`` back into its wire answer; everything in
between happens here, once, in this order:

    request in -> worker concurrency limit -> model and version named by the request -> name
    rules -> API key -> hop count -> model known? -> body (HTTP: size, slow sender) -> version
    resolved (releases) -> tensors checked against the model's inputs -> deadline -> forwarded
    (gateway.routing.forwarder: region, admission, replica, retries) -> response headers,
    metrics, access log -> answer out.

The request's bytes are never decoded here beyond what the checks need (the adapters' request
objects hold the body as received and a peek of it); the forwarder sends them on untouched.
The metadata queries (model metadata, config, statistics, readiness) share the name, key and
"model known" rules through ``ModelQueries``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import grpc

from core.config import Config
from core.kserve import (
    ATTEMPTS_HEADER,
    HOPS_HEADER,
    MODEL_VERSION_HEADER,
    PRIORITY_HEADER,
    REGION_HEADER,
    REPLICA_HEADER,
    REQUEST_ID_HEADER,
    http_to_grpc,
)
from core.names import cached_model_ref_problem as model_ref_problem
from gateway.front import deadline as dl
from gateway.front.access_log import AccessLog, request_id_from
from gateway.front.auth import AuthDecision, Authenticator
from gateway.front.request_checks import ClientErrorLog, RequestError, parse_hops
from gateway.routing.forwarder import Forwarder
from gateway.routing.load_window import LoadWindow
from gateway.upstream.catalog import ModelCatalog, ModelSpecs
from gateway.upstream.pool import RegionPools
from gateway.upstream.types import NO_VERDICT, OUTCOME_NAME, PROTOCOL_HTTP, InferCall, Reply

if TYPE_CHECKING:  # the metrics live with the composition root (gateway.server), a layer above
    from gateway.server.metrics import GatewayMetrics

log = logging.getLogger("geogate.gateway.pipeline")

SHED_RETRY_AFTER_S = 1  # an overloaded worker tells clients to come back this soon
# What the gateway says about itself (server metadata), on both protocols.
SERVER_NAME = "geogate"
SERVER_VERSION = "0.1.0"
SERVER_EXTENSIONS = ["binary_tensor_data"]
# Statistics answers say how many replicas they sum (README, "API"): those that answered, those asked.
REPLICAS_AGGREGATED_HEADER = "geogate-replicas-aggregated"
REPLICAS_ASKED_HEADER = "geogate-replicas-asked"
NOT_ON_GATEWAY = ("the {what} is not available on the geogate gateway; use the replicas' own API "
                  "(or `geogate models ...` for model versions)")


class InferRequest(Protocol):
    """One client request as an adapter presents it to the pipeline."""

    protocol: str  # gateway.upstream.types.PROTOCOL_HTTP | PROTOCOL_GRPC
    headers: Mapping[str, str]  # HTTP headers (case-insensitive) or gRPC metadata (lower-case keys)

    def target(self) -> tuple[str, str | None]:
        """(model, requested version or None); RequestError when the request names none."""

    async def read_body(self) -> None:
        """Have the whole body; RequestError 413 (too large) or 408 (sender too slow)."""

    def check(self, model: str, specs: ModelSpecs | None) -> None:
        """Tensors against the model's inputs and the limits; RequestError when malformed."""

    def deadline(self, now_s: float, default_timeout_ms: int) -> dl.Deadline:
        """When the client stops waiting; DeadlineError for a malformed timeout."""

    def call(self, model: str, requested: str | None, version: str | None, request_id: str,
             deadline: dl.Deadline, hops: int, started_s: float) -> InferCall:
        """The call the forwarder sends on (the body as received)."""

    def client_ip(self) -> str:
        """The socket peer's address (for nearest-to-client routing)."""


class ModelLookup(Protocol):
    """What the pipeline asks of the region's state (gateway.server.region_state.RegionState)."""

    def unknown_model(self, model: str, version: str | None, hops: int = 0) -> Reply | None: ...

    def resolve_version(self, model: str, requested: str | None) -> str | None: ...


@dataclass(slots=True)
class InferAnswer:
    """What the pipeline answers; the adapter writes it on its wire."""

    status: int  # HTTP status
    grpc_code: grpc.StatusCode
    message: str = ""  # the error text (not for a served request)
    meta: list[tuple[str, str]] = field(default_factory=list)  # response headers / initial metadata
    reply: Reply | None = None  # the replica's (or peer's) answer, when forwarded
    retry_after_s: int | None = None
    refusal: AuthDecision | None = None  # a refused API key: its Retry-After / WWW-Authenticate
    close: bool = False  # HTTP: close the connection after this answer (slow sender)


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    region: str
    default_timeout_ms: int
    max_in_flight: int  # [gateway] max_concurrent_requests, per worker
    locate_clients: bool  # nearest-to-client routing reads the client's address

    @classmethod
    def from_config(cls, cfg: Config, region: str) -> PipelineSettings:
        return cls(region=region, default_timeout_ms=cfg.gateway.default_timeout_ms,
                   max_in_flight=cfg.gateway.max_concurrent_requests,
                   locate_clients=len(cfg.regions) > 1 and cfg.routing.mode == "nearest-to-client")


class InferencePipeline:
    def __init__(self, settings: PipelineSettings, *, auth: Authenticator | None, models: ModelLookup,
                 catalog: ModelCatalog, forwarder: Forwarder, metrics: GatewayMetrics, load: LoadWindow,
                 access_log: AccessLog) -> None:
        self.settings = settings
        self.region = settings.region
        self.auth = auth  # None: no client authentication ([auth] keys_file not set)
        self.models = models
        self.catalog = catalog
        self.forwarder = forwarder
        self.metrics = metrics
        self.load = load
        self.access_log = access_log
        self.crash_log = ClientErrorLog(log)  # rate limit for tracebacks of unexpected errors

    async def infer(self, req: InferRequest) -> InferAnswer:
        t0 = time.monotonic()
        protocol = req.protocol
        headers = req.headers
        rid = request_id_from(headers.get(REQUEST_ID_HEADER))
        meta = [(REGION_HEADER, self.region), (REQUEST_ID_HEADER, rid)]
        model, requested = "", None
        decision: AuthDecision | None = None
        load, metrics = self.load, self.metrics
        # Returned in `finally` on every path (errors and cancellation included).
        load.in_flight += 1
        metrics.in_flight_add(protocol, 1)
        try:
            limit = self.settings.max_in_flight
            if load.in_flight > limit:
                # HTTP 503 (a server-side condition the client may retry); gRPC RESOURCE_EXHAUSTED.
                return self._refuse(protocol, meta, rid, model, requested, 503,
                                    f"gateway worker overloaded: more than {limit} requests in flight "
                                    f"([gateway] max_concurrent_requests); retry after {SHED_RETRY_AFTER_S} s",
                                    t0, grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    retry_after_s=SHED_RETRY_AFTER_S)
            try:
                model, requested = req.target()
            except RequestError as exc:
                return self._refuse(protocol, meta, rid, model, "", exc.status, str(exc), t0)
            bad_name = model_ref_problem(model, requested)  # before any lookup by that name
            if bad_name:
                return self._refuse(protocol, meta, rid, model, requested, 400, bad_name, t0)
            if self.auth is not None:
                decision = self.auth.authorize_headers(headers, model)
                if not decision.allowed:
                    return self._refuse(protocol, meta, rid, model, requested, decision.http_status,
                                        decision.message, t0, refusal=decision)
            try:
                hops = parse_hops(headers.get(HOPS_HEADER))
            except RequestError as exc:
                return self._refuse(protocol, meta, rid, model, requested, 400, str(exc), t0)
            unknown = self.models.unknown_model(model, requested, hops)
            if unknown is not None:
                return self._refuse(protocol, meta, rid, model, requested, 404, unknown.message, t0)
            try:
                await req.read_body()
            except RequestError as exc:
                return self._refuse(protocol, meta, rid, model, requested, exc.status, str(exc), t0,
                                    close=exc.status == 408)
            version = self.models.resolve_version(model, requested)
            try:
                catalog = self.catalog
                specs = catalog.fresh_specs(model, version) or await catalog.specs(model, version)
                req.check(model, specs)
                deadline = req.deadline(t0, self.settings.default_timeout_ms)
            except (RequestError, dl.DeadlineError) as exc:
                return self._refuse(protocol, meta, rid, model, version, getattr(exc, "status", 400), str(exc), t0)
            call = req.call(model, requested, version, rid, deadline, hops, t0)
            call.priority = headers.get(PRIORITY_HEADER, "")
            if decision is not None:
                call.key_priority = decision.priority
            if self.settings.locate_clients:
                call.client_ip = req.client_ip()
                call.forwarded_for = headers.get("x-forwarded-for")
            result = await self.forwarder.forward(call)
            return self._served(protocol, meta, call, result.reply, result.upstream, result.attempts, t0)
        except Exception as exc:  # a gateway bug: a 500 / INTERNAL with a reason, the traceback rate-limited
            if self.crash_log.allow():
                log.exception("inference request %s for model %r failed inside the gateway", rid, model)
            return self._refuse(protocol, meta, rid, model, requested, 500,
                                f"internal gateway error: {type(exc).__name__}", t0)
        finally:
            if decision is not None:
                decision.release()
            load.in_flight -= 1
            metrics.in_flight_add(protocol, -1)

    def _served(self, protocol: str, meta: list, call: InferCall, reply: Reply, upstream, attempts: int,
                t0: float) -> InferAnswer:
        # Served by a peer region: its gateway said where and by which replica.
        replica = upstream.state.url if upstream is not None else reply.replica
        if reply.region:
            meta[0] = (REGION_HEADER, reply.region)
        served_version = reply.model_version or call.version or ""
        meta += [(REPLICA_HEADER, replica), (MODEL_VERSION_HEADER, served_version), (ATTEMPTS_HEADER, str(attempts))]
        now = time.monotonic()
        outcome = OUTCOME_NAME[reply.outcome]
        if reply.outcome not in NO_VERDICT:  # a client's short deadline is no latency sample
            self.load.record(now - t0, now)
        self.metrics.request(call.model, served_version, replica, protocol, outcome, now - t0)
        if self.access_log.enabled:
            status = reply.http_status if protocol == PROTOCOL_HTTP else reply.grpc_code.name
            self.access_log.log(request_id=call.request_id, protocol=protocol, model=call.model,
                                version=served_version, status=status, replica=replica, attempts=attempts,
                                duration_s=now - t0, outcome=outcome, error=reply.message)
        return InferAnswer(reply.http_status, reply.grpc_code, reply.message, meta, reply,
                           retry_after_s=reply.retry_after_s or None)

    def _refuse(self, protocol: str, meta: list, rid: str, model: str, version: str | None, status: int,
                message: str, t0: float, *, grpc_code: grpc.StatusCode | None = None,
                retry_after_s: int | None = None, refusal: AuthDecision | None = None,
                close: bool = False) -> InferAnswer:
        """A request the gateway answers itself (nothing forwarded): metric, access log, answer."""
        code = grpc_code or http_to_grpc(status)
        label = str(status) if protocol == PROTOCOL_HTTP else code.name
        self.metrics.reject(protocol, label)
        self.access_log.log(request_id=rid, protocol=protocol, model=model, version=version or "", status=label
                            if protocol != PROTOCOL_HTTP else status, replica="", attempts=0,
                            duration_s=time.monotonic() - t0, outcome="rejected", error=message)
        meta.append((ATTEMPTS_HEADER, "0"))
        return InferAnswer(status, code, message, meta, retry_after_s=retry_after_s, refusal=refusal, close=close)


@dataclass(slots=True)
class ModelDocument:
    """A metadata query's answer: ``status`` 200 with ``body``, or an error ``message``."""

    status: int
    body: dict | None = None
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # response headers / initial metadata


class ModelQueries:
    """Model metadata, config, statistics and readiness, and server metadata, the same on both
    doors: name rules (400), unknown model (404), then the pool's cached answer or a replica's
    (503 when no replica can answer, with the pool's reason); statistics summed over the pool's
    replicas, server metadata the pool's when its replicas are not geogate ones. API keys are
    checked by the adapters (HTTP: for every non-infer path at once; gRPC: per call, unless
    ``[auth] open_metadata``)."""

    def __init__(self, *, models: ModelLookup, catalog: ModelCatalog, pools: RegionPools) -> None:
        self.models = models
        self.catalog = catalog
        self.pools = pools

    def refusal(self, model: str, version: str | None) -> ModelDocument | None:
        """400 for a malformed model name or version, 404 for an unknown model; None when it may go on."""
        bad_name = model_ref_problem(model, version)
        if bad_name:
            return ModelDocument(400, message=bad_name)
        unknown = self.models.unknown_model(model, version)
        if unknown is not None:
            return ModelDocument(404, message=unknown.message)
        return None

    async def document(self, fetch: Callable[[str, str | None], Awaitable[tuple[int, dict]]], model: str,
                       version: str | None, protocol: str) -> ModelDocument:
        """``fetch``: one of the catalog's metadata / config / statistics."""
        refused = self.refusal(model, version)
        if refused is not None:
            return refused
        status, body = await fetch(model, version)
        if status == 0:
            cands = self.pools.candidates(model, version, protocol, time.monotonic())
            return ModelDocument(503, message=f"no replica can serve model '{model}': "
                                              f"{cands.reason or 'no replica answered'}")
        if status != 200:
            return ModelDocument(status, body, str(body.get("error", f"HTTP {status}")))
        return ModelDocument(200, body)

    async def server_metadata(self) -> dict:
        """The pool's replicas' name, version and extensions when they are not geogate replicas
        (gateway.upstream.pool_merge), else the gateway's own."""
        pool = await self.catalog.server_metadata()
        if pool is not None:
            return pool
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(SERVER_EXTENSIONS)}

    async def statistics(self, model: str | None, version: str | None, protocol: str) -> ModelDocument:
        """Statistics summed over the pool's routable replicas (`model` None: all models), with
        REPLICAS_AGGREGATED_HEADER / REPLICAS_ASKED_HEADER saying how many it covers."""
        if model is not None:
            refused = self.refusal(model, version)
            if refused is not None:
                return refused
        got = await self.catalog.pool_statistics(model, version)
        headers = {REPLICAS_AGGREGATED_HEADER: str(got.replicas), REPLICAS_ASKED_HEADER: str(got.asked)}
        if got.status == 200:
            return ModelDocument(200, got.body, headers=headers)
        if got.status == 0:
            if model is None:
                reason = (f"none of the {got.asked} routable replicas answered" if got.asked
                          else "no replica of the region is routable")
                return ModelDocument(503, message=f"no statistics: {reason}", headers=headers)
            cands = self.pools.candidates(model, version, protocol, time.monotonic())
            return ModelDocument(503, message=f"no replica can serve model '{model}': "
                                              f"{cands.reason or 'no replica answered'}", headers=headers)
        return ModelDocument(got.status, got.body, str(got.body.get("error", f"HTTP {got.status}")), headers)

    def ready(self, model: str, version: str | None, protocol: str) -> ModelDocument:
        refused = self.refusal(model, version)
        if refused is not None:
            return refused
        if self.catalog.ready(model, version):
            return ModelDocument(200)
        cands = self.pools.candidates(model, version, protocol, time.monotonic())
        return ModelDocument(400, message=f"model '{model}' is not ready: {cands.reason}")
