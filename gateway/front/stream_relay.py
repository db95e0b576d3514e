"""gRPC ModelStreamInfer through the gateway: one ``StreamRelay`` per client stream.

Each request on the client's stream is checked and routed like a unary one (name rules, API
key, model known, version resolved, tensors against the model's inputs, admission, a replica
picked by P2C among the region's routable gRPC replicas) and written to an upstream stream to
that replica (gateway.upstream.grpc_stream: one per replica per client stream, multiplexed on the
replica's pooled HTTP/2 channel). Responses, any number per request (decoupled models, their
empty final responses included), are relayed as received, in order per request. A request the
gateway refuses is answered on the stream with ``error_message`` (as Triton does), and the
stream goes on.

Backpressure: responses wait in a bounded queue per client stream; when the client reads
slowly the queue fills, the upstream readers stop reading, and HTTP/2 flow control holds the
replicas back: the gateway never buffers more than the queue's bound. One slow replica stalls
only its own reader. Deadline: the client's stream deadline bounds every upstream stream.
Cancellation: a client that goes away cancels every upstream stream. An upstream stream that
fails: its requests with no response relayed yet go to another replica (within the retry
limit); the others get an error response saying their replica failed mid-answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from core.kserve import PRIORITY_HEADER, REQUEST_ID_HEADER
from core.names import cached_model_ref_problem as model_ref_problem
from gateway.front.access_log import request_id_from
from gateway.front.auth import Authenticator
from gateway.front.request_checks import RequestError, check_grpc
from gateway.routing.admission import PriorityError
from gateway.routing.balancer import pick_p2c
from gateway.routing.sequences import SequenceRouter, sequence_from_grpc
from gateway.upstream.catalog import ModelCatalog
from gateway.upstream.grpc_stream import StreamRequest, UpstreamStream, error_response
from gateway.upstream.pool import RegionPools
from gateway.upstream.proto_peek import ProtoError, peek_infer_request, with_model_version
from health.outcomes import Outcome

if TYPE_CHECKING:
    from gateway.front.pipeline import ModelLookup
    from gateway.server.metrics import GatewayMetrics

log = logging.getLogger("geogate.gateway.stream")

STREAM_QUEUE_RESPONSES = 64  # responses buffered per client stream before upstream reading pauses
_END = object()


class StreamSettings:
    __slots__ = ("max_attempts", "max_elements", "region")

    def __init__(self, *, region: str, max_elements: int, max_attempts: int) -> None:
        self.region = region
        self.max_elements = max_elements
        self.max_attempts = max_attempts


class StreamServices:
    """What every client stream of a worker shares (built by the composition root)."""

    def __init__(self, settings: StreamSettings, *, auth: Authenticator | None, models: ModelLookup,
                 catalog: ModelCatalog, pools: RegionPools, overload, metrics: GatewayMetrics,
                 sequences: SequenceRouter) -> None:
        self.settings = settings
        self.auth = auth
        self.models = models
        self.catalog = catalog
        self.pools = pools
        self.overload = overload  # gateway.routing.admission.OverloadGuard or None
        self.metrics = metrics
        self.sequences = sequences  # requests of sequences go where their sequence lives
        self.rng = random.Random()
        self._decoupled: dict[tuple[str, str], bool] = {}

    async def decoupled(self, model: str, version: str | None) -> bool:
        """Does the model send any number of responses per request (its config says so)?"""
        key = (model, version or "")
        hit = self._decoupled.get(key)
        if hit is None:
            status, cfg = await self.catalog.config(model, version)
            policy = cfg.get("model_transaction_policy") if status == 200 and isinstance(cfg, dict) else None
            hit = bool(policy.get("decoupled")) if isinstance(policy, dict) else False
            if status == 200:
                self._decoupled[key] = hit
        return hit


class StreamRelay:
    def __init__(self, services: StreamServices, context: grpc.aio.ServicerContext) -> None:
        self.s = services
        self.context = context
        self.metadata = {k: v for k, v in context.invocation_metadata() or ()}
        self.request_id = request_id_from(self.metadata.get(REQUEST_ID_HEADER))
        remaining = context.time_remaining()
        self.deadline_s = time.monotonic() + remaining if remaining is not None else None
        self.out: asyncio.Queue = asyncio.Queue(maxsize=STREAM_QUEUE_RESPONSES)
        self.upstreams: dict[str, UpstreamStream] = {}  # replica URL -> its stream
        self.client_done = False

    async def run(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        metrics = self.s.metrics
        metrics.stream_open(1)
        reader = asyncio.get_running_loop().create_task(self._read_client(requests), name="stream-requests")
        try:
            while True:
                item = await self.out.get()
                if item is _END:
                    break
                metrics.stream_response()
                yield item
            await reader
        finally:
            reader.cancel()
            for up in self.upstreams.values():
                up.cancel()
            metrics.stream_open(-1)

    # ------------------------------------------------------------------ client -> replicas

    async def _read_client(self, requests: AsyncIterator[bytes]) -> None:
        try:
            async for raw in requests:
                await self._submit(raw)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            raise  # the client went away: run() ends and cancels everything
        except Exception as exc:  # a gateway bug: the client gets the reason, not a stream that hangs
            log.exception("ModelStreamInfer stream %s failed inside the gateway", self.request_id)
            await self.out.put(error_response(f"internal gateway error: {type(exc).__name__}"))
        self.client_done = True
        # Half-close every upstream stream and wait for each to end (a failed one may have
        # handed its requests to a stream opened meanwhile: loop until none is left).
        while live := [u for u in self.upstreams.values() if not u.reader.done()]:
            for up in live:
                await up.half_close()
            await asyncio.gather(*(u.reader for u in live), return_exceptions=True)
        await self.out.put(_END)

    async def _refuse(self, message: str, model: str = "", request_id: str = "", reason: str = "refused") -> None:
        self.s.metrics.stream_refused(reason)
        await self.out.put(error_response(message, model=model, request_id=request_id))

    async def _submit(self, raw: bytes) -> None:
        s = self.s
        try:
            peek = peek_infer_request(raw)
        except ProtoError as exc:
            return await self._refuse(f"malformed ModelInferRequest: {exc}")
        model, requested, rid = peek.model_name, peek.model_version or None, peek.id
        if not model:
            return await self._refuse("ModelInferRequest has no model_name", request_id=rid)
        bad = model_ref_problem(model, requested)
        if bad:
            return await self._refuse(bad, model, rid)
        seq = sequence_from_grpc(peek)
        if seq is not None and seq.error:
            return await self._refuse(seq.error, model, rid)
        decision = None
        if s.auth is not None:
            decision = s.auth.authorize_headers(self.metadata, model)
            if not decision.allowed:
                return await self._refuse(decision.message, model, rid)
        try:
            unknown = s.models.unknown_model(model, requested, 1)  # a stream is served in this region
            if unknown is not None:
                raise RequestError(unknown.message, 404)
            version = s.models.resolve_version(model, requested)
            specs = s.catalog.fresh_specs(model, version) or await s.catalog.specs(model, version)
            check_grpc(model, peek, specs, s.settings.max_elements, raw)
            if s.overload is not None and (seq is None or seq.start):  # a step after START is never refused
                priority = s.overload.classify(self.metadata.get(PRIORITY_HEADER),
                                               decision.priority if decision is not None else None)
                admitted = s.overload.check(priority, may_spill=False)
                if not admitted.admitted:
                    raise RequestError(admitted.reason, 429)
            decoupled = await s.decoupled(model, version)
        except (RequestError, PriorityError) as exc:
            if decision is not None:
                decision.release()
            return await self._refuse(str(exc), model, rid)
        if version and version != peek.model_version:
            raw = with_model_version(raw, version)
        req = StreamRequest(rid, model, raw, decoupled, version=version,
                            release=decision.release if decision is not None else None,
                            sequence_id=seq.id if seq is not None else None)
        if seq is None:
            return await self._route(req)
        up, why = await s.sequences.place(model, version, "grpc", seq)
        if up is None:
            if req.release is not None:
                req.release()
            return await self._refuse(why, model, rid, reason="sequence-lost")
        req.tried.append(up)
        stream = self._stream_to(up)
        await stream.send(req)
        if self.client_done:
            await stream.half_close()

    async def _route(self, req: StreamRequest) -> None:
        """To the cheapest routable gRPC replica it has not tried yet."""
        s = self.s
        why = ""
        while len(req.tried) < s.settings.max_attempts:
            now = time.monotonic()
            cands = s.pools.candidates(req.model, req.version, "grpc", now)
            ups = [u for u in cands.upstreams if u.client.scheme == "grpc" and u not in req.tried]
            if not ups:
                why = cands.reason or ("no gRPC replica: ModelStreamInfer needs replicas that speak gRPC"
                                       if cands.upstreams else "no replica answered")
                break
            up = pick_p2c(ups, now, s.rng)
            req.tried.append(up)
            stream = self._stream_to(up)
            if await stream.send(req):
                if self.client_done:
                    await stream.half_close()
                return
            why = f"replica {up.state.url}: its stream is closed"
        else:
            why = f"{len(req.tried)} replicas tried"
        if req.release is not None:
            req.release()
        await self._refuse(f"no replica can serve model '{req.model}': {why}", req.model, req.request_id,
                           reason="no-replica")

    def _stream_to(self, up) -> UpstreamStream:
        stream = self.upstreams.get(up.state.url)
        if stream is None or stream.closed:
            timeout_s = None if self.deadline_s is None else max(0.001, self.deadline_s - time.monotonic())
            stream = self.upstreams[up.state.url] = UpstreamStream(
                up, timeout_s=timeout_s, metadata=((REQUEST_ID_HEADER, self.request_id),),
                on_response=self._relay, on_failure=self._failed)
        return stream

    # ------------------------------------------------------------------ replicas -> client

    async def _relay(self, stream: UpstreamStream, req: StreamRequest | None, raw: bytes) -> None:
        await self.out.put(raw)  # waits while the client reads slowly (the bound)

    async def _failed(self, stream: UpstreamStream, left: list[StreamRequest], outcome: Outcome, why: str) -> None:
        up = stream.up
        client_deadline = outcome is Outcome.TIMEOUT and self.deadline_s is not None
        if not client_deadline and outcome is not Outcome.CANCELLED:
            # the replica's failure (not the client's deadline or cancel): outlier detection hears it
            self.s.pools.detector.record(up.state, outcome, up.pool.states, time.monotonic())
        log.warning("stream to replica %s ended (%s): %d requests unanswered", up.state.url, why, len(left))
        for req in left:
            if req.sequence_id is not None:  # its state lives on that replica: never elsewhere
                if req.release is not None:
                    req.release()
                self.s.metrics.stream_refused("sequence-lost")
                await self.out.put(error_response(self.s.sequences.lost_on_stream(req.model, req.sequence_id,
                                                                                  up.state.url, why),
                                                  model=req.model, request_id=req.request_id))
                continue
            if req.relayed == 0 and not client_deadline:
                await self._route(req)  # nothing of it reached the client: another replica answers it whole
                continue
            if req.release is not None:
                req.release()
            self.s.metrics.stream_refused("replica-failed")
            await self.out.put(error_response(
                f"replica {up.state.url} failed after {req.relayed} responses of this request: {why}",
                model=req.model, request_id=req.request_id))
