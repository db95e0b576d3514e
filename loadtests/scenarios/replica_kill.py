"""replica-kill: one region, three replicas; one is killed with SIGKILL a third of the way in.
The same fault runs first behind HAProxy (phases/haproxy/: round-robin, health checks tuned
like the gateway's, `retries 2` + `option redispatch`), then behind geogate (the main load),
side by side; the victim is restarted on the same ports between the two.

Expected from geogate: requests that were on the killed replica are retried elsewhere (connect
failure and reset are retryable), so clients see no failure; the dead replica answers nothing
after the kill; the survivors share the traffic. HAProxy's figures are reported next to it.
"""

from __future__ import annotations

import math
from typing import Any

from loadtests.haproxy import require_haproxy, start_haproxy
from loadtests.loadgen import LoadSpec
from loadtests.procs import PoolConfig, RegionConfig, infer_headers
from loadtests.results import window_totals
from loadtests.scenario import (
    Check,
    FaultAction,
    Scenario,
    ScenarioContext,
    check_no_wrong_answers,
    check_success_ratio,
    kill,
    phase_summary,
    run_phase,
)

REGION = "eu-west"
WARM_UP_REQUESTS = 3
KILL_NOT_BEFORE_S = 2.5
VICTIM = "replica-b"
SETTLE_S = 2.0  # after the kill, before "the dead replica answers nothing" is checked
TRANSITION_S = 3  # seconds after the fault whose latency is "during the transition"
HEALTH = {"interval_ms": 250, "timeout_ms": 250, "rise": 1, "fall": 2}
PROTOCOL = "http-binary"


def side_by_side(ctx: ScenarioContext, geogate: dict[str, Any], haproxy: dict[str, Any], fault_kind: str,
                 geogate_label: str = "", haproxy_label: str = "haproxy") -> dict[str, Any]:
    """The figures of the same fault behind geogate and behind HAProxy, for notes and checks."""
    def figures(results: dict[str, Any], label: str) -> dict[str, Any]:
        recorder = ctx.phase_recorders.get(label) if label else ctx.recorder
        t = next((e["t_s"] for e in results["events"] if e["kind"] == fault_kind), None)
        out = phase_summary(results)
        if t is not None and recorder is not None:
            w = recorder.window_latency(int(t), int(t) + TRANSITION_S)
            out["transition_p99_ms"] = w["p99"]
            out["transition_failed"] = window_totals(results, int(t), int(t) + TRANSITION_S)["failed"]
        return out
    g, h = figures(geogate, geogate_label), figures(haproxy, haproxy_label)
    return {"geogate": g, "haproxy": h,
            "table": {k: {"geogate": g.get(k), "haproxy": h.get(k)}
                      for k in ("sent", "failed", "p50_ms", "p99_ms", "transition_p99_ms", "transition_failed")}}


def side_by_side_check(figs: dict[str, Any]) -> Check:
    g, h = figs["geogate"], figs["haproxy"]
    return Check("side by side", True,
                 f"failed: geogate {g['failed']} vs haproxy {h['failed']} ({h['failed_by_reason'] or 'none'}); p99: "
                 f"geogate {g['p99_ms']:.1f} vs haproxy {h['p99_ms']:.1f} ms; p99 in the {TRANSITION_S} s after the "
                 f"fault: geogate {g.get('transition_p99_ms', 0):.1f} vs haproxy "
                 f"{h.get('transition_p99_ms', 0):.1f} ms")


class ReplicaKill(Scenario):
    name = "replica-kill"
    description = "SIGKILL one of three replicas under load, behind HAProxy and then behind geogate"

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        require_haproxy()
        self.duration_s = 6.0 if ctx.quick else 15.0
        self.rate = 40.0 if ctx.quick else 150.0
        repo = ctx.demo_repository()
        replicas = ctx.start_replicas(["replica-a", VICTIM, "replica-c"], repo)
        h = start_haproxy(ctx, [r.http_address for r in replicas])
        self.peer = run_phase(ctx, "haproxy", self._spec(f"http://{h.address}"),
                              [kill(ctx.replicas[VICTIM], self._kill_at())])
        h.kill()
        ctx.restart_replicas([VICTIM])
        for _ in range(WARM_UP_REQUESTS):  # its first inferences are slow (ORT): the balancer would avoid it
            infer_headers(ctx.replicas[VICTIM].http_address)
        region = RegionConfig(REGION, pools=[PoolConfig("eu-ort", [r.url("http") for r in replicas])])
        (gw,) = ctx.start_gateways([region], sections={"health": HEALTH})
        ctx.notes["victim_url"] = replicas[1].url("http")
        return self._spec(f"http://{gw.http_address}")

    def _kill_at(self) -> float:
        # at least KILL_NOT_BEFORE_S: the victim must have served (and been measured) first
        return max(KILL_NOT_BEFORE_S, round(self.duration_s / 3, 1))

    def _spec(self, url: str) -> LoadSpec:
        return LoadSpec(url=url, protocol=PROTOCOL, model="demo", rate=self.rate, duration_s=self.duration_s,
                        timeout_s=5.0)

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        return [kill(ctx.replicas[VICTIM], self._kill_at())]

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        victim = ctx.notes["victim_url"]
        kill_t = next((e["t_s"] for e in results["events"] if e["kind"] == "kill"), None)
        checks = [check_success_ratio(results, 1.0, name="no failed requests (geogate)"),
                  check_no_wrong_answers(results)]
        c = check_no_wrong_answers(self.peer)
        c.name = "answers verified (haproxy)"
        checks.append(c)
        if kill_t is None:
            return [*checks, Check("kill happened", False, "no kill event recorded")]
        # every second up to the one the kill fell in: the victim answers nothing after its kill,
        # so what it answered in that second came before it
        before = window_totals(results, 0, math.ceil(kill_t))
        after = window_totals(results, int(kill_t + SETTLE_S) + 1, results["duration_s"])
        checks.append(Check("victim served before the kill", before["replicas"].get(victim, 0) > 0,
                            f"replica answers before t={kill_t:g} s: {before['replicas']}"))
        checks.append(Check("victim silent after the kill", after["replicas"].get(victim, 0) == 0 and after["ok"] > 0,
                            f"replica answers from t={int(kill_t + SETTLE_S) + 1} s: {after['replicas']}"))
        figs = side_by_side(ctx, results, self.peer, "kill")
        ctx.notes["side_by_side"] = figs
        checks.append(side_by_side_check(figs))
        return checks


SCENARIO = ReplicaKill
