"""Client-facing ``inference.GRPCInferenceService`` on grpc.aio.

ModelInfer is registered through a generic handler with identity (de)serializers: the
request arrives as bytes, proto_peek reads model/version/id and tensor headers without
copying, and the same bytes (plus an appended model_version when the resolver chose one) go
to a gRPC replica. The other RPCs use tritonclient's generated messages and are answered
from the pool's state or proxied (gateway.upstream.catalog). Repository, shared-memory, trace
and log RPCs are UNIMPLEMENTED on the gateway with a message saying so. The standard
grpc.health.v1 service follows the gateway's readiness.

Security, as on HTTP (gateway.front.http_adapter): API keys in the ``authorization: Bearer gk_...`` or
``x-api-key`` metadata (UNAUTHENTICATED / PERMISSION_DENIED / RESOURCE_EXHAUSTED with a
``retry-after`` trailer); ServerLive, ServerReady and grpc.health.v1 stay open. Limits: message
size (``[gateway] max_body_bytes``), metadata size (``[limits] max_header_bytes``), handshake
(``request_head_timeout_ms``) and idle-connection timeouts, concurrent streams, tensor elements,
model/version names. TLS credentials come from core.tls (``[tls]``).
"""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2, service_pb2

from core.kserve import HOPS_HEADER, PRIORITY_HEADER, REQUEST_ID_HEADER, http_to_grpc
from core.names import cached_model_ref_problem as model_ref_problem
from gateway.front import deadline as dl
from gateway.front.access_log import request_id_from
from gateway.front.auth import AuthDecision, Authenticator, grpc_abort
from gateway.front.http_adapter import (
    NOT_ON_GATEWAY,
    SERVER_EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    SHED_RETRY_AFTER_S,
)
from gateway.front.request_checks import ClientErrorLog, RequestError, check_grpc, parse_hops
from gateway.upstream.proto_peek import ProtoError, peek_infer_request
from gateway.upstream.types import NO_VERDICT, OUTCOME_NAME, PROTOCOL_GRPC, InferCall

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


class GrpcFront:
    def __init__(self, gw) -> None:
        self.gw = gw
        self.region = gw.region.name
        self.default_timeout_ms = gw.cfg.gateway.default_timeout_ms
        self.max_in_flight = gw.cfg.gateway.max_concurrent_requests
        self.max_elements = gw.cfg.limits.max_tensor_elements
        self.auth: Authenticator | None = getattr(gw, "auth", None)  # None: no client authentication
        self.open_metadata = gw.cfg.auth.open_metadata
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.crash_log = ClientErrorLog(log)  # rate limit for tracebacks of unexpected errors

    # ------------------------------------------------------------------ server

    def build_server(self, address: str, *, reuse_port: bool,
                     credentials: grpc.ServerCredentials | None = None) -> grpc.aio.Server:
        """The listener; `credentials` (core.tls.ServerTls.grpc_credentials): TLS."""
        max_bytes = self.gw.cfg.gateway.max_body_bytes
        limits = self.gw.cfg.limits
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", 1 << 30),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_concurrent_streams", self.gw.cfg.gateway.max_concurrent_requests),
            ("grpc.max_metadata_size", limits.max_header_bytes),
            # slow or silent clients: TLS/HTTP2 handshake, then idle connections, are bounded
            ("grpc.server_handshake_timeout_ms", limits.request_head_timeout_ms),
            ("grpc.max_connection_idle_ms", limits.idle_timeout_ms),
            # graceful GOAWAY after this age: how a draining worker hands clients over (gateway.server.drain)
            *([("grpc.max_connection_age_ms", age_ms)] if (age_ms := self.gw.cfg.gateway.grpc_max_connection_age_ms)
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
            self._stream_unimplemented, request_deserializer=_identity, response_serializer=_identity)
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
            bad = model_ref_problem(name, version)
            if bad:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad)
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
        t0 = time.monotonic()
        gw = self.gw
        md = {k: v for k, v in context.invocation_metadata() or ()}
        rid = request_id_from(md.get(REQUEST_ID_HEADER))
        initial = [("geogate-region", self.region), (REQUEST_ID_HEADER, rid)]
        decision: AuthDecision | None = None
        model = ""
        # Returned in `finally` on every path (aborts, errors and cancellation included).
        gw.load.in_flight += 1
        gw.metrics.in_flight_add(PROTOCOL_GRPC, 1)
        try:
            if gw.load.in_flight > self.max_in_flight:
                context.set_trailing_metadata((("retry-after", str(SHED_RETRY_AFTER_S)),))
                await self._reject(context, initial, rid, "", None, 429,
                                   f"gateway worker overloaded: more than {self.max_in_flight} requests in "
                                   f"flight ([gateway] max_concurrent_requests); retry after {SHED_RETRY_AFTER_S} s",
                                   t0)
            try:
                peek = peek_infer_request(raw)
            except ProtoError as exc:
                await self._reject(context, initial, rid, "", "", 400, f"malformed ModelInferRequest: {exc}", t0)
            model = peek.model_name
            requested = peek.model_version or None
            if not model:
                await self._reject(context, initial, rid, "", "", 400, "ModelInferRequest has no model_name", t0)
            bad_name = model_ref_problem(model, requested)  # before any lookup by that name
            if bad_name:
                await self._reject(context, initial, rid, model, requested, 400, bad_name, t0)
            if self.auth is not None:
                decision = self.auth.authorize_headers(md, model)
                if not decision.allowed:
                    trailers = decision.grpc_trailers()
                    if trailers:
                        context.set_trailing_metadata(trailers)
                    await self._reject(context, initial, rid, model, requested, decision.http_status,
                                       decision.message, t0)
            try:
                hops = parse_hops(md.get(HOPS_HEADER))
            except RequestError as exc:
                await self._reject(context, initial, rid, model, requested, 400, str(exc), t0)
            unknown = gw.unknown_model(model, requested, hops)
            if unknown is not None:
                await self._reject(context, initial, rid, model, requested, 404, unknown.message, t0)
            version = gw.resolve_version(model, requested)
            try:
                deadline = dl.grpc_deadline(t0, context.time_remaining(),
                                            peek.int_parameters.get(dl.TIMEOUT_PARAMETER),
                                            self.default_timeout_ms)
                specs = gw.catalog.fresh_specs(model, version) or await gw.catalog.specs(model, version)
                check_grpc(model, peek, specs, self.max_elements, raw)
            except (RequestError, dl.DeadlineError) as exc:
                await self._reject(context, initial, rid, model, version, getattr(exc, "status", 400), str(exc),
                                   t0)
            call = InferCall(PROTOCOL_GRPC, model, requested, version, rid, deadline.at_s,
                             hops=hops, client_deadline=deadline.client, started_s=t0, raw=raw, peek=peek)
            call.priority = md.get(PRIORITY_HEADER, "")
            if decision is not None:
                call.key_priority = decision.priority
            if gw.locate_clients:
                call.client_ip = grpc_peer_ip(context.peer())
                call.forwarded_for = md.get("x-forwarded-for")
            result = await gw.forwarder.forward(call)
            reply = result.reply
            # Served by a peer region: its gateway said where and by which replica.
            replica = result.upstream.state.url if result.upstream is not None else reply.replica
            if reply.region:
                initial[0] = ("geogate-region", reply.region)
            served_version = reply.model_version or version or ""
            initial += [("geogate-replica", replica), ("geogate-model-version", served_version),
                        ("geogate-attempts", str(result.attempts))]
            now = time.monotonic()
            if reply.outcome not in NO_VERDICT:  # a client's short deadline is no latency sample
                gw.load.record(now - t0, now)
            gw.metrics.request(model, served_version, replica, PROTOCOL_GRPC, OUTCOME_NAME[reply.outcome],
                               now - t0)
            if gw.access_log.enabled:
                gw.access_log.log(request_id=rid, protocol=PROTOCOL_GRPC, model=model, version=served_version,
                                  status=reply.grpc_code.name, replica=replica, attempts=result.attempts,
                                  duration_s=now - t0, outcome=OUTCOME_NAME[reply.outcome], error=reply.message)
            await context.send_initial_metadata(initial)
            if reply.grpc_code == grpc.StatusCode.OK:
                return reply.body
            if reply.retry_after_s:
                context.set_trailing_metadata((("retry-after", str(reply.retry_after_s)),))
            await context.abort(reply.grpc_code, reply.message)
        except grpc.aio.AbortError:
            raise  # context.abort(): the answer is on its way
        except Exception as exc:  # a gateway bug: INTERNAL with a reason, the traceback rate-limited
            if self.crash_log.allow():
                log.exception("inference call %s for model %r failed inside the gateway", rid, model)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal gateway error: {type(exc).__name__}")
        finally:
            if decision is not None:
                decision.release()
            gw.load.in_flight -= 1
            gw.metrics.in_flight_add(PROTOCOL_GRPC, -1)
        raise AssertionError("unreachable")

    async def _reject(self, context, initial, rid: str, model: str, version: str | None, status: int,
                      message: str, t0: float) -> None:
        gw = self.gw
        code = http_to_grpc(status)
        gw.metrics.reject(PROTOCOL_GRPC, code.name)
        gw.access_log.log(request_id=rid, protocol=PROTOCOL_GRPC, model=model, version=version or "",
                          status=code.name, replica="", attempts=0, duration_s=time.monotonic() - t0,
                          outcome="rejected", error=message)
        await context.send_initial_metadata([*initial, ("geogate-attempts", "0")])
        await context.abort(code, message)

    # ------------------------------------------------------------------ everything else

    async def server_live(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.gw.readiness()[0])

    async def server_metadata(self, request, context):
        decision = await self._metadata_guard(context, None)
        if decision is not None:
            decision.release()
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                                  extensions=SERVER_EXTENSIONS)

    async def model_ready(self, request, context):
        version = request.version or None
        decision = await self._metadata_guard(context, request.name, version)
        if decision is not None:
            decision.release()
        if self.gw.unknown_model(request.name, version) is not None:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=self.gw.catalog.ready(request.name, version))

    async def _proxied(self, context, name: str, version: str | None, fetch) -> dict:
        decision = await self._metadata_guard(context, name, version)
        if decision is not None:
            decision.release()
        unknown = self.gw.unknown_model(name, version)
        if unknown is not None:
            await context.abort(grpc.StatusCode.NOT_FOUND, unknown.message)
        status, body = await fetch(name, version)
        if status == 0:
            cands = self.gw.pools.candidates(name, version, "grpc", time.monotonic())
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no replica can serve model '{name}': "
                                f"{cands.reason or 'no replica answered'}")
        if status != 200:
            await context.abort(http_to_grpc(status), str(body.get("error", f"HTTP {status}")))
        return body

    async def model_metadata(self, request, context):
        body = await self._proxied(context, request.name, request.version or None, self.gw.catalog.metadata)
        return json_format.ParseDict(body, service_pb2.ModelMetadataResponse(), ignore_unknown_fields=True)

    async def model_config(self, request, context):
        body = await self._proxied(context, request.name, request.version or None, self.gw.catalog.config)
        cfg = json_format.ParseDict(body, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
        return service_pb2.ModelConfigResponse(config=cfg)

    async def model_statistics(self, request, context):
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "statistics for all models are not "
                                "aggregated by the gateway; ask for one model")
        body = await self._proxied(context, request.name, request.version or None,
                                   self.gw.catalog.statistics)
        return json_format.ParseDict(body, service_pb2.ModelStatisticsResponse(), ignore_unknown_fields=True)

    def _unimplemented(self, what: str):
        message = NOT_ON_GATEWAY.format(what=what)

        async def handler(request, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

        return handler

    async def _stream_unimplemented(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "ModelStreamInfer (decoupled streaming) is not supported by the geogate gateway")
        yield b""  # pragma: no cover  (makes this an async generator)
