"""Admin API for model versions (the same operations as `geogate models ...`).

    GET  /admin/v1/models                    release records and versions in the store
    GET  /admin/v1/models/{name}             one model (404 when the store knows nothing of it)
    POST /admin/v1/models/{name}/promote     {"version": "2"}
    POST /admin/v1/models/{name}/canary      {"version": "3", "weight": 0.1}   (weight 0 clears)
    POST /admin/v1/models/{name}/rollback    {}
    GET  /admin/v1/status                    every site's status.json

All need ``Authorization: Bearer <token>`` (401 without, 403 with a wrong one, 403 when the
server has no token configured). POST bodies may add ``"who"`` (recorded in the history;
default "admin-api") and ``"if_generation"`` (apply only at that generation). Errors are JSON
``{"error": "..."}``: 400 bad request, 404 unknown model/version, 409 the release record
changed meanwhile (compare-and-swap lost: nothing applied) or the operation does not apply.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

import orjson
from aiohttp import web

from replicas.manifest import list_stored_versions
from replicas.releases import ConflictError, ReleaseError, Releases, UnknownModel, UnknownVersion
from replicas.site_status import read_all_sites
from replicas.store import ObjectStore, StoreError, StoreUnavailable

PREFIX = "/admin/v1"
DEFAULT_WHO = "admin-api"


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def add_model_admin_routes(app: web.Application, store: ObjectStore, *, token: str) -> None:
    releases = Releases(store)

    def authorized(request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return _error(401, "missing 'Authorization: Bearer <token>' header")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return _error(401, "Authorization header must be 'Bearer <token>'")
        if not token:
            return _error(403, "admin API disabled: no admin token configured ([admin] token / token_env)")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            return _error(403, "invalid admin token")
        return None

    def guarded(handler):
        async def wrapper(request: web.Request) -> web.StreamResponse:
            denied = authorized(request)
            if denied is not None:
                return denied
            try:
                return await handler(request)
            except ConflictError as exc:
                return _error(409, str(exc))
            except (UnknownVersion, UnknownModel) as exc:
                return _error(404, str(exc))
            except ReleaseError as exc:
                return _error(409, str(exc))
            except ValueError as exc:
                return _error(400, str(exc))
            except StoreUnavailable as exc:
                return _error(503, f"model store unavailable: {exc}")
            except StoreError as exc:
                return _error(502, f"model store error: {exc}")

        return wrapper

    async def body(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"request body is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError("request body must be a JSON object")
        return doc

    def gen(doc: dict[str, Any]) -> int | None:
        g = doc.get("if_generation")
        if g is not None and (not isinstance(g, int) or isinstance(g, bool)):
            raise ValueError(f"'if_generation' must be an integer, got {g!r}")
        return g

    def version_of(doc: dict[str, Any]) -> str:
        v = doc.get("version")
        if v is None or isinstance(v, bool):
            raise ValueError("body needs \"version\" (e.g. {\"version\": \"2\"})")
        return str(v)

    async def model_view(name: str) -> dict[str, Any] | None:
        rec = await releases.get(name)
        versions = (await list_stored_versions(store, name)).get(name, [])
        if rec is None and not versions:
            return None
        return {"name": name, "release": rec.to_dict() if rec else None,
                "versions": [{"version": v.version, "complete": v.complete, "files": v.files,
                              "bytes": v.total_bytes} for v in versions]}

    async def list_models(request: web.Request) -> web.Response:
        recs = await releases.all()
        stored = await list_stored_versions(store)
        out = []
        for name in sorted(set(recs) | set(stored)):
            rec = recs.get(name)
            out.append({"name": name, "release": rec.to_dict() if rec else None,
                        "versions": [{"version": v.version, "complete": v.complete, "files": v.files,
                                      "bytes": v.total_bytes} for v in stored.get(name, [])]})
        return _json({"models": out})

    async def get_model(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        view = await model_view(name)
        if view is None:
            return _error(404, f"unknown model {name!r}: no release record and no versions in the store")
        return _json(view)

    async def promote(request: web.Request) -> web.Response:
        doc = await body(request)
        rec = await releases.promote(request.match_info["name"], version_of(doc),
                                     who=str(doc.get("who") or DEFAULT_WHO), expected_generation=gen(doc))
        return _json({"release": rec.to_dict()})

    async def canary(request: web.Request) -> web.Response:
        doc = await body(request)
        weight = doc.get("weight")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ValueError("body needs \"weight\": a number between 0 and 1")
        rec = await releases.set_canary(request.match_info["name"], version_of(doc), float(weight),
                                        who=str(doc.get("who") or DEFAULT_WHO), expected_generation=gen(doc))
        return _json({"release": rec.to_dict()})

    async def rollback(request: web.Request) -> web.Response:
        doc = await body(request)
        name = request.match_info["name"]
        if await releases.get(name) is None:
            return _error(404, f"unknown model {name!r}: no release record")
        rec = await releases.rollback(name, who=str(doc.get("who") or DEFAULT_WHO), expected_generation=gen(doc))
        return _json({"release": rec.to_dict()})

    async def status(request: web.Request) -> web.Response:
        now = time.time()
        sites = await read_all_sites(store)
        out = {}
        for name, st in sorted(sites.items()):
            doc = orjson.loads(st.to_bytes())
            doc["age_s"] = round(st.age_s(now), 3)
            out[name] = doc
        return _json({"sites": out})

    app.router.add_get(f"{PREFIX}/models", guarded(list_models))
    app.router.add_get(f"{PREFIX}/models/{{name}}", guarded(get_model))
    app.router.add_post(f"{PREFIX}/models/{{name}}/promote", guarded(promote))
    app.router.add_post(f"{PREFIX}/models/{{name}}/canary", guarded(canary))
    app.router.add_post(f"{PREFIX}/models/{{name}}/rollback", guarded(rollback))
    app.router.add_get(f"{PREFIX}/status", guarded(status))


def mount(admin_app: web.Application, gw: Any) -> None:
    """Mount the routes on a running gateway's admin listener (``gateway.main._mount_extras``
    style): the config's store (a missing local store directory is not created: routes answer
    503 until it exists) and the config's admin token (``[admin] token`` / ``token_env``)."""
    from replicas.store import open_store

    cfg = gw.cfg
    store = open_store(cfg.store.url, cfg.store, base_dir=cfg.base_dir, create=False)
    add_model_admin_routes(admin_app, store, token=cfg.admin_token())

    async def close_store(_app: web.Application) -> None:
        await store.close()

    admin_app.on_cleanup.append(close_store)
