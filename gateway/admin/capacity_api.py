"""``GET /geogate/v1/capacity`` on the admin listener: the capacity model's document
(gateway.routing.capacity.CapacityControl.document), read by `geogate status`, the status page
and the local autoscaler; with ``[capacity] enabled = false`` a 404 that says so."""

from __future__ import annotations

from collections.abc import Callable

import orjson
from aiohttp import web

from gateway.routing.capacity import CAPACITY_PATH, CapacityControl


def add_capacity_routes(app: web.Application, capacity_source: Callable[[], dict]) -> None:
    """``GET /geogate/v1/capacity`` on an aiohttp app: JSON from ``capacity_source()``."""

    async def capacity(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(capacity_source()), content_type="application/json")

    app.router.add_get(CAPACITY_PATH, capacity)


def mount(admin_app: web.Application, control: CapacityControl | None) -> None:
    if control is not None:
        add_capacity_routes(admin_app, control.document)
        return

    async def disabled(request: web.Request) -> web.Response:
        return web.Response(status=404, content_type="application/json",
                            body=orjson.dumps({"error": "capacity tracking is off ([capacity] enabled = false)"}))

    admin_app.router.add_get(CAPACITY_PATH, disabled)
