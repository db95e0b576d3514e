"""region-outage: cross-region failover through peer gateways.

Three regions, each with its gateway: eu-west (home: two replicas; all load enters through its
gateway), eu-central and us-east (one replica each). A gateway whose own replicas cannot serve
forwards to the next region's gateway (`geogate-hops: 1`); the `geogate-region` answer header
says which region served, and the report's region-share panel shows it second by second.

Main load (report.png), through eu-west's gateway:
1. kill-home:   SIGKILL both eu-west replicas -> traffic fails over to a peer region X
                (whichever the gateway ranks first: RTT, then distance; found by probing);
2. kill-region: SIGKILL region X whole (its gateway and replica) while load flows through
                eu-west's gateway -> traffic moves to the last region;
3. restore:     eu-west's replicas start again (same ports) -> traffic comes back home after
                health checks and `routing.failback_hold_ms`.

Blackhole phase (phases/blackhole/, only when running as root; otherwise reported as not run):
the peers run in network namespaces of their own; with the home replicas killed again, the
region serving eu-west's traffic is cut off by taking its namespace's link down, so requests to
it TIME OUT instead of being refused; then the link comes back and home is restored.

Figures per transition: failed requests (by reason), time from the fault until the first
success served by another region, p50/p99 of the requests sent in the 3 s after the fault, the
serving regions; after the restore, the time until every answer is served at home again.
Checks (correctness): no failed request in the main load (a dead process refuses connections:
the gateway retries elsewhere at no cost), the right serving regions in each window, verified
answers; the blackhole's failures are reported, not asserted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from loadtests.loadgen import LoadSpec
from loadtests.netns import NetNamespace, netns_supported
from loadtests.procs import LOOPBACK, PoolConfig, RegionConfig, infer_region
from loadtests.scenario import (
    Check,
    FaultAction,
    Scenario,
    ScenarioContext,
    check_no_wrong_answers,
    check_success_ratio,
    phase_summary,
    run_phase,
)
from loadtests.trace import OK, REGION, between, done_at, failures, first_answer, last_sent, percentile_ms, regions

HOME = "eu-west"
PEERS = {"eu-central": (50.11, 8.68), "us-east": (38.9, -77.0)}
HOME_LOCATION = (53.35, -6.26)
HOME_REPLICAS = ["eu-west-a", "eu-west-b"]
FAILBACK_HOLD_MS = 2000
QUICK_FAILBACK_HOLD_MS = 1000
QUICK_BASE_EJECTION_MS = 1000
TRANSITION_S = 3.0  # the window after a fault whose latency is "during the transition"
SETTLE_S = 1.5  # after a fault, before a window must be served by the new region only
HOME_TAIL_S = 2  # the last seconds of the main load must be served at home
PROBES = 6
READY_TIMEOUT_S = 60.0
HOME_SHARE_MIN = 0.95  # at home, outside the faults: a CPU stall of the shared machine can fail a probe
# ... and a quick run's window before the faults holds ~20 answers, where 2 such strays are 10%:
# up to this many answers elsewhere pass whatever the share.
HOME_STRAYS_ALLOWED = 2
SECTIONS = {
    "health": {"interval_ms": 250, "timeout_ms": 500, "rise": 1, "fall": 2},
    # peers' gateways are probed with the [dns] check settings
    "dns": {"check_interval_ms": 250, "check_timeout_ms": 400, "fall": 2, "rise": 1},
}


def serving_region(http_address: str, exclude: set[str]) -> str:
    """Which region serves a gateway's traffic now (most common answer of a few probes), ignoring
    `exclude`; '' when no probe succeeded."""
    seen = Counter(r for r in (infer_region(http_address) for _ in range(PROBES)) if r and r not in exclude)
    return seen.most_common(1)[0][0] if seen else ""


def transition_figures(trace: list, t_s: float, end_s: float, excluded: set[str]) -> dict[str, Any]:
    """What the clients saw from a fault at t_s until the next event (end_s)."""
    window = between(trace, t_s, end_s)
    first = first_answer(trace, t_s, lambda e: e[REGION] not in excluded)
    during = between(trace, t_s, t_s + TRANSITION_S)
    return {"at_s": t_s, "sent": len(window), "failed": sum(1 for e in window if not e[OK]),
            "failed_by_reason": failures(window),
            "first_remote_success_ms": round((done_at(first) - t_s) * 1000, 1) if first else None,
            "first_remote_region": first[REGION] if first else "",
            "transition_p50_ms": percentile_ms(during, 50), "transition_p99_ms": percentile_ms(during, 99),
            "transition_failed": sum(1 for e in during if not e[OK]), "served_by": regions(window)}


def back_home_figures(trace: list, t_s: float) -> dict[str, Any]:
    """After the home replicas returned at t_s: when did answers stop coming from elsewhere."""
    away = last_sent(trace, t_s, lambda e: e[OK] and e[REGION] != HOME)
    home = first_answer(trace, away[0] if away else t_s, lambda e: e[REGION] == HOME)
    return {"restored_at_s": t_s, "last_away_sent_s": away[0] if away else None,
            "back_home_s": round(home[0] - t_s, 3) if home else None,
            "served_by_after": regions(between(trace, t_s))}


class RegionOutage(Scenario):
    name = "region-outage"
    description = ("home replicas killed, then the serving peer region killed whole (and, as root, "
                   "blackholed): cross-region failover through peer gateways")

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        quick = ctx.quick
        self.rate = 40.0 if quick else 100.0
        self.duration_s = 12.0 if quick else 30.0
        self.times = ({"kill-home": 1.5, "kill-region": 3.5, "restore": 5.5} if quick
                      else {"kill-home": 6.0, "kill-region": 13.0, "restore": 20.0})
        self.bh_duration_s = 5.0 if quick else 22.0
        self.bh_times = ({"kill-home": 1.0, "blackhole": 2.5} if quick
                         else {"kill-home": 4.0, "blackhole": 10.0, "link-up": 16.0})
        hold_ms = QUICK_FAILBACK_HOLD_MS if quick else FAILBACK_HOLD_MS
        self.netns_ok, why = netns_supported()
        self.namespaces: dict[str, NetNamespace] = {}
        if self.netns_ok:
            for i, peer in enumerate(PEERS, 1):
                ns = NetNamespace.create(i)
                ctx.cleanups.append(ns.delete)
                ctx.namespaces.append(ns.name)
                self.namespaces[peer] = ns
        ctx.notes["netns"] = {p: ns.name for p, ns in self.namespaces.items()}
        repo = ctx.demo_repository()
        home = ctx.start_replicas(HOME_REPLICAS, repo, wait=False)
        self.region_procs: dict[str, list] = {HOME: list(home)}
        for peer in PEERS:
            ns = self.namespaces.get(peer)
            self.region_procs[peer] = ctx.start_replicas(
                [f"{peer}-a"], repo, wait=False, netns=ns.name if ns else None, netns_address=ns.address if ns else "")
        for procs in self.region_procs.values():
            for p in procs:
                p.wait_ready()
        self.regions = [RegionConfig(HOME, HOME_LOCATION, pools=[PoolConfig("ort", [p.url("http") for p in home])])]
        for peer, loc in PEERS.items():
            ns = self.namespaces.get(peer)
            urls = [p.url("http") for p in self.region_procs[peer]]
            self.regions.append(RegionConfig(peer, loc, host=ns.address if ns else LOOPBACK,
                                             pools=[PoolConfig("ort", urls)]))
        sections = {**SECTIONS, "routing": {"failback_hold_ms": hold_ms}}
        if quick:  # a replica ejected by passive outlier detection when it died comes back sooner
            sections["health"] = {**SECTIONS["health"], "base_ejection_ms": QUICK_BASE_EJECTION_MS}
        config = ctx.write_config(self.regions, sections=sections)
        ctx.start_gateways(self.regions, config=config, netns={p: ns.name for p, ns in self.namespaces.items()})
        for r in self.regions:
            self.region_procs[r.name].append(ctx.gateways[r.name])
        self.home_gw = ctx.gateways[HOME]
        self._wait_routing_home(ctx)
        ctx.notes["setup"] = {"rate_per_s": self.rate, "duration_s": self.duration_s, "failback_hold_ms": hold_ms,
                              "regions": {r.name: r.http_address for r in self.regions},
                              "fault_times_s": self.times}
        if self.netns_ok:
            self.blackhole = run_phase(ctx, "blackhole", self._spec(self.bh_duration_s), self._blackhole_actions(ctx))
            self._restore_after_blackhole(ctx)
        else:
            self.blackhole = None
            ctx.notes["blackhole"] = {"run": False, "why_not": why}
        return self._spec(self.duration_s)

    def _spec(self, duration_s: float) -> LoadSpec:
        return LoadSpec(url=f"http://{self.home_gw.http_address}", protocol="http-binary", model="demo",
                        rate=self.rate, duration_s=duration_s, timeout_s=5.0, trace=True)

    def _wait_routing_home(self, ctx: ScenarioContext) -> None:
        """Until eu-west's gateway sees every region healthy and serves at home."""
        def ready() -> bool:
            routing = self.home_gw.region_summary().get("routing") or {}
            healthy = routing.get("healthy") or {}
            return (len(healthy) == len(self.regions) and all(healthy.values())
                    and infer_region(self.home_gw.http_address) == HOME)
        self.home_gw.wait_until(ready, READY_TIMEOUT_S, what="routing at home with every region healthy")

    # ------------------------------------------------------------------ faults

    def _action(self, at_s: float, kind: str, target: str, fn: Callable[[FaultAction], str]) -> FaultAction:
        action = FaultAction(at_s, kind, target, lambda: "")
        action.run = lambda: fn(action)  # may rename its target once it knows it (the serving region)
        return action

    def _kill_home(self, ctx: ScenarioContext) -> Callable[[FaultAction], str]:
        def run(_a: FaultAction) -> str:
            for name in HOME_REPLICAS:
                ctx.replicas[name].kill()
            return f"SIGKILL {', '.join(HOME_REPLICAS)}"
        return run

    def _serving_peer(self) -> str:
        peer = serving_region(self.home_gw.http_address, {HOME})
        if not peer:  # nothing answered: take the gateway's own ranking
            order = (self.home_gw.region_summary().get("routing") or {}).get("order") or []
            peer = next((r for r in order if r != HOME), "")
        if not peer:
            raise RuntimeError("no peer region serves eu-west's traffic")
        return peer

    def _kill_region(self, ctx: ScenarioContext) -> Callable[[FaultAction], str]:
        def run(a: FaultAction) -> str:
            peer = a.target = self._serving_peer()
            for p in self.region_procs[peer]:
                p.kill()
            ctx.notes["killed_region"] = peer
            return f"SIGKILL region {peer}: gateway and replicas"
        return run

    def _restore(self, ctx: ScenarioContext) -> Callable[[FaultAction], str]:
        def run(_a: FaultAction) -> str:
            t0 = time.monotonic()
            ctx.restart_replicas(HOME_REPLICAS)
            return f"eu-west replicas restarted and ready after {time.monotonic() - t0:.2f} s"
        return run

    def _blackhole(self, ctx: ScenarioContext) -> Callable[[FaultAction], str]:
        def run(a: FaultAction) -> str:
            peer = a.target = self._serving_peer()
            self.namespaces[peer].link_down()
            ctx.notes["blackholed_region"] = peer
            return f"link down in namespace {self.namespaces[peer].name} (region {peer})"
        return run

    def _link_up(self, ctx: ScenarioContext) -> Callable[[FaultAction], str]:
        def run(a: FaultAction) -> str:
            peer = a.target = ctx.notes.get("blackholed_region", "")
            if peer:
                self.namespaces[peer].link_up()
            ctx.restart_replicas(HOME_REPLICAS)
            return f"link up (region {peer}); eu-west replicas restarted"
        return run

    def _blackhole_actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        t = self.bh_times
        actions = [self._action(t["kill-home"], "kill-home", HOME, self._kill_home(ctx)),
                   self._action(t["blackhole"], "blackhole", "serving peer", self._blackhole(ctx))]
        if "link-up" in t:
            actions.append(self._action(t["link-up"], "link-up", "blackholed peer", self._link_up(ctx)))
        return actions

    def _restore_after_blackhole(self, ctx: ScenarioContext) -> None:
        peer = ctx.notes.get("blackholed_region", "")
        if peer and "link-up" not in self.bh_times:
            self.namespaces[peer].link_up()
        if not all(ctx.replicas[n].alive() for n in HOME_REPLICAS) or "link-up" not in self.bh_times:
            ctx.restart_replicas(HOME_REPLICAS)
        self._wait_routing_home(ctx)

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        t = self.times
        return [self._action(t["kill-home"], "kill-home", HOME, self._kill_home(ctx)),
                self._action(t["kill-region"], "kill-region", "serving peer", self._kill_region(ctx)),
                self._action(t["restore"], "restore", HOME, self._restore(ctx))]

    # ------------------------------------------------------------------ figures and checks

    @staticmethod
    def _events(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {e["kind"]: e for e in results["events"]}

    def _main_figures(self, results: dict[str, Any], trace: list) -> dict[str, Any]:
        ev = self._events(results)
        kh, kr, rs = (ev.get(k) for k in ("kill-home", "kill-region", "restore"))
        figs: dict[str, Any] = {"totals": phase_summary(results)}
        if kh:
            steady = between(trace, 1.0, kh["t_s"])
            figs["steady"] = {"p50_ms": percentile_ms(steady, 50), "p99_ms": percentile_ms(steady, 99),
                              "served_by": regions(steady)}
            figs["kill-home"] = transition_figures(trace, kh["t_s"], kr["t_s"] if kr else self.duration_s, {HOME})
        if kr:
            figs["kill-region"] = {"region": kr["target"], **transition_figures(
                trace, kr["t_s"], rs["t_s"] if rs else self.duration_s, {HOME, kr["target"]})}
        if rs:
            figs["restore"] = back_home_figures(trace, rs["t_s"])
        return figs

    def _blackhole_figures(self, results: dict[str, Any], trace: list) -> dict[str, Any]:
        ev = self._events(results)
        kh, bh, up = (ev.get(k) for k in ("kill-home", "blackhole", "link-up"))
        figs: dict[str, Any] = {"run": True, "totals": phase_summary(results)}
        if kh:
            figs["kill-home"] = transition_figures(trace, kh["t_s"], bh["t_s"] if bh else self.bh_duration_s, {HOME})
        if bh:
            figs["blackhole"] = {"region": bh["target"], **transition_figures(
                trace, bh["t_s"], up["t_s"] if up else self.bh_duration_s, {HOME, bh["target"]})}
        if up:
            figs["restore"] = back_home_figures(trace, up["t_s"])
        return figs

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        trace = ctx.recorder.trace or []
        figs = self._main_figures(results, trace)
        out: dict[str, Any] = {"kill": figs}
        checks = [check_success_ratio(results, 1.0, name="no failed requests (kill)"), check_no_wrong_answers(results)]
        ev = self._events(results)
        missing = [k for k in ("kill-home", "kill-region", "restore") if k not in ev]
        if missing:
            checks.append(Check("faults happened", False, f"missing events {missing}: {results['events']}"))
        else:
            kh, kr, rs = ev["kill-home"]["t_s"], ev["kill-region"]["t_s"], ev["restore"]["t_s"]
            killed = ev["kill-region"]["target"]
            checks.append(self._served_home("served at home before the faults", trace, 1.0, kh))
            checks.append(self._served_only("failed over to a peer when the home replicas died", trace, kh + SETTLE_S,
                                            kr, set(PEERS)))
            checks.append(self._served_only(f"failed over again when region {killed} died", trace, kr + SETTLE_S, rs,
                                            set(PEERS) - {killed}))
            checks.append(self._back_home(trace, rs))
        if self.blackhole is not None:
            btrace = ctx.phase_recorders["blackhole"].trace or []
            bfigs = self._blackhole_figures(self.blackhole, btrace)
            out["blackhole"] = bfigs
            c = check_no_wrong_answers(self.blackhole)
            c.name = "answers verified (blackhole)"
            checks.append(c)
            bev = self._events(self.blackhole)
            if "blackhole" not in bev or "kill-home" not in bev:
                checks.append(Check("blackhole happened", False, f"events: {self.blackhole['events']}"))
            else:
                bh = bev["blackhole"]
                end = bev["link-up"]["t_s"] if "link-up" in bev else self.bh_duration_s
                # requests sent to the blackholed region before it was marked down time out (by design
                # of a partition); afterwards the remaining peer must serve
                checks.append(self._served_only(f"failed over away from blackholed region {bh['target']}", btrace,
                                                bh["t_s"] + SETTLE_S, end, set(PEERS) - {bh["target"]}))
                b = bfigs["blackhole"]
                checks.append(Check("blackhole figures", True,
                                    f"{b['failed']} failed ({b['failed_by_reason'] or 'none'}); first success "
                                    f"elsewhere after {b['first_remote_success_ms']} ms; p99 in the "
                                    f"{TRANSITION_S:g} s after: {b['transition_p99_ms']} ms"))
        else:
            out["blackhole"] = ctx.notes.get("blackhole")
            checks.append(Check("blackhole (network namespace link down)", True,
                                f"not run: {out['blackhole']['why_not']}"))
        ctx.notes["region_outage"] = out
        if "kill-home" in figs and "kill-region" in figs and "restore" in figs:
            k1, k2, r = figs["kill-home"], figs["kill-region"], figs["restore"]
            checks.append(Check("transition figures", True,
                                f"home replicas killed: {k1['failed']} failed, first remote success after "
                                f"{k1['first_remote_success_ms']} ms ({k1['first_remote_region']}), p99 "
                                f"{k1['transition_p99_ms']} ms; region {k2['region']} killed: {k2['failed']} failed, "
                                f"first success elsewhere after {k2['first_remote_success_ms']} ms, p99 "
                                f"{k2['transition_p99_ms']} ms; back home {r['back_home_s']} s after the restore"))
        return checks

    def _back_home(self, trace: list, restored_s: float) -> Check:
        """Served at home in the load's last seconds; when the restarted replicas were ready too
        late for that (a busy machine starts them slowly), probes after the load must find home."""
        name = "back home after the home replicas returned"
        tail = self._served_home(name, trace, self.duration_s - HOME_TAIL_S, self.duration_s)
        if tail.ok or restored_s < self.duration_s - HOME_TAIL_S - FAILBACK_HOLD_MS / 1000:
            return tail
        t0 = time.monotonic()
        while time.monotonic() - t0 < READY_TIMEOUT_S:
            if serving_region(self.home_gw.http_address, set()) == HOME:
                return Check(name, True, f"replicas ready only at t={restored_s:.1f} s (load ended at "
                                         f"{self.duration_s:g} s); probes after the load served at home "
                                         f"within {time.monotonic() - t0:.1f} s")
            time.sleep(0.2)
        return Check(name, False, f"{tail.detail}; probes after the load not at home after {READY_TIMEOUT_S:g} s")

    @staticmethod
    def _served_home(name: str, trace: list, start_s: float, end_s: float) -> Check:
        served = regions(between(trace, start_s, end_s))
        total = sum(served.values())
        home = served.get(HOME, 0) / max(1, total)
        strays = total - served.get(HOME, 0)
        return Check(name, served.get(HOME, 0) > 0 and (home >= HOME_SHARE_MIN or strays <= HOME_STRAYS_ALLOWED),
                     f"answers sent in [{start_s:.1f}, {end_s:.1f}) s by region: {served or 'none'} "
                     f"({home:.1%} at home, need >= {HOME_SHARE_MIN:.0%} or at most {HOME_STRAYS_ALLOWED} elsewhere)")

    @staticmethod
    def _served_only(name: str, trace: list, start_s: float, end_s: float, allowed: set[str]) -> Check:
        window = between(trace, start_s, end_s)
        served = regions(window)
        ok = bool(served) and set(served) <= allowed
        return Check(name, ok, f"answers sent in [{start_s:.1f}, {end_s:.1f}) s by region: {served or 'none'} "
                               f"(allowed: {', '.join(sorted(allowed))})")


SCENARIO = RegionOutage
