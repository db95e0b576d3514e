"""Great-circle distance between two points on Earth (haversine formula)."""

from __future__ import annotations

import math
from collections.abc import Sequence

# IUGG mean Earth radius; the spherical model is within ~0.5% of the ellipsoid, plenty for
# ranking datacenters.
EARTH_RADIUS_KM = 6371.0088


def great_circle_km(a: Sequence[float], b: Sequence[float]) -> float:
    """Distance in km between ``a`` and ``b``, each ``(latitude, longitude)`` in degrees."""
    lat1, lon1 = math.radians(a[0]), math.radians(a[1])
    lat2, lon2 = math.radians(b[0]), math.radians(b[1])
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2)
    # min() guards asin against rounding just above 1 for antipodal points.
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
