"""Which version of a model an unversioned request goes to (DESIGN.md, Routing step 1 and
Cutover). The gateway calls ``resolver.resolve(model, requested, site) -> Resolution``.

The resolver polls the store every ``poll_interval_s`` for release records
(``releases/*.json``) and site status (``sites/*/status.json``) and answers from memory:

- an explicit version in the request wins;
- no release record: ``version=None`` (forward unversioned: the replica's default);
- otherwise the stable version, or the canary for its weight of traffic (random per request);
- cutover ``"global"`` (default): a newly promoted stable takes unversioned traffic only once
  every healthy site (heartbeat fresher than ``stale_after_s``) reports it READY; until then
  the newest of the previous stables that every healthy site has READY keeps serving, so
  regions never disagree for long and no request waits on a loading version;
- cutover ``"per-site"``: the same, judged by this site's status alone;
- a canary gets traffic only once it is ready by the same rule;
- a rollback is a new stable that is already ready everywhere: visible within one poll.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from core.aio_tasks import cancel_and_wait
from replicas.releases.records import ReleaseRecord, Releases
from replicas.releases.site_status import SiteStatus, read_all_sites
from replicas.store import ObjectStore, StoreError

ReadyHere = Callable[[str, str], bool]  # (model, version) -> can this region serve it now?

log = logging.getLogger("geogate.version_resolver")

CUTOVER_GLOBAL = "global"
CUTOVER_PER_SITE = "per-site"
DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_STALE_AFTER_S = 15.0

REASON_EXPLICIT = "explicit version requested"
REASON_NO_RECORD = "no release record: replica default version"
REASON_NO_STABLE = "release record has no stable version: replica default version"


@dataclass(frozen=True)
class Resolution:
    version: str | None
    reason: str


class VersionResolver:
    def __init__(self, store: ObjectStore | None, *, cutover: str = CUTOVER_GLOBAL,
                 poll_interval_s: float = DEFAULT_POLL_INTERVAL_S, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 rng: random.Random | None = None, site: str = "", owns_store: bool = False):
        if cutover not in (CUTOVER_GLOBAL, CUTOVER_PER_SITE):
            raise ValueError(f"cutover must be 'global' or 'per-site', got {cutover!r}")
        self.store = store
        self.cutover = cutover
        self.poll_interval_s = poll_interval_s
        self.stale_after_s = stale_after_s
        self.rng = rng or random.Random()
        self.site = site  # this gateway's region (default for snapshot(); resolve() is told per call)
        self.owns_store = owns_store
        self.records: dict[str, ReleaseRecord] = {}
        self.sites: dict[str, SiteStatus] = {}
        self.last_refresh_s = 0.0
        self.last_error = ""
        self._task: asyncio.Task | None = None

    @classmethod
    def from_config(cls, cfg, store: ObjectStore, *, site: str = "", owns_store: bool = False) -> VersionResolver:
        """Built from the deployment config (``[routing] cutover``, ``[sync]`` timings)."""
        return cls(store, cutover=cfg.routing.cutover,
                   poll_interval_s=cfg.sync.resolver_poll_interval_ms / 1000,
                   stale_after_s=cfg.sync.site_stale_after_ms / 1000,
                   site=site, owns_store=owns_store)

    # ------------------------------------------------------------ polling

    async def refresh(self) -> None:
        """Read release records and site status once (keeps the last good view on errors)."""
        if self.store is None:
            return
        try:
            records = await Releases(self.store).all()
            sites = await read_all_sites(self.store)
        except StoreError as exc:
            if str(exc) != self.last_error:
                log.warning("cannot read release records; keeping the last known ones: %s", exc)
            self.last_error = str(exc)
            return
        self.records, self.sites = records, sites
        self.last_refresh_s = time.time()
        self.last_error = ""

    def update(self, records: Mapping[str, ReleaseRecord], sites: Mapping[str, SiteStatus]) -> None:
        """Set the view directly (tests, or a caller that reads the store itself)."""
        self.records, self.sites = dict(records), dict(sites)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._poll_loop())

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.refresh()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self.owns_store and self.store is not None:
            await self.store.close()

    # ------------------------------------------------------------ decisions

    def _judges(self, site: str, now_s: float) -> list[SiteStatus]:
        """The site statuses whose readiness counts for a cutover decision."""
        if self.cutover == CUTOVER_PER_SITE:
            st = self.sites.get(site)
            return [st] if st is not None and st.fresh(self.stale_after_s, now_s) else []
        return [st for st in self.sites.values() if st.fresh(self.stale_after_s, now_s)]

    def effective_stable(self, rec: ReleaseRecord, site: str, now_s: float | None = None,
                         ready_here: ReadyHere | None = None) -> tuple[str, str]:
        """(version, reason): the newest of stable, previous stables that is ready where it must be.
        `ready_here(model, version)` (a gateway's own view of its replicas): among those, the
        newest one this region can serve now, so a gateway whose health checks have not yet
        seen a new stable keeps serving the previous one instead of failing."""
        now_s = time.time() if now_s is None else now_s
        judges = self._judges(site, now_s)
        assert rec.stable is not None
        history = [rec.stable, *rec.previous]
        if not judges:
            where = f"site {site!r}" if self.cutover == CUTOVER_PER_SITE else "any site"
            version, order = rec.stable, history
            reason = f"stable {rec.stable} (no fresh status from {where} to wait for)"
        else:
            order = [v for v in history if all(st.ready(rec.name, v) for st in judges)]
            if not order:
                return rec.stable, f"stable {rec.stable} (no earlier version is ready everywhere either)"
            version = order[0]
            if version == rec.stable:
                reason = f"stable {version}"
            else:
                waiting = sorted(st.site for st in judges if not st.ready(rec.name, rec.stable))
                reason = (f"stable {rec.stable} not ready yet on {', '.join(waiting)} ({self.cutover} cutover):"
                          f" previous stable {version}")
        if ready_here is not None and not ready_here(rec.name, version):
            for older in order:
                if older != version and ready_here(rec.name, older):
                    return older, f"{reason}; {version} not seen ready on this region's replicas yet: {older}"
        return version, reason

    def _canary_ready(self, rec: ReleaseRecord, site: str, now_s: float, ready_here: ReadyHere | None) -> bool:
        judges = self._judges(site, now_s)
        return all(st.ready(rec.name, rec.canary_version) for st in judges) and \
            (ready_here is None or ready_here(rec.name, rec.canary_version))

    def resolve(self, model: str, requested: str | None, site: str, ready_here: ReadyHere | None = None) -> Resolution:
        if requested:
            return Resolution(requested, REASON_EXPLICIT)
        rec = self.records.get(model)
        if rec is None:
            return Resolution(None, REASON_NO_RECORD)
        if rec.stable is None:
            return Resolution(None, REASON_NO_STABLE)
        now_s = time.time()
        if rec.canary and self.rng.random() < rec.canary_weight and self._canary_ready(rec, site, now_s, ready_here):
            return Resolution(rec.canary_version, f"canary {rec.canary_version} ({rec.canary_weight:.0%} of traffic)")
        version, reason = self.effective_stable(rec, site, now_s, ready_here)
        return Resolution(version, reason)

    def snapshot(self) -> dict:
        """For the status page: per model the version unversioned traffic gets now."""
        now_s = time.time()
        out = {}
        for name, rec in self.records.items():
            eff = self.effective_stable(rec, self.site, now_s)[0] if rec.stable else None
            out[name] = {"stable": rec.stable, "effective": eff, "canary": rec.canary,
                         "generation": rec.generation}
        return {"cutover": self.cutover, "models": out, "last_refresh_s": self.last_refresh_s,
                "error": self.last_error}


def resolver_for_gateway(cfg, region: str) -> VersionResolver:
    """The resolver a region's gateway uses: the config's store (a missing local store directory
    is not created: the resolver reports it and answers 'no release record' until it exists),
    its cutover mode and timings. ``await start()`` begins polling; ``await close()`` ends it."""
    from replicas.store import open_store

    store = open_store(cfg.store.url, cfg.store, base_dir=cfg.base_dir, create=False)
    return VersionResolver.from_config(cfg, store, site=region, owns_store=True)
