"""Clients for a replica's repository API (KServe repository extension): load a model with a
config override and read the repository index, over HTTP (aiohttp) or gRPC, optionally with TLS
(``[tls.upstream]``, mutual when it names a client certificate) and a control token."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import grpc
import orjson
from tritonclient.grpc import service_pb2, service_pb2_grpc

from core.tls import ClientTls

INDEX_TIMEOUT_S = 5.0
GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ReplicaError(Exception):
    """The replica refused or could not be reached; the message says which and why.
    ``reachable``: False when it did not answer at all (down, timeout), True when it refused."""

    def __init__(self, message: str, *, reachable: bool):
        super().__init__(message)
        self.reachable = reachable


@dataclass(frozen=True)
class VersionState:
    state: str  # READY, LOADING, UNAVAILABLE, ...
    reason: str


Index = dict[str, dict[str, VersionState]]  # model -> version -> state


def _address(url: str) -> str:
    return url.partition("://")[2].rstrip("/")


def _bearer(token: str) -> str:
    return f"Bearer {token}"


class HttpReplica:
    """A replica's repository API over HTTP. With `tls` the replica is reached over HTTPS
    whatever its URL's scheme says (as the gateway does with ``[tls.upstream]``)."""

    def __init__(self, url: str, control_token: str = "", *, tls: ClientTls | None = None):
        self.url = url
        address = _address(url)
        self._ssl = tls.ssl_context if tls is not None else None
        if tls is not None:
            self._base = tls.http_base(address)
        else:
            self._base = ("https://" if url.startswith("https://") else "http://") + address
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "application/json"}
        if control_token:
            self._headers["Authorization"] = _bearer(control_token)

    async def _post(self, path: str, body: dict, timeout_s: float) -> bytes:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl is not None else None
            self._session = aiohttp.ClientSession(connector=connector)
        try:
            async with self._session.post(self._base + path, data=orjson.dumps(body), headers=self._headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                data = await resp.read()
                if resp.status != 200:
                    try:
                        msg = orjson.loads(data).get("error", "")
                    except (orjson.JSONDecodeError, AttributeError):
                        msg = data[:200].decode(errors="replace")
                    raise ReplicaError(f"{self.url}: HTTP {resp.status}: {msg}", reachable=True)
                return data
        except (aiohttp.ClientError, OSError) as exc:
            raise ReplicaError(f"{self.url}: unreachable: {type(exc).__name__}: {exc}", reachable=False) from None
        except TimeoutError:
            raise ReplicaError(f"{self.url}: no answer within {timeout_s:.0f} s", reachable=False) from None

    async def load(self, model: str, config_json: str, timeout_s: float) -> None:
        await self._post(f"/v2/repository/models/{model}/load", {"parameters": {"config": config_json}},
                         timeout_s)

    async def index(self) -> Index:
        out: Index = {}
        for r in orjson.loads(await self._post("/v2/repository/index", {}, INDEX_TIMEOUT_S)):
            if r.get("version"):
                out.setdefault(r["name"], {})[str(r["version"])] = VersionState(r.get("state", ""),
                                                                                r.get("reason", ""))
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class GrpcReplica:
    """A replica's repository API over gRPC; with `tls` over a secure channel (client
    certificate included when ``[tls.upstream]`` names one)."""

    def __init__(self, url: str, control_token: str = "", *, tls: ClientTls | None = None):
        self.url = url
        self._metadata = (("authorization", _bearer(control_token)),) if control_token else None
        opts = [("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES)]
        addr = _address(url)
        if tls is not None:
            self._channel = tls.grpc_channel(addr, opts)
        elif url.startswith("grpcs://"):
            self._channel = grpc.aio.secure_channel(addr, grpc.ssl_channel_credentials(), options=opts)
        else:
            self._channel = grpc.aio.insecure_channel(addr, options=opts)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def load(self, model: str, config_json: str, timeout_s: float) -> None:
        req = service_pb2.RepositoryModelLoadRequest(model_name=model)
        req.parameters["config"].string_param = config_json
        try:
            await self._stub.RepositoryModelLoad(req, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _grpc_error(self.url, exc) from None

    async def index(self) -> Index:
        try:
            resp = await self._stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=INDEX_TIMEOUT_S,
                                                    metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _grpc_error(self.url, exc) from None
        out: Index = {}
        for m in resp.models:
            if m.version:
                out.setdefault(m.name, {})[m.version] = VersionState(m.state, m.reason)
        return out

    async def close(self) -> None:
        await self._channel.close()


def _grpc_error(url: str, exc: grpc.aio.AioRpcError) -> ReplicaError:
    down = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return ReplicaError(f"{url}: {exc.code().name}: {exc.details()}", reachable=not down)


ReplicaClient = HttpReplica | GrpcReplica


def replica_client(url: str, control_token: str = "", *, tls: ClientTls | None = None) -> ReplicaClient:
    """The replica's protocol is its URL's scheme (DESIGN.md: Configuration); `control_token`:
    presented on its repository API (the pool's control_token_file); `tls`: ``[tls.upstream]``
    (None: plaintext unless the URL says https/grpcs)."""
    scheme = url.partition("://")[0]
    if scheme in ("http", "https"):
        return HttpReplica(url, control_token, tls=tls)
    if scheme in ("grpc", "grpcs"):
        return GrpcReplica(url, control_token, tls=tls)
    raise ValueError(f"replica URL {url!r}: scheme must be http or grpc")
