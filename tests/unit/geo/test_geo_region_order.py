"""Region ordering (local-first, nearest-to-client), Envoy priority-level spill shares and the
failback hold."""

from __future__ import annotations

import pytest

from core.config import parse_config
from geo.client_locator import Location
from geo.region_order import FailbackHold, order_regions, spill_shares

CONFIG = """
[[regions]]
name = "eu-west"
location = [53.35, -6.26]
[[regions]]
name = "us-east"
location = [38.9, -77.0]
[[regions]]
name = "ap-south"
location = [19.08, 72.88]
[[regions]]
name = "us-west"
location = [45.6, -121.2]
"""


@pytest.fixture(scope="module")
def regions():
    return parse_config(CONFIG).regions


def test_local_first_then_distance_when_nothing_measured(regions):
    order = order_regions("eu-west", regions, client=None, rtt_s={}, mode="local-first")
    assert order == ["eu-west", "us-east", "us-west", "ap-south"]  # from Dublin: 5.4k, 7.4k, 7.6k km
    order = order_regions("us-west", regions, client=None, rtt_s={}, mode="local-first")
    assert order == ["us-west", "us-east", "eu-west", "ap-south"]


def test_local_first_measured_rtt_beats_distance(regions):
    rtt = {"ap-south": 0.020, "us-east": 0.090}  # us-west unmeasured: after the measured ones
    order = order_regions("eu-west", regions, client=None, rtt_s=rtt, mode="local-first")
    assert order == ["eu-west", "ap-south", "us-east", "us-west"]


def test_unknown_local_keeps_configured_order(regions):
    order = order_regions("", regions, client=None, rtt_s={}, mode="local-first")
    assert order == ["eu-west", "us-east", "ap-south", "us-west"]


def test_nearest_to_client_by_distance(regions):
    singapore = Location(1.35, 103.82)
    order = order_regions("eu-west", regions, client=singapore, rtt_s={}, mode="nearest-to-client")
    assert order[0] == "ap-south"
    new_york = Location(40.71, -74.01)
    order = order_regions("eu-west", regions, client=new_york, rtt_s={}, mode="nearest-to-client")
    assert order == ["us-east", "us-west", "eu-west", "ap-south"]


def test_nearest_to_client_cidr_hit_names_region_first(regions):
    # The CIDR table says ap-south serves this client even though it sits in New York.
    hit = Location(40.71, -74.01, region="ap-south", source="cidr")
    order = order_regions("eu-west", regions, client=hit, rtt_s={}, mode="nearest-to-client")
    assert order == ["ap-south", "us-east", "us-west", "eu-west"]


def test_nearest_to_client_unknown_client_is_local_first(regions):
    order = order_regions("us-west", regions, client=None, rtt_s={}, mode="nearest-to-client")
    assert order[0] == "us-west"


def test_bad_mode_is_an_error(regions):
    with pytest.raises(ValueError, match="routing mode"):
        order_regions("eu-west", regions, client=None, rtt_s={}, mode="round-robin")


# ------------------------------------------------------------ spill shares


def test_spill_full_health_keeps_everything():
    assert spill_shares(["a", "b"], {"a": 1.0, "b": 1.0}) == {"a": 1.0, "b": 0.0}


def test_spill_half_healthy_takes_70_percent():
    shares = spill_shares(["a", "b"], {"a": 0.5, "b": 1.0})
    assert shares["a"] == pytest.approx(0.7) and shares["b"] == pytest.approx(0.3)


def test_spill_overprovisioning_hides_small_losses():
    shares = spill_shares(["a", "b"], {"a": 0.75, "b": 1.0})  # 1.4 * 0.75 > 1
    assert shares == {"a": 1.0, "b": 0.0}


def test_spill_full_outage_fails_over_completely():
    shares = spill_shares(["a", "b", "c"], {"a": 0.0, "b": 1.0, "c": 1.0})
    assert shares == {"a": 0.0, "b": 1.0, "c": 0.0}


def test_spill_cascades_over_three_regions():
    shares = spill_shares(["a", "b", "c"], {"a": 0.25, "b": 0.5, "c": 1.0})
    assert shares["a"] == pytest.approx(0.35)
    assert shares["b"] == pytest.approx(0.65)  # b could take 0.7 but only 0.65 is left
    assert shares["c"] == pytest.approx(0.0)
    shares = spill_shares(["a", "b", "c"], {"a": 0.25, "b": 0.25, "c": 1.0})
    assert shares == pytest.approx({"a": 0.35, "b": 0.35, "c": 0.3})


def test_spill_normalises_when_total_capacity_below_one():
    # 1.4*0.2 = 0.28 and 1.4*0.3 = 0.42: 0.70 in all, normalised like Envoy: 0.4 / 0.6.
    shares = spill_shares(["a", "b"], {"a": 0.2, "b": 0.3})
    assert shares["a"] == pytest.approx(0.4) and shares["b"] == pytest.approx(0.6)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_spill_nothing_healthy_goes_to_first_and_unknown_is_unhealthy():
    assert spill_shares(["a", "b"], {"a": 0.0, "b": 0.0}) == {"a": 1.0, "b": 0.0}
    assert spill_shares(["a", "b"], {"b": 1.0}) == {"a": 0.0, "b": 1.0}
    assert spill_shares([], {}) == {}


def test_spill_factor_is_a_parameter():
    shares = spill_shares(["a", "b"], {"a": 0.5, "b": 1.0}, factor=1.0)
    assert shares["a"] == pytest.approx(0.5) and shares["b"] == pytest.approx(0.5)


@pytest.mark.parametrize("fractions", [
    {"a": 0.1, "b": 0.1, "c": 0.1}, {"a": 0.9, "b": 0.0, "c": 0.3}, {"a": 0.33, "b": 0.66, "c": 0.01},
])
def test_spill_shares_always_sum_to_one(fractions):
    shares = spill_shares(["a", "b", "c"], fractions)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for v in shares.values())


# ------------------------------------------------------------ failback hold


def test_failback_hold_delays_recovery_not_failure():
    hold = FailbackHold(5000)
    assert hold.observe("eu", True, now_s=0.0) is True  # first sighting: no history to hold against
    assert hold.observe("eu", False, now_s=1.0) is False  # failure counts at once
    assert hold.observe("eu", True, now_s=2.0) is False  # healthy again, but held
    assert hold.held_for_s("eu", now_s=2.0) == pytest.approx(5.0)
    assert hold.observe("eu", True, now_s=6.9) is False
    assert hold.is_healthy("eu", now_s=7.0) is True  # held 5 s: back in rotation
    assert hold.held_for_s("eu", now_s=7.0) == 0.0


def test_failback_hold_flapping_never_returns():
    hold = FailbackHold(5000)
    hold.observe("eu", True, now_s=0.0)
    t = 1.0
    for _ in range(20):  # healthy 3 s, unhealthy 1 s, over and over
        assert hold.observe("eu", False, now_s=t) is False
        assert hold.observe("eu", True, now_s=t + 1.0) is False
        assert hold.observe("eu", True, now_s=t + 3.9) is False
        t += 4.0
    assert hold.observe("eu", True, now_s=t) is False
    assert hold.observe("eu", True, now_s=t + 5.0) is True


def test_failback_hold_apply_and_unknown_regions():
    clock = iter([0.0, 1.0, 2.0, 2.1, 2.7])
    hold = FailbackHold(500, clock=lambda: next(clock))
    assert hold.apply({"a": True, "b": False}) == {"a": True, "b": False}
    # b was never healthy (still starting): nothing to flap against, it joins at once
    assert hold.apply({"a": True, "b": True}) == {"a": True, "b": True}
    assert hold.is_healthy("never-seen", now_s=0.0) is False
    assert hold.apply({"a": True, "b": False}) == {"a": True, "b": False}
    assert hold.apply({"a": True, "b": True}) == {"a": True, "b": False}  # was healthy once: held
    assert hold.apply({"a": True, "b": True}) == {"a": True, "b": True}  # b healthy since 2.1: held 0.6 s > 0.5 s


def test_client_distance_order_matches_order_regions_and_reports_ties(regions):
    from geo.region_order import client_distance_order

    for client in (Location(48.86, 2.35), Location(35.68, 139.69), Location(47.6, -122.3, region="ap-south")):
        ordered, ties = client_distance_order(regions, client)
        assert not ties
        assert ordered == order_regions("", regions, client=client, rtt_s={}, mode="nearest-to-client")
    twins = parse_config(CONFIG + '[[regions]]\nname = "us-east-2"\nlocation = [38.9, -77.0]\n').regions
    assert client_distance_order(twins, Location(40.0, -75.0))[1]  # two regions at one place tie
