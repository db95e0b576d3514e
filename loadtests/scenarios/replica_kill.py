"""replica-kill: one region, three replicas behind the gateway; one replica is killed with
SIGKILL a third of the way in.

Expected: requests that were on the killed replica are retried elsewhere (connect failure and
reset are retryable), so clients see (almost) no failures; the dead replica answers nothing
after the kill; the survivors share the traffic.
"""

from __future__ import annotations

from typing import Any

from loadtests.loadgen import LoadSpec
from loadtests.procs import PoolConfig, RegionConfig
from loadtests.results import window_totals
from loadtests.scenario import (
    Check,
    FaultAction,
    Scenario,
    ScenarioContext,
    check_no_wrong_answers,
    check_success_ratio,
    kill,
)

REGION = "eu-west"
VICTIM = "replica-b"
MIN_SUCCESS_RATIO = 0.99
SETTLE_S = 2.0  # after the kill, before "the dead replica answers nothing" is checked
HEALTH = {"interval_ms": 250, "timeout_ms": 250, "rise": 1, "fall": 2}


class ReplicaKill(Scenario):
    name = "replica-kill"
    description = "SIGKILL one of three replicas under load; clients should not notice"

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        repo = ctx.demo_repository()
        a, b, c = ctx.start_replicas(["replica-a", VICTIM, "replica-c"], repo)
        # gRPC end to end: the gateway prefers replicas speaking the client's protocol
        region = RegionConfig(REGION, pools=[PoolConfig("eu-ort", [r.url("grpc") for r in (a, b, c)])])
        (gw,) = ctx.start_gateways([region], sections={"health": HEALTH})
        ctx.notes["victim_url"] = b.url("grpc")
        self.duration_s = 5.0 if ctx.quick else 15.0
        return LoadSpec(url=f"grpc://{gw.grpc_address}", protocol="grpc", model="demo",
                        rate=40.0 if ctx.quick else 150.0, duration_s=self.duration_s, timeout_s=5.0)

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        return [kill(ctx.replicas[VICTIM], round(self.duration_s / 3, 1))]

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        victim = ctx.notes["victim_url"]
        kill_t = next((e["t_s"] for e in results["events"] if e["kind"] == "kill"), None)
        checks = [check_success_ratio(results, MIN_SUCCESS_RATIO), check_no_wrong_answers(results)]
        if kill_t is None:
            return [*checks, Check("kill happened", False, "no kill event recorded")]
        before = window_totals(results, 0, int(kill_t))
        after = window_totals(results, int(kill_t + SETTLE_S) + 1, results["duration_s"])
        checks.append(Check("victim served before the kill", before["replicas"].get(victim, 0) > 0,
                            f"replica answers before t={kill_t:g} s: {before['replicas']}"))
        checks.append(Check("victim silent after the kill", after["replicas"].get(victim, 0) == 0
                            and after["ok"] > 0,
                            f"replica answers from t={int(kill_t + SETTLE_S) + 1} s: {after['replicas']}"))
        return checks


SCENARIO = ReplicaKill
