"""One gateway worker's shared state: pools, forwarder, catalog, metrics, logs, readiness.

Both fronts (HTTP, gRPC) and the admin listener hold one ``GatewayState``; ``main`` owns its
lifecycle (start -> serve -> drain -> close).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from gateway.access_log import AccessLog
from gateway.config import Config, RegionSection
from gateway.forwarder import Forwarder
from gateway.gateway_metrics import GatewayMetrics
from gateway.load_window import LoadWindow
from gateway.model_catalog import ModelCatalog
from gateway.pool import RegionPools
from gateway.router import Router
from gateway.upstream_types import Reply
from health.outcomes import Outcome
from health.replica_state import ReplicaState

log = logging.getLogger("geogate.gateway")

REASON_DRAINING = "draining: the gateway is shutting down"


@dataclass(slots=True)
class Resolution:
    version: str | None
    reason: str = ""


class PassThroughResolver:
    """Used until/unless the store's version resolver is available: the requested version, or
    None (the replica's default)."""

    def resolve(self, model: str, requested: str | None, site: str) -> Resolution:
        return Resolution(requested, "explicit version" if requested else "no release record")


def make_resolver(cfg: Config, region: RegionSection):
    """The store helper's resolver (gateway.version_resolver) when present, else pass-through."""
    try:
        from gateway import version_resolver  # type: ignore[attr-defined]
    except ImportError:
        return PassThroughResolver(), None
    factory = getattr(version_resolver, "resolver_for_gateway", None) or \
        getattr(version_resolver, "VersionResolver", None)
    if factory is None:
        return PassThroughResolver(), None
    try:
        made = factory(cfg, region.name) if factory.__name__ == "resolver_for_gateway" else factory(cfg)
    except Exception as exc:  # a store problem must not stop the data path
        log.warning("version resolver unavailable (%s); forwarding requested versions as-is", exc)
        return PassThroughResolver(), None
    return made, made


class GatewayState:
    def __init__(self, cfg: Config, region: RegionSection, *, worker: int = 0) -> None:
        self.cfg = cfg
        self.region = region
        self.worker = worker
        self.metrics = GatewayMetrics(region.name)
        self.load = LoadWindow()
        self.access_log = AccessLog(enabled=cfg.gateway.access_log)
        self.pools = RegionPools(cfg, region, on_health_change=self._on_health_change,
                                 on_eject=self._on_eject, on_member_change=self._on_member)
        self.router = Router(region.name)
        self.catalog = ModelCatalog(self.pools)
        self.forwarder = Forwarder(self.pools, cfg.gateway, self.metrics, self.router, self.load)
        self.resolver, self._resolver_lifecycle = make_resolver(cfg, region)
        self.draining = False
        self.started_s = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.access_log.start()
        await self.pools.start()
        start = getattr(self._resolver_lifecycle, "start", None)
        if start is not None:
            try:
                await start()
            except Exception as exc:
                log.warning("version resolver failed to start (%s); forwarding requested versions", exc)
                self.resolver = PassThroughResolver()

    async def close(self) -> None:
        close = getattr(self._resolver_lifecycle, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:
                log.exception("version resolver close failed")
        await self.pools.close()
        await self.access_log.close()

    # ------------------------------------------------------------------ callbacks

    def _on_health_change(self, state: ReplicaState) -> None:
        self.pools.invalidate()
        self.metrics.health(state.pool, state.url, state.healthy)
        if state.healthy:
            # A replica that (re)joins starts with a clean latency record: penalties from
            # before it died must not keep it idle for long after it is back.
            for pool in self.pools.pools:
                up = pool.upstream_of(state)
                if up is not None:
                    up.load.reset()
        log.info("replica %s is now %s%s", state.url, "healthy" if state.healthy else "unhealthy",
                 "" if state.healthy else f" ({state.health_reason})")

    def _on_eject(self, state: ReplicaState) -> None:
        self.pools.invalidate()
        self.metrics.ejected(state.url)
        log.warning("replica %s ejected: %s", state.url, state.eject_reason)

    def _on_member(self, up, added: bool) -> None:
        self.metrics.health(up.state.pool, up.state.url, up.state.healthy if added else False)

    # ------------------------------------------------------------------ answers

    def readiness(self) -> tuple[bool, str]:
        """(can this region serve?, why not)."""
        if self.draining:
            return False, REASON_DRAINING
        now = time.monotonic()
        states = self.pools.all_states()
        if any(s.routable(now)[0] for s in states):
            return True, ""
        if not states:
            return False, f"region {self.region.name!r} has no replicas"
        reasons = []
        for pool in self.pools.pools:
            counts: dict[str, int] = {}
            for s in pool.states:
                d = s.unroutable_detail(now) or "unknown"
                counts[d] = counts.get(d, 0) + 1
            detail = ", ".join(f"{n} {c}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            reasons.append(f"pool {pool.name!r}: {len(pool.states)} replicas, none routable ({detail})")
        return False, f"no routable replica in region {self.region.name!r}: " + "; ".join(reasons)

    def resolve_version(self, model: str, requested: str | None) -> str | None:
        try:
            return self.resolver.resolve(model, requested, self.region.name).version
        except Exception as exc:
            log.warning("version resolver failed for %r (%s); using the requested version", model, exc)
            return requested

    def unknown_model(self, model: str, version: str | None) -> Reply | None:
        """A 404 / NOT_FOUND reply when no replica has the model (version), else None."""
        known = self.pools.model_known(model, version)
        if known is False:
            if version is None or self.pools.model_known(model, None) is False:
                msg = f"Request for unknown model: '{model}' is not found"
            else:
                msg = f"Request for unknown model: '{model}' version {version} is not found"
            return Reply(Outcome.CLIENT_ERROR, 404, grpc.StatusCode.NOT_FOUND, message=msg)
        return None
