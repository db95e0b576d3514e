"""What the region's pool can serve, for the non-inference KServe v2 calls and request checks.

- model ready / known: from the replicas' health state (ready versions from their repository
  index), no replica call;
- metadata and config: proxied to a routable replica that has the model (version) ready, and
  cached per (model, version) for METADATA_TTL_S; a stale entry is served while one refresh
  runs in the background, so inference's request checks never wait after the first request;
- statistics: proxied, not cached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import quote

from gateway.upstream.model_specs import ModelSpecs
from gateway.upstream.pool import RegionPools, Upstream

log = logging.getLogger("geogate.gateway.catalog")

METADATA_TTL_S = 5.0
UPSTREAM_CALL_TIMEOUT_S = 5.0
MAX_REPLICAS_ASKED = 2


def model_path(model: str, version: str | None, tail: str = "") -> str:
    p = f"/v2/models/{quote(model, safe='')}"
    if version:
        p += f"/versions/{quote(version, safe='')}"
    return p + (f"/{tail}" if tail else "")


class _Entry:
    __slots__ = ("body", "fetched_s", "refreshing", "specs", "status")

    def __init__(self, status: int, body: dict, fetched_s: float) -> None:
        self.status = status
        self.body = body
        self.fetched_s = fetched_s
        self.refreshing = False
        self.specs: ModelSpecs | None = None


class ModelCatalog:
    def __init__(self, pools: RegionPools) -> None:
        self.pools = pools
        self._cache: dict[tuple[str, str, str], _Entry] = {}

    def _replicas_for(self, model: str, version: str | None) -> list[Upstream]:
        now = time.monotonic()
        cands = self.pools.candidates(model, version, "http", now).upstreams
        return sorted(cands, key=lambda u: u.load.cost(now, u.state.weight))[:MAX_REPLICAS_ASKED]

    async def _fetch(self, model: str, version: str | None, tail: str) -> tuple[int, dict]:
        ups = self._replicas_for(model, version)
        if not ups:
            return 0, {}
        status, body = 0, {}
        for up in ups:
            status, got = await up.client.get_json(model_path(model, version, tail), UPSTREAM_CALL_TIMEOUT_S)
            body = got or {}
            if status != 0:
                return status, body
        return status, body

    async def _cached(self, model: str, version: str | None, tail: str) -> tuple[int, dict]:
        key = (model, version or "", tail)
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is not None:
            if now - entry.fetched_s > METADATA_TTL_S and not entry.refreshing:
                entry.refreshing = True
                asyncio.get_running_loop().create_task(self._refresh(key, model, version, tail))
            return entry.status, entry.body
        status, body = await self._fetch(model, version, tail)
        if status == 200:
            self._cache[key] = _Entry(status, body, time.monotonic())
        return status, body

    async def _refresh(self, key, model: str, version: str | None, tail: str) -> None:
        try:
            status, body = await self._fetch(model, version, tail)
        except Exception:  # never let a background refresh die loudly; keep the stale entry
            log.exception("metadata refresh for %s failed", key)
            status, body = 0, {}
        entry = self._cache.get(key)
        if status == 200:
            self._cache[key] = _Entry(status, body, time.monotonic())
        elif status in (400, 404):
            self._cache.pop(key, None)
        elif entry is not None:
            entry.refreshing = False

    async def metadata(self, model: str, version: str | None) -> tuple[int, dict]:
        return await self._cached(model, version, "")

    async def config(self, model: str, version: str | None) -> tuple[int, dict]:
        return await self._cached(model, version, "config")

    async def statistics(self, model: str, version: str | None) -> tuple[int, dict]:
        return await self._fetch(model, version, "stats")

    def fresh_specs(self, model: str, version: str | None) -> ModelSpecs | None:
        """Cached specs without awaiting anything (None: not cached or stale; call `specs`)."""
        entry = self._cache.get((model, version or "", ""))
        if entry is not None and entry.specs is not None and \
                time.monotonic() - entry.fetched_s <= METADATA_TTL_S:
            return entry.specs
        return None

    async def specs(self, model: str, version: str | None) -> ModelSpecs | None:
        """Input/output specs for request checks (None when no replica could tell)."""
        key = (model, version or "", "")
        entry = self._cache.get(key)
        if entry is not None and entry.specs is not None and \
                time.monotonic() - entry.fetched_s <= METADATA_TTL_S:
            return entry.specs
        status, body = await self._cached(model, version, "")
        if status != 200:
            return None
        entry = self._cache.get(key)
        try:
            specs = ModelSpecs.from_metadata(body)
        except (KeyError, TypeError, ValueError):
            return None
        if entry is not None:
            entry.specs = specs
        return specs

    def ready(self, model: str, version: str | None) -> bool:
        return bool(self.pools.candidates(model, version, "http", time.monotonic()).upstreams)
