"""overhead: direct vs geogate vs HAProxy on the same replicas, in one run, with ratios
(issue 3's benchmark).

Four replicas (tiny demo model; quick: two). Paths:
- direct:      to one replica (replica-a);
- geogate-1w:  `geogate gateway` (one worker) over all replicas;
- geogate-Nw:  `geogate gateway --workers N`, N = the core count, over the same replicas;
- haproxy:     Debian's HAProxy, nbthread N, round-robin with health checks, same replicas.
Both gateways run with the access log off (HAProxy logs nothing by default either).

Each path gets, in turn (paths interleaved per kind, so slow drifts of a shared machine hit
all alike):
- latency: open loop at a moderate rate: what each proxy adds over direct at p50 and p99;
- throughput: closed loop at a fixed concurrency, from `CLIENT_PROCESSES` client processes.
  The clients run on the same cores as everything else, so every ceiling is partly the
  client's and the ratios are compressed toward 1: read them as bounds of the differences.

The last phase (geogate-Nw throughput) is the scenario's main load (report.png); every other
phase has its own report under phases/. Checks: no failure and verified answers on every
path; the goals (geogate adds <= 0.3 ms at p50 and <= 1.5 ms at p99 over direct at moderate
load; with --workers = cores, >= 0.5x HAProxy's throughput) are reported as goal checks, and
every figure is in notes["overhead"].
"""

from __future__ import annotations

import os
from typing import Any

from loadtests.haproxy import require_haproxy, start_haproxy
from loadtests.loadgen import LoadSpec
from loadtests.procs import PoolConfig, RegionConfig
from loadtests.scenario import Check, Scenario, ScenarioContext, check_no_wrong_answers, phase_summary, run_phase

PROTOCOL = "http-binary"
GOAL_ADDED_P50_MS = 0.3
GOAL_ADDED_P99_MS = 1.5
GOAL_THROUGHPUT_VS_HAPROXY = 0.5
CLIENT_PROCESSES = 2
HEALTH = {"interval_ms": 1000, "timeout_ms": 500}
GATEWAY = {"access_log": False}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Overhead(Scenario):
    name = "overhead"
    description = "direct vs geogate (1 worker, N workers) vs HAProxy on the same replicas: latency and throughput"

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        require_haproxy()
        quick = ctx.quick
        self.phase_s = 1.0 if quick else 5.0
        self.rate = 50.0 if quick else 200.0
        self.concurrency = 4 if quick else 16
        self.client_processes = 1 if quick else CLIENT_PROCESSES
        self.workers = cores()
        repo = ctx.demo_repository()
        names = ["replica-a", "replica-b"] if quick else ["replica-a", "replica-b", "replica-c", "replica-d"]
        replicas = ctx.start_replicas(names, repo)
        urls = [r.url("http") for r in replicas]
        one = RegionConfig("bench-1w", pools=[PoolConfig("ort", urls)])
        many = RegionConfig("bench-nw", pools=[PoolConfig("ort", urls)])
        sections = {"health": HEALTH, "gateway": GATEWAY}
        (gw1,) = ctx.start_gateways([one], config=ctx.write_config([one], name="gw-1w.toml", sections=sections))
        (gwn,) = ctx.start_gateways([many], config=ctx.write_config([many], name="gw-nw.toml", sections=sections),
                                    workers=self.workers)
        h = start_haproxy(ctx, [r.http_address for r in replicas], threads=self.workers)
        self.paths = {"direct": f"http://{replicas[0].http_address}", "haproxy": f"http://{h.address}",
                      "geogate-1w": f"http://{gw1.http_address}", "geogate-Nw": f"http://{gwn.http_address}"}
        ctx.notes["setup"] = {"replicas": len(replicas), "gateway_workers": self.workers,
                              "haproxy_threads": self.workers, "protocol": PROTOCOL, "phase_s": self.phase_s,
                              "latency_rate_per_s": self.rate, "throughput_concurrency": self.concurrency,
                              "client_processes": self.client_processes, "cores": cores()}
        self.phases: dict[str, dict[str, Any]] = {}
        for name, url in self.paths.items():
            self.phases[f"{name}-latency"] = run_phase(ctx, f"{name}-latency", self._latency(url))
        for name in ("direct", "haproxy", "geogate-1w"):
            self.phases[f"{name}-throughput"] = run_phase(ctx, f"{name}-throughput",
                                                          self._throughput(self.paths[name]))
        return self._throughput(self.paths["geogate-Nw"])

    def _latency(self, url: str) -> LoadSpec:
        return LoadSpec(url=url, protocol=PROTOCOL, model="demo", rate=self.rate, duration_s=self.phase_s,
                        timeout_s=5.0)

    def _throughput(self, url: str) -> LoadSpec:
        return LoadSpec(url=url, protocol=PROTOCOL, model="demo", concurrency=self.concurrency,
                        processes=self.client_processes, duration_s=self.phase_s, timeout_s=5.0)

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        self.phases["geogate-Nw-throughput"] = results
        s = {label: phase_summary(r) for label, r in self.phases.items()}
        d = s["direct-latency"]
        paths = ("direct", "haproxy", "geogate-1w", "geogate-Nw")
        table = {p: {"latency_p50_ms": s[f"{p}-latency"]["p50_ms"], "latency_p99_ms": s[f"{p}-latency"]["p99_ms"],
                     "throughput_ok_per_s": s[f"{p}-throughput"]["ok_per_s"],
                     "throughput_p50_ms": s[f"{p}-throughput"]["p50_ms"],
                     "throughput_p99_ms": s[f"{p}-throughput"]["p99_ms"],
                     "added_p50_ms": round(s[f"{p}-latency"]["p50_ms"] - d["p50_ms"], 3),
                     "added_p99_ms": round(s[f"{p}-latency"]["p99_ms"] - d["p99_ms"], 3)}
                 for p in paths}

        def ratio(a: str, b: str) -> float:
            return round(table[a]["throughput_ok_per_s"] / max(1e-9, table[b]["throughput_ok_per_s"]), 3)

        figures = {"paths": table, "phases": s, **ctx.notes.get("setup", {}),
                   "ratio_geogate_nw_vs_haproxy": ratio("geogate-Nw", "haproxy"),
                   "ratio_geogate_1w_vs_haproxy": ratio("geogate-1w", "haproxy"),
                   "ratio_geogate_nw_vs_direct": ratio("geogate-Nw", "direct"),
                   "ratio_geogate_1w_vs_direct": ratio("geogate-1w", "direct"),
                   "ratio_haproxy_vs_direct": ratio("haproxy", "direct")}
        ctx.notes["overhead"] = figures
        failed = {label: r["totals"]["failed_by_reason"] for label, r in self.phases.items() if r["totals"]["failed"]}
        checks = [Check("no failed requests on any path", not failed, f"failures: {failed or 'none'}")]
        for label, r in self.phases.items():
            c = check_no_wrong_answers(r)
            c.name = f"answers verified ({label})"
            checks.append(c)
        g1 = table["geogate-1w"]
        checks.append(Check(f"geogate adds <= {GOAL_ADDED_P50_MS} ms at p50", g1["added_p50_ms"] <= GOAL_ADDED_P50_MS,
                            f"geogate-1w p50 {g1['latency_p50_ms']:.3f} ms vs direct {d['p50_ms']:.3f} ms: "
                            f"{g1['added_p50_ms']:+.3f} ms (haproxy {table['haproxy']['added_p50_ms']:+.3f} ms)",
                            goal=True))
        checks.append(Check(f"geogate adds <= {GOAL_ADDED_P99_MS} ms at p99", g1["added_p99_ms"] <= GOAL_ADDED_P99_MS,
                            f"geogate-1w p99 {g1['latency_p99_ms']:.3f} ms vs direct {d['p99_ms']:.3f} ms: "
                            f"{g1['added_p99_ms']:+.3f} ms (haproxy {table['haproxy']['added_p99_ms']:+.3f} ms)",
                            goal=True))
        r = figures["ratio_geogate_nw_vs_haproxy"]
        checks.append(Check(f"geogate --workers {self.workers} >= {GOAL_THROUGHPUT_VS_HAPROXY}x HAProxy's throughput",
                            r >= GOAL_THROUGHPUT_VS_HAPROXY,
                            f"ok/s: geogate-Nw {table['geogate-Nw']['throughput_ok_per_s']:.0f}, haproxy "
                            f"{table['haproxy']['throughput_ok_per_s']:.0f} ({r:.2f}x); geogate-1w "
                            f"{table['geogate-1w']['throughput_ok_per_s']:.0f}, direct "
                            f"{table['direct']['throughput_ok_per_s']:.0f}", goal=True))
        return checks


SCENARIO = Overhead
