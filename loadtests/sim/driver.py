"""The event loop of a run: faults, health probes, ticks and sampled requests in time order,
on one simulated clock that every product object reads.

**Ticks.** Every tick (``fine_tick_s`` within ``fine_window_s`` after a region-wide event: a
region lost or restored, a partition or its end; ``mid_tick_s`` for the rest of a region's loss;
``coarse_tick_s`` otherwise) the loop
1. spreads each region's arrival rate over its replicas with *load picks*: ``picks_per_replica``
   x the eligible replicas calls of the product's P2C (``RegionPools.candidates`` +
   ``pick_p2c``), each carrying an equal slice of the rate and adding its share of in-flight to
   the picked replica's outstanding count as it lands, so later picks see it (a dead replica's
   picks fail, are recorded by the outlier detector and picked again, as retries would);
2. advances each replica's queue (``queueing.ReplicaQueue``) by the tick and sets the
   product's view of it: outstanding = in-flight, latency EWMA and concurrency-limit learner
   fed with the replica's mean latency at that in-flight level;
3. runs each gateway's capacity sampler (``sample_gateway`` + ``OverloadGuard.refresh``), and
   every ``SUMMARY_REFRESH_S`` the peers' summary fetches (``RegionHealthMonitor.record_probe``);
4. draws the tick's sampled requests: every metro gets at least one, the rest by demand,
   each standing for (metro rate x tick) / samples real requests; each enters through the
   region GeoDNS named when its client last resolved (``GeoDnsResponder.choose`` on a
   GeoIP database of the metros, answers cached for the DNS TTL) and is served by
   ``requests.serve``. A region's arrival rate for the next tick is what those samples sent
   there, smoothed over ``FLOW_SMOOTHING_S``.

**Probes.** Health probes that would change nothing are not replayed: a replica or region
whose true state is unchanged and whose recorded state agrees with it would only count one
more success. When a truth changes (a fault, a partition, a restore) its probes are replayed
at their own phase and interval (``[health] interval_ms`` for replicas, ``[dns]
check_interval_ms`` for gateways and GeoDNS) through the product's rise/fall code, until the
recorded state agrees again. A blackholed probe fails when it times out.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import logging
import math
import random
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import dns.rdatatype

from gateway.routing.balancer import pick_p2c
from geo.client_locator import ClientLocator, Location
from geo.dns_server import GeoDnsResponder
from geo.mmdb_build import build_city_db
from geo.region_health import RegionHealthMonitor
from health.outcomes import Outcome
from loadtests.sim import faults as F
from loadtests.sim import network, requests, traffic
from loadtests.sim.gateway import SimGateway
from loadtests.sim.queueing import ReplicaQueue
from loadtests.sim.world import MODEL, World

MS_PER_S = 1000.0
FLOW_SMOOTHING_S = 5.0  # time constant of a region's arrival rate as measured by the samples
SUMMARY_REFRESH_S = 1.0  # peers' summaries (healthy fraction, load) are re-read this often (every tick, in practice)
LEVEL_OBSERVATIONS = 2  # concurrency-limit learner samples per busy replica per tick
READY = {MODEL: {"1"}}
REPLICA_PROBE_RTT_S = 0.001
# Load picks per eligible replica and tick: enough that one pick carries a fraction of a small
# replica's capacity, so P2C can steer load by it (one pick per replica overloads whatever small
# replica it lands on).
DEFAULT_PICKS_PER_REPLICA = 2.0
FILL_UTILIZATION = 0.95  # a replica takes slices up to this share of its capacity while others have room
# A slice is at most this share of the picked replica's capacity: P2C decides per request, so a
# replica's load grows in steps that are small next to what it can take (a slice of a big
# region's rate would fill a small replica at once, whatever its cost said a moment later).
SLICE_MAX_CAPACITY = 0.25
P2C_REACTION_S = 1.0  # outstanding as P2C sees it: the in-flight a slice adds within this horizon
INITIAL_SPREAD_S = 1.0  # first probes of a (re)started gateway are spread over this

FINE_TICK_FAULTS = (F.REGION_DOWN, F.REGION_UP, F.PARTITION, F.HEAL)

_EV_FAULT, _EV_RPROBE, _EV_GPROBE, _EV_DNSPROBE, _EV_TICK, _EV_REQUEST = range(6)


class Planet:
    def __init__(self, world: World, *, start_s: float, duration_s: float, faults: list[F.Fault], seed: int,
                 samples_per_s: float, warmup_s: float = 0.0, warmup_samples_per_s: float | None = None,
                 fine_tick_s: float = 1.0, coarse_tick_s: float = 10.0, fine_window_s: float = 300.0,
                 mid_tick_s: float | None = None,
                 picks_per_replica: float = DEFAULT_PICKS_PER_REPLICA, workdir: str | None = None,
                 on_served: Callable[[requests.Request, requests.Served, str], None] | None = None,
                 on_tick: Callable[[float, float], None] | None = None) -> None:
        for name in ("geogate", "geogate.health.active", "geogate.health.outlier", "geogate.region_health"):
            logging.getLogger(name).setLevel(logging.ERROR)  # thousands of flips: the metrics tell
        self.world = world
        self.cfg = world.config
        self.start_s = start_s  # what is measured starts here, after `warmup_s` of simulated warm-up
        self.end_s = start_s + duration_s
        start_s -= warmup_s
        self.now = start_s
        self.seed = seed
        self.rng = random.Random(seed)
        self.samples_per_s = samples_per_s
        self.warmup_samples_per_s = samples_per_s if warmup_samples_per_s is None else warmup_samples_per_s
        self.fine_tick_s = fine_tick_s
        self.mid_tick_s = fine_tick_s if mid_tick_s is None else mid_tick_s
        self.coarse_tick_s = coarse_tick_s
        self.fine_window_s = fine_window_s
        self.picks_per_replica = picks_per_replica
        self.on_served = on_served
        self.on_tick = on_tick
        self.faults = sorted(faults, key=lambda f: f.t_s)
        # fine ticks after the events that move whole regions' traffic
        self._fine_starts = sorted(f.t_s for f in self.faults if f.kind in FINE_TICK_FAULTS)
        # ... and all through a region's loss: where its clients go is the run's main figure
        downs = [f for f in self.faults if f.kind == F.REGION_DOWN]
        self._fine_spans = [(d.t_s, next((u.t_s for u in self.faults if u.kind == F.REGION_UP and u.target == d.target
                                          and u.t_s > d.t_s), self.end_s)) for d in downs]
        self.network = network.Network()
        self.clock = lambda: self.now
        h, d = self.cfg.health, self.cfg.dns
        self.replica_interval_s = h.interval_ms / MS_PER_S
        self.region_interval_s = d.check_interval_ms / MS_PER_S
        self.region_timeout_s = d.check_timeout_ms / MS_PER_S
        self.ttl_s = float(d.ttl)

        regions = world.regions
        self.continent = {r.name: r.continent for r in regions}
        self.metro_continent = {m.name: m.continent for m in world.metros}
        self._rtt = {(a.name, b.name): network.rtt_ms(a.location, b.location) / MS_PER_S
                     for a in regions for b in regions}
        self.metro_rtt = {(m.name, r.name): network.rtt_ms(m.location, r.location) / MS_PER_S
                          for m in world.metros for r in regions}
        self.metro_by_distance = {m.name: sorted((r.name for r in regions), key=lambda n: self.metro_rtt[(m.name, n)])
                                  for m in world.metros}
        self.alive = {r.name: True for r in regions}
        self.queues: dict[str, ReplicaQueue] = {}
        deadline_s = self.cfg.gateway.default_timeout_ms / MS_PER_S
        self.replica_region: dict[str, str] = {}
        for region, specs in world.replicas.items():
            for s in specs:
                self.queues[s.url] = ReplicaQueue(s.slots, s.service_s, abandon_s=deadline_s)
                self.replica_region[s.url] = region
        self._phase = {url: self.rng.uniform(0.0, self.replica_interval_s) for url in self.queues}
        self._heap: list = []
        self._seq = 0
        self._pending_rprobe: set[str] = set()
        self._pending_gprobe: set[tuple[str, str]] = set()
        self.detect_at: dict[tuple[str, str], float] = {}
        self.gateways: dict[str, SimGateway] = {}
        self._gw_generation = dict.fromkeys(self.alive, 0)
        for r in regions:
            self._start_gateway(r.name, start_s, initial=True)
        for observer, gw in self.gateways.items():  # a deployment that was up before the run
            for peer in self.gateways:
                if peer != observer:
                    gw.monitor.record_probe(peer, True, "", self._rtt[(observer, peer)],
                                            self.gateways[peer].summary(start_s))
        # arrival rate per region (real requests/s), first guess: the nearest-region demand
        self.arrival = dict.fromkeys(self.alive, 0.0)
        for m in world.metros:
            self.arrival[world.nearest[m.name]] += world.metro_rate_per_s(m, start_s)
        self._flow = dict.fromkeys(self.alive, 0.0)
        self._flow_dt = 0.0
        self._next_summary_s = start_s

        # GeoDNS: the product's responder over a GeoIP database of the metros' networks
        self._tmp = tempfile.TemporaryDirectory(prefix="geogate-sim-") if workdir is None else None
        mmdb = str(Path(workdir or self._tmp.name) / "metros.mmdb")
        build_city_db(mmdb, {m.cidr: m.location for m in world.metros}, description="geogate sim metros")
        self.dns_monitor = RegionHealthMonitor(self.cfg.regions, interval_ms=d.check_interval_ms,
                                               timeout_ms=d.check_timeout_ms, fall=d.fall, rise=d.rise,
                                               fetch_summary=False, on_change=self._on_dns_change, clock=self.clock)
        self.locator = ClientLocator(self.cfg.regions, mmdb_path=mmdb)
        self.dns = GeoDnsResponder(self.cfg, self.dns_monitor, self.locator)
        self._metro_net = {m.name: ipaddress.ip_network(m.cidr) for m in world.metros}
        self._region_of_address = {a: r.name for r in self.cfg.regions for a in r.addresses}
        self.dns_times: dict[str, list[float]] = {m.name: [] for m in world.metros}
        self.dns_answers: dict[str, list[str]] = {m.name: [] for m in world.metros}
        self.dns_withdrawn_at: dict[str, float] = {}
        for r in regions:
            self.dns_monitor.record_probe(r.name, True, "", 0.0)
        self._refresh_dns(start_s)
        self.metro_location = {m.name: Location(m.lat, m.lon) for m in world.metros}
        self.nearest_mode = self.cfg.routing.mode == "nearest-to-client"

        for f in self.faults:
            if start_s <= f.t_s < self.end_s:
                self._push(f.t_s, _EV_FAULT, f)
        self._push(start_s, _EV_TICK, None)

    # ------------------------------------------------------------------ plumbing

    def _push(self, t: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, payload))

    def run(self) -> None:
        heap = self._heap
        while heap:
            t, kind, _, payload = heapq.heappop(heap)
            if t >= self.end_s:
                break
            self.now = t
            if kind == _EV_REQUEST:
                self._serve(payload)
            elif kind == _EV_TICK:
                self._tick(t)
            elif kind == _EV_RPROBE:
                self._replica_probe(payload)
            elif kind == _EV_GPROBE:
                self._gateway_probe(*payload)
            elif kind == _EV_DNSPROBE:
                self._dns_probe(*payload)
            else:
                self._apply_fault(payload)
        self.now = self.end_s

    def close(self) -> None:
        self.locator.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # ------------------------------------------------------------------ truth

    def rtt_s(self, a: str, b: str) -> float:
        return self._rtt[(a, b)]

    def reachable(self, a: str, b: str) -> bool:
        """Can region `a`'s gateway reach region `b`'s right now?"""
        return self.alive[b] and self.network.reachable(self.continent[a], self.continent[b])

    def blackhole_wait_s(self, observer: str, peer: str, now_s: float) -> float:
        """How long a request to an unanswering peer waits: until the observer's region monitor
        withdraws it (PeerLink.mark fails it then), or for ever (the deadline) once withdrawn."""
        if peer in self.gateways[observer].peer_down:
            return math.inf
        at = self.detect_at.get((observer, peer))
        if at is None or at < now_s:
            return self.cfg.dns.fall * self.region_interval_s + self.region_timeout_s
        return at - now_s

    def serving_region_healthy(self, region: str) -> bool:
        return self.alive[region] and any(self.queues[s.url].alive for s in self.world.replicas[region])

    def nearest_healthy(self, metro: str) -> str:
        for name in self.metro_by_distance[metro]:
            if self.serving_region_healthy(name):
                return name
        return ""

    # ------------------------------------------------------------------ gateways

    def _start_gateway(self, region: str, now_s: float, *, initial: bool = False) -> None:
        """A (re)started gateway process: fresh product state, replicas and peers probed anew
        (`initial`: the run's first state, every replica already probed healthy once)."""
        self._gw_generation[region] += 1
        gw = SimGateway(self.cfg, region, self.clock, self.seed * 1000 + self.world.region(region).index * 17
                        + self._gw_generation[region])
        self.gateways[region] = gw
        if initial:
            for s in self.world.replicas[region]:
                gw.probe_replica(s.url, True, now_s, REPLICA_PROBE_RTT_S, READY)
            return
        spread = min(INITIAL_SPREAD_S, self.replica_interval_s)
        for s in self.world.replicas[region]:
            self._pending_rprobe.discard(s.url)
            self._schedule_rprobe(s.url, now_s + self._phase[s.url] / self.replica_interval_s * spread, exact=True)
        for peer in self.alive:
            if peer != region:
                self._pending_gprobe.discard((region, peer))
                self._schedule_gprobe(region, peer, now_s, first=True)

    # ------------------------------------------------------------------ replica probes

    def _schedule_rprobe(self, url: str, after_s: float, *, exact: bool = False) -> None:
        if url in self._pending_rprobe:
            return
        self._pending_rprobe.add(url)
        if exact:
            t = after_s
        else:
            k = math.floor((after_s - self._phase[url]) / self.replica_interval_s) + 1
            t = self._phase[url] + k * self.replica_interval_s
        self._push(t, _EV_RPROBE, url)

    def _replica_probe(self, url: str) -> None:
        self._pending_rprobe.discard(url)
        region = self.replica_region[url]
        if not self.alive[region]:
            return
        ok = self.queues[url].alive
        gw = self.gateways[region]
        gw.probe_replica(url, ok, self.now, REPLICA_PROBE_RTT_S, READY if ok else None)
        if gw.upstreams[url].state.healthy != ok:
            self._schedule_rprobe(url, self.now)

    # ------------------------------------------------------------------ gateway (region) probes

    def _probe_start(self, key: tuple[str, str], after_s: float) -> float:
        phase = (zlib.crc32("|".join(key).encode()) % 1000) / 1000.0 * self.region_interval_s  # stable across runs
        k = math.floor((after_s - phase) / self.region_interval_s) + 1
        return phase + k * self.region_interval_s

    def _schedule_gprobe(self, observer: str, peer: str, after_s: float, *, first: bool = False) -> None:
        key = (observer, peer)
        if key in self._pending_gprobe:
            return
        self._pending_gprobe.add(key)
        start = self._probe_start(key, after_s)
        ok = self.reachable(observer, peer)
        took = self.rtt_s(observer, peer) if ok else self.region_timeout_s
        state = self.gateways[observer].monitor.states[peer]
        if not ok and state.healthy:
            # when the observer will withdraw it: the rest of `fall` failed probes, each
            # failing at its timeout
            left = max(1, self.cfg.dns.fall - state.consecutive_failures)
            self.detect_at[key] = start + (left - 1) * self.region_interval_s + took
        self._push(start + took, _EV_GPROBE, (observer, peer, self._gw_generation[observer], start))

    def _gateway_probe(self, observer: str, peer: str, generation: int, start_s: float) -> None:
        key = (observer, peer)
        self._pending_gprobe.discard(key)
        if not self.alive[observer] or generation != self._gw_generation[observer]:
            return
        ok = self.reachable(observer, peer)
        gw = self.gateways[observer]
        if ok:
            gw.monitor.record_probe(peer, True, "", self.rtt_s(observer, peer), self.gateways[peer].summary(self.now))
        else:
            gw.monitor.record_probe(peer, False, f"probe timeout after {self.cfg.dns.check_timeout_ms} ms")
        if gw.monitor.states[peer].healthy != ok:
            self._schedule_gprobe(observer, peer, start_s)

    def _truth_changed_for_peers(self, region: str) -> None:
        """`region`'s reachability changed: every observer's probes of it are replayed."""
        for observer in self.alive:
            if observer != region and self.alive[observer]:
                self._schedule_gprobe(observer, region, self.now)
        self._schedule_dnsprobe(region, self.now)

    # ------------------------------------------------------------------ GeoDNS

    def _schedule_dnsprobe(self, region: str, after_s: float) -> None:
        key = ("dns", region)
        if key in self._pending_gprobe:
            return
        self._pending_gprobe.add(key)
        start = self._probe_start(key, after_s)
        took = self.region_timeout_s if not self.alive[region] else 0.0
        self._push(start + took, _EV_DNSPROBE, (region, start))

    def _dns_probe(self, region: str, start_s: float) -> None:
        self._pending_gprobe.discard(("dns", region))
        ok = self.alive[region]
        self.dns_monitor.record_probe(region, ok, "" if ok else "probe timeout")
        if self.dns_monitor.states[region].healthy != ok:
            self._schedule_dnsprobe(region, start_s)

    def _on_dns_change(self, state) -> None:
        if not state.healthy:
            self.dns_withdrawn_at[state.name] = self.now
        self._refresh_dns(self.now)

    def _refresh_dns(self, now_s: float) -> None:
        for metro, net in self._metro_net.items():
            addresses, _, first = self.dns.choose(dns.rdatatype.A, net)
            region = first or (self._region_of_address.get(addresses[0], "") if addresses else "")
            answers = self.dns_answers[metro]
            if not answers or answers[-1] != region:
                self.dns_times[metro].append(now_s)
                answers.append(region)

    def dns_answer(self, metro: str, resolved_s: float) -> str:
        """The region GeoDNS answered for `metro` at `resolved_s`."""
        times = self.dns_times[metro]
        i = bisect.bisect_right(times, resolved_s) - 1
        return self.dns_answers[metro][max(0, i)]

    # ------------------------------------------------------------------ faults

    def _apply_fault(self, f: F.Fault) -> None:
        now = self.now
        if f.kind in (F.REPLICA_DOWN, F.REPLICA_UP):
            q = self.queues[f.target]
            q.alive = f.kind == F.REPLICA_UP
            q.backlog = 0.0
            if self.alive[self.replica_region[f.target]]:
                self._schedule_rprobe(f.target, now)
        elif f.kind in (F.REPLICA_SLOW, F.REPLICA_NORMAL):
            self.queues[f.target].slowdown = F.SLOW_FACTOR if f.kind == F.REPLICA_SLOW else 1.0
        elif f.kind == F.REGION_DOWN:
            self.alive[f.target] = False
            for s in self.world.replicas[f.target]:
                self.queues[s.url].alive = False
            self._truth_changed_for_peers(f.target)
        elif f.kind == F.REGION_UP:
            self.alive[f.target] = True
            for s in self.world.replicas[f.target]:
                q = self.queues[s.url]
                q.alive, q.backlog = True, 0.0
            self.arrival[f.target] = 0.0
            self._start_gateway(f.target, now)
            self._truth_changed_for_peers(f.target)
        elif f.kind in (F.PARTITION, F.HEAL):
            a, b = f.target.split("|")
            if f.kind == F.PARTITION:
                self.network.partition(a, b)
            else:
                self.network.heal(a, b)
            for obs in self.alive:
                for peer in self.alive:
                    if {self.continent[obs], self.continent[peer]} == {a, b} and self.alive[obs]:
                        self._schedule_gprobe(obs, peer, now)

    # ------------------------------------------------------------------ ticks

    def tick_length_s(self, t: float) -> float:
        i = bisect.bisect_right(self._fine_starts, t) - 1
        if i >= 0 and t - self._fine_starts[i] < self.fine_window_s:
            return self.fine_tick_s
        if any(a <= t < b for a, b in self._fine_spans):
            return self.mid_tick_s
        nxt = self._fine_starts[i + 1] if i + 1 < len(self._fine_starts) else math.inf
        return max(self.fine_tick_s, min(self.coarse_tick_s, nxt - t))

    def _tick(self, t: float) -> None:
        dt = min(self.tick_length_s(t), self.end_s - t)
        if t < self.start_s:
            dt = min(dt, self.start_s - t)  # the warm-up ends on a tick: no tick straddles the start
        self._update_arrivals(dt)
        for region, gw in self.gateways.items():
            if self.alive[region]:
                self._spread_load(gw, t, dt)
        if t >= self._next_summary_s:  # the peers' load as last sampled, read before the guards decide
            self._refresh_summaries(t)
            self._next_summary_s = t + SUMMARY_REFRESH_S
        for region, gw in self.gateways.items():
            if self.alive[region]:
                gw.sample_capacity(t)
        if self.on_tick is not None:
            self.on_tick(t, dt)
        self._draw_requests(t, dt)
        if t + dt < self.end_s:
            self._push(t + dt, _EV_TICK, None)

    def _refresh_summaries(self, t: float) -> None:
        summaries = {r: gw.summary(t) for r, gw in self.gateways.items() if self.alive[r]}
        for observer, gw in self.gateways.items():
            if not self.alive[observer]:
                continue
            states = gw.monitor.states
            for peer, summary in summaries.items():
                if peer == observer or (observer, peer) in self._pending_gprobe:
                    continue
                if states[peer].healthy and self.reachable(observer, peer):
                    gw.monitor.record_probe(peer, True, "", self._rtt[(observer, peer)], summary)

    def _spread_load(self, gw: SimGateway, t: float, dt: float) -> None:
        """Load picks (see the module doc), then every replica's queue advanced by `dt`.

        A slice is at most ``SLICE_MAX_CAPACITY`` of the picked replica's capacity, and never
        pushes a replica past ``FILL_UTILIZATION`` of its capacity while
        another eligible replica has room: per request, P2C sees a replica's queue grow within
        milliseconds and stops choosing it, which slices of a whole tick cannot show. Only when
        every eligible replica is full does load pile up (the region is overloaded)."""
        lam = self.arrival[gw.name]
        queues = self.queues
        ups = gw.upstreams
        horizon_s = min(dt, P2C_REACTION_S)
        for url, up in ups.items():
            q = queues[url]
            up.load.outstanding = q.in_flight_if(0.0, horizon_s)
            if q.alive:
                # the latency the last tick's requests showed, stamped now: every replica's
                # peak-EWMA is as fresh as it would be under real traffic (a stale stamp
                # decays a replica's cost and would make it look cheap)
                up.load.observe(q.mean_latency_s, t)
        arrivals: dict[str, float] = {}
        cands = gw.pools.candidates(MODEL, None, requests.SCHEME, t).upstreams
        if cands and lam > 0.0:
            k = max(1, round(len(cands) * self.picks_per_replica))
            share = lam / k
            left = lam
            full: set[str] = set()
            max_attempts = self.cfg.gateway.max_attempts
            detector = gw.pools.detector
            rng = gw.rng
            for _ in range(k + round(len(cands) / SLICE_MAX_CAPACITY)):
                if left <= 0.0:
                    break
                for _attempt in range(max_attempts):
                    up = pick_p2c(cands, t, rng)
                    url = up.state.url
                    q = queues[url]
                    if q.alive:
                        a = arrivals.get(url, 0.0)
                        cap = q.capacity_per_s
                        take = min(share, left, SLICE_MAX_CAPACITY * cap)
                        if len(full) < len(cands):
                            room = FILL_UTILIZATION * cap - a
                            if room < take:
                                full.add(url)
                                take = max(0.0, room)
                        a = arrivals[url] = a + take
                        left -= take
                        up.load.outstanding = q.in_flight_if(a, horizon_s)
                        break
                    full.add(url)
                    up.load.observe(requests.FAILURE_LATENCY_PENALTY_S, t)
                    detector.record(up.state, Outcome.CONNECT_FAILURE, up.pool.states, t)
                    cands = gw.pools.candidates(MODEL, None, requests.SCHEME, t).upstreams or cands
            if left > 0.0:  # every replica full: the rest queues where P2C puts it
                for _ in range(len(cands)):
                    up = pick_p2c(cands, t, rng)
                    if queues[up.state.url].alive:
                        arrivals[up.state.url] = arrivals.get(up.state.url, 0.0) + left / len(cands)
        tracker = gw.tracker
        gauss = self.rng.gauss
        detector = gw.pools.detector
        for url, up in ups.items():
            q = queues[url]
            q.step(arrivals.get(url, 0.0), dt)
            in_flight = q.in_flight
            up.load.outstanding = in_flight
            if url in arrivals:
                # the slices' answers, once per replica (successes only reset the failure streak)
                detector.record(up.state, Outcome.SUCCESS, up.pool.states, t)
                # what the concurrency-limit learner would see from the requests of this tick:
                # in-flight levels around the mean (Poisson-like spread), each with the latency
                # of one request at that level
                sd = math.sqrt(in_flight)
                for _ in range(LEVEL_OBSERVATIONS):
                    level = max(1, round(in_flight + sd * gauss(0.0, 1.0)))
                    tracker.observe(up.pool.name, url, q.latency_at_level_s(level, self.rng), level, t)

    def _draw_requests(self, t: float, dt: float) -> None:
        world = self.world
        rates = [(m, world.metro_rate_per_s(m, t + dt / 2.0)) for m in world.metros]
        total = sum(r for _, r in rates)
        budget = max(len(rates), (self.samples_per_s if t >= self.start_s else self.warmup_samples_per_s) * dt)
        rng = self.rng
        mix = traffic.PRIORITY_MIX
        classes = [c for c, _ in mix]
        weights = [w for _, w in mix]
        for m, rate in rates:
            if rate <= 0.0:
                continue
            n = max(1, round((budget - len(rates)) * rate / total) + 1) if total > 0 else 1
            w = rate * dt / n
            for cls in rng.choices(classes, weights, k=n):
                req = requests.Request(m.name, cls, t + rng.random() * dt, w,
                                       self.metro_location[m.name] if self.nearest_mode else None)
                self._push(req.t_s, _EV_REQUEST, req)

    def _update_arrivals(self, dt: float) -> None:
        """Each region's arrival rate: what the previous tick's samples sent there, smoothed."""
        prev = self._flow_dt
        if prev > 0.0:
            a = 1.0 - math.exp(-prev / FLOW_SMOOTHING_S)
            for region, flow in self._flow.items():
                self.arrival[region] += a * (flow / prev - self.arrival[region])
        for region in self._flow:
            self._flow[region] = 0.0
        self._flow_dt = dt

    # ------------------------------------------------------------------ requests

    def _serve(self, req: requests.Request) -> None:
        resolved_s = req.t_s - self.rng.random() * self.ttl_s
        entry = self.dns_answer(req.metro, resolved_s)
        base_s = self.metro_rtt[(req.metro, entry)] if entry else 0.0
        metro_cont = self.metro_continent[req.metro]
        if not entry or not self.alive[entry] or not self.network.reachable(metro_cont, self.continent[entry]):
            why = ("no region answered by GeoDNS" if not entry else
                   f"region {entry!r} unreachable (DNS answer from {req.t_s - resolved_s:.1f} s before)")
            served = requests.Served(requests.UNREACHABLE, entry, "", 0.0, 0, why)
        else:
            served = requests.serve(self, self.gateways[entry], req, base_s)
            if served.outcome == requests.OK:
                self._flow[served.region] += req.weight
        if self.on_served is not None:
            self.on_served(req, served, resolved_s)
