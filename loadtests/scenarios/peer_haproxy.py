"""HAProxy as the peer to compare geogate with, and running extra load phases inside a scenario.

- `HaproxyProc`: Debian's haproxy configured by the scenario (HTTP mode, round-robin, active
  health checks `GET /v2/health/ready`, optional `backup` servers: HAProxy's own failover),
  started as a scenario process (killed with the rest at teardown).
- `run_phase`: one more load run inside a scenario (e.g. the same fault against HAProxy, or the
  "direct" leg of the overhead comparison), with its own timed faults; writes
  `phases/LABEL/results.json` + `report.png` and returns the results document.
- `replica-kill-vs-haproxy` scenario: the replica-kill fault against HAProxy and against
  geogate in one run, side by side (HAProxy phase first, on its own replicas' twin set).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from loadtests.loadgen import LoadSpec, run_load
from loadtests.procs import PoolConfig, Proc, RegionConfig, free_port, http_ok
from loadtests.report import write_report
from loadtests.results import build_results, window_totals, write_results
from loadtests.scenario import (
    Check,
    FaultAction,
    Scenario,
    ScenarioContext,
    _FaultRunner,
    check_no_wrong_answers,
    check_success_ratio,
    kill,
)

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
HAPROXY_READY_TIMEOUT_S = 30.0
# HAProxy's health checks tuned like the gateway's in the fault scenarios (fair comparison).
CHECK_INTER_MS = 250
CHECK_FALL = 2
CHECK_RISE = 1
PHASES_DIR = "phases"


def haproxy_available() -> bool:
    return Path(HAPROXY).exists()


class HaproxyProc(Proc):
    """haproxy -db -f CONFIG: HTTP mode, round-robin over `servers` (HOST:PORT of replicas' HTTP
    listeners) with health checks; `backups` take traffic only when every server is down;
    `retries` + `option redispatch` let a failed connect go to another server (HAProxy's retry)."""

    def __init__(self, work_dir: Path, servers: list[str], *, name: str = "haproxy",
                 log_dir: Path, backups: list[str] | None = None, threads: int = 1,
                 inter_ms: int = CHECK_INTER_MS, fall: int = CHECK_FALL, rise: int = CHECK_RISE):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        lines = []
        for i, s in enumerate(servers):
            lines.append(f"    server s{i} {s} check inter {inter_ms} fall {fall} rise {rise}")
        for i, s in enumerate(backups or []):
            lines.append(f"    server b{i} {s} check inter {inter_ms} fall {fall} rise {rise} backup")
        work_dir.mkdir(parents=True, exist_ok=True)
        self.config = work_dir / f"{name}.cfg"
        self.config.write_text(f"""global
    maxconn 4096
    nbthread {threads}
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 2
    option redispatch
    option http-keep-alive
frontend fe
    bind {self.address}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-reuse safe
{chr(10).join(lines)}
""")
        super().__init__([HAPROXY, "-db", "-f", str(self.config)], name=name, log_dir=log_dir)

    def wait_ready(self, timeout_s: float = HAPROXY_READY_TIMEOUT_S) -> HaproxyProc:
        self.wait_until(lambda: http_ok(f"http://{self.address}/v2/health/ready"), timeout_s)
        return self


def start_haproxy(ctx: ScenarioContext, servers: list[str], *, name: str = "haproxy",
                  backups: list[str] | None = None, threads: int = 1) -> HaproxyProc:
    h = HaproxyProc(ctx.work_dir, servers, name=name, log_dir=ctx.log_dir, backups=backups, threads=threads)
    ctx.procs.append(h)
    ctx.notes.setdefault("ports", []).append(h.port)
    # wait until every server passed a check (rise 1): a first check round is one interval
    h.wait_ready()
    time.sleep(2 * CHECK_INTER_MS / 1000)
    return h


def run_phase(ctx: ScenarioContext, label: str, spec: LoadSpec, actions: list[FaultAction] | None = None,
              ) -> dict[str, Any]:
    """Run one more load (with its own timed faults) inside a scenario; write its results and
    report under phases/LABEL/; return the results document."""
    actions = actions or []
    runner: list[_FaultRunner] = []

    def on_start(t0: float) -> None:
        r = _FaultRunner(actions, t0, spec.duration_s)
        runner.append(r)
        r.start()

    try:
        load = run_load(spec, on_start=on_start)
    finally:
        for r in runner:
            r.cancel()
            r.join(timeout=30)
    events = runner[0].events if runner else []
    results = build_results(load.recorder, spec=spec.to_dict(), duration_s=spec.duration_s, events=events,
                            started_at_unix_s=load.wall_start)
    results["phase"] = label
    if runner and runner[0].errors:
        results["phase_errors"] = runner[0].errors
    out = ctx.out_dir / PHASES_DIR / label
    write_results(results, out / "results.json")
    write_report(results, out / "report.png", title=f"{label}")
    ctx.notes.setdefault("phase_reports", {})[label] = str(out / "report.png")
    return results


def phase_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The figures of a phase that go into the scenario's notes (and the side-by-side table)."""
    t = results["totals"]
    return {"sent": t["sent"], "ok": t["ok"], "failed": t["failed"], "failed_by_reason": t["failed_by_reason"],
            "ok_per_s": t["ok_per_s"], "p50_ms": t["latency_ms"]["p50"], "p99_ms": t["latency_ms"]["p99"],
            "p999_ms": t["latency_ms"]["p999"], "max_ms": t["latency_ms"]["max"]}


def fault_window_p99(results: dict[str, Any], kind: str, span_s: int = 3) -> float:
    """Worst per-second p99 in the `span_s` seconds from the first `kind` event (the transition)."""
    t = next((e["t_s"] for e in results["events"] if e["kind"] == kind), None)
    if t is None:
        return 0.0
    rows = [r["p99_ms"] for r in results["timeline"] if int(t) <= r["t_s"] < int(t) + span_s]
    return max(rows, default=0.0)


# ---------------------------------------------------------------------------- replica-kill vs HAProxy


REGION = "eu-west"
HEALTH = {"interval_ms": CHECK_INTER_MS, "timeout_ms": 250, "rise": 1, "fall": 2}


class ReplicaKillVsHaproxy(Scenario):
    name = "replica-kill-vs-haproxy"
    description = "SIGKILL one of three replicas under load, behind HAProxy and then behind geogate"

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        if not haproxy_available():
            raise RuntimeError(f"haproxy not found at {HAPROXY} (Debian: apt-get install haproxy)")
        self.duration_s = 5.0 if ctx.quick else 15.0
        rate = 40.0 if ctx.quick else 150.0
        repo = ctx.demo_repository()
        a, b, c = ctx.start_replicas(["replica-a", "replica-b", "replica-c"], repo)
        # HTTP on both sides: HAProxy's HTTP mode, the gateway's HTTP front
        h = start_haproxy(ctx, [r.http_address for r in (a, b, c)])
        peer = run_phase(ctx, "haproxy", LoadSpec(url=f"http://{h.address}", protocol="http-binary", model="demo",
                                                  rate=rate, duration_s=self.duration_s, timeout_s=5.0),
                         [kill(b, round(self.duration_s / 3, 1))])
        h.kill()
        ctx.notes["haproxy"] = {**phase_summary(peer), "transition_p99_ms": fault_window_p99(peer, "kill")}
        self.peer_results = peer
        (b2,) = ctx.start_replicas(["replica-b2"], repo)
        region = RegionConfig(REGION, pools=[PoolConfig("eu-ort", [r.url("http") for r in (a, b2, c)])])
        (gw,) = ctx.start_gateways([region], sections={"health": HEALTH})
        ctx.notes["ports"] += [region.http_port, region.grpc_port, region.admin_port]
        ctx.notes["victim_url"] = b2.url("http")
        return LoadSpec(url=f"http://{gw.http_address}", protocol="http-binary", model="demo", rate=rate,
                        duration_s=self.duration_s, timeout_s=5.0)

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        return [kill(ctx.replicas["replica-b2"], round(self.duration_s / 3, 1))]

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        ctx.notes["geogate"] = {**phase_summary(results), "transition_p99_ms": fault_window_p99(results, "kill")}
        g, h = ctx.notes["geogate"], ctx.notes["haproxy"]
        ctx.notes["side_by_side"] = {k: {"geogate": g[k], "haproxy": h[k]}
                                     for k in ("sent", "failed", "p50_ms", "p99_ms", "transition_p99_ms")}
        checks = [check_success_ratio(results, 0.99, name="geogate success ratio"), check_no_wrong_answers(results),
                  check_no_wrong_answers(self.peer_results)]
        checks[-1].name = "haproxy answers verified"
        after = window_totals(results, int(next((e["t_s"] for e in results["events"]), 0)) + 3, 10**6)
        checks.append(Check("victim silent after the kill (geogate)",
                            after["replicas"].get(ctx.notes["victim_url"], 0) == 0,
                            f"replica answers from 3 s after the kill: {after['replicas']}"))
        checks.append(Check("side by side", True,
                            f"failed: geogate {g['failed']} vs haproxy {h['failed']}; p99 during the kill: "
                            f"geogate {g['transition_p99_ms']:.1f} ms vs haproxy {h['transition_p99_ms']:.1f} ms"))
        return checks


SCENARIO = ReplicaKillVsHaproxy
