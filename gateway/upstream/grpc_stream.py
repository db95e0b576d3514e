"""One upstream ModelStreamInfer call: a bidirectional gRPC stream from the gateway to one
replica, carrying the requests one client stream routed to that replica.

Requests are written as received (bytes); each response is read as bytes and handed to the
client stream's relay in arrival order, with the request it answers (matched by request id,
else the oldest request still waiting, which is Triton's order for non-decoupled models). A
request is done at its single response, or, for a decoupled model, at the response that carries
``triton_final_response: true``. When the call fails, the requests still waiting are handed back
with how many of their responses were already relayed (the relay retries those with none
elsewhere, and answers the others with an error).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from tritonclient.grpc import service_pb2

from gateway.upstream.grpc_upstream import classify_rpc_error
from gateway.upstream.proto_peek import ProtoError, peek_stream_response
from health.outcomes import Outcome

log = logging.getLogger("geogate.gateway.stream")

MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


def _identity(b: bytes) -> bytes:
    return b


@dataclass(slots=True)
class StreamRequest:
    """One client request on a stream, while it waits for its responses."""

    request_id: str  # as the client sent it ("" if none)
    model: str
    raw: bytes  # what goes upstream (the client's bytes, model_version appended if resolved)
    decoupled: bool
    version: str | None = None  # as resolved (routing needs it when the request is sent again)
    sequence_id: int | str | None = None  # a request of a sequence: never sent to another replica
    relayed: int = 0  # responses already sent to the client
    tried: list = field(default_factory=list)  # upstreams it went to (gateway.upstream.pool.Upstream)
    release: Callable[[], None] | None = None  # frees the API key's slot when done


def error_response(message: str, *, model: str = "", request_id: str = "") -> bytes:
    """A ModelStreamInferResponse carrying an error for one request (Triton's way: the stream
    goes on; tritonclient's callback gets it as an InferenceServerException)."""
    return service_pb2.ModelStreamInferResponse(
        error_message=message, infer_response=service_pb2.ModelInferResponse(model_name=model, id=request_id),
    ).SerializeToString()


OnResponse = Callable[["UpstreamStream", StreamRequest | None, bytes], Awaitable[None]]
OnFailure = Callable[["UpstreamStream", list[StreamRequest], Outcome, str], Awaitable[None]]


class UpstreamStream:
    """The stream to one replica (``up``: a gateway.upstream.pool.Upstream with a gRPC client)."""

    def __init__(self, up, *, timeout_s: float | None, metadata: tuple, on_response: OnResponse,
                 on_failure: OnFailure) -> None:
        self.up = up
        self.pending: deque[StreamRequest] = deque()
        self._on_response = on_response
        self._on_failure = on_failure
        self.call = up.client.channel.stream_stream(
            MODEL_STREAM_INFER, request_serializer=_identity, response_deserializer=_identity,
        )(timeout=timeout_s, metadata=metadata)
        self.closed = False  # no more writes (half-closed, failed or cancelled)
        self.failed = False
        self.reader = asyncio.get_running_loop().create_task(self._read(), name=f"stream-from {up.state.url}")

    async def send(self, req: StreamRequest) -> bool:
        """Write one request; False when the stream is no longer usable (the caller reroutes)."""
        if self.closed:
            return False
        self.pending.append(req)
        self.up.load.outstanding += 1
        try:
            await self.call.write(req.raw)
            return True
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            log.debug("write to %s failed: %s", self.up.state.url, exc)
            return True  # the reader sees the call fail and hands the request back

    def _match(self, request_id: str) -> StreamRequest | None:
        if request_id:
            for req in self.pending:
                if req.request_id == request_id:
                    return req
        return self.pending[0] if self.pending else None

    def _done(self, req: StreamRequest) -> None:
        self.pending.remove(req)
        self.up.load.outstanding -= 1
        if req.release is not None:
            req.release()
            req.release = None

    async def _read(self) -> None:
        outcome, why = Outcome.RESET, "the replica ended the stream with requests unanswered"
        try:
            async for raw in self.call:
                try:
                    peek = peek_stream_response(raw)
                except ProtoError as exc:
                    outcome, why = Outcome.SERVER_ERROR, f"unreadable stream response: {exc}"
                    self.call.cancel()
                    break
                req = self._match(peek.request_id)
                if req is not None:
                    req.relayed += 1
                    if not req.decoupled or peek.final or peek.error_message:
                        self._done(req)
                await self._on_response(self, req, raw)
            else:
                for req in [r for r in self.pending if r.decoupled and r.relayed]:
                    self._done(req)  # a decoupled model's responses end with the stream
                if not self.pending:
                    return
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and self.closed and not self.failed:
                return  # we cancelled it (the client went away)
            outcome, why = classify_rpc_error(err), f"{err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            self.call.cancel()
            raise
        self.closed = self.failed = True
        left = list(self.pending)
        for req in left:
            self._done_quietly(req)
        await self._on_failure(self, left, outcome, why)

    def _done_quietly(self, req: StreamRequest) -> None:
        self.pending.remove(req)
        self.up.load.outstanding -= 1

    async def half_close(self) -> None:
        """The client sent its last request: tell the replica (it ends the stream after its last
        response)."""
        if self.closed:
            return
        self.closed = True
        try:
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the reader reports the failure

    def cancel(self) -> None:
        self.closed = True
        self.call.cancel()
        self.reader.cancel()
        for req in list(self.pending):
            self._done_quietly(req)
            if req.release is not None:
                req.release()
