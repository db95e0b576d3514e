"""Per-site status: ``sites/{site}/status.json``, written by the site's sync agent every poll.

    {"site": "eu-west", "heartbeat_s": 1764430000.5, "heartbeat": "2026-...+00:00",
     "store": {"ok": true, "error": "", "last_error": "...", "last_error_s": 1764429000.0},
     "replicas": {"grpc://127.0.0.1:18101": {"ok": true, "error": ""}},
     "models": {"demo": {"generation": 7, "stable": "2", "canary": null,
                          "ready": ["1", "2"],      # installed and READY on every replica of the site
                          "loading": ["3"],          # downloading, verifying or loading
                          "failed": {"4": "model.onnx: sha256 ... does not match manifest ..."},
                          "serving": ["1", "2"]}}}  # READY on at least one replica

Gateways' version resolvers read these to decide cutover; ``geogate models status`` shows them.
A site whose heartbeat is older than the staleness limit counts as down (not "healthy").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from replicas.store.base import NotFound, ObjectStore

SITES_PREFIX = "sites/"
STATUS_NAME = "status.json"


def status_key(site: str) -> str:
    return f"{SITES_PREFIX}{site}/{STATUS_NAME}"


@dataclass
class ModelStatus:
    generation: int = 0
    stable: str | None = None
    canary: str | None = None
    ready: list[str] = field(default_factory=list)
    loading: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    serving: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "stable": self.stable, "canary": self.canary,
                "ready": self.ready, "loading": self.loading, "failed": self.failed, "serving": self.serving}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelStatus:
        return cls(generation=int(d.get("generation", 0)), stable=d.get("stable"), canary=d.get("canary"),
                   ready=[str(v) for v in d.get("ready", [])], loading=[str(v) for v in d.get("loading", [])],
                   failed={str(k): str(v) for k, v in d.get("failed", {}).items()},
                   serving=[str(v) for v in d.get("serving", [])])


@dataclass
class SiteStatus:
    site: str
    heartbeat_s: float = 0.0  # unix time of the agent's last publication
    store_ok: bool = True
    store_error: str = ""
    store_last_error: str = ""  # the last store failure, kept after recovery
    store_last_error_s: float = 0.0
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, ModelStatus] = field(default_factory=dict)

    def age_s(self, now_s: float | None = None) -> float:
        return (time.time() if now_s is None else now_s) - self.heartbeat_s

    def fresh(self, stale_after_s: float, now_s: float | None = None) -> bool:
        return self.age_s(now_s) <= stale_after_s

    def ready(self, model: str, version: str) -> bool:
        m = self.models.get(model)
        return m is not None and version in m.ready

    def to_bytes(self) -> bytes:
        return orjson.dumps({
            "site": self.site, "heartbeat_s": self.heartbeat_s,
            "heartbeat": datetime.fromtimestamp(self.heartbeat_s, UTC).isoformat(timespec="seconds"),
            "store": {"ok": self.store_ok, "error": self.store_error, "last_error": self.store_last_error,
                      "last_error_s": self.store_last_error_s},
            "replicas": self.replicas,
            "models": {name: m.to_dict() for name, m in sorted(self.models.items())},
        }, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_bytes(cls, data: bytes) -> SiteStatus:
        d = orjson.loads(data)
        store = d.get("store", {})
        return cls(site=str(d["site"]), heartbeat_s=float(d.get("heartbeat_s", 0.0)),
                   store_ok=bool(store.get("ok", True)), store_error=str(store.get("error", "")),
                   store_last_error=str(store.get("last_error", "")),
                   store_last_error_s=float(store.get("last_error_s", 0.0)),
                   replicas=dict(d.get("replicas", {})),
                   models={k: ModelStatus.from_dict(v) for k, v in d.get("models", {}).items()})


async def publish(store: ObjectStore, status: SiteStatus) -> None:
    """Write the site's status (one writer per site: no compare-and-swap needed)."""
    await store.put(status_key(status.site), status.to_bytes())


async def read_site(store: ObjectStore, site: str) -> SiteStatus | None:
    try:
        return SiteStatus.from_bytes((await store.get(status_key(site))).data)
    except NotFound:
        return None


async def read_all_sites(store: ObjectStore) -> dict[str, SiteStatus]:
    """Every site that ever published, by name (unparseable files are skipped)."""
    out: dict[str, SiteStatus] = {}
    for obj in await store.list(SITES_PREFIX):
        rest = obj.key[len(SITES_PREFIX):]
        site, _, name = rest.partition("/")
        if name != STATUS_NAME:
            continue
        try:
            st = SiteStatus.from_bytes((await store.get(obj.key)).data)
        except NotFound:
            continue
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        out[site] = st
    return out
