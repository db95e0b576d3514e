"""HTTP upstream. Inference goes through a lean keep-alive connection pool per replica
(gateway.upstream.http1_client: profiling showed aiohttp's ClientSession costing as much CPU per
proxied request as the rest of the gateway); metadata, config and statistics use one aiohttp
ClientSession per worker. HTTP clients' bodies are forwarded as received (JSON header and
binary blobs, Inference-Header-Content-Length and Content-Encoding untouched); gRPC clients'
requests are translated (gateway.upstream.translate) only when a pool has no gRPC replica for them.
"""

from __future__ import annotations

import functools
from urllib.parse import quote

import aiohttp
import orjson
from google.protobuf.message import DecodeError

from core.kserve import HEADER_LENGTH, HEADER_LENGTH_LC, REGION_HEADER, REPLICA_HEADER, http_to_grpc
from core.tls import ClientTls
from gateway.upstream import translate
from gateway.upstream.http1_client import ConnectionPool, UpstreamConnectError
from gateway.upstream.proto_peek import ProtoError, peek_response_version
from gateway.upstream.types import InferCall, Reply
from health.outcomes import Outcome, classify_http_status

KEEPALIVE_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 2.0
# How far into an HTTP answer to look for "model_version" before parsing its JSON header.
VERSION_SCAN_BYTES = 512
_VERSION_KEY = b'"model_version":"'


def make_session(connections_per_replica: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=connections_per_replica,
                                     keepalive_timeout=KEEPALIVE_TIMEOUT_S, ttl_dns_cache=None,
                                     use_dns_cache=False, enable_cleanup_closed=False)
    # auto_decompress off: Content-Encoding passes through to the client untouched.
    return aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                 skip_auto_headers=("User-Agent", "Content-Type", "Accept-Encoding"),
                                 json_serialize=lambda o: orjson.dumps(o).decode())


@functools.lru_cache(maxsize=4096)
def infer_path(model: str, version: str | None) -> str:
    m = quote(model, safe="")
    if version:
        return f"/v2/models/{m}/versions/{quote(version, safe='')}/infer"
    return f"/v2/models/{m}/infer"


def response_version(body: bytes, header_len: str | None) -> str:
    """model_version of a KServe v2 JSON answer without parsing all of it: servers write it
    near the start; fall back to parsing the JSON header."""
    i = body.find(_VERSION_KEY, 0, VERSION_SCAN_BYTES)
    if i >= 0:
        start = i + len(_VERSION_KEY)
        end = body.find(b'"', start, start + 64)
        if end > 0:
            return body[start:end].decode(errors="replace")
    try:
        head = orjson.loads(body[: int(header_len)] if header_len else body)
        return str(head.get("model_version", ""))
    except (orjson.JSONDecodeError, ValueError, AttributeError):
        return ""


def error_text(body: bytes, status: int) -> str:
    try:
        msg = orjson.loads(body).get("error")
        if msg:
            return str(msg)
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        pass
    return body[:300].decode(errors="replace") or f"HTTP {status}"


def _failure(exc: BaseException, address: str, timeout_s: float) -> Reply:
    if isinstance(exc, UpstreamConnectError | aiohttp.ClientConnectorError):
        return Reply(Outcome.CONNECT_FAILURE, 503, message=f"cannot connect to replica {address}: {exc}")
    if isinstance(exc, TimeoutError):
        return Reply(Outcome.TIMEOUT, 504, message=f"replica {address} did not answer within "
                                                    f"{timeout_s * 1000:.0f} ms")
    return Reply(Outcome.RESET, 503, message=f"connection to replica {address} failed: "
                                              f"{type(exc).__name__}: {exc}")


def _unsendable(exc: UnicodeEncodeError) -> Reply:
    """A header value HTTP/1.1 cannot carry (the fronts refuse these first: never the replica's fault)."""
    return Reply(Outcome.CLIENT_ERROR, 400, http_to_grpc(400),
                 message=f"a request header value cannot be sent on HTTP/1.1 (not latin-1): {exc.object[:40]!r}")


class HttpUpstream:
    scheme = "http"

    def __init__(self, address: str, session: aiohttp.ClientSession, *, connections: int,
                 tls: ClientTls | None = None) -> None:
        self.address = address
        self.tls = tls  # [tls.upstream] (replicas) or [tls.peers] (peer gateways); None: plaintext
        self.base = self.tls.http_base(address) if self.tls is not None else f"http://{address}"
        self._ssl = self.tls.ssl_context if self.tls is not None else True  # aiohttp's default
        self.session = session  # metadata, config, statistics
        self.pool = ConnectionPool(address, max_connections=connections, connect_timeout_s=CONNECT_TIMEOUT_S,
                                   ssl_context=self.tls.ssl_context if self.tls is not None else None)

    async def infer_http(self, call: InferCall, timeout_s: float, extra_headers: dict[str, str]) -> Reply:
        headers = extra_headers
        if call.header_len is not None:
            headers[HEADER_LENGTH] = call.header_len
        if call.content_encoding:
            headers["Content-Encoding"] = call.content_encoding
        if call.accept_encoding:
            headers["Accept-Encoding"] = call.accept_encoding
        try:
            resp = await self.pool.post(infer_path(call.model, call.version), call.body, headers, timeout_s)
        except (ConnectionError, TimeoutError, OSError) as exc:
            return _failure(exc, self.address, timeout_s)
        except UnicodeEncodeError as exc:
            return _unsendable(exc)
        status, rh, data = resp.status, resp.headers, resp.body
        outcome = classify_http_status(status)
        hl = rh.get(HEADER_LENGTH_LC)
        if outcome is Outcome.SUCCESS:
            enc = rh.get("content-encoding")
            version = "" if enc else response_version(data, hl)
            if enc and not version:
                try:
                    plain = translate.decode_body(data, enc)
                    version = response_version(plain, hl)
                except translate.TranslateError:
                    version = ""
            # geogate-region/-replica: only a peer gateway sends them (who really served).
            return Reply(outcome, status, body=data, header_len=hl, content_type=rh.get("content-type"),
                         content_encoding=enc, model_version=version, region=rh.get(REGION_HEADER, ""),
                         replica=rh.get(REPLICA_HEADER, ""))
        return Reply(outcome, status, grpc_code=http_to_grpc(status), message=error_text(data, status),
                     body=data, content_type=rh.get("content-type"), region=rh.get(REGION_HEADER, ""),
                     replica=rh.get(REPLICA_HEADER, ""))

    async def infer_grpc(self, call: InferCall, timeout_s: float, extra_headers: dict[str, str]) -> Reply:
        """A gRPC client's request, translated to HTTP binary for this replica."""
        try:
            model, version, body, hl = translate.grpc_request_to_http(call.raw)
        except (translate.TranslateError, ValueError, DecodeError) as exc:
            return Reply(Outcome.CLIENT_ERROR, 400, http_to_grpc(400),
                         message=f"cannot translate the request for an HTTP replica: {exc}")
        headers = extra_headers
        headers[HEADER_LENGTH] = hl
        try:
            resp = await self.pool.post(infer_path(model, version or None), body, headers, timeout_s)
        except (ConnectionError, TimeoutError, OSError) as exc:
            r = _failure(exc, self.address, timeout_s)
            r.grpc_code = http_to_grpc(r.http_status)
            return r
        except UnicodeEncodeError as exc:
            return _unsendable(exc)
        status, rh, data = resp.status, resp.headers, resp.body
        outcome = classify_http_status(status)
        if outcome is not Outcome.SUCCESS:
            return Reply(outcome, status, http_to_grpc(status), message=error_text(data, status))
        try:
            raw = translate.http_response_to_grpc(data, rh.get(HEADER_LENGTH_LC), rh.get("content-encoding"))
            version = peek_response_version(raw)
        except (translate.TranslateError, ValueError, KeyError, TypeError, AttributeError, ProtoError) as exc:
            # orjson errors are ValueErrors; a JSON answer of the wrong shape, Type/Attribute/KeyErrors
            return Reply(Outcome.SERVER_ERROR, 502, http_to_grpc(500),
                         message=f"replica {self.address} sent an unreadable answer: {type(exc).__name__}: {exc}")
        return Reply(outcome, 200, body=raw, model_version=version)

    async def get_json(self, path: str, timeout_s: float) -> tuple[int, dict | None]:
        """GET (or POST for repository calls) a small JSON resource; status 0 on no answer."""
        try:
            async with self.session.get(self.base + path, ssl=self._ssl,
                                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                data = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError):
            return 0, None
        try:
            return status, orjson.loads(data) if data else {}
        except orjson.JSONDecodeError:
            return status, {"error": data[:300].decode(errors="replace")}

    async def close(self) -> None:
        await self.pool.close()  # the session is shared and closed with the region's pools
