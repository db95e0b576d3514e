"""Real processes for tests: free ports, start a `geogate ...` subcommand, wait until it is
ready, stop it (SIGTERM, then SIGKILL), and keep its output for failure messages. Also the
condition waits tests use instead of fixed sleeps (`wait_until`, `async_wait_until`)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

GEOGATE = [sys.executable, "-m", "gateway"]
POLL_S = 0.05


def wait_until(pred: Callable[[], object], timeout_s: float = 30.0, what: str = "condition",
               poll_s: float = POLL_S) -> float:
    """Poll `pred` until it is true; the seconds waited. TimeoutError naming `what` otherwise.
    Timeouts are generous (a loaded 2-core machine): they bound a failure, not a success."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not met after {timeout_s:g} s")
        time.sleep(poll_s)
    return time.monotonic() - start


async def async_wait_until(pred: Callable[[], object], timeout_s: float = 30.0, what: str = "condition",
                           poll_s: float = POLL_S) -> float:
    """`wait_until` inside an event loop: the loop's other tasks run while it polls."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not met after {timeout_s:g} s")
        await asyncio.sleep(poll_s)
    return time.monotonic() - start

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (and not handed out before in this run).
    The UDP side is free too in practice: tests that need both check nothing else binds."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def http_ok(url: str, timeout_s: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class Proc:
    """One child process with its log in a temp file."""

    def __init__(self, args: list[str], *, name: str = "", env: dict[str, str] | None = None,
                 cwd: str | None = None):
        self.name = name or os.path.basename(args[0])
        self.log = tempfile.NamedTemporaryFile(prefix=f"geogate-{self.name}-", suffix=".log", delete=False)
        full_env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                      cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_until(self, check: Callable[[], bool], timeout_s: float = 30.0, what: str = "ready") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}) before {what}:\n"
                                   f"{self.output()[-4000:]}")
            if check():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not {what} after {timeout_s}s:\n{self.output()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)
        if sig == signal.SIGKILL:
            self.popen.wait(10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                return self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        return self.popen.returncode


def geogate(*args: str, name: str = "", **kw) -> Proc:
    return Proc([*GEOGATE, *args], name=name or (args[0] if args else "geogate"), **kw)


class ReplicaProc(Proc):
    def __init__(self, repository: str, *, extra: list[str] | None = None, env: dict[str, str] | None = None,
                 http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None):
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.repository = repository
        super().__init__([*GEOGATE, "replica", "--repository", repository,
                          "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                          "--metrics-port", str(self.metrics_port), *(extra or [])],
                         name=f"replica-{self.http_port}", env=env)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout_s: float = 60.0) -> ReplicaProc:
        self.wait_until(lambda: http_ok(f"http://{self.http_url}/v2/health/ready"), timeout_s)
        return self


TRITON_WRAPPER = Path(__file__).resolve().parent.parent / ".venv-triton" / "bin" / "tritonserver-geogate"


class TritonProc(Proc):
    """A real NVIDIA Triton server (built by `make triton-env`) in explicit model-control mode,
    listening on 127.0.0.1 only."""

    def __init__(self, repository: str, *, load: tuple[str, ...] = (), http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None):
        if not TRITON_WRAPPER.exists():
            raise RuntimeError(f"{TRITON_WRAPPER} missing: run `make triton-env` first")
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.repository = repository
        args = [str(TRITON_WRAPPER), "--model-repository", repository, "--model-control-mode", "explicit",
                "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                "--log-verbose", "0", "--exit-timeout-secs", "10"]
        for model in load:
            args += ["--load-model", model]
        super().__init__(args, name=f"triton-{self.http_port}")

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout_s: float = 90.0) -> TritonProc:
        self.wait_until(lambda: http_ok(f"http://{self.http_url}/v2/health/ready"), timeout_s)
        return self
