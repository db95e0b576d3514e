"""The admin listener's application (and the ``[gateway] metrics`` listener's): /metrics, the
region summary, health; the admin API, the status page and the capacity view are mounted on it
by the composition root. With ``[admin]`` credentials configured every route but the open ones
needs them (gateway.admin.guard)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
from aiohttp import web

from gateway.admin.guard import (
    admin_guard,
    admin_json_errors,
    admin_request_check,
    error_response,
    public_region_summary,
)
from gateway.front.admin_auth import AdminCredentials

JSON = "application/json"


class AdminListener:
    def __init__(self, *, readiness: Callable[[], tuple[bool, str]], region_summary: Callable[[], dict],
                 exposition: Callable[[], tuple[bytes, str]], credentials: AdminCredentials | None,
                 open_metrics: bool) -> None:
        self.readiness = readiness
        self.region_summary = region_summary
        self.exposition = exposition  # prometheus text of every worker (gateway.server.metrics)
        self.credentials = credentials  # None or not .configured: the listener is open
        self.open_metrics = open_metrics

    def app(self) -> web.Application:
        """/metrics, /geogate/v1/region and /v2/health/{live,ready}; add further routes before
        the listener starts."""
        app = web.Application(middlewares=self._middlewares())
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/geogate/v1/region", self.region_json)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2/health/live", self.live)
        return app

    def metrics_app(self) -> web.Application:
        """The ``[gateway] metrics`` listener: /metrics under the same rule as on the admin listener."""
        app = web.Application(middlewares=self._middlewares())
        app.router.add_get("/metrics", self.metrics)
        return app

    @property
    def guarded(self) -> bool:
        return self.credentials is not None and self.credentials.configured

    def _middlewares(self) -> list:
        if not self.guarded:
            return [admin_json_errors]
        return [admin_json_errors, admin_guard(self.credentials, open_metrics=self.open_metrics)]

    def public_summary(self) -> dict:
        """The summary for a listener that never takes admin credentials (the client listener)."""
        summary = self.region_summary()
        return public_region_summary(summary) if self.guarded else summary

    async def region_json(self, request: web.Request) -> web.Response:
        """Complete with admin credentials (or none configured), else the public summary."""
        summary = self.region_summary()
        if self.guarded and not admin_request_check(self.credentials, request).ok:
            summary = public_region_summary(summary)
        return web.Response(body=orjson.dumps(summary), content_type=JSON)

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        ok, reason = self.readiness()
        return web.Response(status=200) if ok else error_response(reason, 503)

    async def metrics(self, request: web.Request) -> web.Response:
        # In a thread: with --workers N it reads every worker's metric files.
        body, ctype = await asyncio.to_thread(self.exposition)
        return web.Response(body=body, headers={"Content-Type": ctype})
