"""What `geogate up` knows about its autoscaled pools, read from the autoscaler's status file.

The autoscaler (gateway.world.autoscaler, one supervised child) rewrites DIR/autoscaler.json every
round: per "REGION/POOL" the desired count, its reason and source (gateway or operator
override), and each replica it runs (ports; registered in DNS, draining, alive). This module
turns that into what world.json, the printed table and the readiness wait show.
"""

from __future__ import annotations

import json
from pathlib import Path

from gateway.world.launch import AutoscaledPoolLaunch, Launch

# A replica's state as world.json shows it.
SERVING = "serving"  # registered in DNS: the gateway finds it and routes to it once healthy
STARTING = "starting"  # started, not ready yet (not in DNS)
DRAINING = "draining"  # removed from DNS, finishing in-flight requests before it is stopped
EXITED = "exited"  # gone on its own: the autoscaler replaces it
NOT_DECIDED = "the autoscaler has not decided yet (starting)"


def read_status(path: Path) -> dict[str, dict]:
    """The autoscaler's last status ({} while it has written none, or mid-replace)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _state(rep: dict) -> str:
    if not rep.get("alive", True):
        return EXITED
    if rep.get("draining"):
        return DRAINING
    return SERVING if rep.get("registered") else STARTING


def pool_view(pool: AutoscaledPoolLaunch, status: dict[str, dict]) -> dict:
    """One autoscaled pool for world.json: its bounds, the desired count and its replicas."""
    st = status.get(pool.key) or {}
    replicas = []
    for rep in st.get("replicas", []):
        http, grpc = rep.get("http_port"), rep.get("grpc_port")
        port = grpc if pool.scheme == "grpc" else http
        replicas.append({"url": f"{pool.scheme}://127.0.0.1:{port}", "http": f"127.0.0.1:{http}",
                         "grpc": f"127.0.0.1:{grpc}", "state": _state(rep)})
    decided = bool(st.get("source"))  # a (re)started autoscaler reports before its first decision
    return {"pool": pool.name, "discover": pool.discover, "resolver": pool.resolver,
            "repository": pool.repository, "min_replicas": pool.min_replicas, "max_replicas": pool.max_replicas,
            "desired": st.get("desired") if decided else None,
            "reason": st.get("reason", "") if decided else NOT_DECIDED,
            "source": st.get("source", ""), "replicas": replicas}


def serving(view: dict) -> list[str]:
    return [rep["url"] for rep in view["replicas"] if rep["state"] == SERVING]


def pool_has_min_replicas(path: Path, pool: AutoscaledPoolLaunch) -> bool:
    """Readiness probe: the autoscaler runs at least the pool's minimum, each registered in DNS."""
    return len(serving(pool_view(pool, read_status(path)))) >= pool.min_replicas


def views(launch: Launch) -> dict[str, dict]:
    """"REGION/POOL" -> pool_view for every autoscaled pool of the world, from the status file now."""
    status = read_status(launch.autoscaler_status_path)
    return {p.key: pool_view(p, status) for p in launch.autoscaled_pools()}


def changes(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """Operator-facing lines for pools whose desired count or serving replicas changed."""
    out = []
    for key, now in after.items():
        old = before.get(key) or {}
        was, cur = serving(old) if old else [], serving(now)
        if cur == was and now.get("desired") == old.get("desired"):
            continue
        added, removed = sorted(set(cur) - set(was)), sorted(set(was) - set(cur))
        delta = "; ".join(s for s in (f"+{' +'.join(added)}" if added else "",
                                      f"-{' -'.join(removed)}" if removed else "") if s)
        why = f"{now['source']}: {now['reason'] or '-'}" if now.get("source") else now.get("reason")
        desired = "?" if now.get("desired") is None else now["desired"]
        out.append(f"autoscaler: {key}: {len(cur)} serving, desired {desired} ({why})"
                   + (f"; {delta}" if delta else ""))
    return out
