"""What the region's pool can serve, for the non-inference KServe v2 calls and request checks.

- model ready / known: from the replicas' health state (ready versions from their repository
  index), no replica call;
- metadata and config: proxied to a routable replica that has the model (version) ready, and
  cached per (model, version) for METADATA_TTL_S; a stale entry is served while one refresh
  runs in the background, so inference's request checks never wait after the first request;
- statistics: asked of every routable replica that has the model (version) (all routable
  replicas for all models), at once, not cached, and summed (gateway.upstream.pool_merge);
  replicas that do not answer are left out and ``PoolStatistics`` says how many answered;
- server metadata: asked of the routable replicas (at most MAX_SERVER_METADATA_REPLICAS, in URL
  order), agreed by gateway.upstream.pool_merge, cached like model metadata; None when only
  geogate replicas answered (the gateway then answers for itself).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from urllib.parse import quote

from gateway.upstream.model_specs import ModelSpecs
from gateway.upstream.pool import RegionPools, Upstream
from gateway.upstream.pool_merge import merge_server_metadata, merge_statistics

log = logging.getLogger("geogate.gateway.catalog")

METADATA_TTL_S = 5.0
UPSTREAM_CALL_TIMEOUT_S = 5.0
MAX_REPLICAS_ASKED = 2
MAX_REPLICAS_AGGREGATED = 64  # statistics: more replicas than this in a region are not summed
MAX_SERVER_METADATA_REPLICAS = 8
ALL_MODELS_STATS_PATH = "/v2/models/stats"
SERVER_METADATA_PATH = "/v2"


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


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """The pool's statistics: ``status`` 200 with the summed ``body`` when at least one replica
    answered (``replicas`` of ``asked``); otherwise a replica's own refusal (its status and body)
    or status 0 (no replica to ask, or none answered)."""

    status: int
    body: dict
    replicas: int
    asked: int


class ModelCatalog:
    def __init__(self, pools: RegionPools) -> None:
        self.pools = pools
        self._cache: dict[tuple[str, str, str], _Entry] = {}
        self._server: tuple[float, dict | None] | None = None  # (fetched_s, merged answer)
        self._server_refreshing = False

    def _routable(self, model: str | None, version: str | None) -> list[Upstream]:
        """Routable replicas (with the model (version) when one is named), in URL order."""
        now = time.monotonic()
        ups = [u for u in self.pools.upstreams()
               if u.state.routable(now)[0] and (model is None or u.state.has_model(model, version))]
        return sorted(ups, key=lambda u: u.url)

    async def _ask_all(self, ups: list[Upstream], path: str) -> list[tuple[int, dict]]:
        async def one(up: Upstream) -> tuple[int, dict]:
            try:
                status, body = await up.client.get_json(path, UPSTREAM_CALL_TIMEOUT_S)
            except (OSError, ValueError) as exc:  # a client that failed in an unforeseen way: no answer
                log.warning("%s from %s failed: %s", path, up.url, exc)
                return 0, {}
            return status, body if isinstance(body, dict) else {}

        return list(await asyncio.gather(*(one(u) for u in ups)))

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

    async def pool_statistics(self, model: str | None, version: str | None) -> PoolStatistics:
        """Statistics summed over the routable replicas (`model` None: all models)."""
        ups = self._routable(model, version)[:MAX_REPLICAS_AGGREGATED]
        path = model_path(model, version, "stats") if model else ALL_MODELS_STATS_PATH
        results = await self._ask_all(ups, path)
        answered = [body for status, body in results if status == 200]
        if answered:
            return PoolStatistics(200, merge_statistics(answered), len(answered), len(ups))
        refusal = next(((status, body) for status, body in results if status), (0, {}))
        return PoolStatistics(refusal[0], refusal[1], 0, len(ups))

    async def server_metadata(self) -> dict | None:
        """The pool's server metadata (pool_merge rule); None: the gateway answers for itself."""
        cached = self._server
        if cached is not None:
            if time.monotonic() - cached[0] > METADATA_TTL_S and not self._server_refreshing:
                self._server_refreshing = True
                asyncio.get_running_loop().create_task(self._refresh_server())
            return cached[1]
        return await self._fetch_server()

    async def _fetch_server(self) -> dict | None:
        ups = self._routable(None, None)[:MAX_SERVER_METADATA_REPLICAS]
        results = await self._ask_all(ups, SERVER_METADATA_PATH)
        answers = [(up.url, body) for up, (status, body) in zip(ups, results, strict=True) if status == 200]
        merged = merge_server_metadata(answers)
        if answers:  # nobody answering is not cached: the next call asks again
            self._server = (time.monotonic(), merged)
        return merged

    async def _refresh_server(self) -> None:
        try:
            await self._fetch_server()
        except Exception:  # keep the stale answer; never let a background refresh die loudly
            log.exception("server metadata refresh failed")
        finally:
            self._server_refreshing = False

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
