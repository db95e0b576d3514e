"""Hypothesis profiles and the per-target example counts of the property-based tests.

Two profiles (registered here, imported by tests/conftest.py so pytest's
``--hypothesis-profile`` can name them):

- ``full`` (hypothesis' default, 100 examples per test): every target runs its full count, as
  written at the test (``@fuzz(1000)``). ``make test`` runs this.
- ``unit``: ``make test-unit`` (the fast tier, under 60 s on the 2-core machine) runs a quarter
  of each count, never fewer than MIN_EXAMPLES. The same properties, fewer random inputs.

Counts scale with the loaded profile's ``max_examples`` relative to hypothesis' default, so an
explicit ``--hypothesis-profile`` (or a new profile) scales every target alike.
"""

from __future__ import annotations

import datetime

from hypothesis import HealthCheck, settings

FULL_MAX_EXAMPLES = 100  # hypothesis' own default: scale 1
UNIT_MAX_EXAMPLES = 25
MIN_EXAMPLES = 20
FUZZ_DEADLINE = datetime.timedelta(seconds=5)  # far above any real parse: only a hang trips it

settings.register_profile("full", max_examples=FULL_MAX_EXAMPLES)
settings.register_profile("unit", max_examples=UNIT_MAX_EXAMPLES)


def examples(n: int) -> int:
    """`n` (the full count) scaled by the loaded profile."""
    scaled = n * settings.default.max_examples // FULL_MAX_EXAMPLES
    return max(min(n, MIN_EXAMPLES), scaled)


def fuzz(n: int) -> settings:
    """Settings for a fuzz target: `n` examples in the full profile, no example database, a
    deadline only a hang trips."""
    return settings(max_examples=examples(n), deadline=FUZZ_DEADLINE, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])
