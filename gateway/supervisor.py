"""A small process supervisor for `geogate up`: start children, restart the ones that crash,
stop them all in order on Ctrl-C / SIGTERM.

Written by hand because what it needs is tiny and specific (restart with backoff, ordered
shutdown, children dying with the parent); supervisord or circus would be a heavier
dependency and a second config language for operators of the local world.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("geogate.supervisor")

RESTART_BACKOFF_INITIAL_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
# A child that ran this long before crashing is restarted with the initial backoff again.
RESTART_BACKOFF_RESET_AFTER_S = 30.0
STOP_GRACE_S = 15.0
PR_SET_PDEATHSIG = 1


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


def _open_log(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")  # handed to the child, closed by the caller


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
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
    def __init__(self, *, on_event=None) -> None:
        self.children: list[Child] = []
        self._watchers: list[asyncio.Task] = []
        self._stopping = False
        self._on_event = on_event or (lambda msg: log.warning(msg))

    async def start(self, child: Child) -> Child:
        self.children.append(child)
        await self._spawn(child)
        self._watchers.append(asyncio.create_task(self._watch(child), name=f"watch-{child.name}"))
        return child

    async def _spawn(self, child: Child) -> None:
        out = await asyncio.to_thread(_open_log, child.log_path)
        try:
            child.process = await asyncio.create_subprocess_exec(
                *child.argv, stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, **child.env}, preexec_fn=_die_with_parent,
            )
        finally:
            out.close()
        child.started_at = time.monotonic()

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
            self._on_event(f"{child.name} exited with code {code} after {ran_s:.1f}s; "
                           f"restarting in {backoff_s:.1f}s (log: {child.log_path})")
            await asyncio.sleep(backoff_s)
            if self._stopping:
                return
            backoff_s = min(backoff_s * 2, RESTART_BACKOFF_MAX_S)
            child.restarts += 1
            await self._spawn(child)

    async def stop_all(self) -> None:
        """Stop children in reverse start order: front doors first, replicas last."""
        self._stopping = True
        for child in reversed(self.children):
            child.stopping = True
            if child.alive():
                try:
                    child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(self.children):
            if not child.alive():
                continue
            try:
                await asyncio.wait_for(child.process.wait(), max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
            except TimeoutError:
                self._on_event(f"{child.name} did not stop within {STOP_GRACE_S:.0f}s; killing it")
                try:
                    os.killpg(child.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
                except ProcessLookupError:
                    pass
                await child.process.wait()  # type: ignore[union-attr]
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
