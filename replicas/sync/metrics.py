"""The sync agent's Prometheus metrics (``geogate_sync_*``) and their ``--metrics`` listener."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from replicas.releases.site_status import SiteStatus


class SyncMetrics:
    """Prometheus metrics of the agent (``geogate_sync_*``), served on ``--metrics HOST:PORT``."""

    def __init__(self, site: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.site = site
        self.store_up = Gauge("geogate_sync_store_up", "1 when the last store read succeeded", ["site"],
                              registry=r).labels(site)
        self.heartbeat = Gauge("geogate_sync_heartbeat_timestamp_seconds", "Last status publication (unix)",
                               ["site"], registry=r).labels(site)
        self.versions = Gauge("geogate_sync_versions", "Versions per model by state at this site",
                              ["site", "model", "state"], registry=r)
        self.downloaded = Counter("geogate_sync_downloaded_bytes", "Bytes downloaded from the store",
                                  ["site"], registry=r).labels(site)
        self.installs = Counter("geogate_sync_installs", "Version installs by outcome (installed, refused)",
                                ["site", "outcome"], registry=r)
        self.loads = Counter("geogate_sync_replica_loads", "Load requests to replicas by outcome (ok, error)",
                             ["site", "outcome"], registry=r)
        self.store_unanswered = Gauge("geogate_sync_store_unanswered_seconds",
                                      "Seconds since the store last answered while it does not (0 while it does)",
                                      ["site"], registry=r).labels(site)
        self.store_failures = Counter("geogate_sync_store_failures",
                                      "Sync rounds that failed on the store, by kind (timeout: it hangs; missing: "
                                      "no directory/bucket; unavailable: refused, 5xx, I/O error)",
                                      ["site", "kind"], registry=r)

    def observe(self, status: SiteStatus) -> None:
        self.store_up.set(1 if status.store_ok else 0)
        self.heartbeat.set(status.heartbeat_s)
        for model, ms in status.models.items():
            for state, versions in (("ready", ms.ready), ("loading", ms.loading), ("failed", ms.failed),
                                    ("serving", ms.serving)):
                self.versions.labels(self.site, model, state).set(len(versions))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve_metrics(metrics: SyncMetrics, listen: str) -> web.AppRunner:
    """Serve ``GET /metrics`` on ``HOST:PORT``; the caller cleans the runner up."""

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4"})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    return runner
