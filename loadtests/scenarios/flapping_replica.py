"""flapping-replica: one region, three replicas; one is frozen (SIGSTOP) and thawed (SIGCONT)
over and over. A frozen process keeps its sockets: connections are accepted by the kernel and
requests just hang, the nastiest kind of failure for a proxy.

Expected: per-try timeouts and retries on the other replicas keep clients succeeding, with
latency bounded by the per-try timeout; health checks and outlier ejection take the replica
out while frozen and bring it back when it answers again.

The same freeze/thaw sequence runs first behind HAProxy (phases/haproxy/: round-robin, the
same health-check cadence, `retries 2` + `option redispatch`; no per-try timeout of its own
short of `timeout server`), then behind geogate (the main load): figures side by side.
"""

from __future__ import annotations

from typing import Any

from loadtests.haproxy import require_haproxy, start_haproxy
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
    run_phase,
)
from loadtests.scenarios.replica_kill import side_by_side, side_by_side_check

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
    description = "SIGSTOP/SIGCONT one of three replicas repeatedly under load, behind HAProxy and geogate"

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        require_haproxy()
        self.duration_s = 5.0 if ctx.quick else 24.0
        self.period_s = 1.0 if ctx.quick else 2.0  # frozen for one period, thawed for the next
        self.rate = 30.0 if ctx.quick else 100.0
        repo = ctx.demo_repository()
        replicas = ctx.start_replicas([FLAPPER, "replica-b", "replica-c"], repo)
        h = start_haproxy(ctx, [r.http_address for r in replicas])
        self.peer = run_phase(ctx, "haproxy", self._spec(f"http://{h.address}"), self.actions(ctx))
        h.kill()
        region = RegionConfig(REGION, pools=[PoolConfig("eu-ort", [r.url("http") for r in replicas])])
        (gw,) = ctx.start_gateways([region], sections={"health": HEALTH, "gateway": GATEWAY})
        ctx.notes["flapper_url"] = replicas[0].url("http")
        return self._spec(f"http://{gw.http_address}")

    def _spec(self, url: str) -> LoadSpec:
        return LoadSpec(url=url, protocol="http", model="demo", rate=self.rate, duration_s=self.duration_s,
                        timeout_s=5.0)

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
        c = check_no_wrong_answers(self.peer)
        c.name = "answers verified (haproxy)"
        checks.append(c)
        figs = side_by_side(ctx, results, self.peer, "stop")
        ctx.notes["side_by_side"] = figs
        checks.append(side_by_side_check(figs))
        return checks


SCENARIO = FlappingReplica
