"""KServe v2 over HTTP (aiohttp on uvloop), as Triton serves it, plus /metrics and the test fault switch.

Content-Type is never used to decide how to read a body (clients disagree on it); the binary
extension is recognised by the `Inference-Header-Content-Length` header alone. Gzip/deflate
request bodies (`Content-Encoding`) are inflated here, not by aiohttp, in bounded steps that stop
with 413 the moment the output passes the body limit (`http_fast.Inflater`): aiohttp's own
decompression kept inflating a body after the answer (1 MiB of gzip -> 1 GiB).
Plain inference requests are served by the lean path in `http_fast` (same answers, about half
the event-loop CPU per request); `make_runner` sets it up in front of this aiohttp application.

With a control token (`geogate replica --control-token-file`), the repository API needs
`Authorization: Bearer <token>` (401 otherwise), except the ready-only index
(`{"ready": true}`): gateways' health checks read it, and it lists only READY versions, which
`GET /v2/models/{m}` tells anyone. Inference, health and metadata stay open.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from core.kserve import HEADER_LENGTH, MODEL_VERSION_HEADER, REQUEST_ID_HEADERS
from replicas.server.http_bodies import Inflater, content_coding
from replicas.server.http_fast import DEFAULT_HEAD_TIMEOUT_S, KEEPALIVE_TIMEOUT_S
from replicas.server.http_fast_server import FastPathAppRunner
from replicas.server.infer_errors import InferError, LogLimiter, invalid, one_line, too_large
from replicas.server.inference_service import FaultSwitch, InferenceService
from replicas.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from replicas.server.metrics import ReplicaMetrics
from replicas.server.model_config import message_to_json_dict
from replicas.server.repository import ControlToken, LoadError, ModelRepository
from replicas.server.server_info import server_metadata, statistics_response
from replicas.server.v2_codec import decode_http, encode_http

log = logging.getLogger("geogate.replica.http")

JSON = "application/json"
OCTET = "application/octet-stream"
FAULTS_PATH = "/geogate/test/faults"
NOT_READY_STATUS = 400
MAX_HEADER_LENGTH_DIGITS = 18


def error_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}), content_type=JSON)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type=JSON)


def request_id_of(headers) -> str:
    for name in REQUEST_ID_HEADERS:
        value = headers.get(name)
        if value:
            return value
    return ""


def parse_header_length(raw: str | None) -> int | None:
    """Inference-Header-Content-Length: ASCII digits only (int() would also take other scripts'
    digits, signs, underscores and spaces)."""
    if raw is None:
        return None
    value = raw.strip(" \t")
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_HEADER_LENGTH_DIGITS:
        raise invalid(f"{HEADER_LENGTH} must be a non-negative integer in ASCII digits, got {one_line(raw, 40)!r}")
    return int(value)


class AiohttpServerLog:
    """aiohttp's server logger on the replica's port: a request its parser refused (the client's
    fault) becomes one rate-limited warning line instead of a traceback at error level; other
    failures keep their traceback, rate-limited too."""

    def __init__(self) -> None:
        self._log = logging.getLogger("aiohttp.server")
        self._malformed = LogLimiter(self._log)
        self._errors = LogLimiter(self._log)

    def debug(self, *args: Any, **kwargs: Any) -> None:
        self._log.debug(*args, **kwargs)

    def warning(self, *args: Any, **kwargs: Any) -> None:
        self._log.warning(*args, **kwargs)

    def error(self, *args: Any, **kwargs: Any) -> None:
        self._log.error(*args, **kwargs)

    def exception(self, msg: str, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self._malformed.warning("malformed HTTP request refused", {
                "error": one_line(str(exc_info)), "peer": str(args[0]) if args else ""})
            return
        self._errors.log(logging.ERROR, msg % args if args else msg, {}, exc_info=exc_info)


class HttpApi:
    def __init__(self, service: InferenceService, repository: ModelRepository, metrics: ReplicaMetrics,
                 *, max_body_bytes: int, faults: FaultSwitch | None, control_token: ControlToken | None = None,
                 head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S):
        self.service = service
        self.repository = repository
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.faults = faults
        self.control_token = control_token
        self.head_timeout_s = head_timeout_s

    def build_app(self) -> web.Application:
        # aiohttp enforces client_max_size on read(); we turn its error into Triton-style JSON.
        app = web.Application(client_max_size=self.max_body_bytes)
        r = app.router
        # aiohttp tries routes in order: the hot path first.
        r.add_post("/v2/models/{model}/infer", self.infer)
        r.add_post("/v2/models/{model}/versions/{version}/infer", self.infer)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2/models/stats", self.stats)
        r.add_get("/v2/models/{model}/stats", self.stats)
        r.add_get("/v2/models/{model}/versions/{version}/stats", self.stats)
        r.add_get("/v2/models/{model}", self.model_metadata)
        r.add_get("/v2/models/{model}/versions/{version}", self.model_metadata)
        r.add_get("/v2/models/{model}/ready", self.model_ready)
        r.add_get("/v2/models/{model}/versions/{version}/ready", self.model_ready)
        r.add_get("/v2/models/{model}/config", self.model_config)
        r.add_get("/v2/models/{model}/versions/{version}/config", self.model_config)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_post("/v2/repository/models/{model}/load", self.load)
        r.add_post("/v2/repository/models/{model}/unload", self.unload)
        r.add_get("/metrics", self.metrics_handler)
        if self.faults is not None:
            r.add_post(FAULTS_PATH, self.set_faults)
            r.add_get(FAULTS_PATH, self.get_faults)
        return app

    def make_runner(self, **kwargs: Any) -> web.AppRunner:
        """The runner for the main port: aiohttp serves the whole API; connections start on the fast
        inference path and are handed to aiohttp at their first request of another shape."""
        # auto_decompress off: bodies are inflated by `_body`, capped (see the module doc); idle
        # connections close after the same time on both paths (aiohttp's own default is an hour).
        return FastPathAppRunner(self.build_app(), self.run_infer, self.max_body_bytes,
                                 head_timeout_s=self.head_timeout_s, auto_decompress=False,
                                 keepalive_timeout=KEEPALIVE_TIMEOUT_S, logger=AiohttpServerLog(), **kwargs)

    def build_metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_handler)
        return app

    # ------------------------------------------------------------------ health and metadata

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(server_metadata())

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        ready, reason = self.repository.readiness()
        if ready:
            return web.Response(status=200)
        # Triton answers 400 when not ready; the body says why (for operators and the gateway's logs).
        return error_response(NOT_READY_STATUS, f"server is not ready: {reason}")

    async def model_metadata(self, request: web.Request) -> web.Response:
        try:
            h = self.repository.get(request.match_info["model"], request.match_info.get("version", ""))
        except InferError as exc:
            return error_response(exc.http_status, exc.message)
        versions = self.repository.ready_versions(h.model) if not request.match_info.get("version") \
            else [h.version_str]
        return json_response(h.signature.metadata(versions))

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            self.repository.get(request.match_info["model"], request.match_info.get("version", ""))
        except InferError as exc:
            return error_response(400, exc.message)
        return web.Response(status=200)

    async def model_config(self, request: web.Request) -> web.Response:
        try:
            h = self.repository.get(request.match_info["model"], request.match_info.get("version", ""))
        except InferError as exc:
            return error_response(exc.http_status, exc.message)
        return json_response(h.config_json)

    async def stats(self, request: web.Request) -> web.Response:
        model = request.match_info.get("model", "")
        version = request.match_info.get("version", "")
        try:
            response = statistics_response(self.repository, model, version)
        except InferError as exc:
            return error_response(exc.http_status, exc.message)
        return json_response(message_to_json_dict(response))

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    # ------------------------------------------------------------------ inference (hot path)

    async def _body(self, request: web.Request) -> bytes | bytearray:
        limit = self.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise too_large(f"request body of {length} bytes is over the limit of {limit} bytes")
        codings = request.headers.getall("Content-Encoding", ())
        if len(codings) > 1:
            raise InferError(415, "the request has more than one Content-Encoding header")
        coding = content_coding(codings[0] if codings else None)
        try:
            if not coding:
                return await request.read()  # bounded by client_max_size
            inflater = Inflater(coding, limit)
            received = 0
            async for chunk in request.content.iter_any():
                received += len(chunk)
                if received > limit:
                    raise too_large(f"request body is over the limit of {limit} bytes")
                await inflater.feed(chunk)
            return inflater.finish()
        except web.HTTPRequestEntityTooLarge:
            raise too_large(f"request body is over the limit of {limit} bytes") from None
        except (OSError, ValueError, RequestPayloadError, HttpProcessingError) as exc:  # truncated, reset
            raise invalid(f"failed to read the request body: {one_line(str(exc))}") from None

    async def infer(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
        except InferError as exc:
            return error_response(exc.http_status, exc.message)
        info = request.match_info
        headers = request.headers
        status, payload, content_type, version, json_length = await self.run_infer(
            info["model"], info.get("version", ""), body, headers.get(HEADER_LENGTH), request_id_of(headers))
        if status != 200:
            return web.Response(status=status, body=payload, content_type=content_type)
        if json_length is None:
            return web.Response(body=payload, content_type=content_type, headers={MODEL_VERSION_HEADER: version})
        return web.Response(body=payload, content_type=content_type,
                            headers={MODEL_VERSION_HEADER: version, HEADER_LENGTH: str(json_length)})

    async def run_infer(self, model: str, version: str, body: bytes | bytearray, raw_length: str | None, request_id: str
                        ) -> tuple[int, bytes, str, str, int | None]:
        """One inference, for both HTTP paths: (status, body, content type, served version or "",
        Inference-Header-Content-Length or None for an all-JSON answer)."""
        try:
            header_length = parse_header_length(raw_length)
            handle, (payload, json_length) = await self.service.infer(
                "http", model, version, lambda sig: decode_http(body, header_length, sig), encode_http, request_id)
        except InferError as exc:
            return exc.http_status, orjson.dumps({"error": exc.message}), JSON, "", None
        return 200, payload, JSON if json_length is None else OCTET, handle.version_str, json_length

    # ------------------------------------------------------------------ model repository extension

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        body = await self._body(request)
        if not body.strip():
            return {}
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise invalid(f"failed to parse the request JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise invalid("the request JSON must be an object")
        return obj

    def _control_refusal(self, request: web.Request) -> web.Response | None:
        """401 when this replica has a control token and the request does not carry it."""
        if self.control_token is None:
            return None
        reason = self.control_token.refusal(request.headers.get("Authorization"))
        if not reason:
            return None
        log.warning("repository API call refused", extra={"fields": {
            "path": request.path[:200], "remote": request.remote, "reason": reason}})
        return web.Response(status=401, body=orjson.dumps({"error": reason}), content_type=JSON,
                            headers={"WWW-Authenticate": 'Bearer realm="geogate-replica"'})

    async def repository_index(self, request: web.Request) -> web.Response:
        try:
            obj = await self._json_body(request)
            ready = obj.get("ready", False)
            if not isinstance(ready, bool):
                raise invalid("'ready' must be true or false")
        except InferError as exc:
            return error_response(exc.http_status, exc.message)
        refusal = None if ready else self._control_refusal(request)
        if refusal is not None:
            return refusal
        return json_response(self.repository.index(ready_only=ready))

    async def load(self, request: web.Request) -> web.Response:
        refusal = self._control_refusal(request)
        if refusal is not None:
            return refusal
        model = request.match_info["model"]
        try:
            obj = await self._json_body(request)
            params = obj.get("parameters")
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise invalid("'parameters' must be an object")
            config = None
            for key, value in params.items():
                if key == "config":
                    if not isinstance(value, str):
                        raise invalid("parameters.config must be a string holding the model config as JSON")
                    config = value
                elif key.startswith("file:"):
                    raise invalid("load parameters 'file:...': file overrides are not supported by geogate "
                                  "replicas; put the files in the repository")
                else:
                    raise invalid(f"unknown load parameter {one_line(key, 60)!r}")
            log.info("load requested", extra={"fields": {"model": model, "config_override": config is not None}})
            await self.repository.load(model, config)
        except InferError as exc:
            return error_response(exc.http_status, exc.message)
        except LoadError as exc:
            return error_response(400, str(exc))
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        refusal = self._control_refusal(request)
        if refusal is not None:
            return refusal
        model = request.match_info["model"]
        try:
            await self._json_body(request)  # may carry unload_dependents; nothing depends here
            log.info("unload requested", extra={"fields": {"model": model}})
            await self.repository.unload(model)
        except InferError as exc:
            return error_response(exc.http_status, exc.message)
        except LoadError as exc:
            return error_response(400, str(exc))
        return web.Response(status=200)

    # ------------------------------------------------------------------ test faults

    async def set_faults(self, request: web.Request) -> web.Response:
        assert self.faults is not None
        try:
            obj = await self._json_body(request)
            delay_ms, status, hang = obj.get("delay_ms", 0), obj.get("status", 0), obj.get("hang", False)
            if type(delay_ms) is not int or type(status) is not int or type(hang) is not bool:
                raise invalid("faults: delay_ms and status must be integers, hang a boolean")
            self.faults.set(delay_ms=delay_ms, status=status, hang=hang)
        except InferError as exc:
            return error_response(exc.http_status, exc.message)
        except ValueError as exc:
            return error_response(400, f"faults: {exc}")
        log.warning("test faults changed", extra={"fields": self.faults.describe()})
        return json_response(self.faults.describe())

    async def get_faults(self, request: web.Request) -> web.Response:
        assert self.faults is not None
        return json_response(self.faults.describe())

