"""Per request: the ordered targets to try (a local pool, or a peer region's gateway).

``Router`` is the one-region case: always the local pool. With several regions the gateway
uses ``gateway.routing.region_router.MultiRegionRouter`` (same ``targets_for``), whose targets after
the first are peer gateways of other regions, reached with ``geogate-hops: 1``. A request
that arrived with ``geogate-hops >= 1`` came from a peer and is only ever served locally, so
requests never loop between regions.
"""

from __future__ import annotations

from dataclasses import dataclass

TARGET_LOCAL = "local"
TARGET_PEER = "peer"


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # TARGET_LOCAL | TARGET_PEER
    region: str
    address: str = ""  # peers only: the peer gateway's HOST:PORT


def parse_hops(value: str | None) -> int:
    if not value:
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 1  # unreadable: treat as forwarded (never loop)


class Router:
    def __init__(self, local_region: str) -> None:
        self.local_region = local_region
        self._local = (Target(TARGET_LOCAL, local_region),)

    def targets_for(self, call) -> tuple[Target, ...]:
        """Ordered targets for one request: with one region, always the local pools."""
        return self._local

    def snapshot(self) -> dict:
        return {"mode": "single-region", "order": [self.local_region]}
