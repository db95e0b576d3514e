"""Replica load signals: queue depth scraped from each replica's Prometheus ``/metrics``.

The gateway's own count of outstanding requests only sees its own traffic. A replica shared
with other gateways (or other clients), or one that got slower, shows it first in its queue:
requests waiting for a batch slot. Like the Kubernetes Gateway API inference extension's
endpoint picker, pools with ``metrics_scrape = true`` are scraped every
``metrics_interval_ms`` and a replica is scored by

    score = outstanding (this gateway's, live) + queue_depth (the replica's, scraped)

where a scrape older than ``STALE_INTERVALS`` intervals (or a failed one) counts as queue depth
0: stale data must neither keep a replica idle nor pile work on it; the live outstanding count
still applies.

What a replica's queue depth is:
- Triton: ``nv_inference_pending_request_count`` (requests in the scheduler queue, not yet
  executing) summed over every model and version, or, when larger, the average number waiting
  since the previous scrape from ``nv_inference_queue_duration_us``: by Little's law the rate of
  accumulated queueing time (us per us) is the mean number of queued requests, which catches
  bursts that an instantaneous gauge read every 500 ms misses.
- geogate replicas: ``geogate_replica_queue_depth`` (requests waiting for a batch) summed over
  models and versions (``replicas.server.metrics``).

Where /metrics is (``core.config.PoolSection``): ``metrics_ports[url]``, else
``metrics_port`` on the replica's host, else by kind: a geogate replica reached over HTTP serves
/metrics on that same port; anything else on 8002 (Triton's and ``geogate replica``'s default).

Using it in the balancer: ``gateway.upstream.pool.RegionPools`` runs one scraper per gateway worker and,
through ``on_sample``, writes every reading into the replica's ``gateway.upstream.load_stats.LoadStats`` with an
expiry (``set_queue_depth(depth, valid_until_s)``), so P2C's cost becomes peak-EWMA latency x
(outstanding + queue_depth + 1) / weight without any work on the request path; a failed scrape
drops the reading at once, a missing one expires after ``stale_after_s``.
``score(outstanding, load, now_s)`` is the plain endpoint-picker score (outstanding + queue).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from core.aio_tasks import cancel_and_wait

log = logging.getLogger("geogate.gateway.load_signals")

MS_PER_S = 1000.0
US_PER_S = 1_000_000.0
DEFAULT_METRICS_PORT = 8002  # Triton's and `geogate replica`'s default --metrics-port
DEFAULT_INTERVAL_S = 0.5
STALE_INTERVALS = 4  # a sample older than this many scrape intervals is ignored
MIN_STALE_AFTER_S = 1.0
SCRAPE_TIMEOUT_FRACTION = 0.8  # of the interval: a scrape never overlaps the next one
MAX_SCRAPE_TIMEOUT_S = 2.0
METRICS_PATH = "/metrics"
ERROR_MAX_CHARS = 200

TRITON_PENDING = "nv_inference_pending_request_count"
TRITON_QUEUE_US = "nv_inference_queue_duration_us"
GEOGATE_QUEUE = "geogate_replica_queue_depth"
GEOGATE_INFLIGHT = "geogate_replica_inflight_requests"


# ---------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class MetricsSample:
    """What one /metrics page says about load (None: the page does not have that metric)."""

    pending: float | None = None  # requests queued right now (Triton pending / geogate queue depth)
    queue_us_total: float | None = None  # Triton: cumulative queueing time, microseconds
    inflight: float | None = None  # geogate: requests being handled (queued or running)


def parse_metrics(text: str) -> MetricsSample:
    """Sum the load metrics of every model and version on a Prometheus text page.
    Raises ValueError when the text is not the Prometheus text format."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in (TRITON_PENDING, TRITON_QUEUE_US, GEOGATE_QUEUE, GEOGATE_INFLIGHT) \
                    and not math.isnan(s.value):
                sums[s.name] = sums.get(s.name, 0.0) + s.value
    pending = sums.get(TRITON_PENDING)
    if GEOGATE_QUEUE in sums:
        pending = (pending or 0.0) + sums[GEOGATE_QUEUE]
    return MetricsSample(pending=pending, queue_us_total=sums.get(TRITON_QUEUE_US),
                         inflight=sums.get(GEOGATE_INFLIGHT))


# ---------------------------------------------------------------------------- per replica


@dataclass
class ReplicaLoad:
    """The last load reading of one replica (written by the scraper, read by the balancer)."""

    url: str
    metrics_url: str
    kind: str = "geogate"
    pending: float = 0.0  # instantaneous queue depth at the last scrape
    queue_avg: float = 0.0  # Triton: mean queued requests since the previous scrape (Little's law)
    inflight: float | None = None
    updated_s: float = 0.0  # time.monotonic() of the last good scrape; 0: never
    error: str = ""  # why the last scrape failed; "" after a good one
    scrapes: int = 0
    failures: int = 0
    _prev_queue_us: float | None = field(default=None, repr=False)
    _prev_s: float = field(default=0.0, repr=False)

    @property
    def queue_depth(self) -> float:
        return max(self.pending, self.queue_avg)

    def fresh(self, now_s: float, stale_after_s: float) -> bool:
        return self.updated_s > 0.0 and not self.error and now_s - self.updated_s <= stale_after_s

    def queue_depth_at(self, now_s: float, stale_after_s: float) -> float:
        """The queue depth to score with: 0 when the data is stale or the last scrape failed."""
        return self.queue_depth if self.fresh(now_s, stale_after_s) else 0.0

    def record(self, sample: MetricsSample, now_s: float) -> None:
        self.pending = sample.pending or 0.0
        self.inflight = sample.inflight
        if sample.queue_us_total is not None:
            prev, prev_s = self._prev_queue_us, self._prev_s
            if prev is not None and now_s > prev_s and sample.queue_us_total >= prev:
                self.queue_avg = (sample.queue_us_total - prev) / US_PER_S / (now_s - prev_s)
            else:  # first reading, or the counter went back (server restarted)
                self.queue_avg = 0.0
            self._prev_queue_us, self._prev_s = sample.queue_us_total, now_s
        self.updated_s = now_s
        self.error = ""
        self.scrapes += 1

    def record_failure(self, reason: str) -> None:
        self.error = reason[:ERROR_MAX_CHARS]
        self.failures += 1
        self._prev_queue_us = None  # the next good reading starts a fresh rate

    def snapshot(self, now_s: float, stale_after_s: float) -> dict[str, Any]:
        return {"url": self.url, "metrics_url": self.metrics_url, "kind": self.kind,
                "queue_depth": round(self.queue_depth, 3), "pending": self.pending,
                "queue_avg": round(self.queue_avg, 3), "inflight": self.inflight,
                "fresh": self.fresh(now_s, stale_after_s),
                "age_s": round(now_s - self.updated_s, 3) if self.updated_s else None,
                "error": self.error, "scrapes": self.scrapes, "failures": self.failures}


def score(outstanding: int, load: ReplicaLoad | None, now_s: float, stale_after_s: float) -> float:
    """The endpoint picker's score: lower is better."""
    queued = load.queue_depth_at(now_s, stale_after_s) if load is not None else 0.0
    return outstanding + queued


# ---------------------------------------------------------------------------- where to scrape


@dataclass(frozen=True)
class ScrapeTarget:
    url: str  # the replica URL as the pool knows it
    kind: str
    metrics_url: str  # http://HOST:PORT/metrics


def metrics_url_for(replica_url: str, kind: str, *, metrics_port: int = 0,
                    metrics_ports: dict[str, int] | None = None) -> str:
    """Where `replica_url`'s /metrics is (see the module docstring for the rules)."""
    scheme, _, rest = replica_url.partition("://")
    host, _, port = rest.rstrip("/").rpartition(":")
    explicit = (metrics_ports or {}).get(replica_url)
    if explicit:
        m_port = explicit
    elif metrics_port:
        m_port = metrics_port
    elif kind == "geogate" and scheme in ("http", "https"):
        m_port = int(port)
    else:
        m_port = DEFAULT_METRICS_PORT
    m_scheme = "https" if scheme in ("https", "grpcs") else "http"
    return f"{m_scheme}://{host}:{m_port}{METRICS_PATH}"


def targets_from_pools(region_pools) -> Callable[[], list[ScrapeTarget]]:
    """The current members of every pool with ``metrics_scrape = true`` of a
    ``gateway.upstream.pool.RegionPools`` (re-read each cycle, so discovered replicas are scraped too;
    draining ones are not)."""

    def current() -> list[ScrapeTarget]:
        out = []
        for pool in region_pools.pools:
            sec = pool.section
            if not sec.metrics_scrape:
                continue
            for url, up in list(pool.members.items()):
                if up.state.draining:
                    continue
                out.append(ScrapeTarget(url, sec.kind, metrics_url_for(
                    url, sec.kind, metrics_port=sec.metrics_port, metrics_ports=sec.metrics_ports)))
        return out

    return current


def scrape_interval_s(pool_sections: Iterable) -> float:
    """The shortest ``metrics_interval_ms`` of the scraped pools (one loop serves them all)."""
    intervals = [p.metrics_interval_ms / MS_PER_S for p in pool_sections if p.metrics_scrape]
    return min(intervals) if intervals else DEFAULT_INTERVAL_S


# ---------------------------------------------------------------------------- the scraper


class LoadSignals:
    """Scrapes every target's /metrics every `interval_s` (all targets concurrently, each
    bounded by a timeout shorter than the interval) and keeps one ``ReplicaLoad`` per URL."""

    def __init__(self, targets: Callable[[], list[ScrapeTarget]] | list[ScrapeTarget], *,
                 interval_s: float = DEFAULT_INTERVAL_S, stale_after_s: float | None = None,
                 session: aiohttp.ClientSession | None = None,
                 on_sample: Callable[[ReplicaLoad, float], None] | None = None) -> None:
        self._targets = targets if callable(targets) else (lambda: list(targets))
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s if stale_after_s is not None else max(
            MIN_STALE_AFTER_S, STALE_INTERVALS * interval_s)
        self.timeout_s = min(MAX_SCRAPE_TIMEOUT_S, SCRAPE_TIMEOUT_FRACTION * interval_s)
        self.loads: dict[str, ReplicaLoad] = {}
        # Called after every scrape of a replica with its reading and the time.monotonic() until
        # which it may be used (0 after a failed scrape): the balancer's hook.
        self.on_sample = on_sample
        self._session = session
        self._own_session = session is None
        self._task: asyncio.Task | None = None

    @classmethod
    def for_region(cls, region_pools, *, on_sample: Callable[[ReplicaLoad, float], None] | None = None,
                   ) -> LoadSignals | None:
        """A scraper for a ``RegionPools``, or None when no pool asks for ``metrics_scrape``."""
        sections = [p.section for p in region_pools.pools]
        if not any(s.metrics_scrape for s in sections):
            return None
        return cls(targets_from_pools(region_pools), interval_s=scrape_interval_s(sections), on_sample=on_sample)

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True))
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="load-signals")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.scrape_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any surprise; the reason is logged
                log.exception("load signal scrape cycle failed")
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def scrape_once(self) -> None:
        """One scrape of every current target (also usable without start(), e.g. in tests)."""
        targets = self._targets()
        urls = {t.url for t in targets}
        for url in [u for u in self.loads if u not in urls]:
            del self.loads[url]  # left the pool
        if self._session is None:
            self._session = aiohttp.ClientSession()
        await asyncio.gather(*(self._scrape(t) for t in targets))

    async def _scrape(self, target: ScrapeTarget) -> None:
        load = self.loads.get(target.url)
        if load is None or load.metrics_url != target.metrics_url:
            load = self.loads[target.url] = ReplicaLoad(target.url, target.metrics_url, target.kind)
        assert self._session is not None
        try:
            async with self._session.get(target.metrics_url,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}: {text[:80]!r}")
            sample = parse_metrics(text)
        except TimeoutError:
            self._failed(load, f"no answer from {target.metrics_url} within {self.timeout_s * MS_PER_S:.0f} ms")
            return
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self._failed(load, f"{target.metrics_url}: {type(exc).__name__}: {exc}")
            return
        if sample.pending is None and sample.queue_us_total is None:
            self._failed(load, f"{target.metrics_url} has no queue metric ({TRITON_PENDING} or {GEOGATE_QUEUE})")
            return
        now = time.monotonic()
        if load.error:
            log.info("load signal of %s is back", load.url)
        load.record(sample, now)
        if self.on_sample is not None:
            self.on_sample(load, now + self.stale_after_s)

    def _failed(self, load: ReplicaLoad, reason: str) -> None:
        if not load.error:  # log the change, not every interval
            log.warning("load signal unavailable, scoring %s without it: %s", load.url, reason)
        load.record_failure(reason)
        if self.on_sample is not None:
            self.on_sample(load, 0.0)  # drop the old reading now rather than when it expires

    # ------------------------------------------------------------------ reading

    def load_of(self, url: str) -> ReplicaLoad | None:
        return self.loads.get(url)

    def queue_depth(self, url: str, now_s: float) -> float:
        load = self.loads.get(url)
        return load.queue_depth_at(now_s, self.stale_after_s) if load is not None else 0.0

    def score(self, up, now_s: float) -> float:
        """Endpoint-picker score of a ``gateway.upstream.pool.Upstream``: outstanding + queue depth."""
        return score(up.load.outstanding, self.loads.get(up.state.url), now_s, self.stale_after_s)

    def snapshot(self, now_s: float | None = None) -> list[dict[str, Any]]:
        now = time.monotonic() if now_s is None else now_s
        return [ld.snapshot(now, self.stale_after_s) for ld in self.loads.values()]
