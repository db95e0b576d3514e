"""Client-facing ``inference.GRPCInferenceService`` on grpc.aio: translates between gRPC and the
one inference pipeline (gateway.front.pipeline), nothing more.

ModelInfer is registered through a generic handler with identity (de)serializers: the request
arrives as bytes, ``GrpcInferRequest`` peeks model/version/id and tensor headers without copying
(gateway.upstream.proto_peek), and the same bytes go on to a replica; the pipeline's
``InferAnswer`` becomes initial metadata (geogate-*), the replica's serialized response, or a
status with trailers (retry-after). The other RPCs use tritonclient's generated messages and are
answered through ``ModelQueries``. ModelStreamInfer (bidirectional, decoupled models included)
is relayed per request by gateway.front.stream_relay. Repository, shared-memory, trace and log
RPCs are UNIMPLEMENTED on the gateway with a message saying so. The standard grpc.health.v1 service
follows the gateway's readiness.

Security, as on HTTP: API keys in the ``authorization: Bearer gk_...`` or ``x-api-key`` metadata
(UNAUTHENTICATED / PERMISSION_DENIED / RESOURCE_EXHAUSTED with a ``retry-after`` trailer);
ServerLive, ServerReady and grpc.health.v1 stay open. Limits: message size (``[gateway]
max_body_bytes``), metadata size (``[limits] max_header_bytes``), handshake
(``request_head_timeout_ms``) and idle-connection timeouts, concurrent streams, tensor elements,
model/version names. TLS credentials come from core.tls (``[tls]``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2, service_pb2

from core.config import Config
from core.kserve import http_to_grpc
from gateway.front import deadline as dl
from gateway.front.auth import AuthDecision, Authenticator, grpc_abort
from gateway.front.pipeline import (
    NOT_ON_GATEWAY,
    InferAnswer,
    InferencePipeline,
    ModelDocument,
    ModelQueries,
)
from gateway.front.request_checks import RequestError, check_grpc
from gateway.front.stream_relay import StreamRelay, StreamServices
from gateway.routing.sequences import sequence_from_grpc
from gateway.upstream.model_specs import ModelSpecs
from gateway.upstream.proto_peek import InferRequestPeek, ProtoError, peek_infer_request
from gateway.upstream.types import PROTOCOL_GRPC, InferCall

if TYPE_CHECKING:
    from gateway.server.region_state import RegionState

log = logging.getLogger("geogate.gateway.grpc")

SERVICE = "inference.GRPCInferenceService"
UNEXPOSED = {
    "RepositoryIndex": "model repository extension", "RepositoryModelLoad": "model repository extension",
    "RepositoryModelUnload": "model repository extension",
    "SystemSharedMemoryStatus": "shared memory extension", "SystemSharedMemoryRegister": "shared memory extension",
    "SystemSharedMemoryUnregister": "shared memory extension", "CudaSharedMemoryStatus": "shared memory extension",
    "CudaSharedMemoryRegister": "shared memory extension", "CudaSharedMemoryUnregister": "shared memory extension",
    "TraceSetting": "trace extension", "LogSettings": "logging extension",
}


def _identity(b: bytes) -> bytes:
    return b


def grpc_peer_ip(peer: str | None) -> str:
    """The address in grpc's peer string ('ipv4:1.2.3.4:5678', 'ipv6:[::1]:5678')."""
    if not peer:
        return ""
    _, _, rest = peer.partition(":")
    host, _, _ = rest.rpartition(":")
    return host.strip("[]")


class GrpcInferRequest:
    """A ModelInfer call as the pipeline sees it (gateway.front.pipeline.InferRequest)."""

    __slots__ = ("context", "headers", "max_elements", "peek", "raw")
    protocol = PROTOCOL_GRPC

    def __init__(self, raw: bytes, context: grpc.aio.ServicerContext, max_elements: int) -> None:
        self.raw = raw
        self.context = context
        self.headers = {k: v for k, v in context.invocation_metadata() or ()}
        self.max_elements = max_elements
        self.peek: InferRequestPeek | None = None

    def target(self) -> tuple[str, str | None]:
        try:
            peek = self.peek = peek_infer_request(self.raw)
        except ProtoError as exc:
            raise RequestError(f"malformed ModelInferRequest: {exc}") from None
        if not peek.model_name:
            raise RequestError("ModelInferRequest has no model_name")
        return peek.model_name, peek.model_version or None

    async def read_body(self) -> None:
        pass  # grpc-core delivered the whole message (bounded by grpc.max_receive_message_length)

    def check(self, model: str, specs: ModelSpecs | None) -> None:
        check_grpc(model, self.peek, specs, self.max_elements, self.raw)

    def deadline(self, now_s: float, default_timeout_ms: int) -> dl.Deadline:
        return dl.grpc_deadline(now_s, self.context.time_remaining(),
                                self.peek.int_parameters.get(dl.TIMEOUT_PARAMETER), default_timeout_ms)

    def call(self, model: str, requested: str | None, version: str | None, request_id: str, deadline: dl.Deadline,
             hops: int, started_s: float) -> InferCall:
        return InferCall(PROTOCOL_GRPC, model, requested, version, request_id, deadline.at_s, hops=hops,
                         client_deadline=deadline.client, started_s=started_s, raw=self.raw, peek=self.peek,
                         sequence=sequence_from_grpc(self.peek))

    def client_ip(self) -> str:
        return grpc_peer_ip(self.context.peer())


async def grpc_answer(answer: InferAnswer, context: grpc.aio.ServicerContext) -> bytes:
    """The pipeline's answer on a unary call: the replica's response bytes, or abort with its status."""
    await context.send_initial_metadata(answer.meta)
    if answer.grpc_code == grpc.StatusCode.OK:
        return answer.reply.body
    trailers = answer.refusal.grpc_trailers() if answer.refusal is not None else ()
    if answer.retry_after_s:
        trailers = (*trailers, ("retry-after", str(answer.retry_after_s)))
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(answer.grpc_code, answer.message)
    raise AssertionError("unreachable: abort raises")


class GrpcFront:
    def __init__(self, cfg: Config, *, pipeline: InferencePipeline, queries: ModelQueries, state: RegionState,
                 auth: Authenticator | None, streams: StreamServices) -> None:
        self.cfg = cfg
        self.streams = streams  # what ModelStreamInfer's relays share
        self.pipeline = pipeline
        self.queries = queries
        self.state = state  # readiness
        self.max_elements = cfg.limits.max_tensor_elements
        self.auth = auth  # None: no client authentication
        self.open_metadata = cfg.auth.open_metadata
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()

    # ------------------------------------------------------------------ server

    def build_server(self, address: str, *, reuse_port: bool,
                     credentials: grpc.ServerCredentials | None = None) -> grpc.aio.Server:
        """The listener; `credentials` (core.tls.ServerTls.grpc_credentials): TLS."""
        max_bytes = self.cfg.gateway.max_body_bytes
        limits = self.cfg.limits
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", 1 << 30),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_concurrent_streams", self.cfg.gateway.max_concurrent_requests),
            ("grpc.max_metadata_size", limits.max_header_bytes),
            # slow or silent clients: TLS/HTTP2 handshake, then idle connections, are bounded
            ("grpc.server_handshake_timeout_ms", limits.request_head_timeout_ms),
            ("grpc.max_connection_idle_ms", limits.idle_timeout_ms),
            # graceful GOAWAY after this age: how a draining worker hands clients over (gateway.server.drain)
            *([("grpc.max_connection_age_ms", age_ms)] if (age_ms := self.cfg.gateway.grpc_max_connection_age_ms)
              else []),
        ])
        handlers: dict[str, grpc.RpcMethodHandler] = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                self.model_infer, request_deserializer=_identity, response_serializer=_identity),
        }

        def typed(fn, req_cls):
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req_cls.FromString, response_serializer=lambda m: m.SerializeToString())

        handlers["ServerLive"] = typed(self.server_live, service_pb2.ServerLiveRequest)
        handlers["ServerReady"] = typed(self.server_ready, service_pb2.ServerReadyRequest)
        handlers["ModelReady"] = typed(self.model_ready, service_pb2.ModelReadyRequest)
        handlers["ServerMetadata"] = typed(self.server_metadata, service_pb2.ServerMetadataRequest)
        handlers["ModelMetadata"] = typed(self.model_metadata, service_pb2.ModelMetadataRequest)
        handlers["ModelConfig"] = typed(self.model_config, service_pb2.ModelConfigRequest)
        handlers["ModelStatistics"] = typed(self.model_statistics, service_pb2.ModelStatisticsRequest)
        for name, what in UNEXPOSED.items():
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._unimplemented(what), request_deserializer=_identity, response_serializer=_identity)
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer, request_deserializer=_identity, response_serializer=_identity)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if credentials is not None:
            server.add_secure_port(address, credentials)
        else:
            server.add_insecure_port(address)
        return server

    async def _authorize(self, context, model: str | None, md: dict | None = None) -> AuthDecision | None:
        """None when authentication is off; aborts the call (raises) when the key is refused."""
        if self.auth is None:
            return None
        if md is None:
            md = {k: v for k, v in context.invocation_metadata() or ()}
        decision = self.auth.authorize_headers(md, model)
        if not decision.allowed:
            await grpc_abort(context, decision)
        return decision

    async def _metadata_guard(self, context, name: str | None, version: str | None = None) -> AuthDecision | None:
        """Key (unless [auth] open_metadata) and name checks for the metadata RPCs."""
        if name:
            refused = self.queries.refusal(name, version)
            if refused is not None and refused.status == 400:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused.message)
        if self.open_metadata:
            return None
        return await self._authorize(context, name or None)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for svc in ("", SERVICE):
            r = self.health.set(svc, status)
            if r is not None and hasattr(r, "__await__"):
                await r

    # ------------------------------------------------------------------ inference

    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        answer = await self.pipeline.infer(GrpcInferRequest(raw, context, self.max_elements))
        return await grpc_answer(answer, context)

    # ------------------------------------------------------------------ everything else

    async def server_live(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.state.readiness()[0])

    async def server_metadata(self, request, context):
        decision = await self._metadata_guard(context, None)
        if decision is not None:
            decision.release()
        return json_format.ParseDict(await self.queries.server_metadata(), service_pb2.ServerMetadataResponse(),
                                     ignore_unknown_fields=True)

    async def model_ready(self, request, context):
        version = request.version or None
        decision = await self._metadata_guard(context, request.name, version)
        if decision is not None:
            decision.release()
        doc = self.queries.ready(request.name, version, PROTOCOL_GRPC)
        return service_pb2.ModelReadyResponse(ready=doc.status == 200)

    async def _proxied(self, context, name: str, version: str | None, fetch) -> dict:
        decision = await self._metadata_guard(context, name, version)
        if decision is not None:
            decision.release()
        doc: ModelDocument = await self.queries.document(fetch, name, version, PROTOCOL_GRPC)
        if doc.status != 200:
            code = grpc.StatusCode.UNAVAILABLE if doc.status == 503 and doc.body is None else http_to_grpc(doc.status)
            await context.abort(code, doc.message)
        return doc.body

    async def model_metadata(self, request, context):
        body = await self._proxied(context, request.name, request.version or None, self.queries.catalog.metadata)
        return json_format.ParseDict(body, service_pb2.ModelMetadataResponse(), ignore_unknown_fields=True)

    async def model_config(self, request, context):
        body = await self._proxied(context, request.name, request.version or None, self.queries.catalog.config)
        cfg = json_format.ParseDict(body, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
        return service_pb2.ModelConfigResponse(config=cfg)

    async def model_statistics(self, request, context):
        """Summed over the pool's replicas (all models when no name); the initial metadata's
        geogate-replicas-aggregated says over how many."""
        name = request.name or None
        version = (request.version or None) if name else None
        decision = await self._metadata_guard(context, name, version)
        if decision is not None:
            decision.release()
        doc = await self.queries.statistics(name, version, PROTOCOL_GRPC)
        if doc.headers:
            await context.send_initial_metadata(tuple(doc.headers.items()))
        if doc.status != 200:
            code = grpc.StatusCode.UNAVAILABLE if doc.status == 503 and doc.body is None else http_to_grpc(doc.status)
            await context.abort(code, doc.message)
        return json_format.ParseDict(doc.body, service_pb2.ModelStatisticsResponse(), ignore_unknown_fields=True)

    def _unimplemented(self, what: str):
        message = NOT_ON_GATEWAY.format(what=what)

        async def handler(request, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

        return handler

    async def model_stream_infer(self, requests, context):
        """Bidirectional ModelStreamInfer: every request routed like a unary one, its responses
        relayed in order (gateway.front.stream_relay)."""
        async for response in StreamRelay(self.streams, context).run(requests):
            yield response
