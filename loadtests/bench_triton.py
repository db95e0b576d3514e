"""A real Triton behind geogate: throughput through the gateway over throughput direct, HTTP and
gRPC, perf_analyzer at concurrency 4 (issue goal: >= 0.8x direct on both).

`python -m loadtests.bench_triton [--concurrency 4] [--rounds 2] [--workers N]`

One Triton (python backend, the tiny demo model) and one geogate gateway whose pool lists the
Triton's HTTP and gRPC listeners. gRPC is measured twice: with ``[gateway] grpc_upstream =
"http"`` (the default: translated to KServe binary HTTP for its HTTP listener) and ``"grpc"``
(the request's bytes go to the Triton's gRPC listener), each by its own gateway. Paths are
alternated within each round so that a shared machine's drifts hit them alike; the gateway
process's CPU per request is read from /proc.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from loadtests import perf_analyzer
from loadtests.procs import GatewayProc, PoolConfig, RegionConfig, cpu_s, inferences_served, write_config
from loadtests.triton import TritonProc, triton_available


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_triton", description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    args = parser.parse_args(argv)
    if not triton_available() or not perf_analyzer.available():
        print("tritonserver / perf_analyzer missing: run `make triton-env` first", file=sys.stderr)
        return 2
    from replicas.demo.python_backend import write_python_backend_entry

    work = Path(tempfile.mkdtemp(prefix="geogate-bench-triton-"))
    os.chdir(work)  # `python -m gateway` must not pick up a checkout from the working directory
    logs = work / "logs"
    write_python_backend_entry(work / "repo", 1, size="tiny")
    triton = TritonProc(work / "repo", load=("demo",), log_dir=logs).wait_ready()
    gateways: dict[str, GatewayProc] = {}
    try:
        for upstream in ("http", "grpc"):
            region = RegionConfig("t", pools=[PoolConfig("p", [f"http://{triton.http}", f"grpc://{triton.grpc}"])])
            cfg = write_config(work / f"{upstream}.toml", [region], store_dir=str(work / "store"),
                               sections={"gateway": {"access_log": False, "grpc_upstream": upstream}})
            gw = gateways[upstream] = GatewayProc(cfg, region, log_dir=logs, name=f"gateway-{upstream}",
                                                    workers=args.workers)
            gw.wait_ready()
            gw.wait_all_healthy()
        paths = [("http", "direct", triton.http, None), ("http", "geogate", gateways["http"].http_address,
                                                           gateways["http"]),
                 ("grpc", "direct", triton.grpc, None),
                 ("grpc", "geogate (grpc_upstream=http)", gateways["http"].grpc_address, gateways["http"]),
                 ("grpc", "geogate (grpc_upstream=grpc)", gateways["grpc"].grpc_address, gateways["grpc"])]
        got: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for rnd in range(args.rounds):
            for proto, name, address, gw in paths:
                c0, n0 = (cpu_s(gw.pid) if gw else 0.0), inferences_served(triton.http)
                r = perf_analyzer.run(address, protocol=proto, concurrency=args.concurrency, interval_ms=2000)
                tput = r.get("throughput", float("nan"))
                n = inferences_served(triton.http) - n0
                cpu = f", gateway CPU {1e6 * (cpu_s(gw.pid) - c0) / n:.0f} µs/request" if gw and n > 0 else ""
                got.setdefault((proto, name), []).append((tput, r.get("p50_ms", float("nan"))))
                print(f"round {rnd} {proto} {name}: {tput:.0f} infer/s, p50 {r.get('p50_ms')} ms{cpu}"
                      + (f" {r['error']}" if "error" in r else ""), flush=True)
        print(f"\nperf_analyzer c={args.concurrency}, median over {args.rounds} rounds:")
        print("| protocol | path | infer/s | p50 ms | / direct |")
        print("|---|---|---|---|---|")
        for proto, name, _, _ in paths:
            rows = got[(proto, name)]
            tput = statistics.median(t for t, _ in rows)
            direct = statistics.median(t for t, _ in got[(proto, "direct")])
            print(f"| {proto} | {name} | {tput:.0f} | {statistics.median(p for _, p in rows):.2f} | "
                  f"{tput / direct:.2f}x |")
    finally:
        for gw in gateways.values():
            gw.stop()
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
