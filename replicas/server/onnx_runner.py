"""ONNX Runtime sessions for one model version, run off the event loop.

One session per instance (instance_group count), each used by one thread at a time: the
scheduler's worker threads call `run_batch` (blocking), so up to `count` batches run in parallel
and never on the event loop. The execution provider is what the session really got
(`session.get_providers()[0]`), not what we asked for: asking for CUDA on a machine without a
usable GPU falls back to CPU silently.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort

from replicas.server.model_config import GraphTensor, graph_tensors

log = logging.getLogger("geogate.replica.ort")

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
DEFAULT_INTRA_OP_THREADS = 1
# ORT's logger: 3 = errors only (the CUDA fallback warnings are reported by us instead).
ORT_LOG_SEVERITY_ERROR = 3
MIN_BUFFER_ROWS = 8
MAX_BUFFERS_PER_THREAD = 16


def choose_providers(want_gpu: bool) -> list[str]:
    """CUDA first only when this onnxruntime build has it; CPU always as the fallback."""
    if want_gpu and CUDA_PROVIDER in ort.get_available_providers():
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = ORT_LOG_SEVERITY_ERROR
    # A spinning pool swings latency 3-4x under CPU contention (PLATFORM-NOTES).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


class OrtRunner:
    """`count` sessions of one model file and a thread pool of the same size."""

    def __init__(self, model_path: Path, *, count: int, want_gpu: bool,
                 intra_op_threads: int = DEFAULT_INTRA_OP_THREADS, label: str = ""):
        """Blocking (loads the model `count` times): call it from a worker thread."""
        self.model_path = model_path
        self.label = label
        self.count = max(1, count)
        providers = choose_providers(want_gpu)
        opts = session_options(intra_op_threads)
        started = time.perf_counter()
        self._sessions = [ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
                          for _ in range(self.count)]
        first = self._sessions[0]
        self.provider: str = first.get_providers()[0]
        self.inputs: list[GraphTensor] = graph_tensors(first.get_inputs())
        self.outputs: list[GraphTensor] = graph_tensors(first.get_outputs())
        self.output_names = [t.name for t in self.outputs]
        self.input_names = [t.name for t in self.inputs]
        self._free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for s in self._sessions:
            self._free.put(s)
        if providers[0] == CUDA_PROVIDER and self.provider != CUDA_PROVIDER:
            log.warning("asked for CUDA but ONNX Runtime fell back; serving on %s", self.provider,
                        extra={"fields": {"model": label, "execution_provider": self.provider}})
        self._local = threading.local()
        log.info("sessions created", extra={"fields": {
            "model": label, "path": str(model_path), "instances": self.count, "asked_providers": providers,
            "execution_provider": self.provider, "load_s": round(time.perf_counter() - started, 3)}})

    def _concat(self, name: str, arrays: list[np.ndarray]) -> np.ndarray:
        """Concatenate along dim 0 into this worker thread's reusable buffer for that input."""
        rows = sum(a.shape[0] for a in arrays)
        first = arrays[0]
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (name, first.shape[1:], first.dtype)
        buf = buffers.get(key)
        if buf is None or buf.shape[0] < rows:
            if len(buffers) >= MAX_BUFFERS_PER_THREAD:  # models with free dims: keep it bounded
                buffers.clear()
            buf = buffers[key] = np.empty((max(rows, MIN_BUFFER_ROWS), *first.shape[1:]), first.dtype)
        out = buf[:rows]
        np.concatenate(arrays, out=out)
        return out

    def run_batch(self, parts: list[dict[str, np.ndarray]]) -> tuple[list[np.ndarray], int]:
        """Blocking (call it from a worker thread): concatenate the requests' inputs and run once.
        Returns (outputs in `output_names` order, compute ns). The concatenation buffers are reused:
        ORT only reads them during run(), and outputs are fresh arrays."""
        if len(parts) == 1:
            feeds = parts[0]
        else:
            feeds = {name: self._concat(name, [p[name] for p in parts]) for name in parts[0]}
        session = self._free.get()
        try:
            started = time.perf_counter_ns()
            outputs = session.run(self.output_names, feeds)
            return outputs, time.perf_counter_ns() - started
        finally:
            self._free.put(session)

    def close(self) -> None:
        """Blocking: waits for running batches (each holds a session until it ends), then frees the
        sessions."""
        for _ in range(len(self._sessions)):
            self._free.get()
        self._sessions.clear()
