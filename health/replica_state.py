"""Everything the gateway knows about one replica: active health, passive ejection, discovery.

One mutable ``ReplicaState`` per replica URL. The active checker writes the health fields, the
outlier detector the ejection fields, discovery the ``draining`` flag; routing only reads.
Every "not routable" answer is one of the named ``REASON_*`` constants below, so it can be
counted and shown to an operator; the detail (why unhealthy, why ejected) is in
``health_reason`` / ``eject_reason``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

REASON_OK = ""
REASON_DRAINING = "draining"
REASON_UNHEALTHY = "unhealthy"
REASON_EJECTED = "ejected"

# Before the first probe a replica is unhealthy for this reason.
NOT_PROBED_YET = "not probed yet"

SCHEMES = ("http", "grpc")


def split_replica_url(url: str) -> tuple[str, str]:
    """("grpc", "127.0.0.1:18101") from "grpc://127.0.0.1:18101"; ValueError names the URL."""
    scheme, sep, rest = url.partition("://")
    address = rest.rstrip("/")
    if not sep or scheme not in SCHEMES or ":" not in address:
        raise ValueError(f"replica URL must be http://HOST:PORT or grpc://HOST:PORT, got {url!r}")
    return scheme, address


@dataclass(eq=False)
class ReplicaState:
    url: str
    weight: int = 1
    pool: str = ""
    kind: str = "geogate"  # "geogate" | "triton"
    scheme: str = field(init=False)
    address: str = field(init=False)  # HOST:PORT

    # active health (health.active)
    healthy: bool = False
    health_reason: str = NOT_PROBED_YET  # why not healthy, operator-readable ("probe timeout after 500 ms")
    health_cause: str = NOT_PROBED_YET  # the same, short enough to count ("probe timeout")
    ready_versions: dict[str, set[str]] = field(default_factory=dict)
    # False until a repository index was read; also False when the replica has no index API:
    # then has_model() answers True for any model (the replica is asked and says 404 itself).
    ready_versions_known: bool = False
    probe_rtt_ewma_s: float = 0.0
    last_probe_s: float = 0.0  # time.monotonic() of the last probe's end; 0: never
    last_probe_error: str = ""  # why the probes of the current failing streak failed (even while
    # still healthy: fewer than `fall` failures so far); "" after a good probe
    ever_healthy: bool = False
    consecutive_probe_successes: int = 0
    consecutive_probe_failures: int = 0
    health_changed_s: float = 0.0

    # passive outlier detection (health.outlier)
    ejected_until_s: float = 0.0  # time.monotonic(); in the past: not ejected
    ejection_count: int = 0  # grows with each ejection, decays after quiet periods (Envoy)
    eject_reason: str = ""
    consecutive_failures: int = 0
    last_ejection_s: float = 0.0
    ejection_decay_from_s: float = 0.0  # start of the current quiet period
    ejections_total: int = 0

    # discovery
    draining: bool = False

    def __post_init__(self) -> None:
        self.scheme, self.address = split_replica_url(self.url)
        if self.weight < 1:
            self.weight = 1

    # ------------------------------------------------------------------ routing

    def ejected(self, now_s: float) -> bool:
        return now_s < self.ejected_until_s

    def routable(self, now_s: float) -> tuple[bool, str]:
        """(True, REASON_OK) or (False, REASON_DRAINING | REASON_UNHEALTHY | REASON_EJECTED)."""
        if self.draining:
            return False, REASON_DRAINING
        if not self.healthy:
            return False, REASON_UNHEALTHY
        if self.ejected(now_s):
            return False, REASON_EJECTED
        return True, REASON_OK

    def has_model(self, model: str, version: str | None = None) -> bool:
        """Whether `version` (None: any version) of `model` is READY here, as last probed.
        True for any model while the ready versions are unknown (see ready_versions_known)."""
        if not self.ready_versions_known:
            return True
        versions = self.ready_versions.get(model)
        if not versions:
            return False
        return version is None or str(version) in versions

    def unroutable_detail(self, now_s: float) -> str:
        """A short cause for counting in "not routable" messages ("probe timeout", "ejected")."""
        ok, reason = self.routable(now_s)
        if ok:
            return ""
        if reason == REASON_UNHEALTHY:
            return self.health_cause or REASON_UNHEALTHY
        return reason

    def snapshot(self, now_s: float | None = None) -> dict[str, Any]:
        """JSON-able view for region summaries and the status page."""
        now = time.monotonic() if now_s is None else now_s
        ok, reason = self.routable(now)
        ejected = self.ejected(now)
        return {
            "url": self.url,
            "scheme": self.scheme,
            "address": self.address,
            "pool": self.pool,
            "kind": self.kind,
            "weight": self.weight,
            "routable": ok,
            "reason": reason,
            "healthy": self.healthy,
            "health_reason": "" if self.healthy else self.health_reason,
            "last_probe_error": self.last_probe_error,
            "last_probe_age_s": round(now - self.last_probe_s, 3) if self.last_probe_s else None,
            "probe_rtt_ms": round(self.probe_rtt_ewma_s * 1000.0, 3),
            "ready_versions": {m: sorted(v, key=_version_key) for m, v in sorted(self.ready_versions.items())},
            "ready_versions_known": self.ready_versions_known,
            "ejected": ejected,
            "ejected_for_s": round(self.ejected_until_s - now, 3) if ejected else 0.0,
            "eject_reason": self.eject_reason if ejected else "",
            "ejection_count": self.ejection_count,
            "consecutive_failures": self.consecutive_failures,
            "draining": self.draining,
        }


def _version_key(v: str) -> tuple[int, int | str]:
    """Numeric versions in numeric order, anything else after them."""
    return (0, int(v)) if v.isdigit() else (1, v)
