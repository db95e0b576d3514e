"""Admin API for model versions (the same operations as `geogate models ...`).

    GET  /admin/v1/models                    release records and versions in the store
    GET  /admin/v1/models/{name}             one model (404 when the store knows nothing of it)
    POST /admin/v1/models/{name}/promote     {"version": "2"}
    POST /admin/v1/models/{name}/canary      {"version": "3", "weight": 0.1}   (weight 0 clears)
    POST /admin/v1/models/{name}/rollback    {}
    GET  /admin/v1/status                    every site's status.json

All need ``Authorization: Bearer <token>`` (401 without or malformed, e.g. not printable
ASCII; 403 with a wrong one, 403 when the server has no token configured); never the status
page's session cookie (a browser must not be able to promote on a forged link). Model names
and versions follow core.names (400 otherwise, before any store lookup).
Two kinds of credentials (gateway.front.admin_auth.AdminCredentials), separate from the client API keys:
- a named operator's token from ``[admin] operators_file`` (keys-file format, hashed at rest,
  re-read when it changes; ``python -m gateway.front.auth new-key NAME``): the operator's name is
  what the release history records as ``who``;
- the shared ``[admin] token`` / ``token_env``: POST bodies may add ``"who"`` (recorded in the
  history; default "admin-api").
POST bodies may add ``"if_generation"`` (apply only at that generation). Errors are JSON
``{"error": "..."}``: 400 bad request, 404 unknown model/version, 409 the release record
changed meanwhile (compare-and-swap lost: nothing applied) or the operation does not apply.

Audit: every promote / canary / rollback, applied or refused (credentials included), is one
log line on the ``geogate.audit`` logger with who, what, when, from where and the outcome, and
applied ones are in the model's release history (``who``, ``when``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web

from core.config import Config
from core.names import model_name_problem, version_problem
from gateway.front.admin_auth import AdminCredentials
from replicas.releases.manifest import list_stored_versions
from replicas.releases.records import ConflictError, ReleaseError, Releases, UnknownModel, UnknownVersion
from replicas.releases.site_status import read_all_sites
from replicas.store import ObjectStore, StoreError, StoreUnavailable

PREFIX = "/admin/v1"
DEFAULT_WHO = "admin-api"
MAX_WHO_CHARS = 128
MAX_AUDIT_VALUE_CHARS = 64
audit_log = logging.getLogger("geogate.audit")
log = logging.getLogger("geogate.admin")


def audit(*, who: str, action: str, model: str, status: int, remote: str, detail: dict | None = None,
          error: str = "") -> None:
    """One audit record (JSON logs carry it as the "audit" field; see gateway.server.main's formatter)."""
    entry = {"who": who, "action": action, "model": model[:MAX_AUDIT_VALUE_CHARS], "status": status,
             "remote": remote, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **{k: _audit_value(v) for k, v in (detail or {}).items()}}
    if error:
        entry["error"] = error
    audit_log.info("admin %s %s by %s from %s: %s", action, model, who or "?", remote or "?",
                   "applied" if status == 200 else f"refused ({status}: {error})", extra={"audit": entry})


def _audit_value(value: Any) -> Any:
    """A body value as the audit line shows it: a client's oversized or nested value is cut short."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_AUDIT_VALUE_CHARS else text[:MAX_AUDIT_VALUE_CHARS] + "..."


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    resp = _json({"error": message}, status)
    if headers:
        resp.headers.update(headers)
    return resp


# Per-request storage: the authenticated operator ("" for the shared token), who the history
# records, and the change's detail (for the audit line).
OPERATOR_KEY = web.RequestKey("geogate.operator", str)
WHO_KEY = web.RequestKey("geogate.who", str)
DETAIL_KEY = web.RequestKey("geogate.detail", dict)


def add_model_admin_routes(app: web.Application, store: ObjectStore, *, token: str = "", operators=None,
                           credentials: AdminCredentials | None = None) -> None:
    """`credentials`: the gateway's AdminCredentials; or else `token` (the shared [admin] token)
    and `operators` (a gateway.front.auth.Authenticator over [admin] operators_file, None: none)."""
    releases = Releases(store)
    creds = credentials if credentials is not None else AdminCredentials(token, operators)

    def authorized(request: web.Request) -> web.Response | str:
        """The operator's name ("" for the shared token), or the refusal."""
        check = creds.check_authorization(request.headers.get("Authorization", ""))
        if not check.ok:
            return _error(check.status, check.message, check.http_headers())
        return check.who

    def guarded(handler, action: str = ""):
        async def wrapper(request: web.Request) -> web.StreamResponse:
            who = authorized(request)
            if isinstance(who, web.Response):
                resp = who
            elif bad_name := model_name_problem(request.match_info.get("name", "_")):
                # Same rules as the data path, before any store lookup by that name (a 300-
                # character name was an OSError "File name too long": a 500).
                resp = _error(400, bad_name)
            else:
                request[OPERATOR_KEY] = who
                try:
                    resp = await handler(request)
                except ConflictError as exc:
                    resp = _error(409, str(exc))
                except (UnknownVersion, UnknownModel) as exc:
                    resp = _error(404, str(exc))
                except ReleaseError as exc:
                    resp = _error(409, str(exc))
                except ValueError as exc:
                    resp = _error(400, str(exc))
                except web.HTTPRequestEntityTooLarge:
                    resp = _error(413, "request body is too large for the admin API (an admin request is a small "
                                       "JSON object)")
                except StoreUnavailable as exc:
                    resp = _error(503, f"model store unavailable: {exc}")
                except StoreError as exc:
                    resp = _error(502, f"model store error: {exc}")
                except Exception:  # a bug of ours: a JSON 500, logged, and audited below
                    log.exception("admin API %s %s failed", request.method, request.path)
                    resp = _error(500, "internal error in the admin API (logged by the gateway)")
            if action:  # a change: audited whatever happened
                error = ""
                if resp.status != 200 and isinstance(resp, web.Response) and resp.body:
                    try:
                        error = str(orjson.loads(resp.body).get("error", ""))
                    except (orjson.JSONDecodeError, AttributeError):
                        error = ""
                audit(who=request.get(WHO_KEY, "") or (who if isinstance(who, str) else ""),
                      action=action, model=request.match_info.get("name", ""), status=resp.status,
                      remote=request.remote or "", detail=request.get(DETAIL_KEY), error=error)
            return resp

        return wrapper

    def who_of(request: web.Request, doc: dict[str, Any]) -> str:
        """Who the history records: the operator's own name, or (shared token) the body's "who"."""
        operator = request.get(OPERATOR_KEY, "")
        given = doc.get("who")
        if not operator and given is not None and not (isinstance(given, str) and 0 < len(given) <= MAX_WHO_CHARS
                                                       and given.isprintable()):
            raise ValueError(f"\"who\" must be a non-empty printable string of at most {MAX_WHO_CHARS} "
                             f"characters, got {str(given)[:40]!r}")
        who = operator or given or DEFAULT_WHO
        request[WHO_KEY] = who
        return who

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
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < 2 ** 63):
            raise ValueError(f"'if_generation' must be a non-negative integer, got {str(g)[:40]!r}")
        return g

    def version_of(doc: dict[str, Any]) -> str:
        v = doc.get("version")
        if v is None or isinstance(v, bool) or not isinstance(v, str | int):
            raise ValueError("body needs \"version\": a positive integer or its string (e.g. {\"version\": \"2\"})")
        problem = version_problem(str(v))
        if problem:
            raise ValueError(problem)
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
        who = who_of(request, doc)
        request[DETAIL_KEY] = {"version": doc.get("version")}
        rec = await releases.promote(request.match_info["name"], version_of(doc),
                                     who=who, expected_generation=gen(doc), verify=True)
        return _json({"release": rec.to_dict()})

    async def canary(request: web.Request) -> web.Response:
        doc = await body(request)
        who = who_of(request, doc)
        weight = doc.get("weight")
        request[DETAIL_KEY] = {"version": doc.get("version"), "weight": weight}
        if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0.0 <= weight <= 1.0:
            raise ValueError(f"body needs \"weight\": a number between 0 and 1 (a fraction of traffic), "
                             f"got {str(weight)[:40]!r}")
        rec = await releases.set_canary(request.match_info["name"], version_of(doc), float(weight),
                                        who=who, expected_generation=gen(doc), verify=True)
        return _json({"release": rec.to_dict()})

    async def rollback(request: web.Request) -> web.Response:
        doc = await body(request)
        who = who_of(request, doc)
        name = request.match_info["name"]
        if await releases.get(name) is None:
            return _error(404, f"unknown model {name!r}: no release record")
        rec = await releases.rollback(name, who=who, expected_generation=gen(doc))
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
    app.router.add_post(f"{PREFIX}/models/{{name}}/promote", guarded(promote, "promote"))
    app.router.add_post(f"{PREFIX}/models/{{name}}/canary", guarded(canary, "canary"))
    app.router.add_post(f"{PREFIX}/models/{{name}}/rollback", guarded(rollback, "rollback"))
    app.router.add_get(f"{PREFIX}/status", guarded(status))


def mount(admin_app: web.Application, cfg: Config, *, credentials: AdminCredentials | None = None) -> None:
    """Mount the routes on a gateway's admin listener (the composition root does): the config's
    store (a missing local store directory is not created: routes answer 503 until it exists)
    and the admin credentials (None: made from the config here, e.g. on a test's bare app)."""
    from replicas.store import open_store

    creds = credentials
    watcher = None
    if creds is None:  # not built by the composition root (tests mounting on a bare app)
        from gateway.front.admin_auth import admin_credentials_from_config

        # A broken operators file fails the mount: the routes then do not exist rather than
        # exist without the configured credentials.
        creds = admin_credentials_from_config(cfg)
        if creds.operators is not None:
            operators = creds.operators

            async def start_watch(_app: web.Application) -> None:
                nonlocal watcher
                import asyncio

                watcher = asyncio.get_running_loop().create_task(operators.watch(), name="operators-file-watch")

            admin_app.on_startup.append(start_watch)
    store = open_store(cfg.store.url, cfg.store, base_dir=cfg.base_dir, create=False)
    add_model_admin_routes(admin_app, store, credentials=creds)

    async def close_store(_app: web.Application) -> None:
        if watcher is not None:
            watcher.cancel()
        await store.close()

    admin_app.on_cleanup.append(close_store)
