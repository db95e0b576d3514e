"""Round trips between places, and partitions between continents.

A round trip is the great-circle distance there and back at the speed of light in fibre
(about 2/3 c: glass has a refractive index near 1.5) plus a fixed cost per network leg
(switching, queueing in routers, the last mile, TLS termination). Real paths are longer than
great circles, so these are lower bounds of the kind operators use for planning; the fixed
cost keeps two places in one city from looking free.
"""

from __future__ import annotations

from collections.abc import Sequence

from geo.distance import great_circle_km

SPEED_OF_LIGHT_KM_PER_S = 299_792.458
FIBRE_FRACTION_OF_C = 2.0 / 3.0
FIBRE_KM_PER_MS = SPEED_OF_LIGHT_KM_PER_S * FIBRE_FRACTION_OF_C / 1000.0  # ~199.9 km per ms
PER_HOP_MS = 5.0  # fixed cost of one network leg (client -> gateway, gateway -> peer gateway)


def rtt_ms(a: Sequence[float], b: Sequence[float], *, per_hop_ms: float = PER_HOP_MS) -> float:
    """Round trip in ms between `a` and `b` ((latitude, longitude) in degrees)."""
    return 2.0 * great_circle_km(a, b) / FIBRE_KM_PER_MS + per_hop_ms


class Network:
    """Which continents can reach each other right now (a partition cuts both directions)."""

    def __init__(self) -> None:
        self._cut: set[frozenset[str]] = set()

    def partition(self, a: str, b: str) -> None:
        if a == b:
            raise ValueError(f"a partition needs two different continents, got {a!r} twice")
        self._cut.add(frozenset((a, b)))

    def heal(self, a: str, b: str) -> None:
        self._cut.discard(frozenset((a, b)))

    def reachable(self, continent_a: str, continent_b: str) -> bool:
        return continent_a == continent_b or frozenset((continent_a, continent_b)) not in self._cut

    @property
    def partitions(self) -> list[tuple[str, str]]:
        return [tuple(sorted(p)) for p in self._cut]  # type: ignore[misc]
