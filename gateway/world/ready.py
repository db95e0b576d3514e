"""When is the local world ready? When what a user would try works: every gateway serves every
stable model, GeoDNS sends each region's clients to that region, and every autoscaled pool
runs at least its minimum of replicas, registered in DNS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from typing import Any

from gateway.world.autoscale import pool_has_min_replicas
from gateway.world.launch import Launch
from gateway.world.ports import split_host_port
from gateway.world.store import ModelInfo

READY_POLL_S = 0.3
PROBE_TIMEOUT_S = 1.0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _region_serves(url: str, model: str, version: str) -> bool:
    """Does the region summary at ``url`` list ``version`` of ``model`` ready on a routable replica?"""
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as r:
            summary = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return version in ((summary.get("models") or {}).get(model) or {}).get("ready_versions", [])


def _dns_answers(listen: str, name: str, subnet: str, address: str) -> bool:
    """Does the GeoDNS responder answer ``address`` for a client in ``subnet``?"""
    import dns.edns
    import dns.exception
    import dns.message
    import dns.query

    host, port = split_host_port(listen)
    net, _, bits = subnet.partition("/")
    q = dns.message.make_query(name, "A", use_edns=0,
                               options=[dns.edns.ECSOption(net, int(bits or 24))])
    try:
        resp = dns.query.udp(q, host, port=port, timeout=PROBE_TIMEOUT_S)
    except (dns.exception.DNSException, OSError):
        return False
    return any(rd.address == address for rrset in resp.answer for rd in rrset if hasattr(rd, "address"))


def readiness_checks(launch: Launch, models: dict[str, ModelInfo]) -> dict[str, Any]:
    """Name (what an operator reads when it is still failing) -> (probe, *args)."""
    checks: dict[str, Any] = {}
    for r in launch.regions:
        checks[f"{r.name}: gateway ready"] = (_http_ok, f"http://{r.http}/v2/health/ready")
        # Not /v2/models/{m}/ready: that counts replicas the gateway would only try in panic
        # (none healthy yet); the region summary lists versions ready on routable replicas.
        for m in (models or {}).values():
            checks[f"{r.name}: {m.name} v{m.stable} ready on a routable replica"] = (
                _region_serves, f"http://{r.http}/geogate/v1/region", m.name, m.stable)
        if r.client_cidrs and r.addresses:
            checks[f"GeoDNS answers {r.name}"] = (_dns_answers, launch.dns_listen, launch.dns_service,
                                                  r.client_cidrs[0], r.addresses[0])
        for pool in r.autoscaled:
            checks[f"{pool.key}: autoscaler runs {pool.min_replicas} replica(s)"] = (
                pool_has_min_replicas, launch.autoscaler_status_path, pool)
    return checks


async def wait_ready(checks: dict[str, Any], stop: asyncio.Event, timeout_s: float) -> list[str]:
    """Names of the checks still failing when everything passed (empty), stop was asked, or
    the timeout ran out."""
    pending = dict(checks)
    deadline = time.monotonic() + timeout_s
    while pending and not stop.is_set() and time.monotonic() < deadline:
        results = await asyncio.gather(*(asyncio.to_thread(fn, *args) for fn, *args in pending.values()))
        for name, ok in zip(list(pending), results, strict=True):
            if ok:
                del pending[name]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), READY_POLL_S)
    return list(pending)
