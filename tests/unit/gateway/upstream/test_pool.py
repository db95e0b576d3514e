"""RegionPools' eligibility cache: recomputed on events and when an ejection expires, not on a
timer (found by the planet simulation: with a 50 ms TTL a 1,000-replica region was walked 20
times a second per gateway worker; loadtests/sim)."""

from __future__ import annotations

from core.config import parse_config
from gateway.upstream.pool import CANDIDATES_MAX_AGE_S, RegionPools
from health.active import ProbeResult
from health.outcomes import Outcome

URLS = [f"grpc://10.0.0.{i}:8001" for i in range(1, 5)]
CONFIG = f"""
[health]
consecutive_failures = 2
base_ejection_ms = 300
[[regions]]
name = "eu-west"
  [[regions.pools]]
  name = "eu-pool"
  replicas = {URLS!r}
""".replace("'", '"')
READY = ProbeResult(ok=True, ready_versions={"demo": {"1"}}, versions_known=True, rtt_s=0.001)
DOWN = ProbeResult(ok=False, cause="connect refused", reason="connect refused")


class CountingPools(RegionPools):
    scans = 0

    def _candidates(self, *args):
        self.scans += 1
        return super()._candidates(*args)


def make(on_health_change=None) -> CountingPools:
    cfg = parse_config(CONFIG)
    pools = CountingPools(cfg, cfg.regions[0], client_factory=lambda state: None,
                          on_health_change=on_health_change)
    for pool in pools.pools:
        pool.start()  # a static list: members added, no I/O
    for st in pools.all_states():
        pools.checker.record(st, READY, 0.0)
    pools.invalidate()
    return pools


def urls(pools, now_s: float) -> list[str]:
    return sorted(u.state.url for u in pools.candidates("demo", None, "grpc", now_s).upstreams)


def test_candidates_are_reused_until_something_changes():
    pools = make()
    for i in range(1000):
        assert urls(pools, 1.0 + i * CANDIDATES_MAX_AGE_S / 2000) == URLS
    assert pools.scans == 1  # 1,000 requests in half a second: one walk over the pool
    urls(pools, 1.0 + CANDIDATES_MAX_AGE_S)
    assert pools.scans == 2  # and at least once per CANDIDATES_MAX_AGE_S anyway


def test_a_health_flip_is_seen_at_once_without_a_gateway_callback():
    pools = make()
    assert urls(pools, 1.0) == URLS
    st = pools.all_states()[0]
    for k in range(pools.cfg.health.fall):
        if pools.checker.record(st, DOWN, 1.0 + k * 0.001):
            pools.checker._on_change(st)  # what the probe loop's notify does
    assert not st.healthy
    assert urls(pools, 1.01) == URLS[1:]
    assert pools.healthy_fraction(1.01) == 0.75


def test_an_ejection_is_seen_at_once_and_its_expiry_exactly_when_it_comes():
    pools = make()
    assert urls(pools, 1.0) == URLS and pools.healthy_fraction(1.0) == 1.0
    st = pools.all_states()[1]
    for _ in range(2):
        pools.detector.record(st, Outcome.CONNECT_FAILURE, pools.all_states(), 2.0)
    assert st.ejected(2.0)
    until = st.ejected_until_s
    assert urls(pools, 2.0) == [u for u in URLS if u != st.url]
    assert pools.healthy_fraction(2.0) == 0.75
    scans = pools.scans
    assert urls(pools, until - 1e-6) == [u for u in URLS if u != st.url]
    assert pools.scans == scans  # still cached just before the expiry
    assert urls(pools, until) == URLS  # and recomputed the moment it ends, not a TTL later
    assert pools.healthy_fraction(until) == 1.0


def test_the_gateway_callback_still_runs():
    seen = []
    pools = make(on_health_change=seen.append)
    st = pools.all_states()[2]
    for k in range(pools.cfg.health.fall):
        if pools.checker.record(st, DOWN, 1.0 + k):
            pools.checker._on_change(st)
    assert seen == [st]
