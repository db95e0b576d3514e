"""overhead: what the gateway adds, next to HAProxy, on the same replica, in one run.

Three paths to ONE replica (so the comparison is the proxy hop alone): direct, through
geogate (one gateway worker), through HAProxy (Debian's, configured here: HTTP mode,
round-robin, health checks). Each path gets, in turn:

- latency: open loop at a moderate rate (the proxy's added p50/p99 over direct);
- throughput: closed loop at a fixed concurrency (ok/s; the client runs on the same cores,
  so on a small machine all three ceilings are partly the client's and the ratios are
  compressed toward 1: read them as a lower bound of the differences).

Phases run as direct, haproxy, geogate for each kind; the last one (geogate throughput) is the
scenario's main load (report.png); every phase has its own report under phases/. Checks are
correctness only (no failure, verified answers); the ratios and the goals (<= 0.3 ms added at
p50, >= 0.8x HAProxy's throughput) are reported as figures in notes["overhead"].
"""

from __future__ import annotations

from typing import Any

from loadtests.loadgen import LoadSpec
from loadtests.procs import PoolConfig, RegionConfig
from loadtests.scenario import Check, Scenario, ScenarioContext, check_no_wrong_answers
from loadtests.scenarios.peer_haproxy import HAPROXY, haproxy_available, phase_summary, run_phase, start_haproxy

REGION = "eu-west"
PROTOCOL = "http-binary"
GOAL_ADDED_P50_MS = 0.3
GOAL_THROUGHPUT_VS_HAPROXY = 0.8


class Overhead(Scenario):
    name = "overhead"
    description = "direct vs geogate vs HAProxy on the same replica: added latency and throughput ratios"

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        if not haproxy_available():
            raise RuntimeError(f"haproxy not found at {HAPROXY} (Debian: apt-get install haproxy)")
        quick = ctx.quick
        self.phase_s = 2.0 if quick else 10.0
        rate = 50.0 if quick else 200.0
        self.concurrency = 4 if quick else 8
        repo = ctx.demo_repository()
        (rep,) = ctx.start_replicas(["replica-a"], repo)
        region = RegionConfig(REGION, pools=[PoolConfig("eu-ort", [rep.url("http")])])
        (gw,) = ctx.start_gateways([region], sections={"gateway": {"access_log": False}})
        h = start_haproxy(ctx, [rep.http_address])
        ctx.notes.setdefault("ports", []).extend([region.http_port, region.grpc_port, region.admin_port])
        self.paths = {"direct": f"http://{rep.http_address}", "haproxy": f"http://{h.address}",
                      "geogate": f"http://{gw.http_address}"}
        self.phases: dict[str, dict[str, Any]] = {}
        for name, url in self.paths.items():
            spec = LoadSpec(url=url, protocol=PROTOCOL, model="demo", rate=rate, duration_s=self.phase_s,
                            timeout_s=5.0)
            self.phases[f"{name}-latency"] = run_phase(ctx, f"{name}-latency", spec)
        for name in ("direct", "haproxy"):
            spec = LoadSpec(url=self.paths[name], protocol=PROTOCOL, model="demo", concurrency=self.concurrency,
                            duration_s=self.phase_s, timeout_s=5.0)
            self.phases[f"{name}-throughput"] = run_phase(ctx, f"{name}-throughput", spec)
        return LoadSpec(url=self.paths["geogate"], protocol=PROTOCOL, model="demo", concurrency=self.concurrency,
                        duration_s=self.phase_s, timeout_s=5.0)

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        self.phases["geogate-throughput"] = results
        s = {label: phase_summary(r) for label, r in self.phases.items()}
        d, g, h = s["direct-latency"], s["geogate-latency"], s["haproxy-latency"]
        dt, gt, ht = s["direct-throughput"], s["geogate-throughput"], s["haproxy-throughput"]
        figures = {
            "phases": s,
            "added_p50_ms": {"geogate": round(g["p50_ms"] - d["p50_ms"], 3),
                             "haproxy": round(h["p50_ms"] - d["p50_ms"], 3)},
            "added_p99_ms": {"geogate": round(g["p99_ms"] - d["p99_ms"], 3),
                             "haproxy": round(h["p99_ms"] - d["p99_ms"], 3)},
            "throughput_ok_per_s": {"direct": dt["ok_per_s"], "geogate": gt["ok_per_s"], "haproxy": ht["ok_per_s"]},
            "ratio_geogate_vs_haproxy": round(gt["ok_per_s"] / max(1e-9, ht["ok_per_s"]), 3),
            "ratio_geogate_vs_direct": round(gt["ok_per_s"] / max(1e-9, dt["ok_per_s"]), 3),
            "ratio_haproxy_vs_direct": round(ht["ok_per_s"] / max(1e-9, dt["ok_per_s"]), 3),
            "concurrency": self.concurrency, "phase_s": self.phase_s, "protocol": PROTOCOL,
        }
        figures["goals"] = {
            f"added p50 <= {GOAL_ADDED_P50_MS} ms": figures["added_p50_ms"]["geogate"] <= GOAL_ADDED_P50_MS,
            f"throughput >= {GOAL_THROUGHPUT_VS_HAPROXY}x haproxy":
                figures["ratio_geogate_vs_haproxy"] >= GOAL_THROUGHPUT_VS_HAPROXY,
        }
        ctx.notes["overhead"] = figures
        failed = {label: r["totals"]["failed_by_reason"] for label, r in self.phases.items() if r["totals"]["failed"]}
        checks = [Check("no failed requests on any path", not failed, f"failures: {failed or 'none'}")]
        for label, r in self.phases.items():
            c = check_no_wrong_answers(r)
            c.name = f"answers verified ({label})"
            checks.append(c)
        checks.append(Check("figures", True,
                            f"added p50: geogate {figures['added_p50_ms']['geogate']:+.3f} ms, haproxy "
                            f"{figures['added_p50_ms']['haproxy']:+.3f} ms; throughput ok/s direct {dt['ok_per_s']:.0f}"
                            f", geogate {gt['ok_per_s']:.0f}, haproxy {ht['ok_per_s']:.0f} (geogate/haproxy "
                            f"{figures['ratio_geogate_vs_haproxy']:.2f}x); goals met: {figures['goals']}"))
        return checks


SCENARIO = Overhead
