"""`geogate gateway --workers N`: the small supervisor of N worker processes sharing the ports.

Every worker binds the same HTTP, gRPC and admin ports with SO_REUSEPORT, so the kernel spreads
connections over them (gunicorn/uvicorn's model, without a master that accepts).

- SIGTERM / SIGINT: passed to every worker; each drains (readiness false, in-flight requests
  finish); the supervisor exits 0 when all did.
- SIGUSR1: the same, but each worker hands its clients over first (gateway.server.drain:
  listeners closed, gRPC connections moved by their max age) before stopping: for a node
  leaving a load balancer's pool while others keep serving.
- SIGHUP: passed on (workers reload their API keys).
- SIGUSR2: rolling restart, one worker at a time: a replacement starts, and only once it
  serves (it touches a file in the supervisor's ready directory) is the old one sent SIGUSR1
  (handover drain); the ports never go unserved, so clients see no failed request, HTTP or gRPC.
- A worker that exits without being asked is reported with its exit status and replaced; one
  that keeps dying right after start (5 times within 10 s each) stops the gateway with 1.
- Every worker that exits has its metric files merged (gateway.server.metrics.merge_dead_worker):
  its live gauges stop counting and the metrics directory does not grow with each restart.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("geogate.gateway")

WORKER_ENV = "GEOGATE_GATEWAY_WORKER"
READY_DIR_ENV = "GEOGATE_GATEWAY_READY_DIR"
POLL_S = 0.1
RESTART_BACKOFF_S = 0.5
QUICK_DEATH_S = 10.0  # a worker dying this soon after its start counts toward giving up
MAX_QUICK_DEATHS = 5
READY_WAIT_S = 60.0


def announce_ready() -> None:
    """Called by a worker once its listeners serve: tells the supervisor (if any)."""
    ready_dir = os.environ.get(READY_DIR_ENV)
    if ready_dir:
        Path(ready_dir, str(os.getpid())).touch()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class WorkerSupervisor:
    def __init__(self, argv: list[str], workers: int) -> None:
        self.argv = argv  # the worker command line (this gateway's, as a worker)
        self.n = workers
        self.metrics_dir = tempfile.mkdtemp(prefix="geogate-metrics-")
        self.ready_dir = tempfile.mkdtemp(prefix="geogate-ready-")
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir, READY_DIR_ENV: self.ready_dir}
        self.slots: list[subprocess.Popen | None] = [None] * workers
        self.started_s = [0.0] * workers
        self.quick_deaths = [0] * workers
        self.stopping = False
        self.rolling_requested = False

    # ------------------------------------------------------------ processes

    def _spawn(self, index: int) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv, env={**self.env, WORKER_ENV: str(index)})
        self.started_s[index] = time.monotonic()
        return proc

    def _reap(self, proc: subprocess.Popen) -> None:
        """A worker is gone: its live gauges stop counting, its counters and histograms are
        merged into the dead workers' totals (prometheus multiprocess mode)."""
        from gateway.server.metrics import merge_dead_worker

        try:
            merge_dead_worker(self.metrics_dir, proc.pid)
        except OSError as exc:  # never let metrics bookkeeping stop the supervisor
            log.error("merging the metric files of worker pid %d failed: %s", proc.pid, exc)
        Path(self.ready_dir, str(proc.pid)).unlink(missing_ok=True)

    def _ready(self, proc: subprocess.Popen) -> bool:
        return Path(self.ready_dir, str(proc.pid)).exists()

    def _signal_all(self, signum: int) -> None:
        for proc in self.slots:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signum)

    # ------------------------------------------------------------ signals

    def _on_stop(self, signum, _frame) -> None:
        self.stopping = True
        self._signal_all(signum)  # SIGTERM/SIGINT: stop; SIGUSR1: hand over, then stop

    def _on_hup(self, signum, _frame) -> None:
        self._signal_all(signum)

    def _on_usr2(self, _signum, _frame) -> None:
        self.rolling_requested = True

    # ------------------------------------------------------------ rolling restart

    def _rolling_restart(self) -> None:
        log.info("rolling restart of %d workers", self.n)
        for i in range(self.n):
            if self.stopping:
                return
            old = self.slots[i]
            new = self._spawn(i)
            deadline = time.monotonic() + READY_WAIT_S
            while not self._ready(new) and new.poll() is None and time.monotonic() < deadline and not self.stopping:
                time.sleep(POLL_S)
            if not self._ready(new):
                why = _describe_exit(new.returncode) if new.poll() is not None else "not serving in time"
                log.error("rolling restart stopped: the replacement of worker %d failed (%s); the old one "
                          "keeps serving", i, why)
                if new.poll() is None:
                    new.kill()
                    new.wait()
                return
            self.slots[i] = new
            if old is not None and old.poll() is None:
                # Handover drain: readiness false, listeners closed (the replacement takes new
                # connections), gRPC clients moved by their connections' max age, in-flight finish.
                old.send_signal(signal.SIGUSR1)
                old.wait()
            if old is not None:
                self._reap(old)
            log.info("worker %d restarted (pid %d)", i, new.pid)
        log.info("rolling restart done")

    # ------------------------------------------------------------ the loop

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGUSR2, self._on_usr2)
        code = 0
        try:
            for i in range(self.n):
                self.slots[i] = self._spawn(i)
            while True:
                if self.rolling_requested and not self.stopping:
                    self.rolling_requested = False
                    self._rolling_restart()
                alive = [p for p in self.slots if p is not None and p.poll() is None]
                if self.stopping and not alive:
                    break
                if not self.stopping and self._replace_dead() is False:
                    code = 1
                    self._on_stop(signal.SIGTERM, None)
                time.sleep(POLL_S)
            # A worker still starting when asked to stop dies of the signal itself (its handlers
            # are not installed yet): that is a clean stop too.
            clean = (0, None, -signal.SIGTERM, -signal.SIGINT, -signal.SIGUSR1)
            if any(p is not None and p.returncode not in clean for p in self.slots):
                code = 1
        finally:
            for proc in self.slots:
                if proc is not None and proc.poll() is None:
                    proc.kill()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            shutil.rmtree(self.ready_dir, ignore_errors=True)
        return code

    def _replace_dead(self) -> bool:
        """Replace workers that exited unasked; False when one keeps dying (give up)."""
        for i, proc in enumerate(self.slots):
            if proc is None or proc.poll() is None:
                continue
            lived_s = time.monotonic() - self.started_s[i]
            self.quick_deaths[i] = self.quick_deaths[i] + 1 if lived_s < QUICK_DEATH_S else 0
            log.error("gateway worker %d (pid %d) %s after %.1f s", i, proc.pid, _describe_exit(proc.returncode),
                      lived_s)
            if self.quick_deaths[i] >= MAX_QUICK_DEATHS:
                log.error("worker %d died %d times within %.0f s of starting: stopping the gateway", i,
                          self.quick_deaths[i], QUICK_DEATH_S)
                return False
            self._reap(proc)
            time.sleep(RESTART_BACKOFF_S)
            self.slots[i] = self._spawn(i)
            log.info("gateway worker %d restarted (pid %d)", i, self.slots[i].pid)
        return True


def supervise(config: str, region: str, workers: int) -> int:
    argv = [sys.executable, "-m", "gateway", "gateway", "--config", config, "--region", region,
            "--workers", str(workers)]
    return WorkerSupervisor(argv, workers).run()
