"""Real processes for scenarios: free loopback ports, start `geogate replica` / `geogate gateway` /
`geogate sync` / moto S3 / a cuttable TCP proxy, wait until ready, send signals (SIGKILL,
SIGSTOP, SIGCONT), stop; and the cleanup audit (no process or listening port left behind).

(A copy of what scenarios need from tests/procs.py: loadtests must not import from tests/.)
Every process runs in its own process group (not its own session), so a signal to the group
reaches its children (gateway workers) too, while the kernel's scheduler autogroup stays the
one of the scenario: with `kernel.sched_autogroup_enabled=1` every session is a CPU
fair-share group of its own, which would cap a busy gateway at the share of an idle replica.
A process can run inside a network namespace (`netns=`: `ip netns exec NS ...`, same pid).
Logs go to a file in the scenario's output directory.
"""

from __future__ import annotations

import json
import os
import random
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

from core.kserve import REGION_HEADER

GEOGATE = [sys.executable, "-m", "gateway"]
LOOPBACK = "127.0.0.1"
POLL_INTERVAL_S = 0.1
REPLICA_READY_TIMEOUT_S = 90.0
GATEWAY_READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
# moto accepts any credentials; set them so botocore never goes looking for real ones.
S3_ENV = {"AWS_ACCESS_KEY_ID": "loadtest", "AWS_SECRET_ACCESS_KEY": "loadtest", "AWS_DEFAULT_REGION": "us-east-1"}

PORT_RANGE_LOW = 20000
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (and not handed out before by this process),
    picked at random BELOW the kernel's ephemeral range: a port from bind(0) is an ephemeral
    port, which the load's own outgoing connections (thousands per run) may take as their
    source port before the server that was meant to listen on it starts."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(PORT_RANGE_LOW, max(PORT_RANGE_LOW + 1000, low))
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free TCP port found below the ephemeral range")


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def http_ok(url: str, timeout_s: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def get_json(url: str, timeout_s: float = 2.0) -> dict:
    """GET a JSON document ({} when it does not answer 200 with JSON)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return {}


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


# ---------------------------------------------------------------------------- /proc


def proc_tree(pid: int) -> list[int]:
    """`pid` and its descendants (gateway workers), from /proc/*/stat parents."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of `pid` and its descendants (a gateway's workers);
    NaN when the process is gone."""
    total = 0.0
    try:
        for p in proc_tree(pid):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return float("nan")
    return total / os.sysconf("SC_CLK_TCK")


def inferences_served(http_address: str, model: str = "demo") -> int:
    """Inferences a KServe v2 server (geogate replica or Triton) has answered for `model`, from
    its statistics: whole load-generator runs, warm-up included (perf_analyzer's own count
    covers only its last window)."""
    stats = get_json(f"http://{http_address}/v2/models/{model}/stats")
    return sum(int(m["inference_stats"]["success"]["count"]) for m in stats["model_stats"])


def pid_running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie holds no memory, fds or ports)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def listening_ports(ports: set[int]) -> set[int]:
    """Which of `ports` have a listening TCP socket in this network namespace (/proc/net/tcp*)."""
    found: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A":  # TCP_LISTEN
                        port = int(cols[1].rsplit(":", 1)[1], 16)
                        if port in ports:
                            found.add(port)
        except OSError:
            continue
    return found


# ---------------------------------------------------------------------------- processes


class Proc:
    """One child process (its own process group) with its output in a log file."""

    def __init__(self, args: list[str], *, name: str, log_dir: str | os.PathLike[str],
                 env: dict[str, str] | None = None, netns: str | None = None, ports: list[int] | None = None):
        self.name = name
        self.args = args
        self.netns = netns
        self.ports = list(ports or [])  # TCP ports it listens on (the cleanup audit checks them)
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_dir) / f"{name}.log"
        full_env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        argv = ["ip", "netns", "exec", netns, *args] if netns else args
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=full_env, process_group=0)
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
        """SIGKILL the whole group (workers included, even once the leader is gone), and reap it."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
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
    """`geogate replica` on free ports; `--enable-test-faults` so scenarios can inject faults.

    In a network namespace (`netns`, with the namespace's address `netns_address`) it listens
    on every address of the namespace: its gateway there reaches it on the namespace's own
    loopback (`url()`), this host on the namespace's address (`http_address`)."""

    def __init__(self, repository: str | os.PathLike[str], *, name: str, log_dir: str | os.PathLike[str],
                 enable_test_faults: bool = True, extra: list[str] | None = None, netns: str | None = None,
                 netns_address: str = "", ports: tuple[int, int, int] | None = None):
        self.http_port, self.grpc_port, self.metrics_port = ports or (free_port(), free_port(), free_port())
        self.repository = str(repository)
        self.netns_address = netns_address
        args = [*GEOGATE, "replica", "--repository", self.repository, "--http-port", str(self.http_port),
                "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
                "--log-level", "warning"]
        if netns:
            args += ["--host", "0.0.0.0"]
        if enable_test_faults:
            args.append("--enable-test-faults")
        super().__init__([*args, *(extra or [])], name=name, log_dir=log_dir, netns=netns,
                         ports=[] if netns else [self.http_port, self.grpc_port, self.metrics_port])

    @property
    def http_address(self) -> str:
        """Where this host reaches its HTTP listener."""
        return f"{self.netns_address or LOOPBACK}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.netns_address or LOOPBACK}:{self.grpc_port}"

    def url(self, scheme: str) -> str:
        """The replica URL a gateway config names ("grpc://..." or "http://..."): loopback, also
        in a namespace (its gateway runs in the same one)."""
        port = self.grpc_port if scheme == "grpc" else self.http_port
        return f"{'grpc' if scheme == 'grpc' else 'http'}://{LOOPBACK}:{port}"

    def wait_ready(self, timeout_s: float = REPLICA_READY_TIMEOUT_S) -> ReplicaProc:
        self.wait_until(lambda: http_ok(f"http://{self.http_address}/v2/health/ready"), timeout_s)
        return self

    def set_faults(self, *, delay_ms: int = 0, status: int = 0, hang: bool = False) -> dict:
        """Inject (or clear, with no arguments) a fault: POST /geogate/test/faults."""
        code, body = post_json(f"http://{self.http_address}/geogate/test/faults",
                               {"delay_ms": delay_ms, "status": status, "hang": hang})
        if code != 200:
            raise RuntimeError(f"{self.name}: setting faults failed ({code}): {body.get('error', body)}")
        return body

    def serves(self, version: str, model: str = "demo") -> bool:
        """The replica reports `version` of `model` READY (repository index)."""
        req = urllib.request.Request(f"http://{self.http_address}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                index = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return any(m.get("name") == model and str(m.get("version")) == str(version) and m.get("state") == "READY"
                   for m in index)


def infer_region(http_address: str, model: str = "demo", timeout_s: float = 5.0) -> str:
    """One JSON inference through a gateway: the `geogate-region` that served it ('' on failure)."""
    return infer_headers(http_address, model, timeout_s).get(REGION_HEADER, "")


def infer_headers(http_address: str, model: str = "demo", timeout_s: float = 5.0) -> dict[str, str]:
    """One JSON inference through a gateway: its `geogate-*` answer headers ({} on failure)."""
    from replicas.demo.onnx_model import SPECS

    width = next(s.layer_widths[0] for s in SPECS.values() if s.model_name == model)
    body = {"inputs": [{"name": "INPUT0", "shape": [1, width], "datatype": "FP32", "data": [0.5] * width}]}
    req = urllib.request.Request(f"http://{http_address}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            if r.status != 200:
                return {}
            return {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("geogate-")}
    except (urllib.error.URLError, OSError, ValueError):
        return {}


@dataclass
class PoolConfig:
    name: str
    replicas: list[str]  # replica URLs
    kind: str = "geogate"
    repository: str = ""  # the site's model repository (sync agents fill it)


@dataclass
class RegionConfig:
    name: str
    location: tuple[float, float] = (0.0, 0.0)
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    pools: list[PoolConfig] = field(default_factory=list)
    host: str = LOOPBACK  # another address for a gateway inside a network namespace

    @property
    def http_address(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def admin_address(self) -> str:
        return f"{self.host}:{self.admin_port}"

    @property
    def ports(self) -> list[int]:
        return [self.http_port, self.grpc_port, self.admin_port]


def _toml_value(v: object) -> str:
    # json's string and list syntax is valid TOML for the plain values a config holds
    return json.dumps(v)


def write_config(path: str | os.PathLike[str], regions: list[RegionConfig], *, store_dir: str = "",
                 store: dict[str, object] | None = None, sections: dict[str, dict[str, object]] | None = None
                 ) -> Path:
    """Write a geogate TOML config: [deployment], [store] (a file:// store in `store_dir`, or the
    keys of `store`: {"url": "s3://...", "endpoint_url": ...}), any extra `sections`
    ({"health": {"interval_ms": 200}, ...}), then the regions with their pools."""
    store = store or {"url": "file://" + store_dir}
    lines = ['[deployment]', 'name = "loadtest"', '', '[store]']
    lines += [f"{k} = {_toml_value(v)}" for k, v in store.items()]
    lines.append("")
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
                      f"  replicas = {_toml_value(p.replicas)}"]
            if p.repository:
                lines.append(f"  repository = {_toml_value(p.repository)}")
            lines.append("")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


class GatewayProc(Proc):
    """`geogate gateway --config F --region R [--workers N]`."""

    def __init__(self, config_path: str | os.PathLike[str], region: RegionConfig, *,
                 log_dir: str | os.PathLike[str], workers: int = 1, name: str = "", netns: str | None = None,
                 env: dict[str, str] | None = None):
        self.region = region
        self.workers = workers
        args = [*GEOGATE, "gateway", "--config", str(config_path), "--region", region.name]
        if workers > 1:
            args += ["--workers", str(workers)]
        super().__init__(args, name=name or f"gateway-{region.name}", log_dir=log_dir, netns=netns, env=env,
                         ports=region.ports if region.host == LOOPBACK else [])

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
        return get_json(f"http://{self.region.admin_address}/geogate/v1/region", timeout_s)

    def wait_all_healthy(self, timeout_s: float = GATEWAY_READY_TIMEOUT_S) -> GatewayProc:
        """Until every configured replica is healthy in the gateway's view (so a scenario starts
        with the whole pool in rotation, not just the first replica probed). With several
        workers this is one worker's view; each probes on its own, on the same cadence."""
        def all_healthy() -> bool:
            replicas = self.region_summary().get("replicas") or {}
            return bool(replicas.get("total")) and replicas.get("healthy") == replicas.get("total")
        self.wait_until(all_healthy, timeout_s, what="healthy on every replica")
        return self


class SyncProc(Proc):
    """`geogate sync --config F --site S`: one site's sync agent."""

    def __init__(self, config_path: str | os.PathLike[str], site: str, *, log_dir: str | os.PathLike[str],
                 env: dict[str, str] | None = None):
        super().__init__([*GEOGATE, "sync", "--config", str(config_path), "--site", site, "--log-level", "info"],
                         name=f"sync-{site}", log_dir=log_dir, env=env)


class MotoProc(Proc):
    """A real S3-protocol server (moto_server) on loopback, with `bucket` created."""

    def __init__(self, *, log_dir: str | os.PathLike[str], bucket: str = "geogate-loadtest"):
        self.port = free_port()
        self.bucket = bucket
        self.endpoint_url = f"http://{LOOPBACK}:{self.port}"
        super().__init__([MOTO_SERVER, "-H", LOOPBACK, "-p", str(self.port)], name="moto", log_dir=log_dir,
                         ports=[self.port])

    def wait_ready(self, timeout_s: float = 30.0) -> MotoProc:
        self.wait_until(lambda: port_open(self.port), timeout_s, what="listening")
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url, **_boto_credentials()).create_bucket(Bucket=self.bucket)
        return self


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


class TcpProxyProc(Proc):
    """`python -m loadtests.tcp_proxy`: a plain TCP forwarder on a FIXED port, so it can be killed
    (the target becomes unreachable: connections refused, open ones reset) and started again
    on the same port (reachable again) while the target keeps its state."""

    def __init__(self, target: str, *, log_dir: str | os.PathLike[str], port: int = 0, name: str = "store-proxy"):
        self.port = port or free_port()
        self.target = target
        self.address = f"{LOOPBACK}:{self.port}"
        super().__init__([sys.executable, "-m", "loadtests.tcp_proxy", "--listen", self.address, "--target", target],
                         name=name, log_dir=log_dir, ports=[self.port])

    def wait_ready(self, timeout_s: float = 30.0) -> TcpProxyProc:
        self.wait_until(lambda: port_open(self.port), timeout_s, what="listening")
        return self
