"""When old versions may be unloaded (garbage collection's gate).

Only once no gateway routes unversioned traffic to them any more. Gateways switch when the
*published* site statuses say so (global or per-site cutover, ``replicas.releases.resolver``)
and re-read them every ``resolver_poll_interval_ms``: the agent applies the same rule to the
statuses in the store and unloads only after that rule has pointed away from the old versions
for a poll interval plus a margin. Unloading in the pass that first saw the new version READY
(before its status was even published) failed every request still routed to the old one.
"""

from __future__ import annotations

import logging
import time

from replicas.releases.records import ReleaseRecord
from replicas.releases.resolver import VersionResolver  # the cutover rule gateways apply
from replicas.releases.site_status import read_all_sites
from replicas.store import ObjectStore, StoreError
from replicas.sync.state import ModelState, Target, sorted_versions

log = logging.getLogger("geogate.sync")

DEFAULT_RESOLVER_POLL_S = 1.0  # [sync] resolver_poll_interval_ms's default
DEFAULT_SITE_STALE_AFTER_S = 15.0  # [sync] site_stale_after_ms's default
RETIRE_MARGIN_S = 1.0  # after gateways have re-read the statuses: requests routed before finish


class RetirementGate:
    """Says whether a repository's old versions may be unloaded now (see the module docstring)."""

    def __init__(self, store: ObjectStore, site: str, *, cutover: str = "global",
                 resolver_poll_s: float = DEFAULT_RESOLVER_POLL_S,
                 site_stale_after_s: float = DEFAULT_SITE_STALE_AFTER_S) -> None:
        self.store = store
        self.site = site
        self.cutover = cutover
        self.site_stale_after_s = site_stale_after_s
        # How long the cutover rule must point away from a version before it is unloaded.
        self.retire_grace_s = resolver_poll_s + RETIRE_MARGIN_S

    async def may_retire(self, t: Target, name: str, rec: ReleaseRecord, drop: frozenset[str],
                         st: ModelState) -> bool:
        """Whether versions `drop` may be unloaded now: the gateways' cutover rule, applied to the
        site statuses as published, has routed unversioned traffic to a version outside `drop`
        for at least ``retire_grace_s`` (gateways' resolvers re-read statuses every poll)."""
        if rec.stable is None:
            return True  # no release-routed traffic: replicas answer unversioned requests themselves
        try:
            sites = await read_all_sites(self.store)
        except StoreError as exc:
            log.warning("cannot read site statuses: keeping old versions loaded",
                        extra={"fields": {"model": name, "versions": sorted_versions(drop), "error": str(exc)}})
            return False
        judge = VersionResolver(None, cutover=self.cutover, stale_after_s=self.site_stale_after_s, site=self.site)
        judge.update({name: rec}, sites)
        routed, _ = judge.effective_stable(rec, self.site)
        now = time.monotonic()
        key = str(t.repository)
        if routed in drop:
            st.retiring.pop(key, None)
            return False
        since = st.retiring.get(key)
        if since is None or since[0] != drop:
            since = st.retiring[key] = (drop, now)
            log.info("old versions unload once gateways have switched",
                     extra={"fields": {"model": name, "versions": sorted_versions(drop), "routed": routed,
                                       "in_s": round(self.retire_grace_s, 1), "repository": key}})
        if now - since[1] < self.retire_grace_s:
            return False
        del st.retiring[key]
        return True
