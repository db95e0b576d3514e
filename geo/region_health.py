"""Region health monitor: is each region's gateway able to serve?

Probes ``GET http://<region.http>/v2/health/ready`` every ``interval_ms`` (at a fixed cadence,
not "interval after the last probe finished", so a slow probe does not stretch detection),
each bounded by ``timeout_ms``; when ready, also fetches ``GET /geogate/v1/region`` for
details (replica counts, load).  ``fall`` consecutive failures withdraw a region, ``rise``
consecutive successes bring it back; a region never seen healthy becomes healthy on its first
success (nothing to flap against yet).  The round trip of successful probes feeds an EWMA
that ``geo.region_order`` uses to order regions.

Detection time with the ``[dns]`` defaults (interval 500 ms, timeout 400 ms, fall 2):
- killed gateway (connection refused, fails at once): the next two probes, <= 1.0 s;
- blackholed gateway (no answer, probe times out): the probe in flight or the next one fails
  400 ms after it starts, the one after it 500 ms later: <= 0.5 + 0.4 + 0.5 = 1.4 s;
and one lost probe (fall - 1 failures) never withdraws a region.

Used by ``geogate dns``; gateways can reuse it for their peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

log = logging.getLogger("geogate.region_health")

READY_PATH = "/v2/health/ready"
SUMMARY_PATH = "/geogate/v1/region"
RTT_EWMA_ALPHA = 0.3  # weight of the newest round trip
MAX_REASON_BODY_CHARS = 200
FIRST_ROUND_SLACK_S = 0.5

REASON_NOT_PROBED = "not probed yet"
REASON_READY = "ready"


@dataclass
class RegionHealth:
    """One region's health, as seen by this monitor."""

    name: str
    base_url: str  # http://HOST:PORT of the region's gateway
    healthy: bool = False
    reason: str = REASON_NOT_PROBED
    last_failure: str = ""
    ever_healthy: bool = False
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    probes: int = 0
    rtt_ewma_s: float = 0.0
    last_probe_s: float = 0.0  # time.monotonic() of the last completed probe
    last_change_s: float = 0.0
    summary: dict[str, Any] | None = field(default=None, repr=False)

    def healthy_fraction(self) -> float:
        """Fraction of the region's replicas that are healthy (its gateway's summary), 0 when
        the region is down; 1 when healthy but no summary is known."""
        if not self.healthy:
            return 0.0
        replicas = (self.summary or {}).get("replicas") or {}
        total = replicas.get("total")
        if isinstance(total, int) and total > 0 and isinstance(replicas.get("healthy"), int):
            return max(0.0, min(1.0, replicas["healthy"] / total))
        return 1.0

    def snapshot(self) -> dict[str, Any]:
        return {"region": self.name, "url": self.base_url, "healthy": self.healthy, "reason": self.reason,
                "consecutive_successes": self.consecutive_successes,
                "consecutive_failures": self.consecutive_failures,
                "rtt_ewma_ms": round(self.rtt_ewma_s * 1000, 3), "healthy_fraction": self.healthy_fraction()}


def _describe_error(exc: BaseException, timeout_ms: int) -> str:
    if isinstance(exc, TimeoutError):
        return f"probe timeout after {timeout_ms} ms"
    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        errno = getattr(err, "errno", None)
        return f"connect failed: {os.strerror(errno) if errno else err}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection reset by the gateway"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return f"probe failed: {exc.__class__.__name__}: {exc}"
    return f"probe error: {exc!r}"


class RegionHealthMonitor:
    """Probes every region's gateway; ``regions``: objects with ``name`` and ``http``
    (``core.config.RegionSection``).  ``on_change(state)`` runs when a region flips."""

    def __init__(self, regions: Sequence[Any], *, interval_ms: int, timeout_ms: int, fall: int, rise: int,
                 fetch_summary: bool = True, on_change: Callable[[RegionHealth], None] | None = None,
                 ssl_context: Any = None, clock: Callable[[], float] = time.monotonic):
        # Set: the gateways' client-facing listeners serve TLS ([tls]); probe them over https.
        self._ssl = ssl_context if ssl_context is not None else True
        scheme = "https" if ssl_context is not None else "http"
        self.interval_s = interval_ms / 1000.0
        self.timeout_ms = timeout_ms
        self.fall = fall
        self.rise = rise
        self.fetch_summary = fetch_summary
        self.on_change = on_change
        self._clock = clock  # stamps probe results (the simulation passes its own clock)
        self.states: dict[str, RegionHealth] = {
            r.name: RegionHealth(r.name, f"{scheme}://{r.http}") for r in regions}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._first_round = asyncio.Event()

    @classmethod
    def from_config(cls, cfg: Any, **kw: Any) -> RegionHealthMonitor:
        """A monitor with the ``[dns]`` check settings of a ``core.config.Config``."""
        d = cfg.dns
        tls_peers = cfg.tls.peers
        if tls_peers.enabled and "ssl_context" not in kw:
            from core.tls import client_tls_from_section

            kw["ssl_context"] = client_tls_from_section(cfg, tls_peers, "peers").ssl_context
        return cls(cfg.regions, interval_ms=d.check_interval_ms, timeout_ms=d.check_timeout_ms,
                   fall=d.fall, rise=d.rise, **kw)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # One connection per region is plenty; keep-alive avoids a handshake per probe.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=2, ttl_dns_cache=None, enable_cleanup_closed=True,
                                         ssl=self._ssl)
        self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False,
                                              headers={"User-Agent": "geogate-region-health"})
        self._tasks = [asyncio.create_task(self._probe_loop(s), name=f"region-health-{s.name}")
                       for s in self.states.values()]

    async def wait_first_round(self) -> None:
        """Returns once every region has been probed once (or a probe timeout has passed)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout_ms / 1000.0 + FIRST_ROUND_SLACK_S):
                await self._first_round.wait()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------ queries

    def healthy_names(self) -> list[str]:
        """Healthy regions, in configured order."""
        return [name for name, s in self.states.items() if s.healthy]

    def rtt_s(self) -> dict[str, float]:
        return {name: s.rtt_ewma_s for name, s in self.states.items() if s.probes and s.rtt_ewma_s > 0}

    def healthy_fraction(self) -> dict[str, float]:
        return {name: s.healthy_fraction() for name, s in self.states.items()}

    def snapshot(self) -> list[dict[str, Any]]:
        return [s.snapshot() for s in self.states.values()]

    # ------------------------------------------------------------ probing

    async def _probe_loop(self, state: RegionHealth) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.probe(state)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one probe must not end the region's monitoring
                log.exception("region %s: probe crashed", state.name)
            if not self._first_round.is_set() and all(s.probes for s in self.states.values()):
                self._first_round.set()
            next_at += self.interval_s
            now = loop.time()
            if next_at < now:  # a probe ran over its slot: start the next one now, keep cadence after
                next_at = now
            await asyncio.sleep(next_at - now)

    async def probe(self, state: RegionHealth) -> bool:
        """Probe one region once and update its state; returns whether the probe succeeded."""
        assert self._session is not None, "start() first"
        loop = asyncio.get_running_loop()
        started = loop.time()
        ok, reason = False, ""
        try:
            async with asyncio.timeout(self.timeout_ms / 1000.0):
                async with self._session.get(state.base_url + READY_PATH) as resp:
                    body = await resp.read()
            if resp.status == 200:
                ok = True
            else:
                detail = body.decode(errors="replace").strip()[:MAX_REASON_BODY_CHARS]
                reason = f"readiness {resp.status}" + (f": {detail}" if detail else "")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = _describe_error(exc, self.timeout_ms)
        rtt_s = loop.time() - started
        if ok and self.fetch_summary:
            state.summary = await self._fetch_summary(state) or state.summary
        self._record(state, ok, reason, rtt_s)
        return ok

    async def _fetch_summary(self, state: RegionHealth) -> dict[str, Any] | None:
        # Details only: a failure here never counts against the region's health.
        try:
            async with asyncio.timeout(self.timeout_ms / 1000.0):
                async with self._session.get(state.base_url + SUMMARY_PATH) as resp:  # type: ignore[union-attr]
                    if resp.status != 200:
                        return None
                    data = await resp.json(content_type=None)
                    return data if isinstance(data, dict) else None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("region %s: summary unavailable: %s", state.name, _describe_error(exc, self.timeout_ms))
            return None

    def record_probe(self, name: str, ok: bool, reason: str = "", rtt_s: float = 0.0,
                     summary: dict[str, Any] | None = None) -> None:
        """Account one probe of region `name` made by other means (loadtests.sim probes on a
        simulated network): the summary it fetched, if any, then the rise/fall rule."""
        state = self.states[name]
        if ok and summary is not None:
            state.summary = summary
        self._record(state, ok, reason, rtt_s)

    def _record(self, state: RegionHealth, ok: bool, reason: str, rtt_s: float) -> None:
        now = self._clock()
        state.probes += 1
        state.last_probe_s = now
        was = state.healthy
        if ok:
            state.consecutive_successes += 1
            state.consecutive_failures = 0
            state.rtt_ewma_s = rtt_s if state.rtt_ewma_s == 0 else (
                RTT_EWMA_ALPHA * rtt_s + (1 - RTT_EWMA_ALPHA) * state.rtt_ewma_s)
            if not state.healthy and (not state.ever_healthy or state.consecutive_successes >= self.rise):
                state.healthy = True
                state.ever_healthy = True
            if state.healthy:
                state.reason = REASON_READY
            else:
                state.reason = (f"recovering: {state.consecutive_successes}/{self.rise} successful probes"
                                f" (last failure: {state.last_failure})")
        else:
            state.consecutive_failures += 1
            state.consecutive_successes = 0
            state.last_failure = reason
            if state.healthy and state.consecutive_failures >= self.fall:
                state.healthy = False
            state.reason = reason if not state.healthy else (
                f"ready, but {state.consecutive_failures}/{self.fall} failed probes ({reason})")
        if state.healthy != was:
            state.last_change_s = now
            log.log(logging.INFO if state.healthy else logging.WARNING, "region %s is now %s: %s", state.name,
                    "healthy" if state.healthy else "unhealthy", state.reason if state.healthy else reason)
            if self.on_change is not None:
                try:
                    self.on_change(state)
                except Exception:
                    log.exception("region %s: on_change callback failed", state.name)
