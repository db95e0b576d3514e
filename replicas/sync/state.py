"""What the sync agent knows: the site's repositories and their replicas (``Target``), and per
model the versions being installed/loaded, those that failed (with their retry time), and those
ready and serving. Also the one rule for recording a failed version (retry with backoff)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from replicas.releases.records import ReleaseRecord

log = logging.getLogger("geogate.sync")

STAGING_DIR = ".staging"
FAILED_RETRY_BASE_S = 30.0  # a refused/failed version is retried after this, doubling
FAILED_RETRY_MAX_S = 600.0


@dataclass
class Target:
    """One model repository of the site and the replicas that serve it."""

    repository: Path
    replicas: list[str]  # what the agent loads versions into: configured + discovered now
    pools: list[str]
    configured: list[str] = field(default_factory=list)
    # Pools that find replicas by DNS SRV (core.srv_discovery.SrvDiscovery): re-resolved every
    # sync round, so replicas that come and go (an autoscaler) get every version loaded too.
    discoveries: list = field(default_factory=list)
    control_token: str = ""  # presented to these replicas' repository API (pools' control_token_file)

    @property
    def staging_root(self) -> Path:
        # Inside the repository's parent: same filesystem (rename is atomic), outside the
        # directory replicas scan.
        return self.repository.parent / STAGING_DIR / self.repository.name


@dataclass
class Failure:
    reason: str
    retry_at_s: float
    attempts: int = 1


@dataclass
class ModelState:
    record: ReleaseRecord | None = None
    loading: dict[str, str] = field(default_factory=dict)  # version -> what is happening
    failed: dict[str, Failure] = field(default_factory=dict)
    ready: list[str] = field(default_factory=list)
    serving: list[str] = field(default_factory=list)
    # Per repository: old versions waiting to be unloaded, and since when (time.monotonic())
    # the cutover rule has routed unversioned traffic away from them.
    retiring: dict[str, tuple[frozenset[str], float]] = field(default_factory=dict)


def sorted_versions(vs: Iterable[str]) -> list[str]:
    return sorted(set(vs), key=int)


def record_failure(st: ModelState, site: str, name: str, version: str, reason: str) -> None:
    """`version` failed (refused, did not load): report it, retry after a doubling delay."""
    prev = st.failed.get(version)
    attempts = prev.attempts + 1 if prev else 1
    delay = min(FAILED_RETRY_MAX_S, FAILED_RETRY_BASE_S * 2 ** (attempts - 1))
    st.failed[version] = Failure(reason, time.time() + delay, attempts)
    st.loading.pop(version, None)
    log.error("version failed", extra={"fields": {"site": site, "model": name, "version": version,
                                                   "reason": reason, "retry_in_s": delay}})
