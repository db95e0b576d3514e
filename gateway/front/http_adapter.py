"""Client-facing KServe v2 over HTTP (aiohttp on uvloop): translates between HTTP and the one
inference pipeline (gateway.front.pipeline), nothing more.

Inference (the hot path): the URL gives model and version; ``HttpInferRequest`` reads the body
once (bounded in size and time) and checks its JSON header against the model's inputs; the
pipeline does the rest and the ``InferAnswer`` becomes the response: the replica's body as
received on success (Inference-Header-Content-Length and Content-Encoding kept), a replica's own
JSON 4xx unchanged, otherwise ``{"error": ...}`` with geogate-* headers and Retry-After.
Everything else (health, server/model metadata, config, ready, statistics) is answered through
``ModelQueries``; the model repository and other extensions are not exposed.

Security (all off unless configured, see README "Security"): API keys (``[auth] keys_file``)
on every request but health and the region summary (401 / 403 / 429 with ``{"error": ...}``);
limits: ``[gateway] max_body_bytes`` (413, also after gzip/deflate decoding),
``max_concurrent_requests`` per worker (503 + Retry-After), ``[limits]`` header bytes (431),
tensor elements (400), names (400), slow clients (gateway.front.slow_clients: 408 when a head
does not arrive within ``request_head_timeout_ms``, a body within ``request_body_timeout_ms``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from multidict import CIMultiDict

from core.config import Config
from core.kserve import HEADER_LENGTH
from core.names import cached_model_ref_problem as model_ref_problem
from gateway.front import deadline as dl
from gateway.front.auth import AuthDecision, Authenticator
from gateway.front.http_connection import ClientConnection, ClientSite, ParsedRequest
from gateway.front.pipeline import (
    NOT_ON_GATEWAY,
    InferAnswer,
    InferencePipeline,
    ModelDocument,
    ModelQueries,
)
from gateway.front.request_checks import RequestError, ValidatedHeaders, check_coding
from gateway.front.slow_clients import GuardLimits, ListenerLog, sweep_slow_clients
from gateway.routing.sequences import sequence_from_http
from gateway.upstream.model_specs import ModelSpecs
from gateway.upstream.types import PROTOCOL_HTTP, InferCall

if TYPE_CHECKING:
    from gateway.front.generate import GenerateFront
    from gateway.server.region_state import RegionState

log = logging.getLogger("geogate.gateway.http")

JSON = "application/json"
# Paths that never need an API key: load balancers, peers and GeoDNS read them.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/geogate/v1/region"})
# aiohttp's protocol of a connection sees only the requests handed to it: left to its own
# keep-alive timer it would close a connection busy with inference it never saw.
AIOHTTP_KEEPALIVE_S = 7 * 24 * 3600.0
LINGERING_MAX_S = 2.0  # aiohttp's default (10 s) would let a slow sender hold a refused connection
# Paths of the client API with their methods: any other method on them is 405, not 404.
KNOWN_PATHS = (
    (re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/(infer|generate|generate_stream)"), "POST"),
    (re.compile(r"/v2(/health/(live|ready)|/models/stats|/models/[^/]+(/versions/[^/]+)?(/ready|/config|/stats)?)?"),
     "GET, HEAD"),
    (re.compile(r"/geogate/v1/region"), "GET, HEAD"),
)


def json_response(body: object, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=JSON, headers=headers)


def error_response(message: str, status: int, headers: dict | None = None) -> web.Response:
    return json_response({"error": message}, status, headers)


def refusal_response(decision: AuthDecision, headers: dict | None = None) -> web.Response:
    """401 / 403 / 429 for a refused API key, with WWW-Authenticate / Retry-After."""
    return error_response(decision.message, decision.http_status, {**(headers or {}), **decision.http_headers()})


def document_response(doc: ModelDocument) -> web.Response:
    headers = doc.headers or None
    if doc.status == 200:
        return json_response(doc.body, headers=headers) if doc.body is not None else \
            web.Response(status=200, headers=headers)
    if doc.body is not None:  # a replica's own answer
        return json_response(doc.body, doc.status, headers)
    return error_response(doc.message, doc.status, headers)


def model_of_path(path: str) -> tuple[str | None, str | None]:
    """(model, version) named by a /v2/models/... path; (None, None) for server-level paths."""
    if not path.startswith("/v2/models/"):
        return None, None
    parts = path[len("/v2/models/"):].split("/")
    if not parts[0] or (len(parts) == 1 and parts[0] == "stats"):
        return None, None
    version = parts[2] if len(parts) >= 3 and parts[1] == "versions" else None
    return parts[0], version


class HttpLimits:
    """What an HTTP inference request is held to (``[gateway]`` and ``[limits]``)."""

    __slots__ = ("body_timeout_ms", "body_timeout_s", "max_body_bytes", "validated")

    def __init__(self, cfg: Config) -> None:
        self.max_body_bytes = cfg.gateway.max_body_bytes
        self.body_timeout_ms = cfg.limits.request_body_timeout_ms
        self.body_timeout_s = self.body_timeout_ms / 1000.0
        self.validated = ValidatedHeaders(max_elements=cfg.limits.max_tensor_elements,
                                          max_decoded_bytes=self.max_body_bytes)


async def read_aiohttp_body(request: web.BaseRequest, limits: HttpLimits) -> bytes:
    """The whole body of a request aiohttp serves (generate, unusual infer targets): the
    connection handed it over whole already (gateway.front.http_connection); the bounds hold
    here too for a listener without that connection."""
    max_bytes = limits.max_body_bytes
    cl = request.content_length
    if cl is not None and cl > max_bytes:
        raise RequestError(f"request body of {cl} bytes is larger than the gateway's limit of {max_bytes} bytes", 413)
    try:
        if request.content.is_eof():  # the usual case: the whole body came with the head
            return await request.read()
        async with asyncio.timeout(limits.body_timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(f"request body is larger than the gateway's limit of {max_bytes} bytes", 413) from None
    except TimeoutError:
        raise RequestError(f"request body not received within {limits.body_timeout_ms} ms "
                           "([limits] request_body_timeout_ms)", 408) from None


async def infer_request_of(request: web.BaseRequest, model: str, requested: str | None,
                           limits: HttpLimits) -> HttpInferRequest | RequestError:
    """An inference request that aiohttp serves, as the pipeline's request (or why not)."""
    try:
        body = await read_aiohttp_body(request, limits)
    except RequestError as exc:
        return exc
    return HttpInferRequest(request.headers, body, request.remote or "", model, requested, limits)


class HttpInferRequest:
    """An HTTP inference request as the pipeline sees it (gateway.front.pipeline.InferRequest):
    its headers (case-insensitive) and its whole body, read by the connection within the
    listener's size and time bounds (gateway.front.http_connection)."""

    __slots__ = ("body", "header", "headers", "limits", "model", "peer", "requested")
    protocol = PROTOCOL_HTTP

    def __init__(self, headers: Mapping[str, str], body: bytes, peer: str, model: str, requested: str | None,
                 limits: HttpLimits) -> None:
        self.headers = headers
        self.body = body
        self.peer = peer
        self.model = model
        self.requested = requested
        self.limits = limits
        self.header: dict | None = None

    def target(self) -> tuple[str, str | None]:
        return self.model, self.requested

    async def read_body(self) -> None:
        """The connection read it whole (and refused a body over the limits with 413 / 408)."""

    def check(self, model: str, specs: ModelSpecs | None) -> None:
        headers = self.headers
        # Forwarded to replicas as received: plain ASCII only (HTTP/1.1 sends latin-1).
        check_coding("Content-Encoding", headers.get("Content-Encoding"))
        check_coding("Accept-Encoding", headers.get("Accept-Encoding"))
        self.header = self.limits.validated.check(model, self.body, headers.get(HEADER_LENGTH),
                                                  headers.get("Content-Encoding"), specs)

    def deadline(self, now_s: float, default_timeout_ms: int) -> dl.Deadline:
        params = self.header.get("parameters") if self.header else None  # a JSON object or None (checked)
        return dl.http_deadline(now_s, self.headers.get(dl.TIMEOUT_HEADER),
                                params.get(dl.TIMEOUT_PARAMETER) if params else None, default_timeout_ms)

    def call(self, model: str, requested: str | None, version: str | None, request_id: str, deadline: dl.Deadline,
             hops: int, started_s: float) -> InferCall:
        headers = self.headers
        return InferCall(PROTOCOL_HTTP, model, requested, version, request_id, deadline.at_s, hops=hops,
                         client_deadline=deadline.client, started_s=started_s, body=self.body, header=self.header,
                         header_len=headers.get(HEADER_LENGTH), content_encoding=headers.get("Content-Encoding"),
                         accept_encoding=headers.get("Accept-Encoding"),
                         sequence=sequence_from_http(self.header.get("parameters") if self.header else None))

    def client_ip(self) -> str:
        return self.peer


def http_answer(answer: InferAnswer) -> web.Response:
    """The pipeline's answer as an HTTP response."""
    headers = dict(answer.meta)
    reply = answer.reply
    if reply is not None:
        if reply.http_status == 200:
            if reply.header_len is not None:
                headers[HEADER_LENGTH] = reply.header_len
            if reply.content_encoding:
                headers["Content-Encoding"] = reply.content_encoding
            headers["Content-Type"] = reply.content_type or JSON
            return web.Response(body=reply.body, headers=headers)
        if reply.body and 400 <= reply.http_status < 500 and reply.content_type and \
                reply.content_type.startswith(JSON):
            # A replica's own 4xx passes through unchanged.
            headers["Content-Type"] = reply.content_type
            return web.Response(body=reply.body, status=reply.http_status, headers=headers)
    if answer.refusal is not None:
        headers.update(answer.refusal.http_headers())
    if answer.retry_after_s:
        headers["Retry-After"] = str(answer.retry_after_s)
    if answer.close:
        headers["Connection"] = "close"
    resp = error_response(answer.message, answer.status, headers)
    if answer.close:
        resp.force_close()
    return resp


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode()
    return line


class _HttpDate:
    """The Date header, formatted once a second (RFC 9110: an origin server with a clock sends it)."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return self.line


def _header_lines(headers) -> bytes:
    # Values are the gateway's own or llhttp-read replica headers (no CR/LF); latin-1 is HTTP/1.1's charset.
    return "".join([f"{name}: {value}\r\n" for name, value in headers]).encode("latin-1", "replace")


def http_answer_bytes(answer: InferAnswer, close: bool, date: bytes) -> tuple[bytes, bytes]:
    """The pipeline's answer as an HTTP/1.1 response (head, body) for ClientConnection: the
    same answer as ``http_answer``, written without building a response object."""
    headers = answer.meta
    reply = answer.reply
    status = answer.status
    body = b""
    extra: list[tuple[str, str]] = []
    content_type = JSON
    if reply is not None and (reply.http_status == 200 or (
            reply.body and 400 <= reply.http_status < 500 and reply.content_type
            and reply.content_type.startswith(JSON))):
        status, body = reply.http_status, reply.body
        if status == 200:
            if reply.header_len is not None:
                extra.append((HEADER_LENGTH, reply.header_len))
            if reply.content_encoding:
                extra.append(("Content-Encoding", reply.content_encoding))
        content_type = reply.content_type or JSON
    else:
        if answer.refusal is not None:
            extra.extend(answer.refusal.http_headers().items())
        if answer.retry_after_s:
            extra.append(("Retry-After", str(answer.retry_after_s)))
        body = orjson.dumps({"error": answer.message})
        close = close or answer.close
    head = b"".join((_status_line(status), _header_lines(headers), _header_lines(extra), date,
                     b"Content-Type: ", content_type.encode("latin-1", "replace"),
                     b"\r\nContent-Length: %d\r\n" % len(body),
                     b"Connection: close\r\n\r\n" if close else b"\r\n"))
    return head, body


class HttpInferDoor:
    """The inference requests a client connection answers itself (gateway.front.http_connection):
    POST /v2/models/{m}[/versions/{v}]/infer; a target with percent-escapes is aiohttp's (it
    decodes them)."""

    __slots__ = ("date", "limits", "pipeline", "state")

    def __init__(self, pipeline: InferencePipeline, limits: HttpLimits, state: RegionState) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.state = state  # draining: answer, then close the connection
        self.date = _HttpDate()

    def route(self, method: bytes, url: bytes) -> tuple[str, str | None] | None:
        if method != b"POST" or not url.startswith(b"/v2/models/") or b"%" in url:
            return None
        path = url.split(b"?", 1)[0] if b"?" in url else url
        return _split_infer_path(path.decode("latin-1"))

    async def answer(self, req: ParsedRequest, conn: ClientConnection) -> tuple[tuple[bytes, bytes], bool]:
        headers = CIMultiDict([(name.decode("latin-1"), value.decode("latin-1")) for name, value in req.headers])
        model, requested = req.target
        answer = await self.pipeline.infer(HttpInferRequest(headers, req.body, conn.peer, model, requested,
                                                            self.limits))
        # Draining: answer, then close the keep-alive connection, so the client's next request
        # opens a new one to a worker that stays (closing idle connections would race with
        # requests already on their way).
        close = answer.close or self.state.draining or not req.keep_alive
        return http_answer_bytes(answer, close, self.date()), close


class HttpFront:
    def __init__(self, cfg: Config, *, pipeline: InferencePipeline, queries: ModelQueries, state: RegionState,
                 auth: Authenticator | None, region_summary: Callable[[], dict],
                 generate: GenerateFront | None = None) -> None:
        self.pipeline = pipeline
        self.generate = generate  # Triton's generate extension (gateway.front.generate); None: not served
        self.queries = queries
        self.state = state  # readiness, draining
        self.auth = auth  # None: no client authentication ([auth] keys_file not set)
        self.region_summary = region_summary  # the client listener's view (public with admin credentials)
        self.open_metadata = cfg.auth.open_metadata
        self.max_body_bytes = cfg.gateway.max_body_bytes
        limits = self.limits = cfg.limits
        self.infer_limits = HttpLimits(cfg)
        self.listener_log = ListenerLog(logging.getLogger("geogate.gateway.http.listener"))
        # one rate limit for malformed requests, whether the guard or aiohttp refuses them
        self.guard_limits = GuardLimits(limits.request_head_timeout_ms / 1000.0, limits.max_header_bytes,
                                        malformed_log=self.listener_log.malformed,
                                        body_timeout_s=self.infer_limits.body_timeout_s,
                                        idle_timeout_s=limits.idle_timeout_ms / 1000.0,
                                        max_body_bytes=self.max_body_bytes)
        self.conns: dict = {}  # transport -> ClientConnection, for the client listener's connections
        self.infer_door = HttpInferDoor(pipeline, self.infer_limits, state)

    # ------------------------------------------------------------------ app

    def client_app(self) -> web.Application:
        # auto_decompress off: a gzip'd body is forwarded as received (Content-Encoding kept).
        lim = self.limits
        app = web.Application(client_max_size=self.max_body_bytes,
                              handler_args={"access_log": None, "auto_decompress": False,
                                            "max_line_size": lim.max_header_bytes,
                                            "max_field_size": lim.max_header_bytes,
                                            "logger": self.listener_log,
                                            # idle connections are timed by ClientConnection
                                            "keepalive_timeout": AIOHTTP_KEEPALIVE_S,
                                            # after an early answer (408, 413, 401...) the rest of the
                                            # body is read and dropped for at most this long
                                            "lingering_time": min(LINGERING_MAX_S,
                                                                  self.infer_limits.body_timeout_s)})
        r = app.router
        r.add_post("/v2/models/{model}/infer", self.infer)
        r.add_post("/v2/models/{model}/versions/{version}/infer", self.infer)
        if self.generate is not None:
            for tail in ("generate", "generate_stream"):
                r.add_post(f"/v2/models/{{model}}/{tail}", self.generate_route)
                r.add_post(f"/v2/models/{{model}}/versions/{{version}}/{tail}", self.generate_route)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/models/stats", self.stats)
        r.add_get("/v2/models/{model}", self.model_metadata)
        r.add_get("/v2/models/{model}/versions/{version}", self.model_metadata)
        r.add_get("/v2/models/{model}/ready", self.model_ready)
        r.add_get("/v2/models/{model}/versions/{version}/ready", self.model_ready)
        r.add_get("/v2/models/{model}/config", self.model_config)
        r.add_get("/v2/models/{model}/versions/{version}/config", self.model_config)
        r.add_get("/v2/models/{model}/stats", self.stats)
        r.add_get("/v2/models/{model}/versions/{version}/stats", self.stats)
        r.add_get("/geogate/v1/region", self.public_region_json)
        r.add_route("*", "/v2/repository/{tail:.*}", self.not_here("model repository extension"))
        r.add_route("*", "/v2/systemsharedmemory{tail:.*}", self.not_here("shared memory extension"))
        r.add_route("*", "/v2/cudasharedmemory{tail:.*}", self.not_here("shared memory extension"))
        r.add_route("*", "/v2/trace{tail:.*}", self.not_here("trace extension"))
        r.add_route("*", "/v2/logging{tail:.*}", self.not_here("logging extension"))
        # Last: any other path is a KServe-style JSON 404 (no middleware on the hot path).
        r.add_route("*", "/{tail:.*}", self.no_route)
        return app

    def client_site(self, runner: web.BaseRunner, sock, ssl_context=None) -> web.BaseSite:
        """The client listener's site: each connection a ClientConnection (inference answered
        there, the rest by the app), bounded against slow clients."""
        return ClientSite(runner, sock, door=self.infer_door, limits=self.guard_limits, conns=self.conns,
                          ssl_context=ssl_context)

    def sweep_task(self) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(sweep_slow_clients(self.conns, self.guard_limits),
                                                      name="slow-client-sweep")

    # ------------------------------------------------------------------ inference

    def install_fast_path(self, runner: web.AppRunner) -> None:
        """Route what the connections hand to aiohttp before its router: the listener's request
        handler becomes `dispatch` (API keys for every path but the open ones, generate, and
        inference with unusual targets), which hands the rest to the Application as usual."""
        app_handle = runner.server.request_handler  # the Application's own _handle
        conns, state, pipeline, limits = self.conns, self.state, self.pipeline, self.infer_limits
        generate = self.generate

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            conn = conns.get(request.transport)
            try:
                if request.method == "POST" and (target := _split_infer_path(request.path)) is not None:
                    req = await infer_request_of(request, target[0], target[1], limits)
                    resp = error_response(str(req), req.status) if isinstance(req, RequestError) else \
                        http_answer(await pipeline.infer(req))
                elif generate is not None and request.method == "POST" and \
                        (gen := generate.target(request.path)) is not None:
                    resp = await generate.handle(request, *gen)
                elif self.auth is None or request.path in OPEN_PATHS or \
                        (self.open_metadata and request.path.startswith("/v2")):
                    resp = await app_handle(request)
                else:
                    resp = await self._authorized(request, app_handle)
            finally:
                if conn is not None:
                    conn.request_done()  # the connection's next request goes after this answer
            if state.draining:
                # Draining: answer, then close the keep-alive connection (Connection: close),
                # so the client's next request opens a new one to a worker that stays; closing
                # idle connections instead would race with requests already on their way.
                resp.force_close()
            return resp

        runner.server.request_handler = dispatch

    async def _authorized(self, request: web.BaseRequest, app_handle) -> web.StreamResponse:
        """Everything but inference when API keys are on: name check, key check, then the app."""
        model, version = model_of_path(request.path)
        bad_name = model_ref_problem(model, version) if model is not None else ""
        if bad_name:
            return error_response(bad_name, 400)
        decision = self.auth.authorize_headers(request.headers, model)
        if not decision.allowed:
            return refusal_response(decision)
        try:
            return await app_handle(request)
        finally:
            decision.release()

    async def generate_route(self, request: web.Request) -> web.StreamResponse:
        """generate / generate_stream through the router (the fast path goes to it directly)."""
        assert self.generate is not None
        mi = request.match_info
        return await self.generate.handle(request, mi["model"], mi.get("version"),
                                          request.path.endswith("_stream"))

    async def infer(self, request: web.Request) -> web.Response:
        mi = request.match_info
        req = await infer_request_of(request, mi["model"], mi.get("version"), self.infer_limits)
        if isinstance(req, RequestError):
            return error_response(str(req), req.status)
        return http_answer(await self.pipeline.infer(req))

    # ------------------------------------------------------------------ everything else

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        ok, reason = self.state.readiness()
        if ok:
            return web.Response(status=200)
        return error_response(reason, 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(await self.queries.server_metadata())

    async def _document(self, request: web.Request, fetch) -> web.Response:
        mi = request.match_info
        return document_response(await self.queries.document(fetch, mi["model"], mi.get("version"), PROTOCOL_HTTP))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return await self._document(request, self.queries.catalog.metadata)

    async def model_config(self, request: web.Request) -> web.Response:
        return await self._document(request, self.queries.catalog.config)

    async def stats(self, request: web.Request) -> web.Response:
        """Summed over the pool's replicas; geogate-replicas-aggregated says over how many."""
        mi = request.match_info
        return document_response(await self.queries.statistics(mi.get("model"), mi.get("version"), PROTOCOL_HTTP))

    async def model_ready(self, request: web.Request) -> web.Response:
        mi = request.match_info
        return document_response(self.queries.ready(mi["model"], mi.get("version"), PROTOCOL_HTTP))

    async def public_region_json(self, request: web.Request) -> web.Response:
        """Never takes admin credentials (they stay off a public listener), so with admin
        credentials configured it is always the public summary."""
        return json_response(self.region_summary())

    async def no_route(self, request: web.Request) -> web.Response:
        path = request.path
        for pattern, allow in KNOWN_PATHS:
            if pattern.fullmatch(path):
                return error_response(f"Method Not Allowed: {request.method} {path} (allowed: {allow})", 405,
                                      {"Allow": allow})
        return error_response(f"Not Found: {request.method} {path}", 404)

    def not_here(self, what: str):
        message = NOT_ON_GATEWAY.format(what=what)

        async def handler(request: web.Request) -> web.Response:
            return error_response(message, 404)

        return handler


def _split_infer_path(path: str) -> tuple[str, str | None] | None:
    """(model, version or None) of /v2/models/{m}[/versions/{v}]/infer, else None."""
    if not path.startswith("/v2/models/") or not path.endswith("/infer"):
        return None
    parts = path[len("/v2/models/"):-len("/infer")].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None
