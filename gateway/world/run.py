"""The local world's lifecycle: seed the store -> start every process under the supervisor ->
wait until ready -> write world.json and print the summary -> keep world.json current (restarts,
autoscaled replicas coming and going) -> on Ctrl-C / SIGTERM stop everything, front doors first.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

from gateway.world.autoscale import changes, views
from gateway.world.launch import Launch, children
from gateway.world.plan import WorldError
from gateway.world.ready import readiness_checks, wait_ready
from gateway.world.report import print_summary, write_client_script, write_endpoints
from gateway.world.store import ModelInfo, prepare_store
from gateway.world.supervisor import Child, Supervisor

READY_TIMEOUT_S = 180.0
# How often the autoscaler's status file is read to keep world.json and the log current.
AUTOSCALE_FOLLOW_S = 1.0
LOG_TAIL_LINES = 5


def say(msg: str) -> None:
    print(f"[geogate up] {msg}", flush=True)


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join("      " + s for s in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class WorldReport:
    """Keeps world.json current once the world is ready: after every (re)start of a child, and
    whenever an autoscaled pool's desired count or replicas change (said in the log too)."""

    def __init__(self, launch: Launch, models: dict[str, ModelInfo]) -> None:
        self.launch = launch
        self.models = models
        self.supervisor: Supervisor | None = None
        self.ready = False
        self.autoscaled: dict[str, dict] = {}

    def on_spawn(self, _child: Child) -> None:
        if self.ready:
            write_endpoints(self.launch, self.supervisor, self.models, self.autoscaled)

    def publish(self, started: float) -> None:
        self.ready = True
        self.autoscaled = views(self.launch)
        write_endpoints(self.launch, self.supervisor, self.models, self.autoscaled)
        print_summary(self.launch, self.models, time.monotonic() - started, self.autoscaled)

    async def follow_autoscaler(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), AUTOSCALE_FOLLOW_S)
            now = await asyncio.to_thread(views, self.launch)
            # Any change, the reason text too (it carries the gateway's live figures): at most
            # one small atomic rewrite per AUTOSCALE_FOLLOW_S. The log hears of counts only.
            if now == self.autoscaled:
                continue
            for line in changes(self.autoscaled, now):
                say(line)
            self.autoscaled = now
            try:
                await asyncio.to_thread(write_endpoints, self.launch, self.supervisor, self.models, now)
            except OSError as exc:  # say it, keep following: the next change may write again
                say(f"cannot rewrite world.json: {exc}")


async def run_world(launch: Launch, cfg: Any, *, seed: bool, only_if_empty: bool, ready_timeout_s: float,
                    create_bucket: bool = False) -> int:
    started = time.monotonic()
    try:
        models = await prepare_store(cfg, launch.directory / "seed", seed=seed, only_if_empty=only_if_empty,
                                     create_bucket=create_bucket, say=say)
    except WorldError:
        raise
    except Exception as exc:  # any store failure: say which store and why, start nothing
        raise WorldError(f"preparing the store {launch.store_url} failed: {type(exc).__name__}: {exc}") from exc
    write_client_script(launch, models)

    report = WorldReport(launch, models)
    supervisor = report.supervisor = Supervisor(on_event=say, on_spawn=report.on_spawn)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    follower: asyncio.Task | None = None

    def on_signal() -> None:
        if stop.is_set():  # a second Ctrl-C: no more waiting for graceful exits
            say("second signal: killing every process now")
            supervisor.kill_all()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal)
    try:
        for child in children(launch):
            await supervisor.start(child)
        what = ", ".join(models) or "its replicas"
        say(f"started {len(supervisor.children)} processes; waiting until every region serves {what} "
            f"(logs: {launch.logs}) ...")
        pending = await wait_ready(readiness_checks(launch, models), stop, ready_timeout_s)
        if stop.is_set():
            say("stopping before ready ...")
            return 130
        if pending:
            say(f"not ready after {ready_timeout_s:.0f}s: {'; '.join(pending)}")
            for child in supervisor.crashing():
                say(f"  {child.name}: {child.restarts} restarts; last log lines ({child.log_path}):\n"
                    f"{_log_tail(child.log_path)}")
            return 1
        report.publish(started)
        if launch.autoscale:
            follower = asyncio.create_task(report.follow_autoscaler(stop), name="follow-autoscaler")
        await stop.wait()
        say("stopping ...")
        return 0
    finally:
        if follower is not None:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        await supervisor.stop_all()
        with contextlib.suppress(OSError):
            (launch.directory / "world.json").unlink()
        say("all processes stopped.")
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
