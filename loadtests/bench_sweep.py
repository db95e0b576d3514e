"""Data-path sweep: direct vs HAProxy vs geogate, HTTP and gRPC, at several concurrencies, with
NVIDIA's perf_analyzer as the load generator (`geogate bench sweep [--quick] [--out DIR]`).

For each pool size (1 and 4 geogate replicas of the tiny demo model; quick: 1) and protocol
(HTTP, gRPC), at each concurrency (1, 8, 64, 128; quick: 1 and 8), perf_analyzer drives:
- direct:      the first replica;
- haproxy:     Debian's HAProxy over the pool (HTTP mode for HTTP; `proto h2` on bind and
               servers for gRPC), nbthread = cores, round-robin;
- geogate-1w:  a gateway with one worker over the pool (default settings: gRPC calls are
               translated for the replicas' HTTP listeners, ``[gateway] grpc_upstream = "http"``);
- geogate-Nw:  a gateway with --workers = cores;
- geogate-Nw-g (gRPC only): the same with ``grpc_upstream = "grpc"`` (gRPC calls' bytes passed
               through grpcio's client to the replicas' gRPC listeners).
Per cell: throughput, p50, p99, and whether perf_analyzer stopped (refusals or errors: it stops
at the first failed request, so "errors" means the cell has no figures); ratios geogate/HAProxy
and geogate/direct. Checks: zero failed cells on geogate wherever direct succeeds. Everything
shares this machine's cores (replicas, proxies, perf_analyzer): read the ratios as ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from loadtests import perf_analyzer
from loadtests.haproxy import HaproxyProc, require_haproxy
from loadtests.procs import GatewayProc, PoolConfig, Proc, RegionConfig, ReplicaProc, write_config

PATHS = ("direct", "haproxy", "geogate-1w", "geogate-Nw", "geogate-Nw-g")
GATEWAYS = ("geogate-1w", "geogate-Nw", "geogate-Nw-g")


def paths_of(protocol: str) -> tuple[str, ...]:
    return PATHS if protocol == "grpc" else PATHS[:-1]  # grpc_upstream only matters to gRPC clients


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def start_pool(work: Path, n: int, logs: Path) -> tuple[list[Proc], dict[str, dict[str, str]]]:
    """n replicas, two gateways and two HAProxies (HTTP, h2) over them: {protocol: {path: url}}."""
    from replicas.demo.onnx_model import write_repository_entry  # onnx: only when a sweep runs

    repo = work / "repo"
    write_repository_entry(repo, 1, size="tiny")
    procs: list[Proc] = []
    replicas = [ReplicaProc(repo, name=f"replica{n}-{i}", log_dir=logs, enable_test_faults=False) for i in range(n)]
    procs += replicas
    for r in replicas:
        r.wait_ready()
    urls: dict[str, dict[str, str]] = {"http": {"direct": replicas[0].http_address},
                                       "grpc": {"direct": replicas[0].grpc_address}}
    for label, workers, upstream in (("geogate-1w", 1, "http"), ("geogate-Nw", cores(), "http"),
                                     ("geogate-Nw-g", cores(), "grpc")):
        region = RegionConfig("sweep", pools=[PoolConfig("p", [r.url(s) for r in replicas for s in ("http", "grpc")])])
        cfg = write_config(work / f"{label}-{n}.toml", [region], store_dir=str(work / "store"),
                           sections={"gateway": {"access_log": False, "grpc_upstream": upstream},
                                     "health": {"interval_ms": 1000}})
        gw = GatewayProc(cfg, region, log_dir=logs, workers=workers, name=f"{label}-{n}")
        procs.append(gw)
        gw.wait_ready()
        gw.wait_all_healthy()
        urls["http"][label], urls["grpc"][label] = gw.http_address, gw.grpc_address
    for protocol in ("http", "grpc"):
        servers = [r.http_address if protocol == "http" else r.grpc_address for r in replicas]
        h = HaproxyProc(work, servers, name=f"haproxy-{protocol}-{n}", log_dir=logs, threads=cores(),
                        h2=protocol == "grpc")
        procs.append(h)
        h.wait_ready()
        urls[protocol]["haproxy"] = h.address
    return procs, urls


def ratio(a: dict, b: dict) -> float:
    try:
        return a["throughput"] / b["throughput"]
    except (KeyError, ZeroDivisionError, TypeError):
        return math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="geogate bench sweep", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one replica, concurrency 1 and 8, short windows")
    parser.add_argument("--concurrency", default="1,8,64,128", help="comma-separated (default 1,8,64,128)")
    parser.add_argument("--replicas", default="1,4", help="pool sizes (default 1,4)")
    parser.add_argument("--out", default="loadtests/results/sweep", help="output directory (results.json)")


def run(args: argparse.Namespace) -> int:
    if not perf_analyzer.available():
        print(f"{perf_analyzer.PERF_ANALYZER} missing: run `make triton-env` first", file=sys.stderr)
        return 2
    require_haproxy()
    levels = [1, 8] if args.quick else [int(c) for c in args.concurrency.split(",")]
    sizes = [1] if args.quick else [int(n) for n in args.replicas.split(",")]
    interval_ms = 500 if args.quick else 2000
    work = Path(tempfile.mkdtemp(prefix="geogate-bench-sweep-"))
    cells: list[dict] = []
    for n in sizes:
        procs, urls = start_pool(work / f"pool{n}", n, work / "logs")
        try:
            for protocol in ("http", "grpc"):
                for c in levels:
                    row = {"replicas": n, "protocol": protocol, "concurrency": c}
                    for path in paths_of(protocol):
                        row[path] = perf_analyzer.run(urls[protocol][path], protocol=protocol, concurrency=c,
                                                      interval_ms=interval_ms)
                    for path in GATEWAYS[:len(paths_of(protocol)) - 2]:
                        row[f"{path}/haproxy"] = ratio(row[path], row["haproxy"])
                        row[f"{path}/direct"] = ratio(row[path], row["direct"])
                    cells.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            for p in reversed(procs):
                p.stop()
    report(cells)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"cores": cores(), "cells": cells}, indent=2))
    print(f"results: {out / 'results.json'}")
    failed = [(c["replicas"], c["protocol"], c["concurrency"], p) for c in cells for p in GATEWAYS
              if p in c and "error" in c[p] and "error" not in c["direct"]]
    if failed:
        print(f"geogate failed where direct succeeded: {failed}", file=sys.stderr)
    return 1 if failed else 0


def report(cells: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"perf_analyzer sweep ({cores()} cores shared by everything): infer/s, p50/p99 ms")
    for col in ("replicas", "proto", "c", *PATHS, "1w/haproxy", "Nw/haproxy", "Nw-g/haproxy", "Nw/direct"):
        table.add_column(col, justify="right")

    def cell(d: dict | None) -> str:
        if d is None:
            return "-"
        if "error" in d:
            return f"fails: {d['error'][:40]}"
        return f"{d['throughput']:.0f} ({d['p50_ms']:.2f}/{d['p99_ms']:.2f})"

    for c in cells:
        nwg = c.get("geogate-Nw-g/haproxy")
        table.add_row(str(c["replicas"]), c["protocol"], str(c["concurrency"]), *(cell(c.get(p)) for p in PATHS),
                      f"{c['geogate-1w/haproxy']:.2f}x", f"{c['geogate-Nw/haproxy']:.2f}x",
                      f"{nwg:.2f}x" if nwg is not None else "-", f"{c['geogate-Nw/direct']:.2f}x")
    Console(width=200).print(table)


if __name__ == "__main__":
    sys.exit(main())
