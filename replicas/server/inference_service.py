"""The protocol-independent inference path shared by the HTTP and gRPC servers.

resolve model version -> decode + validate (protocol codec) -> test faults -> scheduler
(batching, ORT off the loop) -> pick requested outputs -> encode (protocol codec), with
metrics, per-version statistics and in-flight tracking around it. Every failure becomes an
InferError carrying the HTTP status (and so the gRPC code) the client gets. Refusals are logged
as one warning line each, rate-limited (a client sending malformed requests in a loop cannot
flood the log); unexpected failures keep their traceback, rate-limited as well.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from replicas.server.infer_errors import InferError, LogLimiter, one_line, unavailable
from replicas.server.metrics import UNKNOWN, ReplicaMetrics
from replicas.server.repository import ModelRepository
from replicas.server.signature import ModelSignature
from replicas.server.v2_codec import DecodedRequest, select_outputs
from replicas.server.version_handle import VersionHandle

log = logging.getLogger("geogate.replica.infer")

T = TypeVar("T")
INJECTED_STATUS_MIN, INJECTED_STATUS_MAX = 400, 599
CLIENT_CANCELLED = 499
# separate budgets: a flood of one kind does not hide the others
_refused_log = LogLimiter(log)
_unavailable_log = LogLimiter(log)
_failed_log = LogLimiter(log)


class FaultSwitch:
    """Test-only behaviour changes for inference on both protocols (off unless --enable-test-faults)."""

    def __init__(self) -> None:
        self.delay_ms = 0
        self.status = 0
        self.hang = False
        self._released = asyncio.Event()
        self._released.set()

    @property
    def active(self) -> bool:
        return bool(self.delay_ms or self.status or self.hang)

    def set(self, *, delay_ms: int = 0, status: int = 0, hang: bool = False) -> None:
        if status and not INJECTED_STATUS_MIN <= status <= INJECTED_STATUS_MAX:
            raise ValueError(f"status must be 0 (off) or an HTTP error status {INJECTED_STATUS_MIN}-"
                             f"{INJECTED_STATUS_MAX}, got {status}")
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        self.delay_ms, self.status, self.hang = delay_ms, status, hang
        if hang:
            self._released.clear()
        else:
            self._released.set()

    def describe(self) -> dict[str, int | bool]:
        return {"delay_ms": self.delay_ms, "status": self.status, "hang": self.hang}

    async def apply(self) -> None:
        while self.hang:
            await self._released.wait()
        if self.delay_ms:
            await asyncio.sleep(self.delay_ms / 1000)
        if self.status:
            raise InferError(self.status, f"injected fault: status {self.status}")


class InferenceService:
    def __init__(self, repository: ModelRepository, metrics: ReplicaMetrics, faults: FaultSwitch | None):
        self.repository = repository
        self.metrics = metrics
        self.faults = faults
        self.inflight = 0
        self.idle = asyncio.Event()  # set whenever no inference is in flight (shutdown waits on it)
        self.idle.set()

    async def infer(self, protocol: str, model: str, version: str,
                    decode: Callable[[ModelSignature], DecodedRequest],
                    encode: Callable[[ModelSignature, str, list], T],
                    request_id: str = "") -> tuple[VersionHandle, T]:
        """Run one request end to end; raises InferError (already counted in metrics)."""
        started = time.perf_counter()
        handle: VersionHandle | None = None
        self.inflight += 1
        self.idle.clear()
        try:
            if self.repository.draining:
                raise unavailable("the server is shutting down")
            handle = self.repository.get(model, version)
            handle.enter()
            try:
                req = decode(handle.signature)
                if self.faults is not None and self.faults.active:
                    await self.faults.apply()
                outcome = await handle.scheduler.submit(req.feeds, req.rows, req.key)
                result = encode(handle.signature, req.id, select_outputs(handle.output_names,
                                                                         outcome.outputs, req))
            finally:
                handle.exit()
        except InferError as exc:
            self._failed(protocol, handle, started, exc, request_id)
            raise
        except asyncio.CancelledError:
            self._failed(protocol, handle, started, InferError(CLIENT_CANCELLED, "client cancelled"), request_id)
            raise
        except Exception as exc:
            err = InferError(500, f"inference failed for model '{model}': {one_line(str(exc))}")
            _failed_log.log(logging.ERROR, "inference failed", {"model": model, "version": version,
                                                                "request_id": request_id}, exc_info=exc)
            self._failed(protocol, handle, started, err, request_id)
            raise err from None
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()
        elapsed_s = time.perf_counter() - started
        self.metrics.observe(model, handle.version_str, protocol, "success", elapsed_s)
        handle.stats.record_success(rows=req.rows, total_ns=int(elapsed_s * 1e9), queue_ns=outcome.queue_ns,
                                    compute_ns=outcome.compute_ns)
        if request_id and log.isEnabledFor(logging.DEBUG):
            log.debug("inference", extra={"fields": {"request_id": request_id, "model": model,
                                                     "version": handle.version_str, "protocol": protocol,
                                                     "ms": round(elapsed_s * 1000, 3)}})
        return handle, result

    def _failed(self, protocol: str, handle: VersionHandle | None, started: float, exc: InferError,
                request_id: str) -> None:
        elapsed_s = time.perf_counter() - started
        outcome = "fault" if exc.message.startswith("injected fault") else exc.outcome
        if handle is not None:
            self.metrics.observe(handle.model, handle.version_str, protocol, outcome, elapsed_s)
            handle.stats.record_failure(int(elapsed_s * 1e9))
        else:
            self.metrics.observe(UNKNOWN, UNKNOWN, protocol, outcome, elapsed_s)
        if exc.http_status == CLIENT_CANCELLED:
            return
        limiter = _unavailable_log if exc.http_status >= 500 else _refused_log
        limiter.warning("inference refused", {"request_id": one_line(request_id, 100), "protocol": protocol,
                                              "status": exc.http_status, "error": one_line(exc.message)})
