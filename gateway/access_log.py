"""JSON access log: one line per client inference request, to stderr.

Lines are buffered and written every FLUSH_INTERVAL_S (or when the buffer is large) so the
hot path pays for an orjson dump and a list append, not a write syscall per request.
Request ids come from the client's ``x-request-id`` or are generated, and are passed to the
replica as ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import orjson

FLUSH_INTERVAL_S = 0.2
FLUSH_AT_LINES = 512
REQUEST_ID_HEADER = "x-request-id"


MAX_REQUEST_ID_CHARS = 128


def new_request_id() -> str:
    return os.urandom(8).hex()


def request_id_from(value: str | None) -> str:
    """The client's request id when it is usable as a log field and a response header (printable
    ASCII, at most MAX_REQUEST_ID_CHARS), else a fresh one."""
    if value and len(value) <= MAX_REQUEST_ID_CHARS and value.isascii() and value.isprintable():
        return value
    return new_request_id()


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class AccessLog:
    def __init__(self, *, enabled: bool = True, stream=None) -> None:
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stderr.buffer
        self._lines: list[bytes] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.enabled:
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
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.flush()
