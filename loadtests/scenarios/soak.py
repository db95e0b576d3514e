"""soak: a long steady run (default 10 minutes; quick: 8 s) through one gateway (two workers) in front of two
replicas, watching every process's resident memory (VmRSS) and open file descriptors from
/proc every few seconds.

Expected: no failures, and no process grows beyond a tolerance between the baseline (the
sample at a quarter of the run, after warm-up: connection pools, caches and allocator arenas
have filled by then) and the end (median of the last samples, so one GC pause is not growth).

Duration: `geogate bench scenario soak --duration 600`, or `GEOGATE_SOAK_DURATION_S` (environment).
The load generator itself (this process) is not watched: its per-second histograms grow with
the run by design.
Writes soak.png (RSS and fds per process over time) next to the report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from loadtests.loadgen import LoadSpec
from loadtests.procs import PoolConfig, Proc, RegionConfig, proc_tree
from loadtests.scenario import (
    Check,
    FaultAction,
    Scenario,
    ScenarioContext,
    check_no_wrong_answers,
    check_success_ratio,
)

REGION = "eu-west"
DEFAULT_DURATION_S = 600.0
QUICK_DURATION_S = 8.0
DURATION_ENV = "GEOGATE_SOAK_DURATION_S"
SAMPLE_INTERVAL_S = 5.0
QUICK_SAMPLE_INTERVAL_S = 1.0
BASELINE_AT = 0.25  # of the run: after warm-up
END_SAMPLES = 3
# Growth allowed from baseline to end, per process: absolute + relative (RSS), absolute (fds).
RSS_TOLERANCE_MB = 30.0
RSS_TOLERANCE_FRACTION = 0.15
FD_TOLERANCE = 16
SOAK_PNG = "soak.png"
WORKERS = 2
PAGE_KB = 1024


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / PAGE_KB
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class ProcSampler(threading.Thread):
    """Samples RSS (MB) and open fds of every process of the scenario, children (gateway
    workers) each on their own ("gateway-eu-west/1234"), every interval."""

    def __init__(self, procs: list[Proc], interval_s: float):
        super().__init__(name="proc-sampler", daemon=True)
        self.procs = procs
        self.interval_s = interval_s
        self.t0 = time.monotonic()
        self.samples: dict[str, list[tuple[float, float, int]]] = {p.name: [] for p in procs}
        self._halt = threading.Event()

    def sample(self) -> None:
        t = round(time.monotonic() - self.t0, 2)
        for p in self.procs:
            if not p.alive():
                continue
            for pid in proc_tree(p.pid):
                rss, fds = rss_mb(pid), fd_count(pid)
                if rss is None or fds is None:
                    continue
                name = p.name if pid == p.pid else f"{p.name}/{pid}"
                self.samples.setdefault(name, []).append((t, round(rss, 2), fds))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def growth(samples: list[tuple[float, float, int]], duration_s: float) -> dict[str, float]:
    """Baseline (first sample at/after BASELINE_AT of the run) vs end (median of the last samples)."""
    if len(samples) < 2:
        return {}
    base = next((s for s in samples if s[0] >= duration_s * BASELINE_AT), samples[0])
    tail = samples[-END_SAMPLES:]
    end_rss = statistics.median(s[1] for s in tail)
    end_fds = statistics.median(s[2] for s in tail)
    return {"baseline_t_s": base[0], "rss_start_mb": samples[0][1], "rss_baseline_mb": base[1],
            "rss_end_mb": end_rss, "rss_growth_mb": round(end_rss - base[1], 2),
            "fds_baseline": base[2], "fds_end": end_fds, "fds_growth": end_fds - base[2]}


def write_soak_png(samples: dict[str, list[tuple[float, float, int]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_fd) = plt.subplots(2, 1, figsize=(12, 6), sharex=True, constrained_layout=True)
    for name, rows in samples.items():
        if rows:
            ax_rss.plot([r[0] for r in rows], [r[1] for r in rows], label=name)
            ax_fd.plot([r[0] for r in rows], [r[2] for r in rows], label=name)
    ax_rss.set_ylabel("RSS MB")
    ax_fd.set_ylabel("open fds")
    ax_fd.set_xlabel("seconds since start")
    for ax in (ax_rss, ax_fd):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    fig.suptitle("soak: memory and file descriptors per process")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class Soak(Scenario):
    name = "soak"
    description = "long steady load; RSS and open fds of every process must not grow beyond a tolerance"

    configurable_duration = True

    def __init__(self, duration_s: float | None = None):
        env = os.environ.get(DURATION_ENV)
        self.requested_duration_s = duration_s or (float(env) if env else None)

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        self.duration_s = self.requested_duration_s or (QUICK_DURATION_S if ctx.quick else DEFAULT_DURATION_S)
        self.interval_s = QUICK_SAMPLE_INTERVAL_S if ctx.quick else SAMPLE_INTERVAL_S
        repo = ctx.demo_repository()
        a, b = ctx.start_replicas(["replica-a", "replica-b"], repo)
        region = RegionConfig(REGION, pools=[PoolConfig("eu-ort", [a.url("grpc"), b.url("http")])])
        # two workers: every worker process is watched on its own
        (gw,) = ctx.start_gateways([region], sections={"health": {"interval_ms": 500, "timeout_ms": 500}},
                                   workers=WORKERS)
        # half gRPC, half HTTP would need two loads; gRPC to the gateway, mixed protocols upstream
        return LoadSpec(url=f"grpc://{gw.grpc_address}", protocol="grpc", model="demo",
                        rate=30.0 if ctx.quick else 100.0, duration_s=self.duration_s, timeout_s=5.0)

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        self.sampler = ProcSampler(list(ctx.procs), self.interval_s)
        self.sampler.start()  # starts just before the load: t=0 is within a second of the load's
        return []

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        self.sampler.stop()
        checks = [check_success_ratio(results, 1.0, name="no failed requests"), check_no_wrong_answers(results)]
        report: dict[str, Any] = {}
        for name, rows in self.sampler.samples.items():
            g = growth(rows, self.duration_s)
            report[name] = g
            if not g:
                checks.append(Check(f"{name} sampled", False, f"{len(rows)} samples"))
                continue
            rss_limit = RSS_TOLERANCE_MB + RSS_TOLERANCE_FRACTION * g["rss_baseline_mb"]
            checks.append(Check(f"{name} memory", g["rss_growth_mb"] <= rss_limit,
                                f"RSS {g['rss_baseline_mb']:.1f} MB at t={g['baseline_t_s']:g} s -> "
                                f"{g['rss_end_mb']:.1f} MB at the end ({g['rss_growth_mb']:+.1f} MB, "
                                f"allowed +{rss_limit:.1f} MB)"))
            checks.append(Check(f"{name} fds", g["fds_growth"] <= FD_TOLERANCE,
                                f"open fds {g['fds_baseline']} -> {g['fds_end']:g} "
                                f"({g['fds_growth']:+g}, allowed +{FD_TOLERANCE})"))
        ctx.notes["growth"] = report
        ctx.notes["samples"] = self.sampler.samples
        ctx.notes["soak_png"] = str(write_soak_png(self.sampler.samples, ctx.out_dir / SOAK_PNG))
        return checks


SCENARIO = Soak


def main(argv: list[str] | None = None) -> int:
    from loadtests.scenario import run_scenario

    p = argparse.ArgumentParser(description="soak scenario with a chosen duration")
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="seconds of load (default 600)")
    p.add_argument("--out", default="loadtest-out/soak")
    args = p.parse_args(argv)
    outcome = run_scenario(Soak(args.duration), args.out, progress=False)
    for c in outcome.checks:
        print(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    print(f"scenario soak: {'PASSED' if outcome.passed else 'FAILED'}\nresults: {outcome.results_path}")
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    sys.exit(main())
