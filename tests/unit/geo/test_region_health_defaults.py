"""The [dns] health-check defaults behind geo.region_health's documented withdrawal time."""

from __future__ import annotations

from core.config import DnsSection

DOCUMENTED_WITHDRAW_S = 2.0
DEFAULTS = DnsSection()


def test_defaults_are_the_documented_ones():
    # The 2 s withdrawal figure in geo/region_health.py rests on these defaults.
    assert (DEFAULTS.check_interval_ms, DEFAULTS.check_timeout_ms, DEFAULTS.fall, DEFAULTS.rise) == (500, 400, 2, 3)
    worst_blackhole_s = (2 * DEFAULTS.check_interval_ms + DEFAULTS.check_timeout_ms) / 1000
    assert worst_blackhole_s <= DOCUMENTED_WITHDRAW_S
