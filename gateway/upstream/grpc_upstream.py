"""gRPC upstream: one grpc.aio channel per replica (HTTP/2 multiplexes every request of the
worker over it). ModelInfer is called with identity serializers, so a gRPC client's request
bytes go to the replica as received (plus an appended model_version when the resolver chose
one) and the replica's answer comes back as bytes. HTTP clients' requests are translated
(gateway.upstream.translate) only when a pool has no HTTP replica for them.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2, service_pb2_grpc

from core.kserve import grpc_to_http
from core.tls import ClientTls
from gateway.upstream import translate
from gateway.upstream.proto_peek import ProtoError, peek_response_version, with_model_version
from gateway.upstream.types import InferCall, Reply
from health.outcomes import Outcome, classify_grpc_code

MAX_MESSAGE_BYTES = 1 << 30
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect quickly after a replica restarts (defaults back off up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.enable_retries", 0),
]
_NOT_CONNECTED_HINTS = ("failed to connect", "connection refused", "connect failed", "no route")


def _identity(b: bytes) -> bytes:
    return b


def classify_rpc_error(err: grpc.aio.AioRpcError) -> Outcome:
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        details = (err.details() or "").lower()
        if any(h in details for h in _NOT_CONNECTED_HINTS):
            return Outcome.CONNECT_FAILURE
        if "socket closed" in details or "reset" in details or "goaway" in details:
            return Outcome.RESET
    return classify_grpc_code(code)


def _shape_ints(d: dict) -> dict:
    for t in d.get("inputs", []) + d.get("outputs", []):
        for key in ("shape", "dims"):
            if key in t:
                t[key] = [int(x) for x in t[key]]
    return d


class GrpcUpstream:
    scheme = "grpc"

    def __init__(self, address: str, *, tls: ClientTls | None = None) -> None:
        self.address = address
        self.tls = tls  # [tls.upstream] (replicas) or [tls.peers] (peer gateways); None: plaintext
        self.channel = (self.tls.grpc_channel(address, CHANNEL_OPTIONS) if self.tls is not None
                        else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
        self._infer = self.channel.unary_unary(MODEL_INFER, request_serializer=_identity,
                                               response_deserializer=_identity)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def _call(self, raw: bytes, timeout_s: float,
                    metadata: tuple) -> tuple[Outcome, bytes, grpc.aio.AioRpcError | None]:
        """One ModelInfer. Cancelling the caller cancels the RPC (grpc.aio), so no stream is left
        behind on any path."""
        try:
            data = await self._infer(raw, timeout=timeout_s, metadata=metadata)
            return Outcome.SUCCESS, data, None
        except grpc.aio.AioRpcError as err:
            return classify_rpc_error(err), b"", err

    def _unusable_channel(self, exc: Exception) -> Reply:
        """grpc.aio refused the call itself (the channel was closed: the replica left the pool)."""
        return Reply(Outcome.RESET, 503, grpc.StatusCode.UNAVAILABLE,
                     message=f"replica {self.address}: gRPC channel unusable: {type(exc).__name__}: {exc}")

    def _unreadable(self, exc: Exception) -> Reply:
        return Reply(Outcome.SERVER_ERROR, 502, grpc.StatusCode.INTERNAL,
                     message=f"replica {self.address} sent an unreadable answer: {type(exc).__name__}: {exc}")

    def _error_reply(self, outcome: Outcome, err: grpc.aio.AioRpcError, timeout_s: float) -> Reply:
        code = err.code()
        if outcome is Outcome.TIMEOUT:
            msg = f"replica {self.address} did not answer within {timeout_s * 1000:.0f} ms"
        elif outcome in (Outcome.CONNECT_FAILURE, Outcome.RESET):
            msg = f"replica {self.address}: {err.details()}"
        else:
            msg = err.details() or code.name
        return Reply(outcome, grpc_to_http(code), code, message=msg)

    async def infer_grpc(self, call: InferCall, timeout_s: float, extra_headers: dict[str, str]) -> Reply:
        raw = call.raw
        if call.version and call.version != (call.peek.model_version if call.peek else ""):
            raw = with_model_version(raw, call.version)
        try:
            outcome, data, err = await self._call(raw, timeout_s, tuple(extra_headers.items()))
        except grpc.aio.UsageError as exc:
            return self._unusable_channel(exc)
        if err is not None:
            return self._error_reply(outcome, err, timeout_s)
        try:
            version = peek_response_version(data)
        except ProtoError as exc:
            return self._unreadable(exc)
        return Reply(outcome, body=data, model_version=version)

    async def infer_http(self, call: InferCall, timeout_s: float, extra_headers: dict[str, str]) -> Reply:
        """An HTTP client's request, translated to ModelInferRequest for this replica."""
        try:
            plain = translate.decode_body(call.body, call.content_encoding)
            _, binary = translate.split_body(plain, call.header_len)
            raw, binary_outputs, binary_all = translate.http_request_to_grpc(
                call.model, call.version, call.header or {}, binary, call.request_id)
        except (translate.TranslateError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # request_checks refused malformed headers already; these are what translation finds
            # beyond them (values protobuf cannot hold: ValueError)
            return Reply(Outcome.CLIENT_ERROR, 400, grpc.StatusCode.INVALID_ARGUMENT,
                         message=f"cannot translate the request for a gRPC replica: {exc}")
        try:
            outcome, data, err = await self._call(raw, timeout_s, tuple(extra_headers.items()))
        except grpc.aio.UsageError as exc:
            return self._unusable_channel(exc)
        if err is not None:
            return self._error_reply(outcome, err, timeout_s)
        try:
            body, hl, version = translate.grpc_response_to_http(data, binary_outputs, binary_all)
        except (translate.TranslateError, ValueError, DecodeError) as exc:
            return self._unreadable(exc)
        return Reply(outcome, 200, body=body, header_len=hl,
                     content_type=translate.BINARY_CONTENT_TYPE if hl else translate.JSON_CONTENT_TYPE,
                     model_version=version)

    async def _unary(self, method, request, timeout_s: float):
        try:
            return 200, await method(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            return grpc_to_http(err.code()) if err.code() != grpc.StatusCode.UNAVAILABLE else 0, \
                {"error": err.details() or err.code().name}
        except asyncio.CancelledError:
            raise

    async def get_json(self, path: str, timeout_s: float) -> tuple[int, dict | None]:
        """The HTTP-form JSON of /v2/models/{m}[/versions/{v}][/config|/stats] via gRPC."""
        if path.rstrip("/") == "/v2":  # server metadata
            status, resp = await self._unary(self.stub.ServerMetadata, service_pb2.ServerMetadataRequest(), timeout_s)
            return (200, json_format.MessageToDict(resp, preserving_proto_field_name=True)) if status == 200 \
                else (status, resp)
        parts = path.strip("/").split("/")  # v2 models M [versions V] [config|stats]; v2 models stats: all
        model = parts[2] if len(parts) > 2 and parts[2:] != ["stats"] else ""
        version = parts[4] if len(parts) > 4 and parts[3] == "versions" else ""
        tail = parts[-1] if parts[-1] in ("config", "stats") else ""
        if tail == "config":
            status, resp = await self._unary(self.stub.ModelConfig, service_pb2.ModelConfigRequest(
                name=model, version=version), timeout_s)
            if status == 200:
                return 200, _shape_ints(json_format.MessageToDict(resp.config, preserving_proto_field_name=True))
            return status, resp
        if tail == "stats":
            status, resp = await self._unary(self.stub.ModelStatistics, service_pb2.ModelStatisticsRequest(
                name=model, version=version), timeout_s)
            if status == 200:
                return 200, json_format.MessageToDict(resp, preserving_proto_field_name=True)
            return status, resp
        status, resp = await self._unary(self.stub.ModelMetadata, service_pb2.ModelMetadataRequest(
            name=model, version=version), timeout_s)
        if status == 200:
            return 200, _shape_ints(json_format.MessageToDict(resp, preserving_proto_field_name=True))
        return status, resp

    async def close(self) -> None:
        await self.channel.close()
