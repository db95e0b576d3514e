"""Prometheus metrics and a status endpoint for `geogate dns` (prefix ``geogate_dns_``).

Served on ``dns.metrics`` (HOST:PORT; empty: off): ``GET /metrics`` (Prometheus text) and
``GET /geogate/v1/dns`` (JSON: each region's health as the responder sees it, fail-open state).
Labelled children are cached: ``labels()`` costs microseconds, paid once per label set.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from geo.region_health import RegionHealth, RegionHealthMonitor

RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


class DnsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._responses = Counter("geogate_dns_responses", "Responses sent, by transport and rcode",
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
        self._response_children: dict[tuple[str, int], Any] = {}
        self._answer_children: dict[str, Any] = {}

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
                                  "fail_open": responder.failing_open, "regions": regions})

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/geogate/v1/dns", get_status)
    return app
