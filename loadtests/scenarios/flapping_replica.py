"""flapping-replica: one region, three replicas; one is frozen (SIGSTOP) and thawed (SIGCONT)
over and over. A frozen process keeps its sockets: connections are accepted by the kernel and
requests just hang, the nastiest kind of failure for a proxy.

Expected: per-try timeouts and retries on the other replicas keep clients succeeding, with
latency bounded by the per-try timeout; health checks and outlier ejection take the replica
out while frozen and bring it back when it answers again.
"""

from __future__ import annotations

from typing import Any

from loadtests.loadgen import LoadSpec
from loadtests.procs import PoolConfig, RegionConfig
from loadtests.scenario import (
    Check,
    FaultAction,
    Scenario,
    ScenarioContext,
    check_no_wrong_answers,
    check_success_ratio,
    pause,
    resume,
)

REGION = "eu-west"
FLAPPER = "replica-a"
MIN_SUCCESS_RATIO = 0.98
PER_TRY_TIMEOUT_MS = 300
MAX_ATTEMPTS = 3
P99_SLACK_MS = 1000  # on top of the worst retry chain, for a loaded machine
HEALTH = {"interval_ms": 250, "timeout_ms": 250, "rise": 2, "fall": 2}
GATEWAY = {"per_try_timeout_ms": PER_TRY_TIMEOUT_MS, "max_attempts": MAX_ATTEMPTS, "default_timeout_ms": 5000}


class FlappingReplica(Scenario):
    name = "flapping-replica"
    description = "SIGSTOP/SIGCONT one of three replicas repeatedly under load"

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        repo = ctx.demo_repository()
        replicas = ctx.start_replicas([FLAPPER, "replica-b", "replica-c"], repo)
        region = RegionConfig(REGION, pools=[PoolConfig("eu-ort", [r.url("http") for r in replicas])])
        (gw,) = ctx.start_gateways([region], sections={"health": HEALTH, "gateway": GATEWAY})
        ctx.notes["flapper_url"] = replicas[0].url("http")
        self.duration_s = 6.0 if ctx.quick else 24.0
        self.period_s = 1.0 if ctx.quick else 2.0  # frozen for one period, thawed for the next
        return LoadSpec(url=f"http://{gw.http_address}", protocol="http", model="demo",
                        rate=30.0 if ctx.quick else 100.0, duration_s=self.duration_s, timeout_s=5.0)

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        p = ctx.replicas[FLAPPER]
        actions = []
        t = self.period_s
        while t + self.period_s < self.duration_s - self.period_s:
            actions += [pause(p, t), resume(p, t + self.period_s)]
            t += 2 * self.period_s
        return actions

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        checks = [check_success_ratio(results, MIN_SUCCESS_RATIO), check_no_wrong_answers(results)]
        stops = sum(1 for e in results["events"] if e["kind"] == "stop")
        conts = sum(1 for e in results["events"] if e["kind"] == "cont")
        checks.append(Check("replica flapped", stops >= 1 and stops == conts,
                            f"{stops} SIGSTOP, {conts} SIGCONT"))
        p99 = results["totals"]["latency_ms"]["p99"]
        bound = PER_TRY_TIMEOUT_MS * MAX_ATTEMPTS + P99_SLACK_MS
        checks.append(Check("p99 bounded by per-try timeouts", p99 <= bound,
                            f"p99 {p99:.1f} ms (need <= {bound} ms)"))
        return checks


SCENARIO = FlappingReplica
