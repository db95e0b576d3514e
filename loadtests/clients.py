"""KServe v2 request senders for the load generator: HTTP JSON, HTTP binary tensors, gRPC.

Every request body is built once per input (the verifier's fixed input set) and reused, so the
client spends its CPU on sending, not on encoding. Each `infer` returns a `Result`: whether the
request succeeded (status AND a verified answer), its latency measured from the INTENDED send
time the caller passes (open-loop: no coordinated omission), the `geogate-region`,
`geogate-replica` and `geogate-model-version` the answer carried, and the failure reason.

Failure reasons are short and low-cardinality ("http 503", "grpc UNAVAILABLE", "timeout",
"connect failed", "connection reset", "wrong answer (not version 2)"): they are keys of the
per-second timeline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import orjson

from core.kserve import HEADER_LENGTH, MODEL_VERSION_HEADER, REGION_HEADER, REPLICA_HEADER, TIMEOUT_HEADER
from loadtests.verify import REASON_BAD_OUTPUT, Verifier

PROTOCOLS = ("http", "http-binary", "grpc")
GRPC_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_PORTS = {"http": 8000, "http-binary": 8000, "grpc": 8001}

REASON_TIMEOUT = "timeout"
REASON_CONNECT = "connect failed"
REASON_RESET = "connection reset"


@dataclass(slots=True)
class Result:
    ok: bool
    latency_s: float
    region: str = ""
    replica: str = ""
    model_version: str = ""
    reason: str = ""


class TargetError(ValueError):
    """The target URL is unusable (not loopback, bad port, wrong scheme)."""


def parse_target(url: str, protocol: str) -> tuple[str, int]:
    """HOST, PORT of `url` ("http://127.0.0.1:8000", "grpc://127.0.0.1:8001" or "127.0.0.1:8001").

    Only loopback targets are accepted: a load generator pointed at someone else's server by a
    typo is an attack, not a benchmark."""
    if protocol not in PROTOCOLS:
        raise TargetError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    parts = urlsplit(url if "://" in url else f"x://{url}")
    if parts.path not in ("", "/"):
        raise TargetError(f"target {url!r} must be a base URL without a path (the client adds /v2/...)")
    host = parts.hostname or ""
    try:
        port = parts.port or DEFAULT_PORTS[protocol]
    except ValueError as exc:
        raise TargetError(f"target {url!r}: bad port ({exc})") from exc
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise TargetError(f"target {url!r}: host {host!r} is not a loopback address; the load generator "
                          f"only sends to 127.0.0.1")
    return host, port


async def verify(verifier: Verifier, index: int, version: str, output: np.ndarray | None) -> str:
    """`verifier.check`, computing a newly seen version's reference outputs off the event loop."""
    if verifier.needs_compute(version):
        await asyncio.to_thread(verifier.expected, verifier.assume_version or version)
    return verifier.check(index, version, output)


def _http_failure_reason(exc: BaseException) -> str:
    import aiohttp

    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return REASON_TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return REASON_CONNECT
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | aiohttp.ClientPayloadError
                  | ConnectionError):
        return REASON_RESET
    return type(exc).__name__


class _HttpClient:
    """Shared part of the two HTTP senders: one aiohttp session, prebuilt bodies, header parsing."""

    def __init__(self, url: str, protocol: str, verifier: Verifier, *, model_version: str = "",
                 timeout_s: float = 10.0, max_connections: int = 0):
        host, port = parse_target(url, protocol)
        version_part = f"/versions/{model_version}" if model_version else ""
        self.url = f"http://{host}:{port}/v2/models/{verifier.model}{version_part}/infer"
        self.verifier = verifier
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.session = None
        self.bodies: list[tuple[bytes, dict[str, str]]] = []

    async def start(self) -> None:
        import aiohttp

        # limit 0: no connection cap of its own, so requests never queue silently inside aiohttp;
        # the generator's in-flight cap (open loop) or concurrency (closed loop) is the bound.
        connector = aiohttp.TCPConnector(limit=self.max_connections)
        self.session = aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                             skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def infer(self, index: int, intended_s: float) -> Result:
        body, headers = self.bodies[index % len(self.bodies)]
        try:
            async with self.session.post(self.url, data=body, headers=headers) as resp:
                data = await resp.read()
                latency_s = time.monotonic() - intended_s
                rh = resp.headers
                status = resp.status
        except Exception as exc:  # every transport failure is a counted outcome
            return Result(False, time.monotonic() - intended_s, reason=_http_failure_reason(exc))
        region, replica = rh.get(REGION_HEADER, ""), rh.get(REPLICA_HEADER, "")
        version = rh.get(MODEL_VERSION_HEADER, "")
        if status != 200:
            return Result(False, latency_s, region, replica, version, f"http {status}")
        try:
            output, body_version = self.decode(data, rh.get(HEADER_LENGTH))
        except (ValueError, KeyError, TypeError, IndexError):
            return Result(False, latency_s, region, replica, version, REASON_BAD_OUTPUT)
        version = version or body_version
        reason = await verify(self.verifier, index, version, output)
        return Result(not reason, latency_s, region, replica, version, reason)

    def decode(self, data: bytes, header_length: str | None) -> tuple[np.ndarray, str]:
        raise NotImplementedError

    def _find_output(self, header: dict) -> dict:
        for out in header["outputs"]:
            if out["name"] == self.verifier.output_name:
                return out
        raise KeyError(self.verifier.output_name)


class HttpJsonClient(_HttpClient):
    """Tensors as JSON numbers, both ways."""

    def __init__(self, url: str, verifier: Verifier, **kw):
        super().__init__(url, "http", verifier, **kw)
        headers = {"Content-Type": "application/json", TIMEOUT_HEADER: str(int(self.timeout_s * 1000))}
        for x in verifier.inputs:
            body = {"inputs": [{"name": verifier.input_name, "shape": list(x.shape), "datatype": "FP32",
                                "data": x.ravel().tolist()}],
                    "outputs": [{"name": verifier.output_name}]}
            self.bodies.append((orjson.dumps(body), headers))

    def decode(self, data: bytes, header_length: str | None) -> tuple[np.ndarray, str]:
        header = orjson.loads(data)
        out = self._find_output(header)
        return np.asarray(out["data"], dtype=np.float32), str(header.get("model_version", ""))


class HttpBinaryClient(_HttpClient):
    """Triton's binary tensor extension: JSON header + raw blobs, built by tritonclient once."""

    def __init__(self, url: str, verifier: Verifier, **kw):
        super().__init__(url, "http-binary", verifier, **kw)
        import tritonclient.http as httpclient

        for x in verifier.inputs:
            inp = httpclient.InferInput(verifier.input_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            out = httpclient.InferRequestedOutput(verifier.output_name, binary_data=True)
            body, json_size = httpclient.InferenceServerClient.generate_request_body([inp], outputs=[out])
            headers = {"Content-Type": "application/octet-stream", TIMEOUT_HEADER: str(int(self.timeout_s * 1000))}
            if json_size is not None:
                headers[HEADER_LENGTH] = str(json_size)
            self.bodies.append((bytes(body), headers))

    def decode(self, data: bytes, header_length: str | None) -> tuple[np.ndarray, str]:
        json_len = int(header_length) if header_length else len(data)
        header = orjson.loads(data[:json_len])
        # Binary outputs follow the JSON header in output order; find ours by walking sizes.
        offset = json_len
        for out in header["outputs"]:
            size = (out.get("parameters") or {}).get("binary_data_size")
            if out["name"] == self.verifier.output_name:
                if size is None:  # the server answered in JSON after all
                    return np.asarray(out["data"], dtype=np.float32), str(header.get("model_version", ""))
                return (np.frombuffer(data[offset:offset + size], dtype=np.float32),
                        str(header.get("model_version", "")))
            offset += size or 0
        raise KeyError(self.verifier.output_name)


class GrpcClient:
    """grpc.aio with ModelInferRequest serialized once per input (raw_input_contents)."""

    def __init__(self, url: str, verifier: Verifier, *, model_version: str = "", timeout_s: float = 10.0,
                 channels: int = 1, **_ignored):
        from tritonclient.grpc import service_pb2

        host, port = parse_target(url, "grpc")
        self.target = f"{host}:{port}"
        self.verifier = verifier
        self.timeout_s = timeout_s
        self.n_channels = max(1, channels)
        self._response_type = service_pb2.ModelInferResponse
        self.requests: list[bytes] = []
        for x in verifier.inputs:
            req = service_pb2.ModelInferRequest(model_name=verifier.model, model_version=model_version)
            tensor = req.inputs.add()
            tensor.name = verifier.input_name
            tensor.datatype = "FP32"
            tensor.shape.extend(x.shape)
            req.outputs.add().name = verifier.output_name
            req.raw_input_contents.append(x.tobytes())
            self.requests.append(req.SerializeToString())
        self.channels: list = []
        self.methods: list = []
        self._next = 0

    async def start(self) -> None:
        import grpc

        options = [("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
                   # separate channels must not share one subchannel (one TCP connection)
                   ("grpc.use_local_subchannel_pool", 1)]
        for _ in range(self.n_channels):
            ch = grpc.aio.insecure_channel(self.target, options=options)
            self.channels.append(ch)
            # request_serializer None: the request is already bytes
            self.methods.append(ch.unary_unary(GRPC_INFER_METHOD, request_serializer=None,
                                               response_deserializer=self._response_type.FromString))

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()

    async def infer(self, index: int, intended_s: float) -> Result:
        import grpc

        self._next = (self._next + 1) % self.n_channels
        call = self.methods[self._next](self.requests[index % len(self.requests)], timeout=self.timeout_s)
        region = replica = version = ""
        try:
            resp = await call
            latency_s = time.monotonic() - intended_s
            for key, value in await call.initial_metadata() or ():
                if key == REGION_HEADER:
                    region = value
                elif key == REPLICA_HEADER:
                    replica = value
                elif key == MODEL_VERSION_HEADER:
                    version = value
        except grpc.aio.AioRpcError as exc:
            latency_s = time.monotonic() - intended_s
            try:
                for key, value in exc.initial_metadata() or ():
                    if key == REGION_HEADER:
                        region = value
                    elif key == REPLICA_HEADER:
                        replica = value
            except Exception:  # metadata is a nicety on failures
                pass
            code = exc.code()
            reason = REASON_TIMEOUT if code == grpc.StatusCode.DEADLINE_EXCEEDED else f"grpc {code.name}"
            return Result(False, latency_s, region, replica, version, reason)
        except Exception as exc:
            return Result(False, time.monotonic() - intended_s, reason=type(exc).__name__)
        version = version or resp.model_version
        output = None
        for i, out in enumerate(resp.outputs):
            if out.name == self.verifier.output_name and i < len(resp.raw_output_contents):
                output = np.frombuffer(resp.raw_output_contents[i], dtype=np.float32)
        reason = await verify(self.verifier, index, version, output)
        return Result(not reason, latency_s, region, replica, version, reason)


def make_client(protocol: str, url: str, verifier: Verifier, *, model_version: str = "",
                timeout_s: float = 10.0, max_connections: int = 0, grpc_channels: int = 1):
    """A started-later client for `protocol` (call `await client.start()` inside the event loop)."""
    if protocol == "http":
        return HttpJsonClient(url, verifier, model_version=model_version, timeout_s=timeout_s,
                              max_connections=max_connections)
    if protocol == "http-binary":
        return HttpBinaryClient(url, verifier, model_version=model_version, timeout_s=timeout_s,
                                max_connections=max_connections)
    if protocol == "grpc":
        return GrpcClient(url, verifier, model_version=model_version, timeout_s=timeout_s,
                          channels=grpc_channels)
    raise TargetError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
