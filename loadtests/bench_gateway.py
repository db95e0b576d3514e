"""Benchmark: the gateway's data path against going direct and against HAProxy.

    python -m loadtests.bench_gateway            # 3 interleaved rounds per measurement
    python -m loadtests.bench_gateway --quick    # 1 short round (a smoke run)

Same replicas (4 `geogate replica` processes, tiny demo model, HTTP binary requests), same
load, three paths measured in one run:
- direct: to one replica;
- geogate: `geogate gateway --workers N` (N = cores by default) over the 4 replicas;
- HAProxy: Debian's haproxy configured here: HTTP mode, round-robin, health checks
  (`option httpchk GET /v2/health/ready`), keep-alive to the servers, nbthread = N.
Load comes from wrk (C, epoll; it does not bottleneck the way a Python client would), with
the request body from a Lua script. Each measurement is a closed loop of C connections for
D seconds; paths are interleaved round by round and the median round is reported, because
this machine is shared and noisy.

Scenario 1, all healthy: moderate load (latency: what geogate adds over direct at p50/p99)
and high load (throughput: geogate / HAProxy).
Scenario 2, one of four replicas 10x slower (its fault switch delays each inference by 9x
the measured direct p50): p99 of geogate and HAProxy vs their own all-healthy p99.

The gateway runs with the access log off (HAProxy logs nothing by default either); say
`--access-log` to include it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from loadtests.procs import GEOGATE, PoolConfig, RegionConfig, free_port, http_ok, post_json, write_config
from replicas.demo_model import write_repository_entry

WRK = shutil.which("wrk") or "/usr/bin/wrk"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
REPLICAS = 4
MODERATE_CONNECTIONS = 4
HIGH_CONNECTIONS = 64
SLOW_FACTOR = 10
GOAL_P50_ADDED_MS = 0.3
GOAL_P99_ADDED_MS = 1.5
GOAL_THROUGHPUT_VS_HAPROXY = 0.5
INFER_PATH = "/v2/models/demo/infer"

console = Console()


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


# ------------------------------------------------------------------ load (wrk)


def _wrk_script(path: Path) -> Path:
    x = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(1, 16)
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()
    body = header + x.tobytes()
    escaped = "".join(f"\\{b:03d}" for b in body)
    path.write_text(f'wrk.method = "POST"\nwrk.body = "{escaped}"\n'
                    f'wrk.headers["Inference-Header-Content-Length"] = "{len(header)}"\n'
                    'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return path


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"cannot read a latency from {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def wrk(address: str, script: Path, *, connections: int, duration_s: float, threads: int) -> Run:
    out = subprocess.run([WRK, f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", "--latency",
                          "-s", str(script), f"http://{address}{INFER_PATH}"],
                         capture_output=True, text=True, timeout=duration_s + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    return Run(rps, p50, p99, errors)


def median_run(runs: list[Run]) -> Run:
    return Run(statistics.median(r.rps for r in runs), statistics.median(r.p50_ms for r in runs),
               statistics.median(r.p99_ms for r in runs), sum(r.errors for r in runs))


# ------------------------------------------------------------------ processes


class Child:
    """A process of the benchmark, in the benchmark's own session.

    Deliberately not a new session per process (as loadtests.procs does): with the kernel's
    scheduler autogroups (kernel.sched_autogroup_enabled=1 here) every session is a separate
    CPU-fair-share group, so a gateway in its own session would be capped at the share of each
    replica's session while needing more CPU than one replica; HAProxy needs little and would
    not notice. One session gives every path the same scheduling."""

    def __init__(self, args: list[str], *, name: str, workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_http(self, url: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            if http_ok(url):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:g} s: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class Replica(Child):
    def __init__(self, repo: Path, index: int, workdir: Path) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.http_address = f"127.0.0.1:{self.http_port}"
        super().__init__([*GEOGATE, "replica", "--repository", str(repo), "--http-port", str(self.http_port),
                          "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
                          "--log-level", "warning", "--enable-test-faults"], name=f"replica-{index}", workdir=workdir)

    def wait_ready(self) -> None:
        self.wait_http(f"http://{self.http_address}/v2/health/ready")

    def set_faults(self, *, delay_ms: int = 0) -> None:
        code, body = post_json(f"http://{self.http_address}/geogate/test/faults",
                               {"delay_ms": delay_ms, "status": 0, "hang": False})
        if code != 200:
            raise RuntimeError(f"{self.name}: setting faults failed ({code}): {body}")


class Gateway(Child):
    def __init__(self, config: Path, region: RegionConfig, workers: int, workdir: Path) -> None:
        self.region = region
        self.http_address = region.http_address
        super().__init__([*GEOGATE, "gateway", "--config", str(config), "--region", region.name,
                          "--workers", str(workers)], name="gateway", workdir=workdir)

    def wait_all_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
            try:
                code, summary = 0, {}
                with urllib.request.urlopen(f"http://{self.region.admin_address}/geogate/v1/region",
                                            timeout=2) as r:
                    code, summary = r.status, json.loads(r.read())
            except (OSError, ValueError):
                pass
            reps = summary.get("replicas") or {}
            if code == 200 and reps.get("total") and reps.get("healthy") == reps.get("total"):
                return
            time.sleep(0.2)
        raise TimeoutError("gateway: not every replica healthy")


class HaproxyProc(Child):
    def __init__(self, workdir: Path, replicas: list[Replica], threads: int) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        servers = "\n".join(f"    server r{i} {r.http_address} check inter 1s fall 2 rise 2"
                            for i, r in enumerate(replicas))
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(f"""global
    maxconn 4096
    nbthread {threads}
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend fe
    bind {self.address}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-reuse always
{servers}
""")
        super().__init__([HAPROXY, "-db", "-f", str(self.config)], name="haproxy", workdir=workdir)

    def wait_ready(self) -> None:
        self.wait_http(f"http://{self.address}/v2/health/ready", timeout_s=30)


# ------------------------------------------------------------------ the benchmark


def _measure(paths: dict[str, str], script: Path, *, connections: int, duration_s: float, rounds: int,
             threads: int) -> dict[str, Run]:
    runs: dict[str, list[Run]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, address in paths.items():  # interleaved: noise hits every path alike
            runs[name].append(wrk(address, script, connections=connections, duration_s=duration_s,
                                  threads=threads))
    return {name: median_run(r) for name, r in runs.items()}


def _table(title: str, results: dict[str, Run]) -> Table:
    t = Table(title=title)
    for col in ("path", "req/s", "p50 ms", "p99 ms", "errors"):
        t.add_column(col, justify="right" if col != "path" else "left")
    for name, r in results.items():
        t.add_row(name, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", str(r.errors))
    return t


def _verdict(ok: bool) -> str:
    return "[green]meets goal[/green]" if ok else "[red]misses goal[/red]"


def run_benchmark(args: argparse.Namespace) -> int:
    if not os.path.exists(WRK):
        console.print("[red]wrk is not installed[/red] (Debian: apt-get install wrk)")
        return 2
    if not os.path.exists(HAPROXY):
        console.print("[red]haproxy is not installed[/red] (Debian: apt-get install haproxy)")
        return 2
    workers = args.workers or os.cpu_count() or 1
    duration_s = args.duration_s or (3.0 if args.quick else 8.0)
    rounds = args.rounds or (1 if args.quick else 3)
    workdir = Path(tempfile.mkdtemp(prefix="geogate-bench-gateway-"))
    repo = workdir / "repo"
    write_repository_entry(repo, 1)
    script = _wrk_script(workdir / "infer.lua")
    procs: list = []
    haproxy: HaproxyProc | None = None  # stopped first
    try:
        replicas = [Replica(repo, i, workdir) for i in range(REPLICAS)]
        procs += replicas
        for r in replicas:
            r.wait_ready()
        region = RegionConfig("bench", pools=[PoolConfig("p", [f"http://{r.http_address}" for r in replicas])])
        config = write_config(workdir / "geogate.toml", [region], store_dir=str(workdir / "store"), sections={
            "health": {"interval_ms": 1000, "timeout_ms": 500},
            "gateway": {"access_log": bool(args.access_log)},
        })
        gateway = Gateway(config, region, workers, workdir)
        procs.append(gateway)
        gateway.wait_all_healthy()
        haproxy = HaproxyProc(workdir, replicas, workers)
        haproxy.wait_ready()
        paths = {"direct (1 replica)": replicas[0].http_address, "geogate": gateway.http_address,
                 "haproxy": haproxy.address}
        console.print(f"[bold]geogate gateway benchmark[/bold]: {REPLICAS} replicas (tiny demo model, HTTP "
                      f"binary), gateway --workers {workers}, haproxy nbthread {workers}, wrk "
                      f"{args.threads} threads; {rounds} round(s) x {duration_s:g} s per measurement; "
                      f"{os.cpu_count()} cores [yellow](machine shared with other work: figures are noisy)"
                      "[/yellow]")
        for address in paths.values():  # warm up connections and EWMAs
            wrk(address, script, connections=MODERATE_CONNECTIONS, duration_s=1, threads=1)

        moderate = _measure(paths, script, connections=MODERATE_CONNECTIONS, duration_s=duration_s,
                            rounds=rounds, threads=min(args.threads, MODERATE_CONNECTIONS))
        console.print(_table(f"Scenario 1a: all healthy, moderate load ({MODERATE_CONNECTIONS} connections)",
                             moderate))
        high = _measure(paths, script, connections=args.connections, duration_s=duration_s, rounds=rounds,
                        threads=args.threads)
        console.print(_table(f"Scenario 1b: all healthy, high load ({args.connections} connections)", high))

        d, g, h = moderate["direct (1 replica)"], moderate["geogate"], moderate["haproxy"]
        added_p50 = g.p50_ms - d.p50_ms
        added_p99 = g.p99_ms - d.p99_ms
        ratio_haproxy = high["geogate"].rps / max(1e-9, high["haproxy"].rps)
        ratio_direct = high["geogate"].rps / max(1e-9, high["direct (1 replica)"].rps)
        summary = Table(title="Scenario 1: geogate vs direct and HAProxy")
        for col in ("figure", "value", "goal", "verdict"):
            summary.add_column(col)
        summary.add_row("p50 added over direct (moderate)", f"{added_p50:+.2f} ms", f"<= {GOAL_P50_ADDED_MS} ms",
                        _verdict(added_p50 <= GOAL_P50_ADDED_MS))
        summary.add_row("p99 added over direct (moderate)", f"{added_p99:+.2f} ms", f"<= {GOAL_P99_ADDED_MS} ms",
                        _verdict(added_p99 <= GOAL_P99_ADDED_MS))
        summary.add_row("haproxy p50 / p99 added (moderate)", f"{h.p50_ms - d.p50_ms:+.2f} / "
                        f"{h.p99_ms - d.p99_ms:+.2f} ms", "", "")
        summary.add_row("throughput geogate / haproxy (high)", f"{ratio_haproxy:.2f}x",
                        f">= {GOAL_THROUGHPUT_VS_HAPROXY}x", _verdict(ratio_haproxy >= GOAL_THROUGHPUT_VS_HAPROXY))
        summary.add_row("throughput geogate / direct (high)", f"{ratio_direct:.2f}x", "", "")
        console.print(summary)

        # Scenario 2: one replica of four 10x slower
        delay_ms = max(1, round(d.p50_ms * (SLOW_FACTOR - 1)))
        replicas[-1].set_faults(delay_ms=delay_ms)
        slow_paths = {"geogate": gateway.http_address, "haproxy": haproxy.address}
        for address in slow_paths.values():  # let the balancer learn
            wrk(address, script, connections=args.slow_connections, duration_s=1, threads=1)
        healthy = _measure(slow_paths, script, connections=args.slow_connections, duration_s=duration_s,
                           rounds=rounds, threads=min(args.threads, args.slow_connections)) \
            if args.slow_connections != MODERATE_CONNECTIONS else None
        slow = _measure(slow_paths, script, connections=args.slow_connections, duration_s=duration_s,
                        rounds=rounds, threads=min(args.threads, args.slow_connections))
        replicas[-1].set_faults()
        base = healthy or {k: moderate[k] for k in slow_paths}
        t2 = Table(title=f"Scenario 2: 1 of {REPLICAS} replicas {SLOW_FACTOR}x slower (+{delay_ms} ms per "
                         f"inference), {args.slow_connections} connections")
        for col in ("path", "req/s", "p50 ms", "p99 ms", "all-healthy p99 ms", "p99 / healthy p99", "errors"):
            t2.add_column(col, justify="right" if col != "path" else "left")
        for name, r in slow.items():
            t2.add_row(name, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{base[name].p99_ms:.2f}",
                       f"{r.p99_ms / max(1e-9, base[name].p99_ms):.2f}x", str(r.errors))
        console.print(t2)
        console.print(f"logs and configs: {workdir}")
        return 0
    finally:
        if haproxy is not None:
            haproxy.stop()
        for p in reversed(procs):
            p.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench_gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one short round per measurement")
    p.add_argument("--workers", type=int, default=0, help="gateway workers and haproxy threads (default: cores)")
    p.add_argument("--duration-s", type=float, default=0.0, help="seconds per measurement (default 8, quick 3)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--connections", type=int, default=HIGH_CONNECTIONS, help="connections for the high load")
    p.add_argument("--slow-connections", type=int, default=MODERATE_CONNECTIONS,
                   help="connections for the slow-replica scenario")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--access-log", action="store_true", help="keep the gateway's access log on")
    return run_benchmark(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
