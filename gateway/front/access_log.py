"""JSON access log: one line per client inference request, to stderr or to a rotated file.

Lines are buffered and handed every FLUSH_INTERVAL_S (or when the buffer is large) to a writer
thread, so the hot path pays for an orjson dump and a list append, and the event loop never
waits for a write (a slow disk or a full pipe to a log collector stalls the thread, not the
requests). A backlog beyond MAX_BACKLOG_BYTES is dropped and counted: a line saying how many
were dropped is written once the writer catches up.

Where (``[gateway]``): stderr by default, for a supervisor that collects it (systemd's journal,
Kubernetes, ``geogate up``, which rotates what its children write: gateway.world.supervisor); or
``access_log_file``, rotated when it would pass ``access_log_max_bytes`` (FILE -> FILE.1 ->
... FILE.<access_log_backups>, the oldest dropped: logging.handlers.RotatingFileHandler).
With ``--workers N`` each worker writes its own file (``access.log`` -> ``access.w0.log``):
two processes renaming one file under each other would lose lines.

Request ids come from the client's ``x-request-id`` or are generated, and are passed to the
replica as ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from typing import Protocol

import orjson

FLUSH_INTERVAL_S = 0.2
FLUSH_AT_LINES = 512
MAX_BACKLOG_BYTES = 32 * 1024 * 1024  # written-but-not-yet-on-disk lines kept at most (per worker)
WRITER_JOIN_TIMEOUT_S = 5.0


MAX_REQUEST_ID_CHARS = 128


# A fresh id: this process's random prefix and a counter (unique across processes and workers
# without a getrandom call per request).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def request_id_from(value: str | None) -> str:
    """The client's request id when it is usable as a log field and a response header (printable
    ASCII, at most MAX_REQUEST_ID_CHARS), else a fresh one."""
    if value and len(value) <= MAX_REQUEST_ID_CHARS and value.isascii() and value.isprintable():
        return value
    return new_request_id()


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class StreamSink:
    """Bytes to a binary stream (stderr's buffer by default)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr.buffer

    def write(self, data: bytes) -> None:
        self.stream.write(data)
        self.stream.flush()

    def close(self) -> None:
        pass


class RotatingSink:
    """Bytes appended to ``path``, rotated by size (blocking: call it from a thread). Writes
    are cut into pieces of whole lines below ``max_bytes``, and a piece that would pass it
    rotates first: each file stays within ``max_bytes`` (counted in characters) and ends on a
    line boundary when writes are whole lines."""

    def __init__(self, path: str, *, max_bytes: int, backups: int) -> None:
        if max_bytes <= 1 or backups <= 0:
            raise ValueError("a rotated log needs max_bytes > 1 and backups > 0")
        self.path = path
        self.max_bytes = max_bytes
        self._handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                             encoding="utf-8")  # opened now: a bad path fails early
        self._handler.terminator = ""  # the data carries its own newlines
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, data: bytes) -> None:
        limit = self.max_bytes - 1  # RotatingFileHandler counts a newline more than it writes
        while len(data) > limit:
            cut = data.rfind(b"\n", 0, limit) + 1 or data.find(b"\n", limit) + 1 or len(data)
            self._emit(data[:cut])
            data = data[cut:]
        if data:
            self._emit(data)

    def _emit(self, data: bytes) -> None:
        # Invalid UTF-8 (a child's raw output) is kept readable, escaped.
        # handle(): under the handler's lock (several threads may write one file)
        self._handler.handle(logging.makeLogRecord({"msg": data.decode("utf-8", "backslashreplace")}))

    def close(self) -> None:
        self._handler.close()


def worker_log_path(path: str, worker: int, workers: int) -> str:
    """``access.log`` -> ``access.w1.log`` when several workers would share the file."""
    if workers <= 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.w{worker}{ext}"


class AccessLog:
    def __init__(self, *, enabled: bool = True, stream=None, sink: Sink | None = None) -> None:
        self.enabled = enabled
        self._sink: Sink = sink if sink is not None else StreamSink(stream)
        self._lines: list[bytes] = []
        self._task: asyncio.Task | None = None
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._backlog_lock = threading.Lock()
        self._backlog_bytes = 0
        self.dropped_lines = 0  # lines dropped because the writer fell MAX_BACKLOG_BYTES behind

    @classmethod
    def from_config(cls, gateway_section, *, base_dir: str = ".", worker: int = 0, workers: int = 1) -> AccessLog:
        """``[gateway] access_log`` / ``access_log_file`` / ``access_log_max_bytes`` / ``access_log_backups``."""
        sec = gateway_section
        sink: Sink | None = None
        if sec.access_log and sec.access_log_file:
            path = sec.access_log_file if os.path.isabs(sec.access_log_file) else \
                os.path.normpath(os.path.join(base_dir, sec.access_log_file))
            sink = RotatingSink(worker_log_path(path, worker, workers), max_bytes=sec.access_log_max_bytes,
                                backups=sec.access_log_backups)
        return cls(enabled=sec.access_log, sink=sink)

    def start(self) -> None:
        if self.enabled:
            self._writer = threading.Thread(target=self._write_forever, name="access-log-writer", daemon=True)
            self._writer.start()
            self._task = asyncio.get_running_loop().create_task(self._flusher(), name="access-log")

    def log(self, *, request_id: str, protocol: str, model: str, version: str, status: int | str,
            replica: str, attempts: int, duration_s: float, outcome: str, error: str = "") -> None:
        if not self.enabled:
            return
        entry = {"ts": round(time.time(), 6), "log": "access", "request_id": request_id,
                 "protocol": protocol, "model": model, "version": version, "status": status,
                 "replica": replica, "attempts": attempts, "duration_ms": round(duration_s * 1000.0, 3),
                 "outcome": outcome}
        if error:
            entry["error"] = error
        try:
            line = orjson.dumps(entry)
        except TypeError:
            # A str with lone surrogates (an undecodable header byte, via surrogateescape) is not
            # UTF-8: found by schemathesis, it turned the request's answer into a 500.
            line = orjson.dumps({k: _printable(v) if isinstance(v, str) else v for k, v in entry.items()})
        self._lines.append(line + b"\n")
        if len(self._lines) >= FLUSH_AT_LINES:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered lines to the writer thread (written here when it is not running)."""
        if not self._lines:
            return
        data = b"".join(self._lines)
        n = len(self._lines)
        self._lines.clear()
        if self._writer is None:
            self._write(data)
            return
        with self._backlog_lock:
            if self._backlog_bytes + len(data) > MAX_BACKLOG_BYTES:
                self.dropped_lines += n
                return
            self._backlog_bytes += len(data)
        self._queue.put(data)

    def _write(self, data: bytes) -> None:
        try:
            self._sink.write(data)
        except (OSError, ValueError):
            pass

    def _write_forever(self) -> None:
        reported = 0
        while (data := self._queue.get()) is not None:
            self._write(data)
            with self._backlog_lock:
                self._backlog_bytes -= len(data)
                dropped = self.dropped_lines
            if dropped != reported:
                note = {"ts": round(time.time(), 6), "log": "access", "outcome": "log-lines-dropped",
                        "dropped_lines": dropped - reported,
                        "error": f"the access log writer fell {MAX_BACKLOG_BYTES} bytes behind; lines dropped"}
                self._write(orjson.dumps(note) + b"\n")
                reported = dropped

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.flush()
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join, WRITER_JOIN_TIMEOUT_S)
            self._writer = None
        self._sink.close()
