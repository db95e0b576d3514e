"""Prometheus metrics and a status endpoint for `geogate dns` (prefix ``geogate_dns_``).

Served on ``dns.metrics`` (HOST:PORT; empty: off): ``GET /metrics`` (Prometheus text) and
``GET /geogate/v1/dns`` (JSON: each region's health as the responder sees it, fail-open state,
what the rate limiter and the TCP listener refused).
Labelled children are cached: ``labels()`` costs microseconds, paid once per label set.  The
rate limiter and TCP listener keep plain int counters (a flood's path stays a few dict and
attribute operations) that a collector reads at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from geo.dns_rate_limit import ResponseRateLimiter
from geo.region_health import RegionHealth, RegionHealthMonitor


class TcpStats(Protocol):
    """What the TCP listener counts (geo.dns_server._TcpServer)."""

    open_connections: int
    closed_idle: int
    refused_per_client: int
    evicted: int


class _ProtectionCollector(Collector):
    """The rate limiter's and TCP listener's counters, read when scraped (zeros until attached)."""

    def __init__(self, metrics: DnsMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        rrl, tcp = self.metrics.rate_limiter, self.metrics.tcp
        limited = CounterMetricFamily("geogate_dns_rate_limited_responses",
                                      "UDP responses not sent in full because their source prefix was over "
                                      "dns.rate_limit_responses_per_s: dropped, or slipped (sent truncated, TC=1)",
                                      labels=["action"])
        limited.add_metric(["dropped"], rrl.dropped if rrl is not None else 0)
        limited.add_metric(["slipped"], rrl.slipped if rrl is not None else 0)
        yield limited
        yield CounterMetricFamily("geogate_dns_rate_limited_sources", "Source prefixes that went over the rate "
                                  "limit (counted again after being forgotten)",
                                  value=rrl.limited_sources if rrl is not None else 0)
        yield GaugeMetricFamily("geogate_dns_rate_limit_sources", "Source prefixes the rate limiter tracks now "
                                "(at most dns.rate_limit_max_sources)",
                                value=rrl.sources if rrl is not None else 0)
        yield CounterMetricFamily("geogate_dns_rate_limit_evictions", "Source prefixes forgotten early because "
                                  "the table was full (dns.rate_limit_max_sources)",
                                  value=rrl.evicted if rrl is not None else 0)
        yield GaugeMetricFamily("geogate_dns_tcp_connections", "Open DNS-over-TCP connections",
                                value=tcp.open_connections if tcp is not None else 0)
        closed = CounterMetricFamily("geogate_dns_tcp_connections_closed",
                                     "TCP connections closed by the server: idle_timeout (no complete query within "
                                     "dns.tcp_idle_timeout_ms), per_client_limit (refused: the client address had "
                                     "dns.tcp_max_connections_per_client open), evicted (the idlest connection, "
                                     "closed for a new one at dns.tcp_max_connections)", labels=["reason"])
        closed.add_metric(["idle_timeout"], tcp.closed_idle if tcp is not None else 0)
        closed.add_metric(["per_client_limit"], tcp.refused_per_client if tcp is not None else 0)
        closed.add_metric(["evicted"], tcp.evicted if tcp is not None else 0)
        yield closed

RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


class DnsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._responses = Counter("geogate_dns_responses", "Responses sent, by transport and rcode (the rate "
                                  "limiter's truncated slips are in geogate_dns_rate_limited_responses)",
                                  ["transport", "rcode"], registry=r)
        self._answers = Counter("geogate_dns_service_answers", "Service answers, by the first region answered",
                                ["region"], registry=r)
        self.dropped = Counter("geogate_dns_dropped", "Packets dropped unanswered (no readable header, "
                               "or not a query)", registry=r)
        self._healthy = Gauge("geogate_dns_region_healthy", "1 while the region is answered (health checks pass)",
                              ["region"], registry=r)
        self._rtt = Gauge("geogate_dns_region_probe_rtt_seconds", "EWMA of the region's health probe round trip",
                          ["region"], registry=r)
        self._flips = Counter("geogate_dns_region_transitions", "Region health flips", ["region", "to"], registry=r)
        self.fail_open = Gauge("geogate_dns_fail_open", "1 while no region is healthy and every region is answered",
                               registry=r)
        self._refused_transfers = Counter("geogate_dns_refused_transfers", "Zone transfer queries answered "
                                          "REFUSED (zone transfers are not served)", ["qtype"], registry=r)
        self._response_children: dict[tuple[str, int], Any] = {}
        self._answer_children: dict[str, Any] = {}
        self._transfer_children: dict[str, Any] = {}
        # Attached by geo.dns_server.serve once they exist; read at scrape time.
        self.rate_limiter: ResponseRateLimiter | None = None
        self.tcp: TcpStats | None = None
        r.register(_ProtectionCollector(self))

    def response(self, transport: str, rcode: int) -> None:
        child = self._response_children.get((transport, rcode))
        if child is None:
            child = self._responses.labels(transport, RCODE_NAMES.get(rcode, str(rcode)))
            self._response_children[(transport, rcode)] = child
        child.inc()

    def answered(self, region: str) -> None:
        child = self._answer_children.get(region)
        if child is None:
            child = self._answer_children[region] = self._answers.labels(region)
        child.inc()

    def refused_transfer(self, qtype: str) -> None:
        child = self._transfer_children.get(qtype)
        if child is None:
            child = self._transfer_children[qtype] = self._refused_transfers.labels(qtype)
        child.inc()

    def protection_status(self) -> dict[str, Any]:
        """What /geogate/v1/dns shows of the rate limiter and the TCP listener."""
        rrl, tcp = self.rate_limiter, self.tcp
        out: dict[str, Any] = {"rate_limit": None, "tcp": None}
        if rrl is not None:
            out["rate_limit"] = {"responses_per_s": int(rrl.rate), "slip": rrl.slip,
                                 "ipv4_prefix_len": rrl.ipv4_prefix_len, "ipv6_prefix_len": rrl.ipv6_prefix_len,
                                 "sources": rrl.sources, "max_sources": rrl.max_sources, "dropped": rrl.dropped,
                                 "slipped": rrl.slipped, "limited_sources": rrl.limited_sources,
                                 "evicted": rrl.evicted}
        if tcp is not None:
            out["tcp"] = {"open_connections": tcp.open_connections, "closed_idle": tcp.closed_idle,
                          "refused_per_client": tcp.refused_per_client, "evicted": tcp.evicted}
        return out

    def region_changed(self, state: RegionHealth) -> None:
        self._flips.labels(state.name, "healthy" if state.healthy else "unhealthy").inc()

    def refresh(self, monitor: RegionHealthMonitor, failing_open: bool) -> None:
        for name, s in monitor.states.items():
            self._healthy.labels(name).set(1 if s.healthy else 0)
            self._rtt.labels(name).set(s.rtt_ewma_s)
        self.fail_open.set(1 if failing_open else 0)


def build_status_app(metrics: DnsMetrics, monitor: RegionHealthMonitor, responder: Any) -> web.Application:
    async def get_metrics(_: web.Request) -> web.Response:
        metrics.refresh(monitor, responder.failing_open)
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def get_status(_: web.Request) -> web.Response:
        now = time.monotonic()
        regions = []
        for s in monitor.states.values():
            snap = s.snapshot()
            snap["last_probe_age_s"] = round(now - s.last_probe_s, 3) if s.probes else None
            regions.append(snap)
        return web.json_response({"zone": responder.zone.to_text(), "service": responder.service.to_text(),
                                  "fail_open": responder.failing_open, "regions": regions,
                                  **metrics.protection_status()})

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/geogate/v1/dns", get_status)
    return app
