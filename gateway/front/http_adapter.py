"""Client-facing KServe v2 over HTTP (aiohttp on uvloop), and the admin listener's app.

Inference (the hot path): the URL gives model and version; the body is read once, its JSON
header parsed and checked (gateway.front.request_checks), the version resolved, and the body bytes
forwarded untouched (gateway.routing.forwarder). Everything else (health, server/model metadata,
config, ready, statistics) is answered from the pool's state or proxied to a replica that has
the model (gateway.upstream.catalog). The model repository extension is not exposed.

Security (all off unless configured, see README "Security"):
- API keys (gateway.front.auth, ``[auth] keys_file``): every request but health (``/v2/health/*``)
  and the region summary (``/geogate/v1/region``, read by peers and GeoDNS) needs a key;
  401 / 403 / 429 with ``{"error": ...}`` and Retry-After. The key's priority class goes to the
  admission control with the call (``InferCall.key_priority``).
- Limits: ``[gateway] max_body_bytes`` (also after gzip/deflate decoding: 413),
  ``max_concurrent_requests`` per worker (503 + Retry-After before anything else is done),
  ``[limits]`` header bytes (431), tensor elements (400), model/version names (400), and slow
  clients: a ``SlowClientGuard`` around each connection answers 408 and closes when a request
  head does not arrive within ``request_head_timeout_ms``; a body not read within
  ``request_body_timeout_ms`` is 408 too.
- Admin listener (``admin_app``; and the ``[gateway] metrics`` listener): with ``[admin]``
  credentials configured, ``admin_guard`` wants them on every route but ADMIN_OPEN_PATHS
  (``[admin] open_metrics`` adds /metrics); the region summary without them is
  ``public_region_summary`` (no replica URLs, routing or peers), on both listeners.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import orjson
from aiohttp import HttpVersion11, web

from core.kserve import HEADER_LENGTH, HOPS_HEADER, PRIORITY_HEADER, REQUEST_ID_HEADER
from core.names import cached_model_ref_problem as model_ref_problem
from gateway.admin.guard import admin_guard, admin_json_errors, admin_request_check, public_region_summary
from gateway.admin.region_summary import region_summary
from gateway.front import deadline as dl
from gateway.front.access_log import request_id_from
from gateway.front.admin_auth import AdminCredentials
from gateway.front.auth import AuthDecision, Authenticator
from gateway.front.request_checks import ClientErrorLog, RequestError, ValidatedHeaders, check_coding, parse_hops
from gateway.front.slow_clients import GuardedSockSite, GuardLimits, ListenerLog, sweep_slow_clients
from gateway.upstream.types import NO_VERDICT, OUTCOME_NAME, PROTOCOL_HTTP, InferCall

log = logging.getLogger("geogate.gateway.http")

JSON = "application/json"
SERVER_NAME = "geogate"
SERVER_VERSION = "0.1.0"
SERVER_EXTENSIONS = ["binary_tensor_data"]
NOT_ON_GATEWAY = ("the {what} is not available on the geogate gateway; use the replicas' own API "
                  "(or `geogate models ...` for model versions)")


def json_response(body: object, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=JSON, headers=headers)


# Paths that never need an API key: load balancers, peers and GeoDNS read them.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/geogate/v1/region"})
SHED_RETRY_AFTER_S = 1  # an overloaded worker tells clients to come back this soon
LINGERING_MAX_S = 2.0  # aiohttp's default (10 s) would let a slow sender hold a refused connection
# Paths of the client API with their methods: any other method on them is 405, not 404.
KNOWN_PATHS = (
    (re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer"), "POST"),
    (re.compile(r"/v2(/health/(live|ready)|/models/stats|/models/[^/]+(/versions/[^/]+)?(/ready|/config|/stats)?)?"),
     "GET, HEAD"),
    (re.compile(r"/geogate/v1/region"), "GET, HEAD"),
)


def error_response(message: str, status: int, headers: dict | None = None) -> web.Response:
    return json_response({"error": message}, status, headers)


def refusal_response(decision: AuthDecision, headers: dict | None = None) -> web.Response:
    """401 / 403 / 429 for a refused API key, with WWW-Authenticate / Retry-After."""
    return error_response(decision.message, decision.http_status, {**(headers or {}), **decision.http_headers()})


def model_of_path(path: str) -> tuple[str | None, str | None]:
    """(model, version) named by a /v2/models/... path; (None, None) for server-level paths."""
    if not path.startswith("/v2/models/"):
        return None, None
    parts = path[len("/v2/models/"):].split("/")
    if not parts[0] or (len(parts) == 1 and parts[0] == "stats"):
        return None, None
    version = parts[2] if len(parts) >= 3 and parts[1] == "versions" else None
    return parts[0], version


class HttpFront:
    def __init__(self, gw) -> None:
        self.gw = gw
        self.region = gw.region.name
        self.default_timeout_ms = gw.cfg.gateway.default_timeout_ms
        self.max_body_bytes = gw.cfg.gateway.max_body_bytes
        limits = gw.cfg.limits
        self.limits = limits
        self.validated = ValidatedHeaders(max_elements=limits.max_tensor_elements,
                                          max_decoded_bytes=self.max_body_bytes)
        self.max_in_flight = gw.cfg.gateway.max_concurrent_requests
        self.body_timeout_s = limits.request_body_timeout_ms / 1000.0
        # None: no client authentication ([auth] keys_file not set)
        self.auth: Authenticator | None = getattr(gw, "auth", None)
        self.open_metadata = gw.cfg.auth.open_metadata
        self.guard_limits = GuardLimits(limits.request_head_timeout_ms / 1000.0, limits.max_header_bytes)
        self.guards: dict = {}  # transport -> SlowClientGuard, for the client listener's connections
        self.listener_log = ListenerLog(logging.getLogger("geogate.gateway.http.listener"))
        self.crash_log = ClientErrorLog(log)  # rate limit for tracebacks of unexpected errors


        # None or not .configured: the admin listener is open (no [admin] credentials)
        self.admin_credentials: AdminCredentials | None = getattr(gw, "admin_credentials", None)

    # ------------------------------------------------------------------ apps

    def client_app(self) -> web.Application:
        # auto_decompress off: a gzip'd body is forwarded as received (Content-Encoding kept).
        lim = self.limits
        app = web.Application(client_max_size=self.max_body_bytes,
                              handler_args={"access_log": None, "auto_decompress": False,
                                            "max_line_size": lim.max_header_bytes,
                                            "max_field_size": lim.max_header_bytes,
                                            "logger": self.listener_log,
                                            "keepalive_timeout": lim.idle_timeout_ms / 1000.0,
                                            # after an early answer (408, 413, 401...) the rest of the
                                            # body is read and dropped for at most this long
                                            "lingering_time": min(LINGERING_MAX_S, self.body_timeout_s)})
        r = app.router
        r.add_post("/v2/models/{model}/infer", self.infer)
        r.add_post("/v2/models/{model}/versions/{version}/infer", self.infer)
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

    def admin_app(self) -> web.Application:
        """/metrics, /geogate/v1/region and /v2/health/ready; others mount the admin API and
        /ui on this Application (add routes before the listener starts). With admin
        credentials configured, every route but ADMIN_OPEN_PATHS needs them (``admin_guard``)."""
        app = web.Application(middlewares=self._admin_middlewares())
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/geogate/v1/region", self.region_json)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2/health/live", self.live)
        app["geogate"] = self.gw
        return app

    def metrics_app(self) -> web.Application:
        """The ``[gateway] metrics`` listener: /metrics under the same rule as on the admin listener."""
        app = web.Application(middlewares=self._admin_middlewares())
        app.router.add_get("/metrics", self.metrics)
        return app

    def _admin_middlewares(self) -> list:
        creds = self.admin_credentials
        if creds is None or not creds.configured:
            return [admin_json_errors]
        return [admin_json_errors, admin_guard(creds, open_metrics=self.gw.cfg.admin.open_metrics)]

    def region_detail_allowed(self, request: web.BaseRequest) -> bool:
        """May this request see the region summary's topology (replica URLs, routing, peers)?
        Yes without admin credentials configured; otherwise only with them."""
        creds = self.admin_credentials
        return creds is None or not creds.configured or admin_request_check(creds, request).ok

    # ------------------------------------------------------------------ inference

    def install_fast_path(self, runner: web.AppRunner) -> None:
        """Route inference before aiohttp's router: the listener's request handler becomes
        `dispatch`, which hands everything but POST .../infer to the Application as usual.
        (Profiling: route resolution and the app's handler chain were a visible share of a
        proxied request; the infer URL is simple enough to split by hand.)"""
        app_handle = runner.server.request_handler  # the Application's own _handle
        guards = self.guards

        gw = self.gw

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            guard = guards.get(request.transport)
            if guard is not None:
                guard.request_started()
            try:
                if request.method == "POST" and (target := _split_infer_path(request.path)) is not None:
                    if "Expect" in request.headers:  # curl / perf_analyzer wait for this
                        await _continue(request)
                    resp = await self._infer(request, target[0], target[1])
                elif self.auth is None or request.path in OPEN_PATHS or \
                        (self.open_metadata and request.path.startswith("/v2")):
                    resp = await app_handle(request)
                else:
                    resp = await self._authorized(request, app_handle)
            finally:
                if guard is not None:
                    guard.request_done()
            if gw.draining:
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

    def client_site(self, runner: web.BaseRunner, sock, ssl_context=None) -> web.BaseSite:
        """The client listener's site: connections guarded against slow clients."""
        return GuardedSockSite(runner, sock, limits=self.guard_limits, guards=self.guards, ssl_context=ssl_context)

    def sweep_task(self) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(sweep_slow_clients(self.guards, self.guard_limits),
                                                      name="slow-client-sweep")

    async def infer(self, request: web.Request) -> web.Response:
        mi = request.match_info
        return await self._infer(request, mi["model"], mi.get("version"))

    async def _infer(self, request: web.BaseRequest, model: str, requested: str | None) -> web.Response:
        t0 = time.monotonic()
        gw = self.gw
        headers = request.headers
        rid = request_id_from(headers.get(REQUEST_ID_HEADER))
        resp_headers = {"geogate-region": self.region, REQUEST_ID_HEADER: rid}
        decision: AuthDecision | None = None
        # Returned in `finally` on every path (errors and cancellation included).
        gw.load.in_flight += 1
        gw.metrics.in_flight_add(PROTOCOL_HTTP, 1)
        try:
            if gw.load.in_flight > self.max_in_flight:
                resp_headers["Retry-After"] = str(SHED_RETRY_AFTER_S)
                return self._reject(rid, model, requested, f"gateway worker overloaded: more than "
                                    f"{self.max_in_flight} requests in flight ([gateway] max_concurrent_requests); "
                                    f"retry after {SHED_RETRY_AFTER_S} s", 503, resp_headers, t0)
            bad_name = model_ref_problem(model, requested)  # before any lookup by that name
            if bad_name:
                return self._reject(rid, model, requested, bad_name, 400, resp_headers, t0)
            if self.auth is not None:
                decision = self.auth.authorize_headers(headers, model)
                if not decision.allowed:
                    resp_headers.update(decision.http_headers())
                    return self._reject(rid, model, requested, decision.message, decision.http_status,
                                        resp_headers, t0)
            try:
                hops = parse_hops(headers.get(HOPS_HEADER))
            except RequestError as exc:
                return self._reject(rid, model, requested, str(exc), 400, resp_headers, t0)
            unknown = gw.unknown_model(model, requested, hops)
            if unknown is not None:
                return self._reject(rid, model, requested, unknown.message, 404, resp_headers, t0)
            cl = request.content_length
            if cl is not None and cl > self.max_body_bytes:
                return self._reject(rid, model, requested, f"request body of {cl} bytes is larger than "
                                    f"the gateway's limit of {self.max_body_bytes} bytes", 413, resp_headers, t0)
            try:
                if request.content.is_eof():  # the usual case: the whole body came with the head
                    body = await request.read()
                else:  # still arriving: bound how long a (slow) sender may take
                    async with asyncio.timeout(self.body_timeout_s):
                        body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._reject(rid, model, requested, f"request body is larger than the gateway's "
                                    f"limit of {self.max_body_bytes} bytes", 413, resp_headers, t0)
            except TimeoutError:
                resp_headers["Connection"] = "close"
                resp = self._reject(rid, model, requested, f"request body not received within "
                                    f"{self.limits.request_body_timeout_ms} ms ([limits] request_body_timeout_ms)",
                                    408, resp_headers, t0)
                resp.force_close()
                return resp
            hl = headers.get(HEADER_LENGTH)
            enc = headers.get("Content-Encoding")
            accept_enc = headers.get("Accept-Encoding")
            version = gw.resolve_version(model, requested)
            try:
                # Forwarded to replicas as received: plain ASCII only (HTTP/1.1 sends latin-1).
                check_coding("Content-Encoding", enc)
                check_coding("Accept-Encoding", accept_enc)
                specs = gw.catalog.fresh_specs(model, version) or await gw.catalog.specs(model, version)
                header = self.validated.check(model, body, hl, enc, specs)
                params = header.get("parameters")  # a JSON object or None (checked)
                deadline = dl.http_deadline(t0, headers.get(dl.TIMEOUT_HEADER),
                                            params.get(dl.TIMEOUT_PARAMETER) if params else None,
                                            self.default_timeout_ms)
            except (RequestError, dl.DeadlineError) as exc:
                status = getattr(exc, "status", 400)
                return self._reject(rid, model, version, str(exc), status, resp_headers, t0)
            call = InferCall(PROTOCOL_HTTP, model, requested, version, rid, deadline.at_s,
                             hops=hops, client_deadline=deadline.client, started_s=t0, body=body, header=header,
                             header_len=hl, content_encoding=enc, accept_encoding=accept_enc)
            call.priority = headers.get(PRIORITY_HEADER, "")
            if decision is not None:
                call.key_priority = decision.priority
            if gw.locate_clients:
                call.client_ip = request.remote or ""
                call.forwarded_for = headers.get("X-Forwarded-For")
            result = await gw.forwarder.forward(call)
            reply = result.reply
            up = result.upstream
            # Served by a peer region: its gateway said where and by which replica.
            replica = up.state.url if up is not None else reply.replica
            if reply.region:
                resp_headers["geogate-region"] = reply.region
            resp_headers["geogate-attempts"] = str(result.attempts)
            resp_headers["geogate-replica"] = replica
            resp_headers["geogate-model-version"] = reply.model_version or (version or "")
            now = time.monotonic()
            if reply.outcome not in NO_VERDICT:  # a client's short deadline is no latency sample
                gw.load.record(now - t0, now)
            gw.metrics.request(model, reply.model_version or version or "", replica, PROTOCOL_HTTP,
                               OUTCOME_NAME[reply.outcome], now - t0)
            if gw.access_log.enabled:
                gw.access_log.log(request_id=rid, protocol=PROTOCOL_HTTP, model=model,
                                  version=reply.model_version or version or "", status=reply.http_status,
                                  replica=replica, attempts=result.attempts, duration_s=now - t0,
                                  outcome=OUTCOME_NAME[reply.outcome], error=reply.message)
            if reply.http_status == 200:
                if reply.header_len is not None:
                    resp_headers[HEADER_LENGTH] = reply.header_len
                if reply.content_encoding:
                    resp_headers["Content-Encoding"] = reply.content_encoding
                resp_headers["Content-Type"] = reply.content_type or JSON
                return web.Response(body=reply.body, headers=resp_headers)
            if reply.body and 400 <= reply.http_status < 500 and reply.content_type and \
                    reply.content_type.startswith(JSON):
                # A replica's own 4xx passes through unchanged.
                resp_headers["Content-Type"] = reply.content_type
                return web.Response(body=reply.body, status=reply.http_status, headers=resp_headers)
            if reply.retry_after_s:
                resp_headers["Retry-After"] = str(reply.retry_after_s)
            return error_response(reply.message, reply.http_status, resp_headers)
        except Exception as exc:  # a gateway bug: a JSON 500 (not aiohttp's text), the traceback rate-limited
            if self.crash_log.allow():
                log.exception("inference request %s for model %r failed inside the gateway", rid, model)
            return self._reject(rid, model, requested, f"internal gateway error: {type(exc).__name__}", 500,
                                resp_headers, t0)
        finally:
            if decision is not None:
                decision.release()
            gw.load.in_flight -= 1
            gw.metrics.in_flight_add(PROTOCOL_HTTP, -1)

    def _reject(self, rid: str, model: str, version: str | None, message: str, status: int,
                resp_headers: dict, t0: float) -> web.Response:
        gw = self.gw
        gw.metrics.reject(PROTOCOL_HTTP, str(status))
        gw.access_log.log(request_id=rid, protocol=PROTOCOL_HTTP, model=model, version=version or "",
                          status=status, replica="", attempts=0, duration_s=time.monotonic() - t0,
                          outcome="rejected", error=message)
        resp_headers["geogate-attempts"] = "0"
        return error_response(message, status, resp_headers)

    # ------------------------------------------------------------------ everything else

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        ok, reason = self.gw.readiness()
        if ok:
            return web.Response(status=200)
        return error_response(reason, 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": SERVER_EXTENSIONS})

    def _model_args(self, request: web.Request) -> tuple[str, str | None]:
        return request.match_info["model"], request.match_info.get("version")

    def _model_refusal(self, model: str, version: str | None) -> web.Response | None:
        """400 for a malformed model name or version, 404 for an unknown model; None when it may go on."""
        bad_name = model_ref_problem(model, version)
        if bad_name:
            return error_response(bad_name, 400)
        unknown = self.gw.unknown_model(model, version)
        if unknown is not None:
            return error_response(unknown.message, 404)
        return None

    async def _proxied(self, request: web.Request, fetch) -> web.Response:
        model, version = self._model_args(request)
        refused = self._model_refusal(model, version)
        if refused is not None:
            return refused
        status, body = await fetch(model, version)
        if status == 0:
            cands = self.gw.pools.candidates(model, version, "http", time.monotonic())
            return error_response(f"no replica can serve model '{model}': "
                                  f"{cands.reason or 'no replica answered'}", 503)
        return json_response(body, status)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return await self._proxied(request, self.gw.catalog.metadata)

    async def model_config(self, request: web.Request) -> web.Response:
        return await self._proxied(request, self.gw.catalog.config)

    async def stats(self, request: web.Request) -> web.Response:
        if "model" not in request.match_info:
            return error_response("statistics for all models are not aggregated by the gateway; "
                                  "ask for one model: /v2/models/{model}/stats", 400)
        return await self._proxied(request, self.gw.catalog.statistics)

    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = self._model_args(request)
        refused = self._model_refusal(model, version)
        if refused is not None:
            return refused
        if self.gw.catalog.ready(model, version):
            return web.Response(status=200)
        cands = self.gw.pools.candidates(model, version, "http", time.monotonic())
        return error_response(f"model '{model}' is not ready: {cands.reason}", 400)

    async def region_json(self, request: web.Request) -> web.Response:
        """The admin listener's: complete with admin credentials (or none configured)."""
        summary = region_summary(self.gw)
        if not self.region_detail_allowed(request):
            summary = public_region_summary(summary)
        return json_response(summary)

    async def public_region_json(self, request: web.Request) -> web.Response:
        """The client listener's: never takes admin credentials (they stay off a public listener),
        so with admin credentials configured it is always the public summary."""
        summary = region_summary(self.gw)
        creds = self.admin_credentials
        return json_response(public_region_summary(summary) if creds is not None and creds.configured else summary)

    async def metrics(self, request: web.Request) -> web.Response:
        # In a thread: with --workers N it reads every worker's metric files.
        body, ctype = await asyncio.to_thread(self.gw.metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": ctype})

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


async def _continue(request: web.BaseRequest) -> None:
    """What aiohttp's router does for `Expect: 100-continue` (bypassed on the fast path)."""
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
