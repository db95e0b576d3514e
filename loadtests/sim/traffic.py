"""Demand: a diurnal curve by local time, and the mix of priority classes.

The curve is the usual shape of consumer internet traffic (and of interactive inference
traffic, which follows people): a trough around 04:00, a climb through the morning, a
daytime plateau, and a peak in the evening around 20:00-21:00. ``DIURNAL_BY_HOUR`` is the
factor at each full local hour (peak = 1.0); between hours it is interpolated linearly, so
the curve is continuous and periodic over 24 hours.
"""

from __future__ import annotations

import math

# Factor of the peak rate at local hour 0, 1, ..., 23.
DIURNAL_BY_HOUR: tuple[float, ...] = (
    0.45, 0.34, 0.26, 0.21, 0.18, 0.20, 0.28, 0.42, 0.58, 0.68, 0.74, 0.78,
    0.80, 0.80, 0.78, 0.78, 0.80, 0.84, 0.90, 0.96, 1.00, 0.97, 0.82, 0.62,
)
HOURS_PER_DAY = 24
S_PER_HOUR = 3600.0

# Share of requests per priority class (gateway.routing.admission classes).
PRIORITY_MIX: tuple[tuple[str, float], ...] = (("critical", 0.10), ("standard", 0.60), ("sheddable", 0.30))


def local_hour(t_s: float, utc_offset_h: float) -> float:
    """Local hour of day (0 <= h < 24) at `t_s` seconds after 00:00 UTC, for a UTC offset."""
    return (t_s / S_PER_HOUR + utc_offset_h) % HOURS_PER_DAY


def diurnal_factor(hour: float) -> float:
    """Demand at local `hour` as a fraction of the daily peak (linear between full hours)."""
    h = hour % HOURS_PER_DAY
    i = math.floor(h)
    frac = h - i
    a = DIURNAL_BY_HOUR[i]
    b = DIURNAL_BY_HOUR[(i + 1) % HOURS_PER_DAY]
    return a + (b - a) * frac
