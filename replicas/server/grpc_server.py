"""KServe v2 over gRPC (`inference.GRPCInferenceService`, grpc.aio) and the standard grpc.health.v1.

Uses tritonclient's generated modules, so the wire format is Triton's. Outputs always travel
in `raw_output_contents`; inputs are read from `raw_input_contents` or the typed `contents`.
With a control token, RepositoryIndex (unless `ready` only), RepositoryModelLoad and
RepositoryModelUnload need `authorization: Bearer <token>` metadata (UNAUTHENTICATED otherwise),
as over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from tritonclient.grpc import service_pb2, service_pb2_grpc

from core.kserve import MODEL_VERSION_HEADER, REQUEST_ID_HEADERS
from replicas.server.infer_errors import InferError, one_line
from replicas.server.inference_service import InferenceService
from replicas.server.repository import ControlToken, LoadError, ModelRepository
from replicas.server.server_info import EXTENSIONS, SERVER_NAME, server_version, statistics_response
from replicas.server.v2_codec import decode_grpc, encode_grpc

log = logging.getLogger("geogate.replica.grpc")

SERVICE_NAME = "inference.GRPCInferenceService"
HEALTH_SYNC_INTERVAL_S = 0.5
STREAM_QUEUE_LIMIT = 1024
MAX_SEND_BYTES = 2**31 - 1
HOT_METHODS = ("ModelInfer",)


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key in REQUEST_ID_HEADERS:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


class ReadinessHealthServicer(HealthServicer):
    """grpc.health.v1 whose answer is the replica's readiness at the moment of asking."""

    def __init__(self, repository: ModelRepository):
        super().__init__()
        self._repository = repository

    def _status(self) -> int:
        ready, _ = self._repository.readiness()
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request, context):
        if request.service not in ("", SERVICE_NAME):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        return health_pb2.HealthCheckResponse(status=self._status())

    async def sync(self) -> None:
        """Keep Watch streams informed (Check computes its answer itself)."""
        status = self._status()
        for service in ("", SERVICE_NAME):
            await self.set(service, status)


def _authorization(context: grpc.aio.ServicerContext) -> str | bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


class GrpcInferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService, repository: ModelRepository,
                 control_token: ControlToken | None = None):
        self.service = service
        self.repository = repository
        self.control_token = control_token

    async def _check_control(self, context: grpc.aio.ServicerContext, method: str) -> None:
        """Abort with UNAUTHENTICATED unless the call carries this replica's control token."""
        if self.control_token is None:
            return
        reason = self.control_token.refusal(_authorization(context))
        if reason:
            log.warning("repository API call refused", extra={"fields": {
                "method": method, "peer": context.peer(), "reason": reason}})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    # ------------------------------------------------------------------ health and metadata

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.repository.readiness()[0])

    async def ModelReady(self, request, context):
        try:
            self.repository.get(request.name, request.version)
        except InferError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=server_version(),
                                                  extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        try:
            h = self.repository.get(request.name, request.version)
        except InferError as exc:
            await context.abort(exc.grpc_code, exc.message)
        versions = [h.version_str] if request.version else self.repository.ready_versions(h.model)
        sig = h.signature
        return service_pb2.ModelMetadataResponse(
            name=h.model, versions=versions, platform="onnxruntime_onnx",
            inputs=[service_pb2.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype,
                                                                     shape=list(s.full_shape))
                    for s in sig.inputs.values()],
            outputs=[service_pb2.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype,
                                                                      shape=list(s.full_shape))
                     for s in sig.outputs.values()])

    async def ModelConfig(self, request, context):
        try:
            h = self.repository.get(request.name, request.version)
        except InferError as exc:
            await context.abort(exc.grpc_code, exc.message)
        return service_pb2.ModelConfigResponse(config=h.config)

    async def ModelStatistics(self, request, context):
        try:
            return statistics_response(self.repository, request.name, request.version)
        except InferError as exc:
            await context.abort(exc.grpc_code, exc.message)

    # ------------------------------------------------------------------ inference

    async def ModelInfer(self, request, context):
        try:
            handle, response = await self.service.infer(
                "grpc", request.model_name, request.model_version,
                lambda sig: decode_grpc(request, sig), encode_grpc, request_id_of(context))
        except InferError as exc:
            await context.abort(exc.grpc_code, exc.message)
        await context.send_initial_metadata(((MODEL_VERSION_HEADER, handle.version_str),))
        return response

    async def ModelStreamInfer(self, request_iterator: AsyncIterator, context
                               ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """As Triton does for a non-decoupled model: one response per request, in the order the
        requests came, each with the request's `id`; a failed request is a response with
        `error_message` (the stream goes on). Requests run concurrently (the batcher may group
        them); at most STREAM_QUEUE_LIMIT are in flight per stream, beyond that the stream stops
        reading and HTTP/2 flow control holds the client back."""
        in_order: asyncio.Queue = asyncio.Queue()  # bounded by `room`
        room = asyncio.Semaphore(STREAM_QUEUE_LIMIT)
        rid = request_id_of(context)

        async def one(req) -> service_pb2.ModelStreamInferResponse:
            try:
                _, response = await self.service.infer(
                    "grpc", req.model_name, req.model_version, lambda sig: decode_grpc(req, sig),
                    encode_grpc, rid or req.id)
            except InferError as exc:
                return service_pb2.ModelStreamInferResponse(
                    error_message=exc.message,
                    infer_response=service_pb2.ModelInferResponse(id=req.id, model_name=req.model_name,
                                                                  model_version=req.model_version))
            return service_pb2.ModelStreamInferResponse(infer_response=response)

        async def reader() -> None:
            try:
                while True:
                    await room.acquire()  # no more than STREAM_QUEUE_LIMIT requests read ahead
                    try:
                        req = await anext(request_iterator)
                    except StopAsyncIteration:
                        return
                    in_order.put_nowait(asyncio.create_task(one(req)))
            finally:
                in_order.put_nowait(None)

        reader_task = asyncio.create_task(reader())
        pending: asyncio.Task | None = None
        try:
            while True:
                pending = await in_order.get()
                if pending is None:
                    break
                response = await pending
                room.release()
                yield response
            await reader_task  # a broken request stream ends the call with its error
        finally:
            # the client went away (or the call failed): nothing of this stream keeps running
            reader_task.cancel()
            for task in [pending, *(in_order.get_nowait() for _ in range(in_order.qsize()))]:
                if task is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task

    # ------------------------------------------------------------------ model repository extension

    async def RepositoryIndex(self, request, context):
        if not request.ready:  # the ready-only index is what health checks read: open (see http_server)
            await self._check_control(context, "RepositoryIndex")
        rows = self.repository.index(ready_only=request.ready)
        return service_pb2.RepositoryIndexResponse(
            models=[service_pb2.RepositoryIndexResponse.ModelIndex(**row) for row in rows])

    async def RepositoryModelLoad(self, request, context):
        await self._check_control(context, "RepositoryModelLoad")
        config = None
        for key, param in request.parameters.items():
            if key == "config":
                if param.WhichOneof("parameter_choice") != "string_param":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "parameters.config must be a string_param holding the model config as JSON")
                config = param.string_param
            elif key.startswith("file:"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "load parameters 'file:...': file overrides are not supported by geogate "
                                    "replicas; put the files in the repository")
            else:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"load parameter {one_line(key, 60)!r} is not supported by geogate replicas")
        log.info("load requested", extra={"fields": {"model": request.model_name,
                                                     "config_override": config is not None}})
        try:
            await self.repository.load(request.model_name, config)
        except LoadError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._check_control(context, "RepositoryModelUnload")
        log.info("unload requested", extra={"fields": {"model": request.model_name}})
        try:
            await self.repository.unload(request.model_name)
        except LoadError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return service_pb2.RepositoryModelUnloadResponse()


class _HandlerCollector:
    """Stands in for the server while generated code adds a service: keeps what it registers."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.methods.update(handlers)


def build_server(servicer: GrpcInferenceServicer, health: ReadinessHealthServicer, *,
                 max_receive_bytes: int) -> grpc.aio.Server:
    # gRPC refuses messages over 4 MB by default; requests are bounded like HTTP bodies.
    options = [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    # grpc.aio's accept loop keeps one pending "next call" future per registered method and runs
    # asyncio.wait over all of them for every call that arrives: the generated code registers all
    # 25 methods of the two services, which costs tens of microseconds per call. Only the inference
    # hot path is registered; every method (it too) is also served by the generic handlers.
    collected = _HandlerCollector()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, collected)
    health_pb2_grpc.add_HealthServicer_to_server(health, collected)
    server.add_generic_rpc_handlers(collected.generic)
    server.add_registered_method_handlers(SERVICE_NAME, {m: collected.methods[m] for m in HOT_METHODS})
    return server
