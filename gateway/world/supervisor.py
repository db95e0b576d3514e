"""A small process supervisor for `geogate up`: start children, restart the ones that crash,
stop them all in order on Ctrl-C / SIGTERM.

Written by hand because what it needs is tiny and specific (restart with backoff, ordered
shutdown, children dying with the parent); supervisord or circus would be a heavier
dependency and a second config language for operators of the local world.

Lifecycle of a child: spawn (own process group, dies with the supervisor) -> watch -> on an
exit nobody asked for: report, wait the backoff, spawn again. Shutdown: children are stopped
tier by tier, highest tier first (front doors before the replicas behind them): SIGTERM to
the child's process group, wait up to STOP_GRACE_S, then SIGKILL.

Logs: a child's stdout and stderr go to its ``log_path``; with ``log_max_bytes`` set they come
through a pipe that the supervisor copies into the file, rotated by size (LOG -> LOG.1 ...
LOG.<log_backups>, gateway.front.access_log.RotatingSink, writes in a thread), as Docker's json-file
log driver does: a gateway's access log at 150 requests/s grew its log by 21 MB in 11 minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger("geogate.supervisor")

RESTART_BACKOFF_INITIAL_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
# A child that ran this long before crashing is restarted with the initial backoff again.
RESTART_BACKOFF_RESET_AFTER_S = 30.0
STOP_GRACE_S = 15.0
LOG_PUMP_CHUNK_BYTES = 64 * 1024
LOG_PUMP_FINISH_S = 5.0  # after the children stopped, for their last output to reach the logs
PR_SET_PDEATHSIG = 1
# Children write logs and metrics without buffering, and ONNX Runtime never phones home.
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "ORT_DISABLE_TELEMETRY": "1"}


def _die_with_parent() -> None:
    """Runs in the child before exec: if `geogate up` is killed outright, its children get
    SIGTERM instead of living on as orphans that keep ports busy."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    # Own process group: a terminal's Ctrl-C reaches only the supervisor, which then stops
    # the children in order instead of all of them dying at once.
    os.setpgrp()


def _open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")  # handed to the child, closed by the caller


def _open_rotating(child: Child):
    from gateway.front.access_log import RotatingSink

    child.log_path.parent.mkdir(parents=True, exist_ok=True)
    return RotatingSink(str(child.log_path), max_bytes=child.log_max_bytes, backups=max(1, child.log_backups))


async def _pump(reader: asyncio.StreamReader, sink) -> None:
    """Copy a child's output into its rotated log, whole lines at a time (a rotation never
    splits a line), file writes in a thread. Ends when every writer of the pipe has exited."""
    rest = b""
    while True:
        chunk = await reader.read(LOG_PUMP_CHUNK_BYTES)
        if not chunk:
            break
        data = rest + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) < LOG_PUMP_CHUNK_BYTES:
            rest = data  # no line end yet: wait for it (a longer line is written as it is)
            continue
        if cut == 0:
            cut = len(data)
        rest = data[cut:]
        await asyncio.to_thread(sink.write, data[:cut])
    if rest:
        await asyncio.to_thread(sink.write, rest)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    # Stop order: higher tiers stop first (and are fully gone before the next tier is asked).
    tier: int = 0
    # > 0: the log is rotated at this size, keeping log_backups old files (0: appended forever)
    log_max_bytes: int = 0
    log_backups: int = 3
    restarts: int = 0
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    stopping: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    """Starts, watches, restarts and stops `Child` processes.

    ``on_event(message)`` hears about crashes and restarts (what an operator must see);
    ``on_spawn(child)`` runs after every (re)start, e.g. to refresh a pid file."""

    def __init__(self, *, on_event: Callable[[str], None] | None = None,
                 on_spawn: Callable[[Child], None] | None = None) -> None:
        self.children: list[Child] = []
        self._watchers: list[asyncio.Task] = []
        self._pumps: list[asyncio.Task] = []  # children's output -> their rotated logs
        self._sinks: dict[str, object] = {}  # child name -> RotatingSink
        self._stopping = False
        self._on_event = on_event or (lambda msg: log.warning(msg))
        self._on_spawn = on_spawn

    async def start(self, child: Child) -> Child:
        self.children.append(child)
        await self._spawn(child)
        self._watchers.append(asyncio.create_task(self._watch(child), name=f"watch-{child.name}"))
        return child

    async def _spawn(self, child: Child) -> None:
        if child.log_max_bytes > 0:
            if child.name not in self._sinks:
                self._sinks[child.name] = await asyncio.to_thread(_open_rotating, child)
            out = asyncio.subprocess.PIPE
        else:
            out = await asyncio.to_thread(_open_log, child.log_path)
        try:
            child.process = await asyncio.create_subprocess_exec(
                *child.argv, stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, **CHILD_ENV, **child.env}, preexec_fn=_die_with_parent,
            )
        finally:
            if out is not asyncio.subprocess.PIPE:
                out.close()
        if child.process.stdout is not None:
            self._pumps.append(asyncio.create_task(_pump(child.process.stdout, self._sinks[child.name]),
                                                   name=f"log-{child.name}"))
        child.started_at = time.monotonic()
        if self._on_spawn is not None:
            self._on_spawn(child)

    async def _watch(self, child: Child) -> None:
        backoff_s = RESTART_BACKOFF_INITIAL_S
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping or child.stopping:
                return
            ran_s = time.monotonic() - child.started_at
            if ran_s > RESTART_BACKOFF_RESET_AFTER_S:
                backoff_s = RESTART_BACKOFF_INITIAL_S
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            self._on_event(f"{child.name} (pid {child.pid}) {how} after {ran_s:.1f}s; "
                           f"restarting in {backoff_s:.1f}s (log: {child.log_path})")
            await asyncio.sleep(backoff_s)
            if self._stopping:
                return
            backoff_s = min(backoff_s * 2, RESTART_BACKOFF_MAX_S)
            child.restarts += 1
            try:
                await self._spawn(child)
            except OSError as exc:  # e.g. the interpreter vanished: report, keep trying
                self._on_event(f"{child.name}: restart failed: {exc}")
                child.started_at = time.monotonic()
                continue
            self._on_event(f"{child.name} restarted (pid {child.pid}, restart #{child.restarts})")

    def crashing(self) -> list[Child]:
        """Children that have been restarted at least once (for "not ready" explanations)."""
        return [c for c in self.children if c.restarts or not c.alive()]

    def kill_all(self) -> None:
        """SIGKILL every child's process group now (a second Ctrl-C while stopping)."""
        self._stopping = True
        for child in self.children:
            child.stopping = True
            if child.alive():
                _signal_group(child.process.pid, signal.SIGKILL)  # type: ignore[union-attr]

    async def stop_all(self) -> None:
        """Stop children tier by tier, highest first: SIGTERM, grace period, then SIGKILL."""
        self._stopping = True
        for tier in sorted({c.tier for c in self.children}, reverse=True):
            group = [c for c in self.children if c.tier == tier]
            for child in group:
                child.stopping = True
                if child.alive():
                    _signal_group(child.process.pid, signal.SIGTERM)  # type: ignore[union-attr]
            deadline = time.monotonic() + STOP_GRACE_S
            for child in group:
                if not child.alive():
                    continue
                try:
                    await asyncio.wait_for(child.process.wait(),  # type: ignore[union-attr]
                                           max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    self._on_event(f"{child.name} did not stop within {STOP_GRACE_S:.0f}s; killing it")
                    _signal_group(child.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
                    await child.process.wait()  # type: ignore[union-attr]
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        # The children are gone: their pipes end; copy what is left, then close the files.
        if self._pumps:
            _done, pending = await asyncio.wait(self._pumps, timeout=LOG_PUMP_FINISH_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)
        for sink in self._sinks.values():
            sink.close()  # type: ignore[attr-defined]
