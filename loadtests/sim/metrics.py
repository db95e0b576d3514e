"""What a run measured, and the figures of sim.json.

Every sampled request is recorded with its weight (the real requests it stands for), so each
figure is about real requests: shares, counts and weighted latency percentiles. Ticks record
what the product's objects say about each region (utilization, expected queueing, spilling)
and the flows of the requests, for the timeline and for the region-loss analysis.

Failover time after a region loss: until its home clients' failed share of every tick stays
under ``FAILED_TOL`` (detection, GeoDNS, the clients' cached answers).

Steady state after an event: where the lost region's home clients go (the share served by each
region, refused, failed) and the refused share of all requests, each averaged over the
``STEADY_WINDOW_S`` up to a time (so the answer includes up to one window), stay within
``STEADY_SHARE_TOL`` (L1 distance) and ``STEADY_REFUSED_TOL`` (absolute) of the values they
settle to: their average over ``STEADY_REFERENCE_S`` starting
``STEADY_REFERENCE_AFTER_S`` after the event (or ending at the next event, if that comes
sooner), so the slow diurnal drift of demand is not mistaken for the event's transient. The
answer is the first time within tolerance after which at least ``STEADY_QUORUM`` of the windows
are (sampled flows are noisy: one stray window must not push it to the end).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from loadtests.sim import faults as F
from loadtests.sim import requests as R
from loadtests.sim import traffic

S_PER_HOUR = 3600.0
STEADY_WINDOW_S = 60.0
FAILED_TOL = 0.01  # failover is over when the home clients' failed share stays under this
STEADY_REFERENCE_S = 300.0
STEADY_REFERENCE_AFTER_S = 600.0
STEADY_QUORUM = 0.9
STEADY_SHARE_TOL = 0.15
STEADY_REFUSED_TOL = 0.03
SATURATED_UTILIZATION = 1.0  # a region at or over its replicas' concurrency limits is saturated
TIMELINE_BIN_S = 300.0  # the PNG's and sim.json's timeline resolution outside the loss window


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: list[float]) -> list[float]:
    if len(values) == 0:
        return [math.nan for _ in qs]
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    total = cum[-1]
    return [float(v[min(len(v) - 1, int(np.searchsorted(cum, q * total)))]) for q in qs]


class Metrics:
    def __init__(self, planet, *, start_s: float, duration_s: float, faults: list[F.Fault]) -> None:
        self.planet = planet
        self.start_s = start_s
        self.end_s = start_s + duration_s
        self.hours = max(1, math.ceil(duration_s / S_PER_HOUR))
        self.faults = faults
        self.regions = [r.name for r in planet.world.regions]
        self.ri = {n: i for i, n in enumerate(self.regions)}
        loss = next((f for f in faults if f.kind == F.REGION_DOWN), None)
        back = next((f for f in faults if f.kind == F.REGION_UP), None)
        self.lost = loss.target if loss else ""
        self.loss_s = loss.t_s if loss else math.inf
        self.restore_s = back.t_s if back else math.inf
        part = next((f for f in faults if f.kind == F.PARTITION), None)
        heal = next((f for f in faults if f.kind == F.HEAL), None)
        self.partition = part.target.split("|") if part else []
        self.partition_s = (part.t_s, heal.t_s if heal else math.inf) if part else (math.inf, math.inf)
        self.home_of_lost = {m.name for m in planet.world.metros if planet.world.nearest[m.name] == self.lost}
        self.any_fault_active_until = 0.0
        n = self.hours
        self.h_total = np.zeros(n)
        self.h_ok = np.zeros(n)
        self.h_nearest = np.zeros(n)
        self.h_failed = np.zeros(n)
        self.h_unreachable = np.zeros(n)
        self.h_shed = {p: np.zeros(n) for p, _ in traffic.PRIORITY_MIX}
        self.h_cross = np.zeros(n)
        self.lat_v: list[float] = []
        self.lat_w: list[float] = []
        self.lat_h: list[int] = []
        self.decision_ns: list[int] = []
        self.samples = 0
        self.failed_by_reason: dict[str, float] = defaultdict(float)
        self.shed_by_priority: dict[str, float] = defaultdict(float)
        self.violations: dict[str, float] = defaultdict(float)
        self.violation_examples: dict[str, str] = {}
        self.loss_served: dict[str, float] = defaultdict(float)  # lost region's home clients during the loss
        self.loss_refused: dict[str, float] = defaultdict(float)  # by priority, everyone, during the loss
        self.loss_failed = 0.0
        self.loss_total = 0.0
        self.loss_shed_at: dict[str, float] = defaultdict(float)
        self.partition_cross = 0.0
        self.partition_failed = 0.0
        self.partition_cut_off = 0.0
        self.partition_total = 0.0
        self.healthy_nearest = [0.0, 0.0]  # ok weight served nearest / ok weight, outside any fault's effect
        # ticks
        self.t_rows: list[tuple[float, float]] = []
        self.t_util: list[list[float]] = []
        self.t_queue: list[list[float]] = []
        self.t_spill: list[list[bool]] = []
        self.t_served: list[np.ndarray] = []
        self.t_home: list[np.ndarray] = []
        self.t_refused: list[float] = []
        self.t_total: list[float] = []
        self.t_ok: list[float] = []
        self.t_lat: list[list[tuple[float, float]]] = []
        self._cur_served = np.zeros(len(self.regions))
        self._cur_home = np.zeros(len(self.regions) + 2)  # served by each region, refused, failed
        self._cur = [0.0, 0.0, 0.0, 0.0]  # refused, total, ok, ok in the nearest healthy region
        self.t_nearest: list[float] = []
        self._cur_lat: list[tuple[float, float]] = []
        slow = next((f for f in faults if f.kind == F.REPLICA_SLOW), None)
        normal = next((f for f in faults if f.kind == F.REPLICA_NORMAL), None)
        self.slow_url = slow.target if slow else ""
        self.slow_span = (slow.t_s, normal.t_s if normal else math.inf) if slow else (math.inf, math.inf)
        self.slow_share = {"before": [0.0, 0.0], "during": [0.0, 0.0], "after": [0.0, 0.0]}  # [share x s, s]
        self.retried = 0.0

    # ------------------------------------------------------------------ per request

    def on_served(self, req: R.Request, s: R.Served, resolved_s: float) -> None:
        t = req.t_s
        if t < self.start_s:
            return
        w = req.weight
        h = min(self.hours - 1, int((t - self.start_s) // S_PER_HOUR))
        self.samples += 1
        self.h_total[h] += w
        self._cur[1] += w
        if s.decision_ns:
            self.decision_ns.append(s.decision_ns)
        planet = self.planet
        in_loss = self.loss_s <= t < self.restore_s
        in_part = self.partition_s[0] <= t < self.partition_s[1]
        if in_loss:
            self.loss_total += w
        if in_part:
            self.partition_total += w
        if s.outcome == R.OK:
            self.h_ok[h] += w
            self._cur[2] += w
            nearest = planet.nearest_healthy(req.metro)
            hit = s.region == nearest
            if hit:
                self.h_nearest[h] += w
                self._cur[3] += w
            if not self._disturbed(t):
                self.healthy_nearest[0] += w if hit else 0.0
                self.healthy_nearest[1] += w
            self.lat_v.append(s.latency_s)
            self.lat_w.append(w)
            self.lat_h.append(h)
            self._cur_lat.append((s.latency_s, w))
            self._cur_served[self.ri[s.region]] += w
            if req.metro in self.home_of_lost:
                self._cur_home[self.ri[s.region]] += w
                if in_loss:
                    self.loss_served[s.region] += w
            if s.region != s.entry:
                self.h_cross[h] += w
            if s.attempts > 1:
                self.retried += w
            if in_part and self.partition and {planet.continent[s.entry], planet.continent[s.region]} == \
                    set(self.partition):
                self.partition_cross += w
        elif s.outcome == R.SHED:
            self.h_shed[req.priority][h] += w
            self.shed_by_priority[req.priority] += w
            self._cur[0] += w
            if req.metro in self.home_of_lost:
                self._cur_home[len(self.regions)] += w
            if in_loss:
                self.loss_refused[req.priority] += w
                self.loss_shed_at[s.region or s.entry] += w
            if req.priority == "critical":
                self._violation("critical_refused", w, f"{s.entry}: {s.reason}")
            elif req.priority == "standard" and not s.sheddable_refused_too:
                self._violation("standard_refused_while_sheddable_admitted", w, f"{s.entry}: {s.reason}")
        else:
            key = "failed" if s.outcome == R.FAILED else "unreachable"
            (self.h_failed if s.outcome == R.FAILED else self.h_unreachable)[h] += w
            if req.metro in self.home_of_lost:
                self._cur_home[len(self.regions) + 1] += w
            self.failed_by_reason[_reason_class(key, s.reason)] += w
            if in_loss:
                self.loss_failed += w
            if in_part:
                self.partition_failed += w
                if s.entry and self.partition and {planet.metro_continent[req.metro],
                                                   planet.continent[s.entry]} == set(self.partition):
                    self.partition_cut_off += w  # GeoDNS answered a region the client cannot reach
        # "no request routed to a dead region after detection"
        if s.known_down_tried:
            self._violation("peer_tried_after_withdrawn", w, f"{s.entry} -> {s.known_down_tried}")
        if s.unhealthy_replicas_tried:
            self._violation("unhealthy_replica_picked", w, f"{s.entry}: {s.unhealthy_replicas_tried}")
        if s.entry and s.outcome == R.UNREACHABLE:
            withdrawn = planet.dns_withdrawn_at.get(s.entry)
            if withdrawn is not None and resolved_s >= withdrawn and not planet.alive[s.entry] \
                    and any(planet.alive.values()):
                self._violation("dns_answered_dead_region", w, f"{req.metro} -> {s.entry}")

    def _disturbed(self, t: float) -> bool:
        """Inside a region loss or a partition, or within the steady-state reference after them."""
        for a, b in ((self.loss_s, self.restore_s + STEADY_REFERENCE_S),
                     (self.partition_s[0], self.partition_s[1] + STEADY_REFERENCE_S)):
            if a <= t < b:
                return True
        return False

    def _violation(self, key: str, w: float, example: str) -> None:
        self.violations[key] += w
        self.violation_examples.setdefault(key, example)

    # ------------------------------------------------------------------ per tick

    def on_tick(self, t: float, dt: float) -> None:
        """Called at the start of each tick: closes the previous one."""
        planet = self.planet
        if self.t_rows:
            self._close_tick()
        if t < self.start_s:
            return
        util, queue, spill = [], [], []
        for r in self.regions:
            gw = planet.gateways[r]
            if planet.alive[r]:
                util.append(gw.guard.utilization)
                queue.append(gw.guard.queue_ms)
                spill.append(gw.spill.spilling)
            else:
                util.append(math.nan)
                queue.append(math.nan)
                spill.append(False)
        if self.slow_url:
            region = planet.replica_region[self.slow_url]
            if planet.alive[region] and planet.arrival[region] > 0:
                phase = "before" if t < self.slow_span[0] else "during" if t < self.slow_span[1] else "after"
                acc = self.slow_share[phase]
                acc[0] += planet.queues[self.slow_url].arrival_per_s / planet.arrival[region] * dt
                acc[1] += dt
        self.t_rows.append((t, dt))
        self.t_util.append(util)
        self.t_queue.append(queue)
        self.t_spill.append(spill)

    def _close_tick(self) -> None:
        self.t_served.append(self._cur_served)
        self.t_home.append(self._cur_home)
        self.t_refused.append(self._cur[0])
        self.t_total.append(self._cur[1])
        self.t_ok.append(self._cur[2])
        self.t_nearest.append(self._cur[3])
        self.t_lat.append(self._cur_lat)
        self._cur_served = np.zeros(len(self.regions))
        self._cur_home = np.zeros(len(self.regions) + 2)
        self._cur = [0.0, 0.0, 0.0, 0.0]
        self._cur_lat = []

    def finish(self) -> None:
        if len(self.t_served) < len(self.t_rows):
            self._close_tick()

    # ------------------------------------------------------------------ figures

    def _window(self, lo: float, hi: float):
        """Tick indices inside [lo, hi)."""
        return [i for i, (t, _) in enumerate(self.t_rows) if lo <= t < hi]

    def steady_after_s(self, event_s: float, until_s: float, *, home: bool) -> float | None:
        """Seconds from `event_s` until the flows stay settled (module doc); None if they never do."""
        ref_end = min(until_s, event_s + STEADY_REFERENCE_AFTER_S + STEADY_REFERENCE_S)
        idx = self._window(event_s, ref_end)
        if not idx:
            return None
        ref = self._window(max(event_s, ref_end - STEADY_REFERENCE_S), ref_end)
        served = np.array([self.t_home[i] if home else self.t_served[i] for i in idx])
        refused = np.array([self.t_refused[i] for i in idx])
        total = np.array([self.t_total[i] for i in idx])
        times = np.array([self.t_rows[i][0] for i in idx])

        def dist(rows: np.ndarray) -> np.ndarray:
            s = rows.sum()
            return rows / s if s > 0 else rows

        ri = [idx.index(i) for i in ref]
        ref_dist = dist(served[ri].sum(axis=0))
        ref_refused = refused[ri].sum() / max(total[ri].sum(), 1e-12)
        ok = []
        for t in times:
            win = (times > t - STEADY_WINDOW_S) & (times <= t)
            d = dist(served[win].sum(axis=0))
            rf = refused[win].sum() / max(total[win].sum(), 1e-12)
            ok.append(np.abs(d - ref_dist).sum() <= STEADY_SHARE_TOL and abs(rf - ref_refused) <= STEADY_REFUSED_TOL)
        # the first time within tolerance after which (nearly) every window is: sampled flows
        # are noisy, one stray window must not push the answer to the end
        for k, good in enumerate(ok):
            if good and sum(ok[k:]) >= STEADY_QUORUM * (len(ok) - k):
                return float(times[k] - event_s)
        return None

    def failures_stop_after_s(self, event_s: float, until_s: float) -> float | None:
        """Seconds from `event_s` until the lost region's home clients stop failing (their
        failed or unreachable share of a tick stays under FAILED_TOL): detection, GeoDNS and the
        clients' cached answers (TTL) all done."""
        idx = self._window(event_s, until_s)
        fail_col = len(self.regions) + 1
        last_bad = None
        for i in idx:
            h = self.t_home[i]
            total = h.sum()
            if total > 0 and h[fail_col] / total > FAILED_TOL:
                last_bad = i
        if last_bad is None:
            return 0.0
        t, dt = self.t_rows[last_bad]
        end = t + dt
        return round(end - event_s, 1) if end < until_s else None

    def region_loss(self) -> dict:
        if not self.lost:
            return {}
        w = self.planet.world
        served_total = sum(self.loss_served.values())
        went = {r: round(v / served_total, 4) for r, v in sorted(self.loss_served.items(), key=lambda kv: -kv[1])}
        idx = self._window(self.loss_s, self.restore_s)
        saturated = []
        for j, r in enumerate(self.regions):
            if r == self.lost or not idx:
                continue
            utils = [self.t_util[i][j] for i in idx]
            queues = [self.t_queue[i][j] for i in idx]
            spill_s = sum(self.t_rows[i][1] for i in idx if self.t_spill[i][j])
            max_u = max(utils)
            shed = self.loss_shed_at.get(r, 0.0)
            if max_u >= SATURATED_UTILIZATION or spill_s > 0 or shed > 0:
                saturated.append({"region": r, "max_utilization": round(max_u, 3),
                                  "max_expected_queue_ms": round(max(queues), 1),
                                  "spilling_s": round(spill_s, 1), "refused_requests": round(shed)})
        saturated.sort(key=lambda d: -d["max_utilization"])
        total = max(self.loss_total, 1e-12)
        loss_hour = traffic.local_hour(self.loss_s, _offset(w, self.lost))
        after_restore_until = min(self.end_s, self.restore_s + 2 * STEADY_REFERENCE_S)
        return {
            "region": self.lost,
            "at_s": round(self.loss_s - self.start_s, 1),
            "local_time": f"{int(loss_hour):02d}:{int(loss_hour % 1 * 60):02d}",
            "restored_at_s": round(self.restore_s - self.start_s, 1),
            "duration_s": round(self.restore_s - self.loss_s, 1),
            "demand_at_loss_per_s": round(sum(w.metro_rate_per_s(m, self.loss_s) for m in w.metros
                                              if m.name in self.home_of_lost)),
            "traffic_went_to": went,
            "saturated_regions": saturated,
            "refused_by_priority": {p: round(self.loss_refused.get(p, 0.0)) for p, _ in traffic.PRIORITY_MIX},
            "refused_share_by_priority": {p: round(self.loss_refused.get(p, 0.0) / total, 5)
                                          for p, _ in traffic.PRIORITY_MIX},
            "failed_requests": round(self.loss_failed),
            "requests_during": round(self.loss_total),
            "failures_stop_after_loss_s": self.failures_stop_after_s(self.loss_s, self.restore_s),
            "steady_after_loss_s": self.steady_after_s(self.loss_s, self.restore_s, home=True),
            "steady_after_restore_s": self.steady_after_s(self.restore_s, after_restore_until, home=True),
        }

    def hours_table(self) -> list[dict]:
        lat_v = np.array(self.lat_v)
        lat_w = np.array(self.lat_w)
        lat_h = np.array(self.lat_h, dtype=int)
        out = []
        for h in range(self.hours):
            mask = lat_h == h
            p50, p99 = weighted_quantiles(lat_v[mask], lat_w[mask], [0.5, 0.99])
            ok = self.h_ok[h]
            utc = (self.start_s + h * S_PER_HOUR) / S_PER_HOUR % 24
            out.append({"hour": h, "utc": f"{int(utc):02d}:00", "requests": round(self.h_total[h]),
                        "ok": round(ok), "failed": round(self.h_failed[h]), "unreachable": round(self.h_unreachable[h]),
                        "shed": {p: round(v[h]) for p, v in self.h_shed.items()},
                        "nearest_region_share": round(self.h_nearest[h] / ok, 4) if ok else None,
                        "cross_region_share": round(self.h_cross[h] / ok, 4) if ok else None,
                        "p50_ms": round(p50 * 1000, 1), "p99_ms": round(p99 * 1000, 1)})
        return out

    def latency(self) -> dict:
        v, w = np.array(self.lat_v), np.array(self.lat_w)
        p50, p90, p99, p999 = weighted_quantiles(v, w, [0.5, 0.9, 0.99, 0.999])
        return {"p50_ms": round(p50 * 1000, 1), "p90_ms": round(p90 * 1000, 1), "p99_ms": round(p99 * 1000, 1),
                "p999_ms": round(p999 * 1000, 1)}

    def decision_cost(self) -> dict:
        if not self.decision_ns:
            return {}
        a = np.array(self.decision_ns) / 1000.0
        return {"decisions": len(a), "median_us": round(float(np.median(a)), 2),
                "p90_us": round(float(np.percentile(a, 90)), 2), "p99_us": round(float(np.percentile(a, 99)), 2),
                "mean_us": round(float(a.mean()), 2)}

    def slow_replica(self) -> dict:
        """The slow replica's share of its region's requests before, during and after (P2C
        steers away from it by its latency), next to its share of the region's capacity."""
        if not self.slow_url:
            return {}
        planet = self.planet
        region = planet.replica_region[self.slow_url]
        spec = next(s for s in planet.world.replicas[region] if s.url == self.slow_url)
        cap_share = spec.capacity_per_s / planet.world.capacity_per_s(region)
        return {"url": self.slow_url, "region": region, "replicas_in_region": len(planet.world.replicas[region]),
                "capacity_share": round(cap_share, 4),
                "slow_capacity_share": round(cap_share / F.SLOW_FACTOR, 4),
                "share": {k: (round(v[0] / v[1], 4) if v[1] else None) for k, v in self.slow_share.items()}}

    def partition_figures(self) -> dict:
        if not self.partition:
            return {}
        return {"continents": self.partition, "at_s": round(self.partition_s[0] - self.start_s, 1),
                "healed_at_s": round(self.partition_s[1] - self.start_s, 1),
                "requests_during": round(self.partition_total),
                "served_across_the_cut": round(self.partition_cross),
                "failed_or_unreachable": round(self.partition_failed),
                "clients_cut_off_from_their_region": round(self.partition_cut_off)}


def _offset(world, region: str) -> float:
    from loadtests.sim.world import utc_offset_h

    return utc_offset_h(world.region(region).tz)


def _reason_class(kind: str, reason: str) -> str:
    r = reason.lower()
    if kind == "unreachable":
        return "entry region unreachable (cached DNS answer)" if "dns answer" in r else "no region answered by GeoDNS"
    if "deadline" in r:
        return "deadline exceeded"
    if "budget" in r:
        return "retry budget exhausted"
    if "did not answer" in r:
        return "peer region did not answer"
    if "attempts failed" in r:
        return "every attempt failed"
    return reason[:60] or "other"
