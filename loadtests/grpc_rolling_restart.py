"""gRPC through rolling restarts: count every non-OK call, and say where it came from.

    python -m loadtests.grpc_rolling_restart [--channels 8] [--rate 300] [--restarts 4]
                                             [--workers 2] [--max-connection-age-ms 10000] [--out DIR]

Starts two `geogate replica` processes and one `geogate gateway --workers N`, sends gRPC
ModelInfer calls from `--channels` separate channels (separate connections, spread over the
workers by SO_REUSEPORT) at `--rate` calls/s in total, and sends SIGUSR2 (a rolling restart)
`--restarts` times. Prints every non-OK call (code, details, when relative to the nearest
worker drain) and the workers' own "requests cut off" counts, and exits 1 when any call
failed or a worker's count is not the number of calls it really cut off.

This is how the CANCELLED calls of issue 17 were found and measured: grpc-core answers
CANCELLED for a call that reached a server after ``grpc_server_shutdown_and_notify`` but
before the client read the GOAWAY, and for calls queued in core that the Python server had
not asked for yet (grpc/grpc#41785). gateway/server/drain.py says what the worker does about
it; ``--max-connection-age-ms 0`` turns that off (the worker cannot move its gRPC clients
before its server stops) and shows the CANCELLED calls again. `tests/e2e/test_hardening_admin.py`
runs the same load, smaller.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtests.procs import GEOGATE, PoolConfig, Proc, RegionConfig, ReplicaProc, http_ok, write_config

REGION = "r1"
START_TIMEOUT_S = 90.0
RESTART_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 10.0
CUT_OFF = re.compile(r"worker (\d+) stopped after [\d.]+ s drain \((\d+) requests cut off[:)]")
DRAINING = re.compile(r'"ts":([\d.]+),[^\n]*worker \d+ draining')
X = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(1, 16)


def worker_pids(supervisor_pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()}
    except OSError:
        return set()


@dataclass
class CallLog:
    """Every call's outcome; failures with their time (monotonic) and details."""

    codes: Counter = field(default_factory=Counter)
    failures: list[tuple[float, float, str, str]] = field(default_factory=list)  # (monotonic, wall, ...)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, code: str, t_s: float, details: str = "") -> None:
        with self.lock:
            self.codes[code] += 1
            if code != "OK":
                self.failures.append((t_s, time.time(), code, details))

    @property
    def total(self) -> int:
        return sum(self.codes.values())


class GrpcLoad:
    """`channels` grpc.aio channels in one event loop (its own thread), `rate` calls/s in total,
    open loop: each channel starts a call every channels/rate seconds whatever the answers."""

    def __init__(self, target: str, *, channels: int, rate: float) -> None:
        self.target = target
        self.channels = channels
        self.rate = rate
        self.log = CallLog()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grpc-load", daemon=True)

    def __enter__(self) -> GrpcLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> CallLog:
        self._stop.set()
        self._thread.join(CALL_TIMEOUT_S + 10)
        return self.log

    def wait_for(self, total: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.log.total < total and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.log.total < total:
            raise TimeoutError(f"only {self.log.total} calls in {timeout_s:g} s")

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import grpc
        from tritonclient.grpc import service_pb2

        req = service_pb2.ModelInferRequest(model_name="demo")
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
        req.raw_input_contents.append(X.tobytes())
        raw = req.SerializeToString()
        # one connection per channel: no shared subchannel pool between them
        chans = [grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(self.channels)]
        calls = [c.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=None, response_deserializer=None) for c in chans]
        pending: set[asyncio.Task] = set()

        async def one(call) -> None:
            try:
                await call(raw, timeout=CALL_TIMEOUT_S)
                self.log.add("OK", time.monotonic())
            except grpc.aio.AioRpcError as exc:
                self.log.add(exc.code().name, time.monotonic(), exc.details() or "")

        async def channel_loop(i: int) -> None:
            period_s = self.channels / self.rate
            next_s = time.monotonic() + period_s * i / self.channels
            while not self._stop.is_set():
                delay = next_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.ensure_future(one(calls[i]))
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_s += period_s

        loops = [asyncio.ensure_future(channel_loop(i)) for i in range(self.channels)]
        await asyncio.to_thread(self._stop.wait)
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if pending:
            await asyncio.wait(pending, timeout=CALL_TIMEOUT_S + 2)
        for c in chans:
            await c.close()


@dataclass
class World:
    replicas: list[ReplicaProc]
    gateway: Proc
    region: RegionConfig

    def stop(self) -> None:
        self.gateway.stop(30)
        for r in self.replicas:
            r.stop()


def start_world(workdir: Path, *, workers: int, gateway_extra: dict | None = None) -> World:
    from replicas.demo.onnx_model import write_repository_entry

    repo = workdir / "repo"
    write_repository_entry(repo, 1)
    reps = [ReplicaProc(repo, name=f"replica-{i}", log_dir=workdir) for i in range(2)]
    try:
        for r in reps:
            r.wait_ready()
        region = RegionConfig(REGION, pools=[PoolConfig("p1", [r.url("grpc") for r in reps])])
        config = write_config(workdir / "gateway.toml", [region], store_dir=str(workdir / "store"),
                              sections={"health": {"interval_ms": 300, "timeout_ms": 250, "rise": 1, "fall": 2},
                                        "gateway": {"drain_timeout_ms": 10000, "access_log": False,
                                                    **(gateway_extra or {})}})
        gw = Proc([*GEOGATE, "gateway", "--config", str(config), "--region", REGION, "--workers", str(workers)],
                  name="gateway", log_dir=workdir, ports=region.ports)
    except BaseException:
        for r in reps:
            r.stop()
        raise
    world = World(reps, gw, region)
    try:
        gw.wait_until(lambda: http_ok(f"http://{region.http_address}/v2/health/ready")
                      and len(worker_pids(gw.pid)) == workers, START_TIMEOUT_S)
    except BaseException:
        world.stop()
        raise
    return world


def rolling_restart(world: World, workers: int) -> tuple[float, float]:
    """SIGUSR2, then wait until every worker is new: (start, end) monotonic times."""
    old = worker_pids(world.gateway.pid)
    t0 = time.monotonic()
    os.kill(world.gateway.pid, signal.SIGUSR2)
    deadline = t0 + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        now = worker_pids(world.gateway.pid)
        if len(now) == workers and not now & old:
            return t0, time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"workers {sorted(old)} not all replaced after {RESTART_TIMEOUT_S:g} s")


def cut_off_counts(output: str) -> list[int]:
    return [int(m.group(2)) for m in CUT_OFF.finditer(output)]


def measure(workdir: Path, *, channels: int, rate: float, restarts: int, workers: int = 2,
            settle_calls: int = 200, gateway_extra: dict | None = None) -> dict:
    """Run the experiment; the result: codes, failures (with the restart they fell in), the
    workers' cut-off counts and the gateway's output."""
    world = start_world(workdir, workers=workers, gateway_extra=gateway_extra)
    windows: list[tuple[float, float]] = []
    try:
        with GrpcLoad(world.region.grpc_address, channels=channels, rate=rate) as load:
            load.wait_for(settle_calls)
            for _ in range(restarts):
                windows.append(rolling_restart(world, workers))
                load.wait_for(load.log.total + settle_calls)
            log = load.stop()
    finally:
        world.stop()
    output = world.gateway.log_path.read_text(errors="replace")
    drains = [float(m.group(1)) for m in DRAINING.finditer(output)]
    failures = []
    for t_s, wall_s, code, details in log.failures:
        where = next((f"restart {i + 1} +{t_s - a:.2f} s" for i, (a, b) in enumerate(windows) if a <= t_s <= b + 1),
                     "outside any restart")
        since = [wall_s - d for d in drains if d <= wall_s]
        if since:
            where += f", {min(since):.3f} s after a worker began to drain"
        failures.append({"code": code, "details": details, "when": where})
    return {"codes": dict(log.codes), "total": log.total, "failures": failures,
            "cut_off": cut_off_counts(output), "output": output}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.grpc_rolling_restart", description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--rate", type=float, default=300.0, help="calls per second, all channels together")
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-connection-age-ms", type=int, default=10000,
                   help="[gateway] grpc_max_connection_age_ms (0: no handover of gRPC clients)")
    p.add_argument("--out", default="", help="keep the processes' logs here (default: a temp dir)")
    args = p.parse_args(argv)
    workdir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="geogate-grpc-restart-"))
    workdir.mkdir(parents=True, exist_ok=True)
    res = measure(workdir, channels=args.channels, rate=args.rate, restarts=args.restarts, workers=args.workers,
                  gateway_extra={"grpc_max_connection_age_ms": args.max_connection_age_ms})
    print(f"{res['total']} calls: {res['codes']}")
    for f in res["failures"]:
        print(f"  {f['code']} ({f['when']}): {f['details']}")
    cut = res["cut_off"]
    print(f"workers' cut-off counts: {cut} (stopped workers: {len(cut)}); logs in {workdir}")
    failed = len(res["failures"])
    if failed or sum(cut) != 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
