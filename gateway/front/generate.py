"""Triton's generate extension through the gateway: ``POST /v2/models/{m}[/versions/{v}]/generate``
(JSON in, one JSON answer out) and ``/generate_stream`` (JSON in, Server-Sent Events out).

The checks are the inference pipeline's (gateway.front.pipeline), called in the same order:
worker concurrency limit -> name rules -> API key -> hop count -> model known -> body (size,
slow sender) -> version resolved -> deadline -> admission (priority, shedding). The body is
forwarded untouched (it is only parsed to say clearly when it is not a JSON object).

Routing is the forwarder's (gateway.routing): the local region's eligible replicas, P2C among
those not tried yet; only HTTP replicas serve generate (Triton has no gRPC form of it), so a pool
of gRPC replicas only answers 503 with that reason. Peer regions are not tried: peer links carry
inference only.

Failover happens only before the first byte reaches the client: a replica that refuses, resets,
times out or answers 503 before the first body chunk is retried on another one (max_attempts,
deadline, retry budget, jittered backoff, as for infer). From the first relayed byte on, the
replica is committed: a failure or the deadline ends the client's stream by closing its
connection (an SSE client sees the stream end without the final chunk) and is logged; a client
that goes away closes the replica's connection, which Triton takes as a cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web

from core.kserve import (
    ATTEMPTS_HEADER,
    HOPS_HEADER,
    MODEL_VERSION_HEADER,
    PRIORITY_HEADER,
    REGION_HEADER,
    REPLICA_HEADER,
    REQUEST_ID_HEADER,
    TIMEOUT_HEADER,
)
from core.names import cached_model_ref_problem as model_ref_problem
from gateway.front import deadline as dl
from gateway.front.access_log import AccessLog, request_id_from
from gateway.front.auth import AuthDecision, Authenticator
from gateway.front.http_adapter import JSON, HttpLimits, error_response, read_aiohttp_body
from gateway.front.pipeline import SHED_RETRY_AFTER_S, ModelLookup, PipelineSettings
from gateway.front.request_checks import RequestError, parse_hops
from gateway.routing.balancer import pick_p2c
from gateway.routing.forwarder import Forwarder, deadline_reply
from gateway.routing.load_window import LoadWindow
from gateway.routing.targets import TARGET_LOCAL
from gateway.upstream.http_stream import HttpStreamClient, OpenStream, stream_failure
from gateway.upstream.http_upstream import response_version
from gateway.upstream.pool import Upstream
from gateway.upstream.types import NO_VERDICT, OUTCOME_NAME, PROTOCOL_HTTP, RETRYABLE, InferCall, Reply
from health.outcomes import Outcome

if TYPE_CHECKING:
    from gateway.server.metrics import GatewayMetrics

log = logging.getLogger("geogate.gateway.generate")

GENERATE = "generate"
GENERATE_STREAM = "generate_stream"
# While waiting for the replica's next chunk, how often to look whether the client is still
# there (aiohttp only tells a handler at its next write).
CLIENT_CHECK_INTERVAL_S = 0.25
SSE_EVENT_END = b"\n\n"
FORWARDED_HEADERS = ("Content-Type", "Content-Encoding", "Accept", "Accept-Encoding")


class _ClientGone(Exception):
    """The client closed its connection while its stream was being relayed."""


def split_generate_path(path: str) -> tuple[str, str | None, bool] | None:
    """(model, version or None, streaming) of /v2/models/{m}[/versions/{v}]/generate[_stream], else None."""
    if not path.startswith("/v2/models/"):
        return None
    rest, _, last = path[len("/v2/models/"):].rpartition("/")
    if last not in (GENERATE, GENERATE_STREAM):
        return None
    parts = rest.split("/")
    stream = last == GENERATE_STREAM
    if len(parts) == 1 and parts[0]:
        return parts[0], None, stream
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2], stream
    return None


def generate_path(model: str, version: str | None, stream: bool) -> str:
    tail = GENERATE_STREAM if stream else GENERATE
    m = quote(model, safe="")
    return f"/v2/models/{m}/versions/{quote(version, safe='')}/{tail}" if version else f"/v2/models/{m}/{tail}"


class _Attempts:
    """The request's attempt loop's result: the open answer (or the last failure) and where."""

    __slots__ = ("attempts", "body", "opened", "reply", "upstream")

    def __init__(self) -> None:
        self.attempts = 0
        self.opened: OpenStream | None = None
        self.body = b""  # generate (not streamed): the whole answer
        self.reply: Reply | None = None  # no answer to relay: why
        self.upstream: Upstream | None = None


class GenerateFront:
    """The generate endpoints' adapter: the pipeline's checks, the forwarder's replica choice
    and retry rules, and a relay that never buffers a streamed answer."""

    def __init__(self, settings: PipelineSettings, *, auth: Authenticator | None, models: ModelLookup,
                 forwarder: Forwarder, metrics: GatewayMetrics, load: LoadWindow, access_log: AccessLog,
                 client: HttpStreamClient, limits: HttpLimits) -> None:
        self.settings = settings
        self.region = settings.region
        self.auth = auth
        self.models = models
        self.forwarder = forwarder
        self.pools = forwarder.pools
        self.metrics = metrics
        self.load = load
        self.access_log = access_log
        self.client = client
        self.limits = limits
        self._rng = random.Random()

    async def close(self) -> None:
        await self.client.close()

    @staticmethod
    def target(path: str) -> tuple[str, str | None, bool] | None:
        """(model, version, streaming) when `path` is a generate endpoint (the fast path's test)."""
        if not path.endswith((GENERATE, GENERATE_STREAM)):
            return None
        return split_generate_path(path)

    # ------------------------------------------------------------------ the request

    async def handle(self, request: web.BaseRequest, model: str, requested: str | None,
                     stream: bool) -> web.StreamResponse:
        t0 = time.monotonic()
        headers = request.headers
        rid = request_id_from(headers.get(REQUEST_ID_HEADER))
        meta = {REGION_HEADER: self.region, REQUEST_ID_HEADER: rid}
        decision: AuthDecision | None = None
        self.load.in_flight += 1
        self.metrics.in_flight_add(PROTOCOL_HTTP, 1)
        try:
            limit = self.settings.max_in_flight
            if self.load.in_flight > limit:
                meta["Retry-After"] = str(SHED_RETRY_AFTER_S)
                return self._refuse(meta, rid, model, requested, 503,
                                    f"gateway worker overloaded: more than {limit} requests in flight "
                                    f"([gateway] max_concurrent_requests); retry after {SHED_RETRY_AFTER_S} s", t0)
            bad_name = model_ref_problem(model, requested)
            if bad_name:
                return self._refuse(meta, rid, model, requested, 400, bad_name, t0)
            if self.auth is not None:
                decision = self.auth.authorize_headers(headers, model)
                if not decision.allowed:
                    meta.update(decision.http_headers())
                    return self._refuse(meta, rid, model, requested, decision.http_status, decision.message, t0)
            try:
                hops = parse_hops(headers.get(HOPS_HEADER))
            except RequestError as exc:
                return self._refuse(meta, rid, model, requested, 400, str(exc), t0)
            unknown = self.models.unknown_model(model, requested, hops)
            if unknown is not None:
                return self._refuse(meta, rid, model, requested, 404, unknown.message, t0)
            try:
                body = await read_aiohttp_body(request, self.limits)
            except RequestError as exc:
                resp = self._refuse(meta, rid, model, requested, exc.status, str(exc), t0)
                if exc.status == 408:
                    resp.force_close()
                return resp
            version = self.models.resolve_version(model, requested)
            try:
                check_generate_body(body, headers.get("Content-Encoding"))
                deadline = dl.http_deadline(t0, headers.get(TIMEOUT_HEADER), None, self.settings.default_timeout_ms)
            except (RequestError, dl.DeadlineError) as exc:
                return self._refuse(meta, rid, model, version, 400, str(exc), t0)
            call = InferCall(PROTOCOL_HTTP, model, requested, version, rid, deadline.at_s, hops=hops,
                             client_deadline=deadline.client, started_s=t0, body=body,
                             priority=headers.get(PRIORITY_HEADER, ""),
                             key_priority=decision.priority if decision is not None else None)
            if self.forwarder.overload is not None:
                refused, _peer, _why = self.forwarder.admit(call)  # spill: peers do not carry generate
                if refused is not None:
                    if refused.retry_after_s:
                        meta["Retry-After"] = str(refused.retry_after_s)
                    return self._refuse(meta, rid, model, version, refused.http_status, refused.message, t0)
            upstream_headers = {REQUEST_ID_HEADER: rid}
            for name in FORWARDED_HEADERS:
                value = headers.get(name)
                if value:
                    upstream_headers[name] = value
            tried = await self._open(call, generate_path(model, version, stream), upstream_headers, stream)
            return await self._answer(request, call, tried, meta, stream, t0)
        except Exception as exc:  # a gateway bug: a 500 with a reason
            log.exception("generate request %s for model %r failed inside the gateway", rid, model)
            return self._refuse(meta, rid, model, requested, 500, f"internal gateway error: {type(exc).__name__}", t0)
        finally:
            if decision is not None:
                decision.release()
            self.load.in_flight -= 1
            self.metrics.in_flight_add(PROTOCOL_HTTP, -1)

    # ------------------------------------------------------------------ replicas

    def _pick(self, call: InferCall, tried: list[Upstream], now_s: float) -> tuple[Upstream | None, str]:
        """(an HTTP replica not tried yet, "") or (None, why none)."""
        cands = self.pools.candidates(call.model, call.version, PROTOCOL_HTTP, now_s)
        http = [u for u in cands.upstreams if u.state.scheme == "http"]
        if not http:
            if cands.upstreams:
                return None, (f"model '{call.model}' is served only by gRPC replicas here; generate and "
                              "generate_stream need an HTTP replica (Triton serves them over HTTP only)")
            return None, cands.reason or "no replica is eligible"
        ups = [u for u in http if u not in tried]
        if not ups:
            return None, "every eligible HTTP replica was tried"
        return pick_p2c(ups, now_s, self._rng), ""

    async def _open(self, call: InferCall, path: str, headers: dict[str, str], stream: bool) -> _Attempts:
        """Attempts until one replica's answer has begun (stream) or fully arrived (generate),
        with the forwarder's retry rules; the chosen replica's in-flight count stays raised
        while its answer is relayed (``_answer`` lowers it)."""
        fw = self.forwarder
        result = _Attempts()
        total_ms = (call.deadline_s - call.started_s) * 1000.0
        if not any(t.kind == TARGET_LOCAL for t in fw.router.targets_for(call)):
            result.reply = Reply(Outcome.UNAVAILABLE, 503, message="no replica can serve: the local region is not "
                                 "routable and generate is not forwarded to other regions")
            return result
        fw.budget.record_request()
        tried: list[Upstream] = []
        while True:
            now = time.monotonic()
            remaining = call.deadline_s - now
            if remaining <= 0:
                result.reply = deadline_reply(total_ms, result.attempts, result.reply, call.client_deadline)
                return result
            up, why = self._pick(call, tried, now)
            if up is None:
                if result.reply is None:
                    result.reply = Reply(Outcome.UNAVAILABLE, 503, message=f"no replica can serve: {why}")
                return result
            result.attempts += 1
            tried.append(up)
            try_s = min(remaining, fw.per_try_s) if fw.per_try_s > 0 else remaining
            up.load.outstanding += 1
            kept = False
            try:
                opened, body, reply = await self._attempt(up, path, call.body, headers, try_s, stream)
                if opened is not None:
                    result.opened, result.body, result.upstream, result.reply = opened, body, up, None
                    kept = True
                    return result
            finally:
                if not kept:
                    up.load.outstanding -= 1
            result.reply, result.upstream = reply, up
            if reply.outcome not in RETRYABLE or result.attempts >= fw.gw.max_attempts:
                return result
            left = call.deadline_s - time.monotonic()
            if left <= 0.0005:
                result.reply = deadline_reply(total_ms, result.attempts, reply, call.client_deadline)
                return result
            if reply.outcome is not Outcome.CONNECT_FAILURE and not fw.budget.try_spend():
                self.metrics.budget_exhausted()
                reply.message += " (retry budget exhausted: not retried)"
                return result
            self.metrics.retry(OUTCOME_NAME[reply.outcome])
            backoff_s = min(fw.backoff_max_s, fw.backoff_base_s * (2 ** (result.attempts - 1))) * self._rng.random()
            if backoff_s >= left:
                result.reply = deadline_reply(total_ms, result.attempts, reply, call.client_deadline)
                return result
            if backoff_s > 0:
                await asyncio.sleep(backoff_s)

    async def _attempt(self, up: Upstream, path: str, body: bytes, headers: dict[str, str], timeout_s: float,
                       stream: bool) -> tuple[OpenStream | None, bytes, Reply]:
        """One replica: (its open answer, the whole body for generate, a success Reply) or
        (None, b"", why it failed). Outcomes feed outlier detection and the balancer's latency."""
        t0 = time.monotonic()
        try:
            opened = await self.client.open(up.state.address, path, body, headers, timeout_s)
        except asyncio.CancelledError:
            self.metrics.attempt(up.url, PROTOCOL_HTTP, OUTCOME_NAME[Outcome.CANCELLED])
            raise
        whole = b""
        if isinstance(opened, OpenStream) and not stream:
            try:  # generate: the whole answer before anything is relayed (a failure is still retryable)
                async with asyncio.timeout(max(0.0, timeout_s - (time.monotonic() - t0))):
                    whole = opened.first + await opened.read_rest()
                opened.release()
            except asyncio.CancelledError:
                opened.abort()
                raise
            except Exception as exc:
                opened.abort()
                opened = stream_failure(exc, up.state.address, timeout_s)
        now = time.monotonic()
        reply = opened if isinstance(opened, Reply) else Reply(Outcome.SUCCESS, opened.status)
        outcome = reply.outcome
        if outcome not in NO_VERDICT:
            up.load.observe(now - t0, now)
            up.load.requests += 1
            self.pools.detector.record(up.state, outcome, up.pool.states, now)
        self.metrics.attempt(up.url, PROTOCOL_HTTP, OUTCOME_NAME[outcome])
        if isinstance(opened, OpenStream):
            return opened, whole, reply
        return None, b"", reply

    # ------------------------------------------------------------------ the answer

    async def _answer(self, request: web.BaseRequest, call: InferCall, tried: _Attempts, meta: dict[str, str],
                      stream: bool, t0: float) -> web.StreamResponse:
        up = tried.upstream
        meta[ATTEMPTS_HEADER] = str(tried.attempts)
        if up is not None:
            meta[REPLICA_HEADER] = up.url
        opened = tried.opened
        if opened is None:
            reply = tried.reply
            assert reply is not None
            meta[MODEL_VERSION_HEADER] = call.version or ""
            self._served(call, up, reply.outcome, reply.http_status, tried.attempts, t0, reply.message)
            if reply.body and 400 <= reply.http_status < 500 and (reply.content_type or "").startswith(JSON):
                return web.Response(body=reply.body, status=reply.http_status,
                                    headers={**meta, "Content-Type": reply.content_type or JSON})
            if reply.retry_after_s:
                meta["Retry-After"] = str(reply.retry_after_s)
            return error_response(reply.message, reply.http_status, meta)
        assert up is not None
        try:
            meta[MODEL_VERSION_HEADER] = response_version(opened.first, None) or call.version or ""
            meta["Content-Type"] = opened.content_type or JSON
            if not stream:
                self._served(call, up, Outcome.SUCCESS, opened.status, tried.attempts, t0)
                return web.Response(body=tried.body, status=opened.status, headers=meta)
            return await self._relay(request, call, opened, up, meta, tried.attempts, t0)
        finally:
            up.load.outstanding -= 1

    async def _relay(self, request: web.BaseRequest, call: InferCall, opened: OpenStream, up: Upstream,
                     meta: dict[str, str], attempts: int, t0: float) -> web.StreamResponse:
        """The stream, chunk by chunk as the replica sends it, each written (and drained: a slow
        reader holds the replica back, not the gateway's memory) before the next is read."""
        resp = web.StreamResponse(status=opened.status, headers=meta)
        outcome, error = Outcome.SUCCESS, ""
        events = 0
        last = b""  # the previous chunk's last byte: an event's blank line may straddle two chunks
        chunk = opened.first
        try:
            async with asyncio.timeout(max(0.0, call.deadline_s - time.monotonic())):
                await resp.prepare(request)
                while chunk:
                    await resp.write(chunk)
                    events += chunk.count(SSE_EVENT_END) + (last == b"\n" and chunk[:1] == b"\n")
                    last = chunk[-1:]
                    chunk = await self._next_chunk(opened, request)
            opened.release()
            await resp.write_eof()
        except (_ClientGone, ConnectionResetError) as exc:
            opened.abort()
            outcome, error = Outcome.CANCELLED, f"client went away mid-stream ({type(exc).__name__})"
            log.info("generate_stream %s for model %r: %s after %d events; replica %s request cancelled",
                     call.request_id, call.model, error, events, up.url)
        except TimeoutError:
            opened.abort()
            outcome = Outcome.DEADLINE_CLIENT if call.client_deadline else Outcome.TIMEOUT
            error = f"deadline of {(call.deadline_s - t0) * 1000:.0f} ms reached mid-stream"
            log.warning("generate_stream %s for model %r from %s: %s after %d events; stream closed",
                        call.request_id, call.model, up.url, error, events)
            _close_client(request)
        except (aiohttp.ClientError, OSError) as exc:
            opened.abort()
            outcome, error = Outcome.RESET, f"replica broke the stream: {type(exc).__name__}: {exc}"
            log.warning("generate_stream %s for model %r from %s: %s after %d events; stream closed",
                        call.request_id, call.model, up.url, error, events)
            self.pools.detector.record(up.state, outcome, up.pool.states, time.monotonic())
            _close_client(request)
        except asyncio.CancelledError:
            opened.abort()
            raise
        except Exception as exc:  # a gateway bug after the answer began: no second answer can follow
            opened.abort()
            outcome, error = Outcome.SERVER_ERROR, f"internal gateway error mid-stream: {type(exc).__name__}"
            log.exception("generate_stream %s for model %r: %s after %d events; stream closed",
                          call.request_id, call.model, error, events)
            _close_client(request)
        finally:
            self.metrics.stream_responses(PROTOCOL_HTTP, events)
        self._served(call, up, outcome, opened.status, attempts, t0, error)
        return resp

    async def _next_chunk(self, opened: OpenStream, request: web.BaseRequest) -> bytes:
        """The replica's next chunk; _ClientGone if the client left while the replica was silent.
        (A timer, not a task, per chunk: interrupting the read loses nothing, the bytes stay in
        the response's buffer; the deadline's own timeout nests around this one.)"""
        while True:
            try:
                async with asyncio.timeout(CLIENT_CHECK_INTERVAL_S):
                    return await opened.next_chunk()
            except TimeoutError:
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise _ClientGone from None

    # ------------------------------------------------------------------ bookkeeping

    def _served(self, call: InferCall, up: Upstream | None, outcome: Outcome, status: int, attempts: int,
                t0: float, error: str = "") -> None:
        now = time.monotonic()
        replica = up.url if up is not None else ""
        name = OUTCOME_NAME[outcome]
        self.metrics.request(call.model, call.version or "", replica, PROTOCOL_HTTP, name, now - t0)
        if self.access_log.enabled:
            self.access_log.log(request_id=call.request_id, protocol=PROTOCOL_HTTP, model=call.model,
                                version=call.version or "", status=status, replica=replica, attempts=attempts,
                                duration_s=now - t0, outcome=name, error=error)

    def _refuse(self, meta: dict[str, str], rid: str, model: str, version: str | None, status: int, message: str,
                t0: float) -> web.Response:
        """Answered by the gateway itself (nothing forwarded): metric, access log, JSON error."""
        self.metrics.reject(PROTOCOL_HTTP, str(status))
        self.access_log.log(request_id=rid, protocol=PROTOCOL_HTTP, model=model, version=version or "",
                            status=status, replica="", attempts=0, duration_s=time.monotonic() - t0,
                            outcome="rejected", error=message)
        meta[ATTEMPTS_HEADER] = "0"
        return error_response(message, status, meta)


def check_generate_body(body: bytes, content_encoding: str | None) -> None:
    """A generate request is one JSON object (Triton maps its keys to inputs and parameters);
    RequestError 400 otherwise. A compressed body is left to the replica."""
    if content_encoding and content_encoding.lower() != "identity":
        return
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"generate request body is not valid JSON: {exc}", 400) from None
    if not isinstance(doc, dict):
        raise RequestError(f"generate request body must be a JSON object, got {type(doc).__name__}", 400)


def _close_client(request: web.BaseRequest) -> None:
    """End a stream that cannot finish: close the connection without the final chunk, so the
    client sees a broken stream rather than a complete one."""
    transport = request.transport
    if transport is not None:
        transport.close()
