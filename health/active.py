"""Active health checks: probe every replica on a timer, HAProxy/Envoy style rise/fall.

One asyncio task per replica. Each probe, bounded by ``timeout_ms`` as a whole:
- HTTP replicas: ``GET /v2/health/ready`` (200 = ready), then ``POST /v2/repository/index``
  with ``{"ready": true}``: the READY ``{"name", "version", "state"}`` entries become
  ``ready_versions``.
- gRPC replicas: ``grpc.health.v1.Health/Check`` with service "" (SERVING = ready; a server
  without the health service is asked ``ServerReady`` instead), then
  ``inference.GRPCInferenceService/RepositoryIndex`` with ``ready=True``.
A replica without the repository extension (index answers 404/400/501 or UNIMPLEMENTED) is
still checked for readiness; its ``ready_versions`` are then unknown
(``ready_versions_known = False``) and ``has_model()`` says yes to any model: the replica
itself answers 404 for a model it lacks, which is the client's error, not the replica's.

Rise/fall: a replica never seen healthy becomes healthy at its first successful probe (so a
fresh gateway serves quickly); afterwards it takes ``fall`` failed probes in a row to mark it
unhealthy and ``rise`` good ones to bring it back. Ready versions are refreshed on every good
probe and kept through failures (panic routing still knows what a replica had).

Each replica keeps one aiohttp session (keep-alive) or one grpc.aio channel, reused across
probes; probes are spaced ``interval_ms`` apart with a little jitter so they don't align.
A probe that raises anything counts as a failed probe with a readable reason; the loop never
dies of it. ``on_change(state)`` (plain function or coroutine function) is called when
``healthy`` flips or the ready versions change.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import grpc
import orjson
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2

from core.config import HealthSection
from core.tls import ClientTls
from health.replica_state import ReplicaState

log = logging.getLogger("geogate.health.active")

MS_PER_S = 1000.0
JITTER_FRACTION = 0.1  # each wait is interval * (1 +- this), and the first probe waits up to this
RTT_EWMA_ALPHA = 0.3  # weight of the newest probe round trip in probe_rtt_ewma_s
REASON_BODY_MAX_CHARS = 200
GRPC_RECONNECT_MIN_MS = 100  # a restarted replica is seen within about one interval, not after
# gRPC's default reconnect backoff (1 s growing to 120 s)
GRPC_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
HTTP_CONNECTIONS_PER_REPLICA = 2
INDEX_UNSUPPORTED_HTTP = (400, 404, 405, 501)

HTTP_READY_PATH = "/v2/health/ready"
HTTP_INDEX_PATH = "/v2/repository/index"
GRPC_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
GRPC_SERVER_READY = "/inference.GRPCInferenceService/ServerReady"
GRPC_REPOSITORY_INDEX = "/inference.GRPCInferenceService/RepositoryIndex"
READY_STATE = "READY"

OnChange = Callable[[ReplicaState], Awaitable[None] | None]


@dataclass
class ProbeResult:
    ok: bool
    cause: str = ""  # short, countable ("probe timeout")
    reason: str = ""  # operator-readable ("probe timeout after 500 ms")
    ready_versions: dict[str, set[str]] = field(default_factory=dict)
    versions_known: bool = False
    rtt_s: float = 0.0


class ProbeFailed(Exception):
    def __init__(self, cause: str, reason: str = ""):
        super().__init__(reason or cause)
        self.cause = cause
        self.reason = reason or cause


# ---------------------------------------------------------------------- probers


class _HttpProber:
    """Readiness + repository index over one keep-alive aiohttp session."""

    def __init__(self, address: str, tls: ClientTls | None):
        self.base = tls.http_base(address) if tls is not None else f"http://{address}"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=HTTP_CONNECTIONS_PER_REPLICA,
                                           ssl=tls.ssl_context if tls is not None else True),
            timeout=aiohttp.ClientTimeout(total=None),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )

    async def probe(self) -> ProbeResult:
        t0 = time.monotonic()
        try:
            async with self.session.get(self.base + HTTP_READY_PATH) as resp:
                body = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            raise _connect_failure(exc) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError) as exc:
            raise ProbeFailed("connection reset", f"connection reset ({_describe(exc)})") from exc
        rtt_s = time.monotonic() - t0
        if status != 200:
            raise ProbeFailed(f"readiness {status}", f"readiness {status}: {_error_text(body)}")
        try:
            async with self.session.post(self.base + HTTP_INDEX_PATH, json={"ready": True}) as resp:
                body = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            raise _connect_failure(exc) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError) as exc:
            raise ProbeFailed("connection reset", f"connection reset ({_describe(exc)})") from exc
        if status in INDEX_UNSUPPORTED_HTTP:
            return ProbeResult(ok=True, versions_known=False, rtt_s=rtt_s)
        if status != 200:
            raise ProbeFailed(f"repository index {status}", f"repository index {status}: {_error_text(body)}")
        try:
            entries = orjson.loads(body)
            versions = _ready_versions((e.get("name"), e.get("version"), e.get("state")) for e in entries)
        except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
            raise ProbeFailed("bad repository index", f"bad repository index: {exc}") from exc
        return ProbeResult(ok=True, ready_versions=versions, versions_known=True, rtt_s=rtt_s)

    async def close(self) -> None:
        await self.session.close()


class _GrpcProber:
    """grpc.health.v1 Check + RepositoryIndex over one grpc.aio channel."""

    def __init__(self, address: str, interval_ms: int, tls: ClientTls | None):
        max_backoff_ms = max(GRPC_RECONNECT_MIN_MS, interval_ms)
        channel = tls.grpc_channel if tls is not None else grpc.aio.insecure_channel
        self.channel = channel(address, options=[
            ("grpc.initial_reconnect_backoff_ms", GRPC_RECONNECT_MIN_MS),
            ("grpc.min_reconnect_backoff_ms", GRPC_RECONNECT_MIN_MS),
            ("grpc.max_reconnect_backoff_ms", max_backoff_ms),
            ("grpc.enable_retries", 0),
            ("grpc.use_local_subchannel_pool", 1),  # never share a connection with the data path
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
        ])
        self._check = self.channel.unary_unary(
            GRPC_HEALTH_CHECK, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self._server_ready = self.channel.unary_unary(
            GRPC_SERVER_READY, request_serializer=service_pb2.ServerReadyRequest.SerializeToString,
            response_deserializer=service_pb2.ServerReadyResponse.FromString)
        self._index = self.channel.unary_unary(
            GRPC_REPOSITORY_INDEX, request_serializer=service_pb2.RepositoryIndexRequest.SerializeToString,
            response_deserializer=service_pb2.RepositoryIndexResponse.FromString)
        self._has_health_service = True

    async def probe(self, deadline: float) -> ProbeResult:
        t0 = time.monotonic()
        try:
            if self._has_health_service:
                try:
                    resp = await self._check(health_pb2.HealthCheckRequest(service=""),
                                             timeout=_remaining(deadline))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    log.info("no grpc.health.v1 service: using ServerReady for readiness")
                    self._has_health_service = False
                else:
                    if resp.status != health_pb2.HealthCheckResponse.SERVING:
                        status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                        raise ProbeFailed("not SERVING", f"not SERVING (health status {status})")
            if not self._has_health_service:
                ready = await self._server_ready(service_pb2.ServerReadyRequest(), timeout=_remaining(deadline))
                if not ready.ready:
                    raise ProbeFailed("not ready", "not ready (ServerReady false)")
            rtt_s = time.monotonic() - t0
            try:
                index = await self._index(service_pb2.RepositoryIndexRequest(ready=True),
                                          timeout=_remaining(deadline))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return ProbeResult(ok=True, versions_known=False, rtt_s=rtt_s)
                raise
        except grpc.aio.AioRpcError as exc:
            raise _grpc_failure(exc) from exc
        versions = _ready_versions((m.name, m.version, m.state) for m in index.models)
        return ProbeResult(ok=True, ready_versions=versions, versions_known=True, rtt_s=rtt_s)

    async def close(self) -> None:
        await self.channel.close()


# ---------------------------------------------------------------------- checker


class ActiveHealthChecker:
    def __init__(self, settings: HealthSection, *, tls: ClientTls | None = None, on_change: OnChange | None = None):
        self.settings = settings
        self.tls = tls  # [tls.upstream]: replicas serve TLS; None: plaintext
        self._on_change = on_change
        self._states: dict[str, ReplicaState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False

    @property
    def states(self) -> dict[str, ReplicaState]:
        return dict(self._states)

    @property
    def interval_s(self) -> float:
        return self.settings.interval_ms / MS_PER_S

    @property
    def timeout_s(self) -> float:
        return self.settings.timeout_ms / MS_PER_S

    def add(self, state: ReplicaState) -> None:
        """Start checking `state` (replacing any state with the same URL)."""
        if state.url in self._states and self._states[state.url] is not state:
            self.remove(state.url)
        self._states[state.url] = state
        if self._started and state.url not in self._tasks:
            self._spawn(state)

    def remove(self, url: str) -> None:
        """Stop checking `url`; its connection is closed by the task as it ends."""
        self._states.pop(url, None)
        task = self._tasks.pop(url, None)
        if task is not None:
            task.cancel()

    async def start(self) -> None:
        self._started = True
        for state in self._states.values():
            if state.url not in self._tasks:
                self._spawn(state)

    async def close(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ per replica loop

    def _spawn(self, state: ReplicaState) -> None:
        self._tasks[state.url] = asyncio.get_running_loop().create_task(
            self._run(state), name=f"health-check {state.url}")

    async def _run(self, state: ReplicaState) -> None:
        prober: _HttpProber | _GrpcProber
        prober = _HttpProber(state.address, self.tls) if state.scheme == "http" else _GrpcProber(
            state.address, self.settings.interval_ms, self.tls)
        try:
            # Spread first probes a little so replicas added together don't probe in lockstep.
            await asyncio.sleep(random.uniform(0.0, JITTER_FRACTION) * self.interval_s)
            while True:
                result = await self.probe(prober, state)
                await self._apply(state, result)
                jitter = random.uniform(1.0 - JITTER_FRACTION, 1.0 + JITTER_FRACTION)
                await asyncio.sleep(self.interval_s * jitter)
        finally:
            with contextlib.suppress(Exception):
                await prober.close()

    async def probe(self, prober: _HttpProber | _GrpcProber, state: ReplicaState) -> ProbeResult:
        """One probe, bounded by timeout_ms; never raises (but lets cancellation through)."""
        deadline = time.monotonic() + self.timeout_s
        try:
            async with asyncio.timeout(self.timeout_s):
                if isinstance(prober, _GrpcProber):
                    return await prober.probe(deadline)
                return await prober.probe()
        except ProbeFailed as exc:
            if exc.cause == "probe timeout":
                return self._timeout_result()
            return ProbeResult(ok=False, cause=exc.cause, reason=exc.reason)
        except TimeoutError:
            return self._timeout_result()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a probe bug must not kill the checker: count it as a failure
            if state.consecutive_probe_failures == 0:  # once per failing streak, not every interval
                log.exception("health probe of %s raised", state.url)
            return ProbeResult(ok=False, cause="probe error", reason=f"probe error: {_describe(exc)}")

    def _timeout_result(self) -> ProbeResult:
        return ProbeResult(ok=False, cause="probe timeout",
                           reason=f"probe timeout after {self.settings.timeout_ms} ms")

    async def _apply(self, state: ReplicaState, result: ProbeResult) -> None:
        if state.url not in self._states:
            return  # removed while the probe was in flight
        if self.record(state, result, time.monotonic()):
            await self._notify(state)

    def record(self, state: ReplicaState, result: ProbeResult, now_s: float) -> bool:
        """Apply one probe's result at `now_s` (the rise/fall rule above); returns whether
        `on_change` is due (health flipped or the ready versions changed). The probe loop calls
        it; so does the planet-scale simulation (loadtests.sim), on its own clock."""
        now = now_s
        state.last_probe_s = now
        was_healthy = state.healthy
        old_versions = (state.ready_versions_known, state.ready_versions)
        if result.ok:
            state.consecutive_probe_successes += 1
            state.consecutive_probe_failures = 0
            state.last_probe_error = ""
            state.probe_rtt_ewma_s = (result.rtt_s if state.probe_rtt_ewma_s == 0.0 else
                                      RTT_EWMA_ALPHA * result.rtt_s + (1 - RTT_EWMA_ALPHA) * state.probe_rtt_ewma_s)
            state.ready_versions = result.ready_versions
            state.ready_versions_known = result.versions_known
            if not state.healthy and (not state.ever_healthy
                                      or state.consecutive_probe_successes >= self.settings.rise):
                state.healthy = True
                state.ever_healthy = True
                state.health_reason = ""
                state.health_cause = ""
        else:
            state.consecutive_probe_failures += 1
            state.consecutive_probe_successes = 0
            state.last_probe_error = result.reason
            if state.healthy and state.consecutive_probe_failures >= self.settings.fall:
                state.healthy = False
            if not state.healthy:
                state.health_reason = result.reason
                state.health_cause = result.cause
        flipped = state.healthy != was_healthy
        if flipped:
            state.health_changed_s = now
            if state.healthy:
                log.info("replica %s is healthy (pool %r)", state.url, state.pool)
            else:
                log.warning("replica %s is unhealthy (pool %r): %s", state.url, state.pool, state.health_reason)
        return flipped or old_versions != (state.ready_versions_known, state.ready_versions)

    async def _notify(self, state: ReplicaState) -> None:
        if self._on_change is None:
            return
        try:
            maybe = self._on_change(state)
            if inspect.isawaitable(maybe):
                await maybe
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("health on_change callback failed for %s", state.url)


# ---------------------------------------------------------------------- helpers


def _remaining(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _ready_versions(entries) -> dict[str, set[str]]:
    versions: dict[str, set[str]] = {}
    for name, version, state in entries:
        if name and version not in (None, "") and (state or READY_STATE) == READY_STATE:
            versions.setdefault(str(name), set()).add(str(version))
    return versions


def _error_text(body: bytes) -> str:
    """The `error` of a KServe error body, else the body itself, shortened."""
    if not body:
        return "(empty body)"
    try:
        parsed = orjson.loads(body)
        if isinstance(parsed, dict) and "error" in parsed:
            return str(parsed["error"])[:REASON_BODY_MAX_CHARS]
    except orjson.JSONDecodeError:
        pass
    return body[:REASON_BODY_MAX_CHARS].decode(errors="replace")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _connect_failure(exc: aiohttp.ClientConnectorError) -> ProbeFailed:
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, ConnectionRefusedError) or getattr(os_error, "errno", None) == errno.ECONNREFUSED:
        return ProbeFailed("connect refused")
    detail = getattr(os_error, "strerror", None) or str(os_error or exc)
    return ProbeFailed("connect failed", f"connect failed: {detail}")


def _grpc_failure(exc: grpc.aio.AioRpcError) -> ProbeFailed:
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ProbeFailed("probe timeout", "probe timeout (gRPC deadline exceeded)")
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = details.lower()
        if "connection refused" in lowered:
            return ProbeFailed("connect refused")
        if "reset" in lowered or "socket closed" in lowered or "eof" in lowered:
            return ProbeFailed("connection reset", f"connection reset ({details})")
        return ProbeFailed("unavailable", f"unavailable: {details[:REASON_BODY_MAX_CHARS]}")
    return ProbeFailed(f"gRPC {code.name}", f"gRPC {code.name}: {details[:REASON_BODY_MAX_CHARS]}")
