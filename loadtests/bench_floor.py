"""What any Python proxy costs here, beside what the gateway costs: HTTP through HAProxy, the
gateway (1 worker and --workers = cores) and a minimal Python proxy (`loadtests.minimal_proxy`:
uvloop + httptools, no features; 1 process and one per core, SO_REUSEPORT), one replica of the
tiny demo model, perf_analyzer as the load generator.

`python -m loadtests.bench_floor [--concurrency 8 64] [--rounds 2]`

Per path and concurrency: throughput, p50, the proxy's CPU per request (its processes' user +
system time from /proc over the replica's count of answered requests) and the ratio to HAProxy
in the same round. Paths are alternated within each round so a shared machine's drifts hit
them alike. If the minimal proxy with one process per core stays under HAProxy, so will any
Python proxy on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from loadtests import perf_analyzer
from loadtests.bench_sweep import cores
from loadtests.haproxy import HaproxyProc, require_haproxy
from loadtests.procs import (
    GatewayProc,
    PoolConfig,
    Proc,
    RegionConfig,
    ReplicaProc,
    cpu_s,
    free_port,
    inferences_served,
    port_open,
    write_config,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if not perf_analyzer.available():
        print("perf_analyzer missing: run `make triton-env` first", file=sys.stderr)
        return 2
    require_haproxy()
    from replicas.demo.onnx_model import write_repository_entry

    n = cores()
    work = Path(tempfile.mkdtemp(prefix="geogate-bench-floor-"))
    os.chdir(work)  # `python -m gateway` must not pick up a checkout from the working directory
    logs = work / "logs"
    write_repository_entry(work / "repo", 1, size="tiny")
    procs: list[Proc] = []
    try:
        replica = ReplicaProc(work / "repo", name="replica", log_dir=logs, enable_test_faults=False)
        procs.append(replica)
        replica.wait_ready()
        haproxy = HaproxyProc(work, [replica.http_address], log_dir=logs, threads=n)
        procs.append(haproxy)
        haproxy.wait_ready()
        paths: dict[str, tuple[list[Proc], str]] = {"haproxy": ([haproxy], haproxy.address)}
        for workers in (1, n):
            region = RegionConfig("floor", pools=[PoolConfig("p", [replica.url("http"), replica.url("grpc")])])
            cfg = write_config(work / f"gateway-{workers}w.toml", [region], store_dir=str(work / "store"),
                               sections={"gateway": {"access_log": False}})
            gw = GatewayProc(cfg, region, log_dir=logs, workers=workers, name=f"gateway-{workers}w")
            procs.append(gw)
            gw.wait_ready()
            gw.wait_all_healthy()
            paths[f"geogate-{workers}w"] = ([gw], gw.http_address)
        for count in (1, n):
            port = free_port()
            minimal = [Proc([sys.executable, "-m", "loadtests.minimal_proxy", str(port), replica.http_address],
                            name=f"minimal-{count}p-{i}", log_dir=logs, ports=[port],
                            env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
                       for i in range(count)]
            procs += minimal
            for p in minimal:
                p.wait_until(lambda port=port: port_open(port), 10.0)
            paths[f"minimal-{count}p"] = (minimal, f"127.0.0.1:{port}")
        got: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
        for c in args.concurrency:
            for rnd in range(args.rounds):
                for name, (owners, address) in paths.items():
                    c0, n0 = sum(cpu_s(p.pid) for p in owners), inferences_served(replica.http_address)
                    r = perf_analyzer.run(address, protocol="http", concurrency=c, interval_ms=1500)
                    answered = inferences_served(replica.http_address) - n0
                    cpu_us = 1e6 * (sum(cpu_s(p.pid) for p in owners) - c0) / answered if answered else float("nan")
                    tput = r.get("throughput", float("nan"))
                    got.setdefault((c, name), []).append((tput, r.get("p50_ms", float("nan")), cpu_us))
                    print(f"c={c} round {rnd} {name}: {tput:.0f} infer/s, p50 {r.get('p50_ms')} ms, "
                          f"{cpu_us:.0f} µs CPU/request" + (f" {r['error']}" if "error" in r else ""), flush=True)
        print(f"\nHTTP, one replica, {n} cores shared by everything; median over {args.rounds} rounds:")
        print("| c | path | infer/s | p50 ms | proxy CPU µs/request | / HAProxy |")
        print("|---|---|---|---|---|---|")
        for c in args.concurrency:
            base = statistics.median(t for t, _, _ in got[(c, "haproxy")])
            for name in paths:
                rows = got[(c, name)]
                tput = statistics.median(t for t, _, _ in rows)
                print(f"| {c} | {name} | {tput:.0f} | {statistics.median(p for _, p, _ in rows):.2f} | "
                      f"{statistics.median(u for _, _, u in rows):.0f} | {tput / base:.2f}x |")
    finally:
        for p in reversed(procs):
            p.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
