"""A/B of two source trees' gateways on the same replica: perf_analyzer throughput (HTTP and gRPC,
concurrency 8) and the gateway process's own CPU per request (from /proc), rounds alternated so
a shared machine's drifts hit both alike.

`python -m loadtests.bench_ab --before DIR --after DIR [--rounds N]` (DIR: a checkout, e.g.
`git worktree add /tmp/before <commit>`; each gateway runs with PYTHONPATH=DIR).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from loadtests import perf_analyzer
from loadtests.procs import GatewayProc, PoolConfig, RegionConfig, ReplicaProc, cpu_s, inferences_served, write_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_ab", description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="checkout of the 'before' tree")
    parser.add_argument("--after", default=str(Path(__file__).resolve().parent.parent), help="default: this tree")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    if not perf_analyzer.available():
        print("perf_analyzer missing: run `make triton-env` first", file=sys.stderr)
        return 2
    from replicas.demo.onnx_model import write_repository_entry

    work = Path(tempfile.mkdtemp(prefix="geogate-bench-ab-"))
    # `python -m gateway` puts its working directory first on sys.path: started from a checkout,
    # every gateway would run that checkout's code whatever PYTHONPATH says.
    os.chdir(work)
    logs = work / "logs"
    write_repository_entry(work / "repo", 1, size="tiny")
    replica = ReplicaProc(work / "repo", name="replica", log_dir=logs, enable_test_faults=False).wait_ready()
    trees = {"before": args.before, "after": args.after}
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for rnd in range(args.rounds):
            for tree, path in trees.items():
                region = RegionConfig("ab", pools=[PoolConfig("p", [replica.url("http"), replica.url("grpc")])])
                cfg = write_config(work / f"{tree}{rnd}.toml", [region], store_dir=str(work / "store"),
                                   sections={"gateway": {"access_log": False}})
                gw = GatewayProc(cfg, region, log_dir=logs, name=f"{tree}{rnd}", env={"PYTHONPATH": path})
                try:
                    gw.wait_ready()
                    gw.wait_all_healthy()
                    for proto, url in (("http", gw.http_address), ("grpc", gw.grpc_address)):
                        c0, n0 = cpu_s(gw.pid), inferences_served(replica.http_address)
                        r = perf_analyzer.run(url, protocol=proto, concurrency=args.concurrency, interval_ms=1500)
                        n = inferences_served(replica.http_address) - n0
                        cpu_us = 1e6 * (cpu_s(gw.pid) - c0) / n if n > 0 else float("nan")
                        rows.setdefault((tree, proto), []).append((r.get("throughput", float("nan")), cpu_us))
                        print(f"round {rnd} {tree} {proto}: {r.get('throughput')} infer/s, {cpu_us:.0f} µs gateway "
                              f"CPU per request", flush=True)
                finally:
                    gw.stop()
    finally:
        replica.stop()
    for (tree, proto), values in sorted(rows.items()):
        tput = [t for t, _ in values]
        cpu = [c for _, c in values]
        print(f"{tree:6s} {proto:4s}: throughput median {statistics.median(tput):.0f}/s {[round(t) for t in tput]}; "
              f"gateway CPU/request median {statistics.median(cpu):.0f} µs {[round(c) for c in cpu]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
