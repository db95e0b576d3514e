"""`geogate bench`: the load generator and chaos scenarios from the command line.

    geogate bench load --url http://127.0.0.1:8000 --protocol http --rate 200 --duration 10 --out DIR
    geogate bench load --url grpc://127.0.0.1:8001 --protocol grpc --concurrency 8 --duration 10 --out DIR
    geogate bench load --url ... --schedule "0:100,10:500,20:100" --duration 30 --processes 2 --out DIR
    geogate bench scenario replica-kill [--quick] --out DIR
    geogate bench scenario soak --duration 600 --out DIR
    geogate bench list
    geogate bench table loadtests/results        # figures of the runs, as a Markdown table
    geogate bench sim [--regions N] [--replicas-per-region M] [--hours H] --out DIR   # planet, simulated

Each run writes DIR/results.json and DIR/report.png and prints a summary. Traffic goes to
127.0.0.1 only; every run stops by itself after --duration. `sim` starts no process and sends no
traffic: the product's routing and health code runs in-process on a simulated clock
(loadtests/sim) and writes DIR/sim.json and DIR/sim.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loadtests.clients import PROTOCOLS

DEFAULT_OUT = "loadtest-out"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    load = sub.add_parser("load", help="send load to one endpoint (open or closed loop)",
                          description="Send KServe v2 inference load to one loopback endpoint and check every answer.")
    load.add_argument("--url", required=True, help="base URL: http://127.0.0.1:8000 or grpc://127.0.0.1:8001")
    load.add_argument("--protocol", choices=PROTOCOLS, default="http",
                      help="http (JSON tensors), http-binary (binary tensor extension) or grpc")
    shape = load.add_mutually_exclusive_group(required=True)
    shape.add_argument("--rate", type=float, help="open loop: requests per second (all processes together)")
    shape.add_argument("--schedule", help='open loop with steps: "START_S:RATE,...", e.g. "0:100,10:500,20:100"')
    shape.add_argument("--concurrency", type=int, help="closed loop: requests in flight (all processes together)")
    load.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    load.add_argument("--processes", type=int, default=1,
                      help="client processes, each with its own event loop and share of the load (default 1)")
    load.add_argument("--model", default="demo", help="demo model to call: demo or demo-heavy (default demo)")
    load.add_argument("--model-version", default="", help="ask for this version (default: the server's choice)")
    load.add_argument("--assume-version", default=None,
                      help="check answers against this version instead of the one the response names")
    load.add_argument("--max-in-flight", type=int, default=None,
                      help="open loop: sends beyond this many in flight fail as 'client overloaded' (default 1024)")
    load.add_argument("--timeout-s", type=float, default=None, help="per-request timeout (default 10)")
    load.add_argument("--grpc-channels", type=int, default=1, help="gRPC channels (connections) per process")
    _common(load)

    scen = sub.add_parser("scenario", help="run a chaos scenario (starts its own replicas and gateways)",
                          description="Run a chaos scenario: real processes, load, timed faults, checks.")
    scen.add_argument("name", help="scenario name (see `geogate bench list`)")
    scen.add_argument("--quick", action="store_true", help="short, low-rate version (smoke test)")
    scen.add_argument("--processes", type=int, default=None, help="client processes (default: the scenario's)")
    scen.add_argument("--duration", type=float, default=None,
                      help="seconds of load, for scenarios without a fixed timeline (soak)")
    _common(scen)

    sim = sub.add_parser("sim", help="planet-scale simulation driven by the product's routing code",
                         description="Simulate a day of a planet of regions and replicas: the product's routing, "
                                     "health, spill, capacity and admission code decides every request on a "
                                     "simulated clock (no sockets). Writes DIR/sim.json and DIR/sim.png.")
    sim.add_argument("--regions", type=int, default=24, help="cloud regions at real cities, 2..30 (default 24)")
    sim.add_argument("--replicas-per-region", type=float, default=42.0,
                     help="replicas per region on average, placed by peak demand (default 42: ~1,000 in all)")
    sim.add_argument("--hours", type=float, default=24.0, help="simulated hours (default 24)")
    sim.add_argument("--start-utc", type=float, default=0.0, help="UTC hour the window starts at (default 0)")
    sim.add_argument("--seed", type=int, default=1, help="random seed (default 1): same seed, same run")
    sim.add_argument("--samples-per-s", type=float, default=2.0,
                     help="sampled requests per simulated second, each standing for many real ones (default 2; "
                          "at least one per metro and tick)")
    sim.add_argument("--routing-mode", choices=("local-first", "nearest-to-client"), default="local-first",
                     help="[routing] mode of the simulated gateways (default local-first)")
    sim.add_argument("--cost-sizes", default="10,100,1000,10000",
                     help='fleet sizes of the decision-cost table, comma-separated; "" skips it '
                          '(default 10,100,1000,10000)')
    sim.add_argument("--cost-decisions", type=int, default=40000,
                     help="decisions measured per fleet size and routing mode (default 40000)")
    sim.add_argument("--no-faults", action="store_true", help="a healthy day: no fault timeline")
    sim.add_argument("--out", default=DEFAULT_OUT, help=f"output directory for sim.json and sim.png "
                                                        f"(default {DEFAULT_OUT})")
    sim.add_argument("--no-progress", action="store_true", help="no progress lines")

    sweep = sub.add_parser("sweep", help="direct vs HAProxy vs geogate, HTTP and gRPC, at several concurrencies "
                                         "(perf_analyzer)",
                           description="Data-path sweep with NVIDIA's perf_analyzer: direct, HAProxy and geogate "
                                       "(1 and N workers) over the same replicas, HTTP and gRPC.")
    from loadtests import bench_sweep

    bench_sweep.add_arguments(sweep)

    sub.add_parser("list", help="list the scenarios")
    table = sub.add_parser("table", help="the figures table (Markdown) of scenario runs",
                           description="Print the figures of scenario runs (DIR/results.json or DIR/*/results.json).")
    table.add_argument("dirs", nargs="+", help="scenario output directories, or a directory holding them")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory for results.json and report.png "
                                                      f"(default {DEFAULT_OUT})")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, "bench_command", None)
    if cmd == "load":
        return _run_load(args)
    if cmd == "scenario":
        return _run_scenario(args)
    if cmd == "sim":
        return _run_sim(args)
    if cmd == "sweep":
        from loadtests import bench_sweep

        return bench_sweep.run(args)
    if cmd == "list":
        return _list()
    if cmd == "table":
        from loadtests.table import build_table

        print(build_table([Path(d) for d in args.dirs]))
        return 0
    print("geogate bench: choose load, scenario, sim, sweep, list or table (see --help)", file=sys.stderr)
    return 2


def _run_load(args: argparse.Namespace) -> int:
    from loadtests.loadgen import (
        DEFAULT_MAX_IN_FLIGHT,
        DEFAULT_TIMEOUT_S,
        LoadSpec,
        SpecError,
        parse_schedule,
        run_load,
    )
    from loadtests.report import write_report
    from loadtests.results import build_results, write_results

    try:
        spec = LoadSpec(url=args.url, protocol=args.protocol, model=args.model, duration_s=args.duration,
                        rate=args.rate, concurrency=args.concurrency,
                        schedule=parse_schedule(args.schedule) if args.schedule else None,
                        processes=args.processes, model_version=args.model_version,
                        assume_version=args.assume_version,
                        max_in_flight=args.max_in_flight or DEFAULT_MAX_IN_FLIGHT,
                        timeout_s=args.timeout_s or DEFAULT_TIMEOUT_S, grpc_channels=args.grpc_channels)
        spec.validate()
    except (SpecError, ValueError) as exc:
        print(f"geogate bench load: {exc}", file=sys.stderr)
        return 2
    try:
        load = run_load(spec, progress=not args.no_progress)
    except (RuntimeError, TimeoutError) as exc:  # a client process failed to start or hung
        print(f"geogate bench load: {exc}", file=sys.stderr)
        return 1
    results = build_results(load.recorder, spec=spec.to_dict(), duration_s=spec.duration_s,
                            started_at_unix_s=load.wall_start)
    out = Path(args.out)
    results_path = write_results(results, out / "results.json")
    report_path = write_report(results, out / "report.png")
    _print_summary(results)
    print(f"results: {results_path}\nreport:  {report_path}")
    return 0


def _run_scenario(args: argparse.Namespace) -> int:
    from loadtests import scenarios
    from loadtests.scenario import run_scenario

    try:
        scenario = scenarios.get(args.name)
    except KeyError as exc:
        print(f"geogate bench scenario: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.duration is not None:
        if not scenario.configurable_duration:
            print(f"geogate bench scenario {args.name}: --duration: this scenario has a fixed timeline "
                  f"(use --quick for a short run)", file=sys.stderr)
            return 2
        if args.duration <= 0:
            print("geogate bench scenario: --duration must be > 0", file=sys.stderr)
            return 2
        scenario.requested_duration_s = args.duration
    try:
        outcome = run_scenario(scenario, args.out, quick=args.quick, progress=not args.no_progress,
                               processes=args.processes)
    except (RuntimeError, TimeoutError, OSError) as exc:
        # setup failed (a process did not start or get ready); its processes are already killed
        print(f"geogate bench scenario {args.name}: could not run: {exc}", file=sys.stderr)
        return 1
    _print_summary(outcome.results)
    for c in outcome.checks:
        print(f"  [{check_label(c)}] {c.name}: {c.detail}")
    print(f"scenario {outcome.name}: {'PASSED' if outcome.passed else 'FAILED'}")
    print(f"results: {outcome.results_path}\nreport:  {outcome.report_path}")
    return 0 if outcome.passed else 1


def _run_sim(args: argparse.Namespace) -> int:
    from loadtests.sim.run import SimOptions, run_sim
    from loadtests.sim.summary import print_summary

    try:
        sizes = tuple(int(s) for s in args.cost_sizes.split(",") if s.strip())
    except ValueError:
        print(f"geogate bench sim: --cost-sizes must be integers separated by commas, got {args.cost_sizes!r}",
              file=sys.stderr)
        return 2
    opts = SimOptions(regions=args.regions, replicas_per_region=args.replicas_per_region, hours=args.hours,
                      start_utc_h=args.start_utc, seed=args.seed, samples_per_s=args.samples_per_s,
                      routing_mode=args.routing_mode, cost_sizes=sizes, cost_decisions=args.cost_decisions,
                      faults=not args.no_faults)
    progress = None if args.no_progress else (lambda msg: print(f"[sim] {msg}", file=sys.stderr, flush=True))
    try:
        result = run_sim(opts, args.out, progress=progress)
    except ValueError as exc:
        print(f"geogate bench sim: {exc}", file=sys.stderr)
        return 2
    print_summary(result)
    out = Path(args.out)
    print(f"results: {out / 'sim.json'}\nreport:  {out / 'sim.png'}")
    checks = {k: c for k, c in result["checks"].items() if k != "decision_cost_flat"}  # that one is a goal
    return 0 if all(c["ok"] for c in checks.values()) else 1


def check_label(c) -> str:
    if c.goal:
        return "goal met" if c.ok else "goal missed"
    return "ok" if c.ok else "FAIL"


def _list() -> int:
    import importlib

    from loadtests.scenarios import SCENARIOS

    for name, module in SCENARIOS.items():
        cls = importlib.import_module(module).SCENARIO
        print(f"{name:20s} {cls.description}")
    return 0


def _print_summary(results: dict) -> None:
    t = results["totals"]
    lat = t["latency_ms"]
    print(f"sent {t['sent']}  ok {t['ok']}  failed {t['failed']}  ({t['success_ratio']:.2%} ok)  "
          f"{t['ok_per_s']:,.1f} ok/s")
    print(f"latency ms (ok requests): p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  "
          f"p99.9 {lat['p999']}  max {lat['max']}")
    lag = t["send_lag_ms"]
    if lag["count"]:
        print(f"send lag ms (client's own lateness): p50 {lag['p50']}  p99 {lag['p99']}  max {lag['max']}")
    if t["failed_by_reason"]:
        print("failures: " + ", ".join(f"{r}: {n}" for r, n in t["failed_by_reason"].items()))
    for key in ("regions", "versions", "replicas"):
        if t[key]:
            print(f"{key}: " + ", ".join(f"{k}: {v}" for k, v in t[key].items()))
