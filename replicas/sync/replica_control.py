"""Loading versions on a repository's replicas and watching them become ready or retire.

Load: write ``<repository>/<name>/config.pbtxt`` (the stable's config with
``version_policy { specific { versions: [...] } }``) and ask replicas to load the model with
that config as an override (KServe repository extension: HTTP
``POST /v2/repository/models/{name}/load {"parameters": {"config": "<JSON>"}}`` or gRPC
``RepositoryModelLoad``), then read the repository index until the versions are READY. Loading
with fewer versions is how old ones are unloaded. Replicas that do not answer are recorded in
``health`` (published in the site status).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from core.tls import ClientTls
from replicas.sync.metrics import SyncMetrics
from replicas.sync.replica_client import Index, ReplicaClient, ReplicaError, replica_client
from replicas.sync.state import ModelState, Target, record_failure, sorted_versions

log = logging.getLogger("geogate.sync")

CONFIG_NAME = "config.pbtxt"
READY = "READY"
LOADING = "LOADING"
UNLOADING = "UNLOADING"
READY_POLL_S = 0.25


def model_config_json(name: str, config_pbtxt: str | None, versions: list[str]) -> tuple[str, str]:
    """(JSON for the load override, pbtxt for the repository) of the model config restricted to
    ``versions`` (Triton's ``version_policy { specific { versions } }``)."""
    cfg = model_config_pb2.ModelConfig()
    if config_pbtxt:
        text_format.Parse(config_pbtxt, cfg)
    cfg.name = name
    cfg.version_policy.Clear()
    cfg.version_policy.specific.versions.extend(sorted(int(v) for v in versions))
    return (json_format.MessageToJson(cfg, preserving_proto_field_name=True, indent=None),
            text_format.MessageToString(cfg))


def _config_source(t: Target, name: str, versions: set[str], st: ModelState) -> str | None:
    """The model config to use: the stable's config.pbtxt, else the newest version's."""
    rec = st.record
    order = ([rec.stable] if rec and rec.stable else []) + sorted(versions, key=int, reverse=True)
    for v in order:
        p = t.repository / name / v / CONFIG_NAME
        if p.is_file():
            return p.read_text()
    return None


def _write_atomic(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ready_sets(indexes: dict[str, Index], name: str) -> tuple[set[str], set[str]]:
    """(READY on every reachable replica, READY on at least one)."""
    per = [{v for v, s in idx.get(name, {}).items() if s.state == READY} for idx in indexes.values()]
    if not per:
        return set(), set()
    return set.intersection(*per), set.union(*per)


def not_ready_reason(indexes: dict[str, Index], name: str, version: str, errors: dict[str, str]) -> str:
    reasons = []
    for url, idx in indexes.items():
        s = idx.get(name, {}).get(version)
        if s is None or s.state != READY:
            why = s.reason if s and s.reason else errors.get(url, "")
            reasons.append(f"{url}: {s.state if s else 'not loaded'}" + (f" ({why})" if why else ""))
    return "did not become ready: " + "; ".join(reasons)


class ReplicaControl:
    """The site's replica clients (one per URL) and what loading/unloading on them takes."""

    def __init__(self, site: str, metrics: SyncMetrics, *, load_timeout_s: float,
                 tls: ClientTls | None = None) -> None:
        self.site = site
        self.metrics = metrics
        self.load_timeout_s = load_timeout_s
        self.tls = tls  # [tls.upstream]: replicas serve TLS (mutual when it names a client certificate)
        self.clients: dict[str, ReplicaClient] = {}
        self.health: dict[str, dict] = {}  # replica URL -> {"ok", "error"}, as the site status shows it

    async def use(self, wanted: dict[str, str]) -> None:
        """Keep clients for exactly the replica URLs in `wanted` (URL -> control token)."""
        for url in wanted.keys() - self.clients.keys():
            self.clients[url] = replica_client(url, wanted[url], tls=self.tls)
        for url in self.clients.keys() - wanted.keys():
            await self.clients.pop(url).close()

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()

    async def load(self, t: Target, name: str, versions: set[str], installed: set[str],
                   st: ModelState, replicas: list[str] | None = None) -> dict[str, str]:
        """Ask every replica (or just `replicas`) to load exactly ``versions``; returns replica
        URL -> error."""
        replicas = t.replicas if replicas is None else replicas
        versions = {v for v in versions if v in installed}
        errors: dict[str, str] = {}
        if not versions:
            return errors
        source = await asyncio.to_thread(_config_source, t, name, versions, st)
        try:
            cfg_json, cfg_pbtxt = model_config_json(name, source, list(versions))
        except text_format.ParseError as exc:
            for v in versions:
                record_failure(st, self.site, name, v, f"config.pbtxt does not parse: {exc}")
            return {u: "bad config" for u in t.replicas}
        await asyncio.to_thread(_write_atomic, t.repository / name / CONFIG_NAME, cfg_pbtxt)
        for v in versions:
            st.loading.setdefault(v, "loading on replicas")
        log.info("loading", extra={"fields": {"site": self.site, "model": name,
                                              "versions": sorted_versions(versions)}})
        results = await asyncio.gather(*(self.clients[u].load(name, cfg_json, self.load_timeout_s)
                                         for u in replicas), return_exceptions=True)
        for url, res in zip(replicas, results, strict=True):
            self.metrics.loads.labels(self.site, "error" if isinstance(res, BaseException) else "ok").inc()
            if isinstance(res, BaseException):
                if not isinstance(res, ReplicaError):
                    raise res
                log.warning("replica load failed", extra={"fields": {"replica": url, "model": name,
                                                                     "error": str(res)}})
                errors[url] = str(res)
                if not res.reachable:
                    self.health[url] = {"ok": False, "error": str(res)}
        for v in versions:
            st.loading.pop(v, None)
        return errors

    async def indexes(self, t: Target, replicas: list[str] | None = None) -> dict[str, Index]:
        """Replica URL -> its repository index, for those that answer (a replica that answers
        with an error counts as there, knowing nothing)."""
        replicas = t.replicas if replicas is None else replicas
        results = await asyncio.gather(*(self.clients[u].index() for u in replicas), return_exceptions=True)
        out: dict[str, Index] = {}
        for url, res in zip(replicas, results, strict=True):
            if isinstance(res, ReplicaError):
                self.health[url] = {"ok": False, "error": str(res)}
                if res.reachable:
                    out[url] = {}
            elif isinstance(res, BaseException):
                raise res
            else:
                self.health[url] = {"ok": True, "error": ""}
                out[url] = res
        return out

    async def wait_ready(self, t: Target, name: str, versions: set[str],
                         replicas: list[str] | None = None) -> dict[str, Index]:
        """Until every reachable replica (of `replicas`, default all) has ``versions`` READY or
        none is still LOADING."""
        deadline = time.monotonic() + self.load_timeout_s
        while True:
            indexes = await self.indexes(t, replicas)
            ready, _ = ready_sets(indexes, name)
            loading = any(s.state == LOADING for idx in indexes.values() for s in idx.get(name, {}).values())
            if versions <= ready or not loading or time.monotonic() > deadline:
                return indexes
            await asyncio.sleep(READY_POLL_S)

    async def wait_retired(self, url: str, name: str, drop: frozenset[str]) -> None:
        """Until `url` has finished unloading `drop` (none READY or UNLOADING), it stopped
        answering, or load_timeout_s passed."""
        deadline = time.monotonic() + self.load_timeout_s
        while time.monotonic() < deadline:
            try:
                index = await self.clients[url].index()
            except ReplicaError:
                return
            states = index.get(name, {})
            if not any(states[v].state in (READY, UNLOADING) for v in drop if v in states):
                return
            await asyncio.sleep(READY_POLL_S)
