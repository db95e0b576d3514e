"""The admin API's model routes, on a real aiohttp server (loopback) over a real file store."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.admin.models_api import add_model_admin_routes
from replicas.releases.models_cli import push_version
from replicas.releases.records import Releases
from replicas.releases.site_status import ModelStatus, SiteStatus, publish
from replicas.store import open_store

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    for v in (1, 2, 3):
        d = tmp_path / "src" / str(v)
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(b"x" * v)
        await push_version(store, "demo", d, who="pusher")
    app = web.Application()
    add_model_admin_routes(app, store, token=TOKEN)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as session:
        yield session, store
    await server.close()
    await store.close()


async def test_auth_required(api):
    session, _ = api
    async with session.get("/admin/v1/models") as r:
        assert r.status == 401 and "Bearer" in (await r.json())["error"]
    async with session.get("/admin/v1/models", headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 403 and (await r.json())["error"] == "invalid admin token"
    async with session.post("/admin/v1/models/demo/promote", json={"version": "1"},
                            headers={"Authorization": "Basic abc"}) as r:
        assert r.status == 401
    assert await Releases(api[1]).get("demo") is None  # nothing was applied


async def test_operations_and_errors(api):
    session, _store = api
    async with session.get("/admin/v1/models", headers=AUTH) as r:
        doc = await r.json()
        assert r.status == 200 and [m["name"] for m in doc["models"]] == ["demo"]
        assert [v["version"] for v in doc["models"][0]["versions"]] == ["1", "2", "3"]
    async with session.get("/admin/v1/models/nope", headers=AUTH) as r:
        assert r.status == 404 and "unknown model" in (await r.json())["error"]
    async with session.post("/admin/v1/models/demo/promote", json={"version": "9"}, headers=AUTH) as r:
        assert r.status == 404 and "not in the store" in (await r.json())["error"]
    async with session.post("/admin/v1/models/demo/promote", data=b"{not json", headers=AUTH) as r:
        assert r.status == 400
    async with session.post("/admin/v1/models/demo/promote", json={"version": 1, "who": "ann"}, headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["release"]["stable"] == "1"
    async with session.post("/admin/v1/models/demo/promote", json={"version": "2"}, headers=AUTH) as r:
        assert r.status == 200
    async with session.post("/admin/v1/models/demo/canary", json={"version": "3", "weight": 0.2},
                            headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["release"]["canary"] == {"version": "3", "weight": 0.2}
    async with session.post("/admin/v1/models/demo/canary", json={"version": "3"}, headers=AUTH) as r:
        assert r.status == 400 and "weight" in (await r.json())["error"]
    async with session.post("/admin/v1/models/demo/rollback", headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["release"]["canary"] is None
    async with session.post("/admin/v1/models/demo/rollback", headers=AUTH) as r:
        rec = (await r.json())["release"]
        assert r.status == 200 and rec["stable"] == "1" and rec["generation"] == 5
        assert [h["who"] for h in rec["history"]] == ["ann", "admin-api", "admin-api", "admin-api", "admin-api"]
    async with session.post("/admin/v1/models/other/rollback", headers=AUTH) as r:
        assert r.status == 404
    async with session.get("/admin/v1/models/demo", headers=AUTH) as r:
        assert (await r.json())["release"]["stable"] == "1"


async def test_conflict_is_409(api):
    session, store = api
    await Releases(store).promote("demo", "1", who="t")

    async def promote(v: str) -> int:
        async with session.post("/admin/v1/models/demo/promote", json={"version": v, "if_generation": 1},
                                headers=AUTH) as r:
            body = await r.json()
            if r.status == 409:
                assert "NOT applied" in body["error"]
            return r.status

    statuses = await asyncio.gather(*(promote(v) for v in ("2", "3", "2", "3", "2", "3")))
    assert sorted(statuses) == [200] + [409] * 5
    assert (await Releases(store).get("demo")).generation == 2


async def test_status(api):
    session, store = api
    await publish(store, SiteStatus(site="eu", heartbeat_s=1.0,
                                    models={"demo": ModelStatus(ready=["1"], failed={"2": "corrupt"})}))
    async with session.get("/admin/v1/status", headers=AUTH) as r:
        doc = await r.json()
        assert r.status == 200 and doc["sites"]["eu"]["models"]["demo"]["failed"] == {"2": "corrupt"}
        assert doc["sites"]["eu"]["age_s"] > 1000


async def test_mount_on_a_gateway_admin_app(tmp_path):
    from core.config import parse_config
    from gateway.admin.models_api import mount

    cfg = parse_config('[store]\nurl = "file://store"\n[admin]\ntoken = "tok"\n[[regions]]\nname = "eu"\n',
                       base_dir=str(tmp_path))
    app = web.Application()
    mount(app, cfg)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as session:
            async with session.get("/admin/v1/models", headers={"Authorization": "Bearer tok"}) as r:
                assert r.status == 503 and "unavailable" in (await r.json())["error"]  # no store dir yet
            (tmp_path / "store").mkdir()
            async with session.get("/admin/v1/models", headers={"Authorization": "Bearer tok"}) as r:
                assert r.status == 200 and (await r.json()) == {"models": []}
    finally:
        await server.close()
