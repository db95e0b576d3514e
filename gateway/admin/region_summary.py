"""``GET /geogate/v1/region``: this region as peers, GeoDNS and the status page see it
(schema in INTERFACES.md), and the readiness answer of ``GET /v2/health/ready``."""

from __future__ import annotations

import time

from health.selection import healthy_fraction


def region_load(gw) -> dict:
    """The summary's ``load`` object: this worker's request rate and latency, plus (capacity
    tracking on) what peers' load-aware spill reads: ``utilization`` (in-flight over the
    replicas' concurrency limits), ``expected_queue_ms`` (-1: no capacity here) and whether
    this region is spilling its own load to peers right now."""
    load = gw.load.summary()
    control = gw.capacity_control
    if control is not None:
        load.update(control.tracker.region_load())
        spill = control.guard.spill
        load["spilling"] = spill.spilling
        load["spill_fraction"] = round(spill.fraction, 4) if spill.spilling else 0.0
    return load


def region_summary(gw) -> dict:
    """The JSON-able region summary of a ``gateway.server.region_state.RegionState``."""
    now = time.monotonic()
    ready, reason = gw.readiness()
    pools = []
    healthy_total = 0
    total = 0
    for pool in gw.pools.pools:
        states = pool.states
        healthy = sum(1 for s in states if s.routable(now)[0])
        members = [s for s in states if not s.draining]
        healthy_total += healthy
        total += len(members)
        panic = bool(members) and healthy_fraction(members, now) < gw.pools.panic_threshold
        pools.append({"name": pool.name, "kind": pool.kind, "healthy": healthy, "total": len(members),
                      "panic": panic, "replicas": [s.snapshot(now) for s in states]})
    models = {m: {"ready_versions": sorted(vs, key=lambda v: (0, int(v)) if v.isdigit() else (1, v))}
              for m, vs in sorted(gw.pools.ready_versions().items())}
    return {
        "region": gw.region.name,
        "location": list(gw.region.location),
        "ready": ready,
        "reason": reason,
        "replicas": {"healthy": healthy_total, "total": total},
        "pools": pools,
        "models": models,
        "load": region_load(gw),
        "worker": gw.worker,
        # How this gateway routes now: region order, spill shares, failback holds, peers' health.
        "routing": gw.router.snapshot(),
        "peers": gw.region_monitor.snapshot() if gw.region_monitor is not None else [],
    }
