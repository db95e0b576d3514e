"""Real processes for scenarios: free loopback ports, start `geogate replica` / `geogate gateway`,
wait until ready, send signals (SIGKILL, SIGSTOP, SIGCONT), stop.

(A copy of what scenarios need from tests/procs.py: loadtests must not import from tests/.)
Every process runs in its own session, so a signal to its process group reaches its children
(gateway workers) too. Logs go to a file in the scenario's output directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

GEOGATE = [sys.executable, "-m", "gateway"]
LOOPBACK = "127.0.0.1"
POLL_INTERVAL_S = 0.1
REPLICA_READY_TIMEOUT_S = 90.0
GATEWAY_READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (and not handed out before by this process)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
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


def post_json(url: str, body: dict, timeout_s: float = 5.0) -> tuple[int, dict]:
    """POST a JSON body; (status, decoded JSON answer or {})."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            data = r.read()
            return r.status, (json.loads(data) if data else {})
    except urllib.error.HTTPError as exc:
        data = exc.read()
        try:
            return exc.code, json.loads(data) if data else {}
        except ValueError:
            return exc.code, {"error": data.decode(errors="replace")}


class Proc:
    """One child process (its own session) with its output in a log file."""

    def __init__(self, args: list[str], *, name: str, log_dir: str | os.PathLike[str],
                 env: dict[str, str] | None = None):
        self.name = name
        self.args = args
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_dir) / f"{name}.log"
        full_env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                          start_new_session=True)
        self.stopped = False  # SIGSTOPped by a scenario

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self, tail_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail_chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_until(self, check: Callable[[], bool], timeout_s: float, what: str = "ready") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}) before {what}:\n{self.output()}")
            if check():
                return
            time.sleep(POLL_INTERVAL_S)
        raise TimeoutError(f"{self.name} not {what} after {timeout_s:g} s:\n{self.output()}")

    def signal(self, sig: int) -> None:
        """Send `sig` to the process group (no-op once it has exited)."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (after SIGCONT if stopped), then SIGKILL if it does not exit in time."""
        if self.alive():
            if self.stopped:
                self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode


class ReplicaProc(Proc):
    """`geogate replica` on free ports; `--enable-test-faults` so scenarios can inject faults."""

    def __init__(self, repository: str | os.PathLike[str], *, name: str, log_dir: str | os.PathLike[str],
                 enable_test_faults: bool = True, extra: list[str] | None = None):
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.repository = str(repository)
        args = [*GEOGATE, "replica", "--repository", self.repository, "--http-port", str(self.http_port),
                "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
                "--log-level", "warning"]
        if enable_test_faults:
            args.append("--enable-test-faults")
        super().__init__([*args, *(extra or [])], name=name, log_dir=log_dir)

    @property
    def http_address(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def url(self, scheme: str) -> str:
        """The replica URL a gateway config names ("grpc://..." or "http://...")."""
        return f"grpc://{self.grpc_address}" if scheme == "grpc" else f"http://{self.http_address}"

    def wait_ready(self, timeout_s: float = REPLICA_READY_TIMEOUT_S) -> ReplicaProc:
        self.wait_until(lambda: http_ok(f"http://{self.http_address}/v2/health/ready"), timeout_s)
        return self

    def region_summary(self, timeout_s: float = 2.0) -> dict:
        """`GET /geogate/v1/region` on the admin listener ({} when it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://{self.region.admin_address}/geogate/v1/region",
                                        timeout=timeout_s) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    def wait_all_healthy(self, timeout_s: float = GATEWAY_READY_TIMEOUT_S) -> GatewayProc:
        """Until every configured replica is healthy in the gateway's view (so a scenario starts
        with the whole pool in rotation, not just the first replica probed)."""
        def all_healthy() -> bool:
            replicas = self.region_summary().get("replicas") or {}
            return bool(replicas.get("total")) and replicas.get("healthy") == replicas.get("total")
        self.wait_until(all_healthy, timeout_s, what="healthy on every replica")
        return self

    def set_faults(self, *, delay_ms: int = 0, status: int = 0, hang: bool = False) -> dict:
        """Inject (or clear, with no arguments) a fault: POST /geogate/test/faults."""
        code, body = post_json(f"http://{self.http_address}/geogate/test/faults",
                               {"delay_ms": delay_ms, "status": status, "hang": hang})
        if code != 200:
            raise RuntimeError(f"{self.name}: setting faults failed ({code}): {body.get('error', body)}")
        return body


@dataclass
class PoolConfig:
    name: str
    replicas: list[str]  # replica URLs
    kind: str = "geogate"


@dataclass
class RegionConfig:
    name: str
    location: tuple[float, float] = (0.0, 0.0)
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    pools: list[PoolConfig] = field(default_factory=list)

    @property
    def http_address(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def admin_address(self) -> str:
        return f"{LOOPBACK}:{self.admin_port}"


def _toml_value(v: object) -> str:
    # json's string and list syntax is valid TOML for the plain values a config holds
    return json.dumps(v)


def write_config(path: str | os.PathLike[str], regions: list[RegionConfig], *, store_dir: str,
                 sections: dict[str, dict[str, object]] | None = None) -> Path:
    """Write a geogate TOML config: [deployment], [store], any extra `sections`
    ({"health": {"interval_ms": 200}, ...}), then the regions with their pools."""
    lines = ['[deployment]', 'name = "loadtest"', '', '[store]', f'url = {_toml_value("file://" + store_dir)}', '']
    for section, values in (sections or {}).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for r in regions:
        lines += ["[[regions]]", f"name = {_toml_value(r.name)}", f"location = {_toml_value(list(r.location))}",
                  f"http = {_toml_value(r.http_address)}", f"grpc = {_toml_value(r.grpc_address)}",
                  f"admin = {_toml_value(r.admin_address)}", ""]
        for p in r.pools:
            lines += ["  [[regions.pools]]", f"  name = {_toml_value(p.name)}", f"  kind = {_toml_value(p.kind)}",
                      f"  replicas = {_toml_value(p.replicas)}", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


class GatewayProc(Proc):
    """`geogate gateway --config F --region R`."""

    def __init__(self, config_path: str | os.PathLike[str], region: RegionConfig, *,
                 log_dir: str | os.PathLike[str], workers: int = 1):
        self.region = region
        args = [*GEOGATE, "gateway", "--config", str(config_path), "--region", region.name]
        if workers > 1:
            args += ["--workers", str(workers)]
        super().__init__(args, name=f"gateway-{region.name}", log_dir=log_dir)

    @property
    def http_address(self) -> str:
        return self.region.http_address

    @property
    def grpc_address(self) -> str:
        return self.region.grpc_address

    def wait_ready(self, timeout_s: float = GATEWAY_READY_TIMEOUT_S) -> GatewayProc:
        """Ready = `GET /v2/health/ready` 200: the region has a routable replica."""
        self.wait_until(lambda: http_ok(f"http://{self.http_address}/v2/health/ready"), timeout_s)
        return self

    def region_summary(self, timeout_s: float = 2.0) -> dict:
        """`GET /geogate/v1/region` on the admin listener ({} when it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://{self.region.admin_address}/geogate/v1/region",
                                        timeout=timeout_s) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    def wait_all_healthy(self, timeout_s: float = GATEWAY_READY_TIMEOUT_S) -> GatewayProc:
        """Until every configured replica is healthy in the gateway's view (so a scenario starts
        with the whole pool in rotation, not just the first replica probed)."""
        def all_healthy() -> bool:
            replicas = self.region_summary().get("replicas") or {}
            return bool(replicas.get("total")) and replicas.get("healthy") == replicas.get("total")
        self.wait_until(all_healthy, timeout_s, what="healthy on every replica")
        return self
