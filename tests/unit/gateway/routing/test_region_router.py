"""Multi-region routing decisions: spill shares, failover order, hold-down, no second hop."""

import random
from collections import Counter

from core.config import parse_config
from gateway.routing.region_router import MultiRegionRouter
from geo.client_locator import Location
from geo.region_health import RegionHealth

CONFIG = """
[routing]
failback_hold_ms = 2000
[[regions]]
name = "eu-west"
location = [53.35, -6.26]
http = "127.0.0.1:1000"
[[regions]]
name = "us-east"
location = [38.9, -77.0]
http = "127.0.0.1:2000"
[[regions]]
name = "ap-south"
location = [19.08, 72.88]
http = "127.0.0.1:3000"
"""


class Peers:
    """The two peer regions' health as a RegionHealthMonitor would hold it."""

    def __init__(self):
        self.states = {n: RegionHealth(n, f"http://{n}") for n in ("us-east", "ap-south")}
        for s in self.states.values():
            s.healthy = True
            s.summary = {"replicas": {"healthy": 2, "total": 2}}
        self.states["us-east"].rtt_ewma_s = 0.010
        self.states["ap-south"].rtt_ewma_s = 0.050

    def rtt_s(self):
        return {n: s.rtt_ewma_s for n, s in self.states.items()}


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(local_fraction):
    clock = Clock()
    peers = Peers()
    router = MultiRegionRouter(parse_config(CONFIG), "eu-west", local_fraction=lambda: local_fraction[0],
                               peers=peers, rng=random.Random(7), clock=clock)
    return router, peers, clock


def first_regions(router, n=4000, hops=0):
    return Counter(router.targets("demo", None, hops)[0].region for _ in range(n))


def test_healthy_local_serves_everything_and_fails_over_by_rtt():
    router, _, _ = make([1.0])
    assert first_regions(router) == {"eu-west": 4000}
    order = [t.region for t in router.targets("demo", None, 0)]
    assert order == ["eu-west", "us-east", "ap-south"]  # failover follows measured RTT
    assert router.targets("demo", None, 0)[1].kind == "peer"


def test_partial_degradation_spills_in_proportion():
    router, _, _ = make([0.5])  # half the local replicas down: 0.7 stays, 0.3 spills
    counts = first_regions(router, n=10000)
    assert abs(counts["eu-west"] / 10000 - 0.7) < 0.03
    assert abs(counts["us-east"] / 10000 - 0.3) < 0.03
    assert counts["ap-south"] == 0


def test_full_outage_fails_over_then_returns_after_hold():
    local = [1.0]
    router, _, clock = make(local)
    assert first_regions(router) == {"eu-west": 4000}
    local[0] = 0.0
    clock.t += 1.0  # the local region's replicas are all down: everything fails over
    assert first_regions(router) == {"us-east": 4000}
    local[0] = 1.0
    clock.t += 1.0  # recovered, first seen healthy now
    assert first_regions(router) == {"us-east": 4000}
    clock.t += 1.0  # still within the 2 s hold-down
    assert first_regions(router) == {"us-east": 4000}
    clock.t += 1.1  # 2.1 s after it was first seen healthy again (hold is 2 s)
    assert first_regions(router) == {"eu-west": 4000}


def test_a_region_that_was_never_healthy_joins_at_once():
    local = [0.0]
    router, _, clock = make(local)
    assert first_regions(router) == {"us-east": 4000}  # still starting
    local[0] = 1.0
    clock.t += 0.1  # no history to flap against: no hold-down
    assert first_regions(router) == {"eu-west": 4000}


def test_forwarded_request_is_only_served_locally():
    router, _, _ = make([0.0])
    targets = router.targets("demo", None, hops=1)
    assert [t.region for t in targets] == ["eu-west"]


def test_nothing_healthy_still_tries_every_region():
    router, peers, _ = make([0.0])
    for s in peers.states.values():
        s.healthy = False
    assert sorted(t.region for t in router.targets("demo", None, 0)) == ["ap-south", "eu-west", "us-east"]


# ---------------------------------------------------------------- nearest-to-client plans
# Found by the planet simulation (loadtests/sim): in nearest-to-client mode every request used
# to re-read every region's health (a walk over all local replicas) and sort every region by
# distance; the plan is now made once per client location and health snapshot.


def make_nearest(local_fraction):
    clock = Clock()
    calls = [0]

    def fraction():
        calls[0] += 1
        return local_fraction[0]

    cfg = parse_config(CONFIG.replace("[routing]", '[routing]\nmode = "nearest-to-client"'))
    router = MultiRegionRouter(cfg, "eu-west", local_fraction=fraction, peers=Peers(), rng=random.Random(7),
                               clock=clock)
    return router, clock, calls, cfg


CLIENTS = [Location(48.86, 2.35), Location(40.71, -74.01), Location(1.35, 103.82), Location(35.68, 139.69),
           Location(-33.87, 151.21), Location(19.43, -99.13)]


def test_nearest_to_client_reads_health_once_per_snapshot_not_per_request():
    from gateway.routing.region_router import PLAN_CACHE_S

    router, clock, calls, _ = make_nearest([1.0])
    for _ in range(50):
        for c in CLIENTS:
            router.targets("demo", None, 0, client=c)
    assert calls[0] == 1  # 300 requests, one health read
    clock.t += 2 * PLAN_CACHE_S
    router.targets("demo", None, 0, client=CLIENTS[0])
    assert calls[0] == 2


def test_nearest_to_client_order_is_order_regions_and_health_changes_show():
    from gateway.routing.region_router import PLAN_CACHE_S
    from geo.region_order import order_regions

    local = [1.0]
    router, clock, _, cfg = make_nearest(local)
    rtt = {"eu-west": 0.0, "us-east": 0.010, "ap-south": 0.050}
    for c in [*CLIENTS, Location(53.35, -6.26, region="ap-south", source="cidr")]:
        expected = order_regions("eu-west", cfg.regions, client=c, rtt_s=rtt, mode="nearest-to-client")
        assert router.plan(c).ordered == expected
        assert [t.region for t in router.targets("demo", None, 0, client=c)] == expected
    paris = CLIENTS[0]
    assert first_regions_for(router, paris) == {"eu-west": 2000}
    local[0] = 0.0  # every local replica down: seen at the next snapshot, for cached clients too
    clock.t += 2 * PLAN_CACHE_S
    assert first_regions_for(router, paris) == {"us-east": 2000}


def test_nearest_to_client_ties_on_distance_still_break_by_rtt():
    router, _, _, cfg = make_nearest([1.0])
    here = Location(0.0, 0.0)
    twins = parse_config(CONFIG.replace('location = [19.08, 72.88]', 'location = [38.9, -77.0]')).regions
    router.cfg = type(cfg)(regions=twins, routing=cfg.routing)  # us-east and ap-south at one place
    order = router.plan(here).ordered
    assert order.index("us-east") < order.index("ap-south")  # 10 ms beats 50 ms measured


def first_regions_for(router, client, n=2000):
    return Counter(router.targets("demo", None, 0, client=client)[0].region for _ in range(n))
