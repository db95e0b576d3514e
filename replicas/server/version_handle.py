"""One loaded model version: its completed config, signature, sessions, scheduler and statistics.

A handle is swapped into the repository only once its sessions are fully loaded; when it is
retired (unload, or replaced by a reload) new requests stop finding it, and it closes its
sessions only after the requests that already hold it have finished (`drain_and_close`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from replicas.server.batcher import Scheduler
from replicas.server.metrics import ReplicaMetrics
from replicas.server.model_config import config_to_json
from replicas.server.model_stats import VersionStats
from replicas.server.onnx_runner import OrtRunner
from replicas.server.signature import ModelSignature

log = logging.getLogger("geogate.replica.repository")


class VersionHandle:
    def __init__(self, *, model: str, version: int, config: mc.ModelConfig, runner: OrtRunner,
                 metrics: ReplicaMetrics, fingerprints: frozenset[bytes], file_stamp: tuple[int, int]):
        self.model = model
        self.version = version
        self.version_str = str(version)
        self.config = config
        self.config_json: dict[str, Any] = config_to_json(config)
        self.runner = runner
        self.provider = runner.provider
        self.signature = ModelSignature(config, version)
        # Run only the configured outputs, in config order (what "all outputs" answers list).
        self.output_names = [o.name for o in config.output]
        runner.output_names = self.output_names
        self.fingerprints = fingerprints
        self.file_stamp = file_stamp
        self.stats = VersionStats()
        self._metrics = metrics
        self._batch_hist = metrics.batch_size.labels(model, self.version_str)
        batching = config.HasField("dynamic_batching")
        self.scheduler = Scheduler(
            runner, batching=batching, max_batch_size=config.max_batch_size,
            max_queue_delay_us=config.dynamic_batching.max_queue_delay_microseconds if batching else 0,
            slots=runner.count, on_batch=self._on_batch)
        # The queue depth is read when metrics are scraped, not pushed to the gauge twice per batch
        # (each push takes the gauge's lock, on the loop and on a batcher thread). A reload's new
        # handle of the same version takes the gauge over (before, the last writer won).
        scheduler = self.scheduler
        metrics.queue_depth.labels(model, self.version_str).set_function(lambda: scheduler.queue_depth)
        self._inflight_gauge = metrics.inflight.labels(model, self.version_str)
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _on_batch(self, rows: int, compute_ns: int) -> None:
        self._batch_hist.observe(rows)
        self.stats.record_batch(rows, compute_ns)

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()
        self._inflight_gauge.inc()

    def exit(self) -> None:
        self.inflight -= 1
        self._inflight_gauge.dec()
        if self.inflight == 0:
            self._idle.set()

    async def drain_and_close(self, timeout_s: float, *, forget_metrics: bool = True) -> None:
        """Wait (bounded) for requests holding this handle, then free the sessions. `forget_metrics`
        is False when a reload put a new handle of the same version in its place (same labels)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("drain timed out; closing with requests in flight", extra={"fields": {
                "model": self.model, "version": self.version, "inflight": self.inflight}})
        self.scheduler.close()
        await asyncio.to_thread(self.runner.close)
        if forget_metrics:
            self._metrics.version_unloaded(self.model, self.version_str, self.provider)
