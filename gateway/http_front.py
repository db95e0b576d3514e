"""Client-facing KServe v2 over HTTP (aiohttp on uvloop), and the admin listener's app.

Inference (the hot path): the URL gives model and version; the body is read once, its JSON
header parsed and checked (gateway.request_checks), the version resolved, and the body bytes
forwarded untouched (gateway.forwarder). Everything else (health, server/model metadata,
config, ready, statistics) is answered from the pool's state or proxied to a replica that has
the model (gateway.model_catalog). The model repository extension is not exposed.
"""

from __future__ import annotations

import time

import orjson
from aiohttp import HttpVersion11, web

from gateway import deadline as dl
from gateway.access_log import REQUEST_ID_HEADER, new_request_id
from gateway.region_summary import region_summary
from gateway.request_checks import RequestError, ValidatedHeaders
from gateway.router import HOPS_HEADER, parse_hops
from gateway.upstream_types import OUTCOME_NAME, PROTOCOL_HTTP, InferCall

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON = "application/json"
SERVER_NAME = "geogate"
SERVER_VERSION = "0.1.0"
SERVER_EXTENSIONS = ["binary_tensor_data"]
NOT_ON_GATEWAY = ("the {what} is not available on the geogate gateway; use the replicas' own API "
                  "(or `geogate models ...` for model versions)")


def json_response(body: object, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=JSON, headers=headers)


PRIORITY_HEADER = "geogate-priority"


def error_response(message: str, status: int, headers: dict | None = None) -> web.Response:
    return json_response({"error": message}, status, headers)


class HttpFront:
    def __init__(self, gw) -> None:
        self.gw = gw
        self.region = gw.region.name
        self.default_timeout_ms = gw.cfg.gateway.default_timeout_ms
        self.max_body_bytes = gw.cfg.gateway.max_body_bytes
        self.validated = ValidatedHeaders()
        self.max_in_flight = gw.cfg.gateway.max_concurrent_requests

    # ------------------------------------------------------------------ apps

    def client_app(self) -> web.Application:
        # auto_decompress off: a gzip'd body is forwarded as received (Content-Encoding kept).
        app = web.Application(client_max_size=self.max_body_bytes,
                              handler_args={"access_log": None, "auto_decompress": False})
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
        r.add_get("/geogate/v1/region", self.region_json)
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
        /ui on this Application (add routes before the listener starts)."""
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/geogate/v1/region", self.region_json)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2/health/live", self.live)
        app["geogate"] = self.gw
        return app

    def metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        return app

    # ------------------------------------------------------------------ inference

    def install_fast_path(self, runner: web.AppRunner) -> None:
        """Route inference before aiohttp's router: the listener's request handler becomes
        `dispatch`, which hands everything but POST .../infer to the Application as usual.
        (Profiling: route resolution and the app's handler chain were a visible share of a
        proxied request; the infer URL is simple enough to split by hand.)"""
        app_handle = runner.server.request_handler  # the Application's own _handle

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            if request.method == "POST":
                target = _split_infer_path(request.path)
                if target is not None:
                    if "Expect" in request.headers:  # curl / perf_analyzer wait for this
                        await _continue(request)
                    return await self._infer(request, target[0], target[1])
            return await app_handle(request)

        runner.server.request_handler = dispatch

    async def infer(self, request: web.Request) -> web.Response:
        mi = request.match_info
        return await self._infer(request, mi["model"], mi.get("version"))

    async def _infer(self, request: web.BaseRequest, model: str, requested: str | None) -> web.Response:
        t0 = time.monotonic()
        gw = self.gw
        headers = request.headers
        rid = headers.get(REQUEST_ID_HEADER) or new_request_id()
        resp_headers = {"geogate-region": self.region, REQUEST_ID_HEADER: rid}
        gw.load.in_flight += 1
        gw.metrics.in_flight_add(PROTOCOL_HTTP, 1)
        try:
            if gw.load.in_flight > self.max_in_flight:
                return self._reject(rid, model, requested, f"gateway worker overloaded: more than "
                                    f"{self.max_in_flight} requests in flight (max_concurrent_requests)",
                                    503, resp_headers, t0)
            hops = parse_hops(headers.get(HOPS_HEADER))
            unknown = gw.unknown_model(model, requested, hops)
            if unknown is not None:
                return self._reject(rid, model, requested, unknown.message, 404, resp_headers, t0)
            cl = request.content_length
            if cl is not None and cl > self.max_body_bytes:
                return self._reject(rid, model, requested, f"request body of {cl} bytes is larger than "
                                    f"the gateway's limit of {self.max_body_bytes} bytes", 413, resp_headers, t0)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._reject(rid, model, requested, f"request body is larger than the gateway's "
                                    f"limit of {self.max_body_bytes} bytes", 413, resp_headers, t0)
            hl = headers.get(HEADER_LENGTH)
            enc = headers.get("Content-Encoding")
            version = gw.resolve_version(model, requested)
            try:
                specs = gw.catalog.fresh_specs(model, version) or await gw.catalog.specs(model, version)
                header = self.validated.check(model, body, hl, enc, specs)
                params = header.get("parameters")
                deadline_s = dl.http_deadline(t0, headers.get(dl.TIMEOUT_HEADER),
                                              params.get(dl.TIMEOUT_PARAMETER) if isinstance(params, dict)
                                              else None, self.default_timeout_ms)
            except (RequestError, dl.DeadlineError) as exc:
                status = getattr(exc, "status", 400)
                return self._reject(rid, model, version, str(exc), status, resp_headers, t0)
            call = InferCall(PROTOCOL_HTTP, model, requested, version, rid, deadline_s,
                             hops=hops, started_s=t0, body=body, header=header,
                             header_len=hl, content_encoding=enc,
                             accept_encoding=headers.get("Accept-Encoding"))
            call.priority = headers.get(PRIORITY_HEADER, "")
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
        finally:
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

    async def _proxied(self, request: web.Request, fetch) -> web.Response:
        model, version = self._model_args(request)
        unknown = self.gw.unknown_model(model, version)
        if unknown is not None:
            return error_response(unknown.message, 404)
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
        unknown = self.gw.unknown_model(model, version)
        if unknown is not None:
            return error_response(unknown.message, 404)
        if self.gw.catalog.ready(model, version):
            return web.Response(status=200)
        cands = self.gw.pools.candidates(model, version, "http", time.monotonic())
        return error_response(f"model '{model}' is not ready: {cands.reason}", 400)

    async def region_json(self, request: web.Request) -> web.Response:
        return json_response(region_summary(self.gw))

    async def metrics(self, request: web.Request) -> web.Response:
        body, ctype = self.gw.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def no_route(self, request: web.Request) -> web.Response:
        return error_response(f"Not Found: {request.method} {request.path}", 404)

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
