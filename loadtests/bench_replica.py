"""Benchmark: the replica's throughput and latency, dynamic batching on vs off, over HTTP and gRPC,
next to the physical limit (in-process ONNX Runtime at the batch size the batcher reached).

    python -m loadtests.bench_replica [--quick] [--protocol http|grpc|both] [--batching on|off|both]

Starts one `geogate replica` with two copies of the heavy demo model (with and without
dynamic_batching) and drives it in closed loops at concurrency 1, 16 and 64 from one client
process whose clients cost as little CPU as possible (raw HTTP/1.1 keep-alive connections; gRPC
over a raw HTTP/2 connection; see bench_replica_clients), so that on a 2-core machine the figures
measure the server, not the load generator. Client CPU per request is measured and printed.

Each point is a warm-up, then windows of load, each followed at once by in-process ORT (same
model, same session options) at the mean batch size that window reached. The ratio of a window
is its throughput over that limit; a point reports the median over its windows. Pairing matters
on a shared machine: other work comes and goes within seconds, and a limit measured at another
moment would compare different machines. Goal: HTTP with batching at concurrency 64 reaches
>= 70% of the limit (more windows there, for the spread). Figures depend on the machine and on
whatever else runs on it; the default run takes about 2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtests.bench_replica_clients import CLIENTS, RPC_TIMEOUT_S, Window, make_input
from loadtests.procs import cpu_s

CONCURRENCIES = (1, 16, 64)
GOAL_CONCURRENCY = 64
GOAL_RATIO = 0.70
BATCHED, UNBATCHED = "demo-heavy", "demo-heavy-nobatch"
READY_TIMEOUT_S = 120.0
CLIENT_START_TIMEOUT_S = 60.0
WINDOW_RAMP_S = 0.1  # each window's first part refills the pipeline after the pause


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ clients

def _client_process(protocol: str, host: str, port: int, model: str, concurrency: int, conn) -> None:
    """Serves windows on command: receives (ramp_s, seconds), runs every closed loop for that long,
    sends back (latencies_s, errors, client CPU s, measured s); None ends it. Connections stay
    open between windows, so a window measures serving, not connecting."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        clients = CLIENTS[protocol](host, port, model, concurrency)
        try:
            while True:
                cmd = await loop.run_in_executor(None, conn.recv)
                if cmd is None:
                    return
                ramp_s, seconds = cmd
                start = time.perf_counter()
                done = loop.create_future()
                window = Window(start + ramp_s, start + ramp_s + seconds, concurrency, done)
                cpu: list[float] = []
                # CPU of the measured part only (the ramp refills the server's queues).
                loop.call_later(ramp_s, lambda c=cpu: c.append(time.process_time()))
                loop.call_later(ramp_s + seconds, lambda c=cpu: c.append(time.process_time()))
                await clients.run(window)
                await asyncio.wait_for(done, ramp_s + seconds + RPC_TIMEOUT_S)
                conn.send((window.latencies, window.errors, cpu[1] - cpu[0] if len(cpu) == 2 else float("nan"),
                           seconds))
        finally:
            await clients.close()

    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


class ClientProcess:
    """A client process kept across the windows of one point (its connections stay open)."""

    def __init__(self, protocol: str, port: int, model: str, concurrency: int):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_client_process,
                                 args=(protocol, "127.0.0.1", port, model, concurrency, child), daemon=True)
        self._proc.start()
        child.close()

    def window(self, ramp_s: float, seconds: float) -> tuple[list[float], int, float, float]:
        self._conn.send((ramp_s, seconds))
        if not self._conn.poll(CLIENT_START_TIMEOUT_S + ramp_s + seconds + RPC_TIMEOUT_S):
            raise RuntimeError("the client process did not finish its window")
        return self._conn.recv()

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()


@dataclass(slots=True)
class Point:
    protocol: str
    batching: bool
    concurrency: int
    rps: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    mean_batch: float = float("nan")
    replica_cpu_us: float = float("nan")
    client_cpu_us: float = float("nan")
    limit_rps: float = float("nan")
    limit_cpu_us: float = float("nan")  # in-process CPU per row at the batch size reached
    limit_batch: int = 1
    ratios: list[float] = field(default_factory=list)  # one per window, each against its own limit

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")

    @property
    def model_cpu_share(self) -> float:
        """In-process CPU per row over the replica's CPU per inference: how much of the replica's
        CPU the model itself gets. Unlike the throughput ratio it holds under CPU contention, and it
        is about what the ratio falls to when the replica has to share its cores."""
        return self.limit_cpu_us / self.replica_cpu_us if self.replica_cpu_us else float("nan")


# ------------------------------------------------------------------------------------ replica side

def _batch_totals(metrics_url: str, model: str) -> tuple[float, float]:
    """(sum of rows, number of runs) of geogate_replica_batch_size for a model so far."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()

    def grab(suffix: str) -> float:
        pattern = r"geogate_replica_batch_size_" + suffix + r'\{model="' + re.escape(model) + r'",version="1"\} (\S+)'
        m = re.search(pattern, text)
        return float(m.group(1)) if m else 0.0
    return grab("sum"), grab("count")


class InProcessLimit:
    """Plain ONNX Runtime on the model, same session options as the replica: rows/s at a batch size."""

    def __init__(self, model_path: Path, intra_op_threads: int = 1):
        import onnxruntime as ort

        from replicas.server.onnx_runner import choose_providers, session_options

        self._session = ort.InferenceSession(str(model_path), sess_options=session_options(intra_op_threads),
                                             providers=choose_providers(True))

    def measure(self, batch_rows: int, seconds: float) -> tuple[float, float]:
        """(rows/s, CPU us/row) over `seconds` (after two warm runs at that batch size)."""
        x = make_input(batch_rows)
        feeds = {"INPUT0": x}
        for _ in range(2):
            self._session.run(None, feeds)
        runs = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds:
            self._session.run(None, feeds)
            runs += 1
        rows = runs * batch_rows
        return rows / (time.perf_counter() - started), (time.process_time() - cpu_started) / rows * 1e6


def _start_replica(repo: Path, http_port: int, grpc_port: int, metrics_port: int, log_path: Path,
                   extra: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    log = open(log_path, "wb")  # the child keeps it; closed when it exits
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "replica", "--repository", str(repo),
                             "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                             "--metrics-port", str(metrics_port), "--log-level", "warning",
                             *(extra or [])],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"replica exited early:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("replica not ready in time")


def _intra_op_threads(replica_args: list[str]) -> int:
    """The replica's --intra-op-threads, so the in-process limit runs with the same setting."""
    for i, a in enumerate(replica_args):
        if a.startswith("--intra-op-threads="):
            return int(a.split("=", 1)[1])
        if a == "--intra-op-threads" and i + 1 < len(replica_args):
            return int(replica_args[i + 1])
    return 1


# ------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke check of the benchmark)")
    parser.add_argument("--window-s", type=float, default=None, help="seconds per measured window (default 1)")
    parser.add_argument("--windows", type=int, default=None, help="measured windows per point (default 3)")
    parser.add_argument("--goal-windows", type=int, default=None,
                        help="measured windows of the goal point (batching, concurrency 64; default 8)")
    parser.add_argument("--warmup-s", type=float, default=None, help="unmeasured seconds per point (default 1)")
    parser.add_argument("--limit-s", type=float, default=None,
                        help="seconds of in-process ORT after each window (default 0.3)")
    parser.add_argument("--concurrency", type=int, action="append", default=None)
    parser.add_argument("--protocol", choices=["http", "grpc", "both"], default="both")
    parser.add_argument("--batching", choices=["on", "off", "both"], default="both")
    parser.add_argument("--grpc-client", choices=["raw", "aio"], default="raw",
                        help="raw HTTP/2 (default, cheapest) or grpc.aio (the stock client, for comparison)")
    parser.add_argument("--replica-arg", action="append", default=[],
                        help="extra argument for `geogate replica` (repeatable), "
                             "e.g. --replica-arg=--intra-op-threads=2")
    args = parser.parse_args(argv)
    window_s = args.window_s or (0.5 if args.quick else 1.0)
    windows = max(1, args.windows or (1 if args.quick else 3))
    goal_windows = max(1, args.goal_windows or (2 if args.quick else 8))
    warmup_s = args.warmup_s if args.warmup_s is not None else (0.3 if args.quick else 1.0)
    limit_s = args.limit_s or (0.15 if args.quick else 0.3)
    concurrencies = tuple(args.concurrency or CONCURRENCIES)
    protocols = ("http", "grpc") if args.protocol == "both" else (args.protocol,)
    batchings = {"on": (True,), "off": (False,), "both": (True, False)}[args.batching]
    intra_op_threads = _intra_op_threads(args.replica_arg)

    from rich.console import Console

    from replicas.demo.onnx_model import write_repository_entry

    console = Console(width=180)
    points: list[Point] = []
    limits_cpu: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="geogate-bench-") as tmp:
        repo = Path(tmp) / "repo"
        write_repository_entry(repo, 1, size="heavy", name=BATCHED, batching=True)
        write_repository_entry(repo, 1, size="heavy", name=UNBATCHED, batching=False)
        http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
        console.print(f"replica: heavy demo model, cpus={os.cpu_count()}, intra-op threads={intra_op_threads}; "
                      f"per point {warmup_s}s warm-up, then windows of {window_s}s each followed by {limit_s}s of "
                      f"in-process ORT ({windows} windows, {goal_windows} at concurrency {GOAL_CONCURRENCY} "
                      "with batching)")
        limit = InProcessLimit(repo / BATCHED / "1" / "model.onnx", intra_op_threads)
        proc = _start_replica(repo, http_port, grpc_port, metrics_port, Path(tmp) / "replica.log",
                              args.replica_arg)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        try:
            for protocol in protocols:
                port = grpc_port if protocol == "grpc" else http_port
                client_kind = "grpc-aio" if protocol == "grpc" and args.grpc_client == "aio" else protocol
                for batching in batchings:
                    model = BATCHED if batching else UNBATCHED
                    for c in concurrencies:
                        n = goal_windows if batching and c == GOAL_CONCURRENCY else windows
                        p = _measure_point(proc.pid, metrics_url, limit, limits_cpu, protocol, client_kind, port,
                                           model, batching, c, warmup_s, window_s, n, limit_s)
                        points.append(p)
                        console.print(
                            f"  {protocol:4s} batching {'on ' if batching else 'off'} c={c:3d}: {p.rps:7.0f}/s "
                            f"p50 {p.p50_ms:7.2f} ms p99 {p.p99_ms:7.2f} ms batch {p.mean_batch:5.1f} "
                            f"limit {p.limit_rps:6.0f}/s ratio {p.ratio:4.0%} "
                            f"[{min(p.ratios):.0%}-{max(p.ratios):.0%}] errors {p.errors} "
                            f"CPU us/inf replica {p.replica_cpu_us:4.0f} client {p.client_cpu_us:4.0f}")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    _report(console, points, limits_cpu, intra_op_threads)
    return 0


def _measure_point(pid: int, metrics_url: str, limit: InProcessLimit, limits_cpu: dict[int, float],
                   protocol: str, client_kind: str, port: int, model: str, batching: bool, concurrency: int,
                   warmup_s: float,
                   window_s: float, windows: int, limit_s: float) -> Point:
    """Windows of closed-loop load, each followed at once by the in-process limit at the batch size
    that window reached: background load on a shared machine drifts over seconds, so each ratio
    compares two measurements taken under about the same conditions."""
    p = Point(protocol, batching, concurrency)
    client = ClientProcess(client_kind, port, model, concurrency)
    latencies: list[float] = []
    measured_s = client_cpu_s = rows_total = runs_total = cpu_total = 0.0
    limit_rows_s: list[float] = []
    limit_cpus: list[float] = []
    try:
        client.window(0.0, warmup_s)
        for _ in range(windows):
            s0, n0 = _batch_totals(metrics_url, model)
            cpu0 = cpu_s(pid)
            lats, errors, ccpu, seconds = client.window(WINDOW_RAMP_S, window_s)
            cpu1 = cpu_s(pid)
            s1, n1 = _batch_totals(metrics_url, model)
            batch = (s1 - s0) / (n1 - n0) if n1 > n0 else 1.0
            limit_rps, limit_cpu = limit.measure(max(1, round(batch)), limit_s)
            limits_cpu[max(1, round(batch))] = limit_cpu
            limit_cpus.append(limit_cpu)
            latencies += lats
            p.errors += errors
            measured_s += seconds
            client_cpu_s += ccpu
            rows_total += s1 - s0
            runs_total += n1 - n0
            cpu_total += cpu1 - cpu0
            limit_rows_s.append(limit_rps)
            p.ratios.append(len(lats) / seconds / limit_rps)
    finally:
        client.close()
    p.rps = len(latencies) / measured_s
    if latencies:
        lat = np.asarray(latencies)
        p.p50_ms, p.p99_ms = float(np.percentile(lat, 50) * 1000), float(np.percentile(lat, 99) * 1000)
    p.mean_batch = rows_total / runs_total if runs_total else float("nan")
    p.limit_batch = max(1, round(p.mean_batch)) if runs_total else 1
    p.limit_rps = statistics.mean(limit_rows_s)
    p.limit_cpu_us = statistics.mean(limit_cpus)
    # replica CPU per inference (ORT included), over the windows' ramps and tails alike
    p.replica_cpu_us = cpu_total / rows_total * 1e6 if rows_total else float("nan")
    p.client_cpu_us = client_cpu_s / len(latencies) * 1e6 if latencies else float("nan")
    return p


def _report(console, points: list[Point], limits_cpu: dict[int, float], intra_op_threads: int) -> None:
    from rich.table import Table

    table = Table(title="geogate replica, heavy demo model, closed loop, one client process")
    cols = ("protocol", "batching", "concurrency", "inferences/s", "p50 ms", "p99 ms", "mean batch",
            "in-process limit/s", "ratio (windows)", "model CPU share", "replica CPU us/inf", "client CPU us/inf",
            "errors")
    for col in cols:
        table.add_column(col, justify="left" if col in ("protocol", "batching") else "right")
    for p in points:
        table.add_row(p.protocol, "on" if p.batching else "off", str(p.concurrency), f"{p.rps:,.0f}",
                      f"{p.p50_ms:.2f}", f"{p.p99_ms:.2f}", f"{p.mean_batch:.1f}",
                      f"{p.limit_rps:,.0f} (b{p.limit_batch})",
                      f"{p.ratio:.0%} ({min(p.ratios):.0%}-{max(p.ratios):.0%})", f"{p.model_cpu_share:.0%}",
                      f"{p.replica_cpu_us:,.0f}", f"{p.client_cpu_us:,.0f}", str(p.errors))
    console.print(table)
    console.print(f"in-process ORT ({intra_op_threads} intra-op thread(s)), CPU us/row at each batch size: "
                  + ", ".join(f"b{b}: {us:,.0f}" for b, us in sorted(limits_cpu.items())))
    console.print("ratio: median over windows of (throughput / in-process limit measured right after the window); "
                  "model CPU share: in-process CPU per row / replica CPU per inference")
    for protocol in ("http", "grpc"):
        goal = [p for p in points if (p.protocol, p.batching, p.concurrency) == (protocol, True, GOAL_CONCURRENCY)]
        if not goal:
            continue
        ratios = sorted(r for p in goal for r in p.ratios)
        med = statistics.median(ratios)
        spread = f" (windows: {', '.join(f'{r:.0%}' for r in ratios)})" if len(ratios) > 1 else ""
        verdict = ("met" if round(med, 2) >= GOAL_RATIO else "NOT met") if protocol == "http" else "reported"
        console.print(f"{protocol} batching at concurrency {GOAL_CONCURRENCY}: median {med:.0%} of the in-process "
                      f"limit{spread}, model CPU share {goal[0].model_cpu_share:.0%}; goal >= {GOAL_RATIO:.0%} over "
                      f"HTTP: {verdict}")
    load1, _, _ = os.getloadavg()
    console.print(f"[dim]load average at the end: {load1:.1f} on {os.cpu_count()} CPUs; figures from a shared "
                  "machine move with whatever else runs on it[/dim]")


if __name__ == "__main__":
    sys.exit(main())
