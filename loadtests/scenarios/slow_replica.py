"""slow-replica: one region, two replicas; one starts answering 300 ms late (replica fault
switch: `delay_ms`) for the middle half of the run, then recovers.

Expected: the gateway's latency-aware choice (power of two choices over peak-EWMA) moves
traffic off the slow replica, so its share drops and the median stays far below the injected
delay; nothing fails; once the delay is cleared the replica is used again.
"""

from __future__ import annotations

import statistics
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
    inject,
    share,
)

REGION = "eu-west"
SLOW = "replica-a"
DELAY_MS = 300
MIN_SUCCESS_RATIO = 0.99
MAX_SLOW_SHARE = 0.25  # of answers while slow (fair share would be 0.5)
SETTLE_S = 1.0  # the gateway needs a few slow answers before it learns
HEALTH = {"interval_ms": 250, "timeout_ms": 1000, "rise": 1, "fall": 2}


class SlowReplica(Scenario):
    name = "slow-replica"
    description = f"one of two replicas answers {DELAY_MS} ms late for half the run"

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        repo = ctx.demo_repository()
        a, b = ctx.start_replicas([SLOW, "replica-b"], repo)
        region = RegionConfig(REGION, pools=[PoolConfig("eu-ort", [a.url("http"), b.url("http")])])
        (gw,) = ctx.start_gateways([region], sections={"health": HEALTH})
        ctx.notes["slow_url"] = a.url("http")
        self.duration_s = 6.0 if ctx.quick else 20.0
        return LoadSpec(url=f"http://{gw.http_address}", protocol="http-binary", model="demo",
                        rate=30.0 if ctx.quick else 100.0, duration_s=self.duration_s, timeout_s=5.0)

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        slow = ctx.replicas[SLOW]
        return [inject(slow, round(self.duration_s / 4, 1), delay_ms=DELAY_MS),
                inject(slow, round(self.duration_s * 3 / 4, 1))]

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        slow = ctx.notes["slow_url"]
        checks = [check_success_ratio(results, MIN_SUCCESS_RATIO), check_no_wrong_answers(results)]
        on = next((e["t_s"] for e in results["events"] if e["kind"] == "fault"), None)
        off = next((e["t_s"] for e in results["events"] if e["kind"] == "clear"), None)
        if on is None or off is None:
            return [*checks, Check("faults happened", False, f"events: {results['events']}")]
        start, end = int(on + SETTLE_S) + 1, int(off)
        during = window_totals(results, start, end)
        slow_share = share(during["replicas"], slow)
        checks.append(Check("traffic moved off the slow replica", during["ok"] > 0 and slow_share <= MAX_SLOW_SHARE,
                            f"slow replica's share of answers in [{start}, {end}) s: {slow_share:.1%} "
                            f"(need <= {MAX_SLOW_SHARE:.0%}); {during['replicas']}"))
        p50s = [row["p50_ms"] for row in results["timeline"] if start <= row["t_s"] < end and row["ok"]]
        median_p50 = statistics.median(p50s) if p50s else 0.0
        checks.append(Check("median stays below the injected delay", bool(p50s) and median_p50 < DELAY_MS / 2,
                            f"median of per-second p50 in [{start}, {end}) s: {median_p50:.1f} ms "
                            f"(need < {DELAY_MS / 2:g} ms)"))
        return checks


SCENARIO = SlowReplica
