"""slow-replica: one of four replicas becomes 10x slower; geogate vs HAProxy round-robin
(issue 3's second benchmark scenario).

Four replicas, one region. A short direct phase measures a replica's p50; the slow replica's
fault switch then delays each inference by 9x that (so it answers 10x slower). The same fault
runs twice, at the same open-loop rate: first behind HAProxy (round-robin, health checks), then
behind geogate (one worker; power of two choices over outstanding requests and peak-EWMA
latency). In each run the replica is healthy for the first third and slow for the rest, so
every run has its own all-healthy baseline:

- healthy window: [1 s, fault); slow window: [fault + settle, end);
- figures: p99 in each window (exact, from the merged HDR histograms), their ratio, and the
  slow replica's share of answers in each window.

Checks (correctness): no failures, verified answers, and (quick runs, 100 ms delay) geogate
moves traffic off the slow replica (its share falls below half of its fair 25%). Goals
(reported): geogate's p99 while one replica is slow stays within 1.5x of its all-healthy p99
(HAProxy's ratio next to it); at the real 10x the traffic shift is a goal too.
"""

from __future__ import annotations

from typing import Any

from loadtests.haproxy import require_haproxy, start_haproxy
from loadtests.loadgen import LoadSpec
from loadtests.procs import PoolConfig, RegionConfig
from loadtests.results import Recorder, window_totals
from loadtests.scenario import (
    Check,
    FaultAction,
    Scenario,
    ScenarioContext,
    check_no_wrong_answers,
    check_success_ratio,
    inject,
    phase_summary,
    run_phase,
    share,
)

REGION = "eu-west"
SLOW = "replica-d"
SLOW_FACTOR = 10
MIN_DELAY_MS = 2
# Quick runs (smoke tests, shared machines): a delay far above scheduling noise, so "traffic
# moved off the slow replica" is about the balancer, not about how busy the machine is.
QUICK_MIN_DELAY_MS = 100
SETTLE_S = 2  # seconds after the fault before the slow window starts (the balancer learns)
GOAL_P99_RATIO = 1.5
MAX_SLOW_SHARE = 0.125  # half of the fair share of one replica in four
HEALTH = {"interval_ms": 250, "timeout_ms": 1000, "rise": 1, "fall": 2}
GATEWAY = {"access_log": False}
PROTOCOL = "http-binary"


def windows(duration_s: float, fault_s: float) -> tuple[tuple[int, int], tuple[int, int]]:
    return (1, int(fault_s)), (int(fault_s) + SETTLE_S, int(duration_s))


def window_figures(results: dict[str, Any], recorder: Recorder, slow_url: str, duration_s: float
                   ) -> dict[str, Any]:
    fault = next((e["t_s"] for e in results["events"] if e["kind"] == "fault"), None)
    if fault is None:
        return {}
    (h0, h1), (s0, s1) = windows(duration_s, fault)
    healthy, slow = recorder.window_latency(h0, h1), recorder.window_latency(s0, s1)
    wh, ws = window_totals(results, h0, h1), window_totals(results, s0, s1)
    return {"healthy_window_s": [h0, h1], "slow_window_s": [s0, s1],
            "healthy_p50_ms": healthy["p50"], "healthy_p99_ms": healthy["p99"],
            "slow_p50_ms": slow["p50"], "slow_p99_ms": slow["p99"],
            "p99_ratio": round(slow["p99"] / max(1e-9, healthy["p99"]), 3),
            "slow_replica_share_healthy": round(share(wh["replicas"], slow_url), 4),
            "slow_replica_share_slow": round(share(ws["replicas"], slow_url), 4),
            "totals": phase_summary(results)}


class SlowReplica(Scenario):
    name = "slow-replica"
    description = (f"one of four replicas {SLOW_FACTOR}x slower: geogate's p99 vs its all-healthy p99, "
                   "and HAProxy round-robin's")

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        require_haproxy()
        self.duration_s = 5.0 if ctx.quick else 15.0
        self.rate = 50.0 if ctx.quick else 150.0
        self.fault_s = round(self.duration_s / 3, 1)
        repo = ctx.demo_repository()
        replicas = ctx.start_replicas(["replica-a", "replica-b", "replica-c", SLOW], repo)
        slow = replicas[-1]
        direct = run_phase(ctx, "direct", LoadSpec(url=f"http://{replicas[0].http_address}", protocol=PROTOCOL,
                                                   model="demo", rate=self.rate, duration_s=1.0 if ctx.quick else 2.0,
                                                   timeout_s=5.0))
        self.direct_p50_ms = direct["totals"]["latency_ms"]["p50"]
        self.delay_ms = max(QUICK_MIN_DELAY_MS if ctx.quick else MIN_DELAY_MS,
                            round(self.direct_p50_ms * (SLOW_FACTOR - 1)))
        h = start_haproxy(ctx, [r.http_address for r in replicas])
        self.peer = run_phase(ctx, "haproxy", self._spec(f"http://{h.address}"),
                              [inject(slow, self.fault_s, delay_ms=self.delay_ms)])
        slow.set_faults()
        h.kill()
        region = RegionConfig(REGION, pools=[PoolConfig("eu-ort", [r.url("http") for r in replicas])])
        (gw,) = ctx.start_gateways([region], sections={"health": HEALTH, "gateway": GATEWAY})
        self.slow_url = slow.url("http")
        ctx.notes["slow_url"] = self.slow_url
        return self._spec(f"http://{gw.http_address}")

    def _spec(self, url: str) -> LoadSpec:
        return LoadSpec(url=url, protocol=PROTOCOL, model="demo", rate=self.rate, duration_s=self.duration_s,
                        timeout_s=5.0)

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        return [inject(ctx.replicas[SLOW], self.fault_s, delay_ms=self.delay_ms)]

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        g = window_figures(results, ctx.recorder, self.slow_url, self.duration_s)
        h = window_figures(self.peer, ctx.phase_recorders["haproxy"], self.slow_url.replace("http://", ""),
                           self.duration_s)
        # HAProxy names no replica in its answers: its per-replica share is not measurable here.
        for k in ("slow_replica_share_healthy", "slow_replica_share_slow"):
            h.pop(k, None)
        ctx.notes["slow_replica"] = {"direct_p50_ms": self.direct_p50_ms, "delay_ms": self.delay_ms,
                                     "rate_per_s": self.rate, "duration_s": self.duration_s,
                                     "fault_at_s": self.fault_s, "geogate": g, "haproxy": h}
        checks = [check_success_ratio(results, 1.0, name="no failed requests (geogate)"),
                  check_success_ratio(self.peer, 1.0, name="no failed requests (haproxy)"),
                  check_no_wrong_answers(results)]
        c = check_no_wrong_answers(self.peer)
        c.name = "answers verified (haproxy)"
        checks.append(c)
        if not g or not h:
            return [*checks, Check("fault happened", False, f"events: {results['events']} / {self.peer['events']}")]
        # A correctness check with the quick run's large delay; with the real 10x of a ~1 ms
        # inference it competes with the shared machine's scheduling noise: a goal then.
        checks.append(Check("geogate moved traffic off the slow replica",
                            g["slow_replica_share_slow"] <= MAX_SLOW_SHARE,
                            f"slow replica's share of answers: {g['slow_replica_share_healthy']:.1%} while healthy, "
                            f"{g['slow_replica_share_slow']:.1%} while slow (need <= {MAX_SLOW_SHARE:.1%})",
                            goal=not ctx.quick))
        checks.append(Check(f"geogate p99 with one slow replica <= {GOAL_P99_RATIO}x its all-healthy p99",
                            g["p99_ratio"] <= GOAL_P99_RATIO,
                            f"geogate p99 {g['healthy_p99_ms']:.2f} -> {g['slow_p99_ms']:.2f} ms "
                            f"({g['p99_ratio']:.2f}x); haproxy p99 {h['healthy_p99_ms']:.2f} -> "
                            f"{h['slow_p99_ms']:.2f} ms ({h['p99_ratio']:.2f}x); slow replica +{self.delay_ms} ms "
                            f"per inference (direct p50 {self.direct_p50_ms:.2f} ms)", goal=True))
        return checks


SCENARIO = SlowReplica
