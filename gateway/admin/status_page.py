"""The operators' status page and the world view behind it, mounted on a gateway's admin app.

Routes (``add_status_routes``):
- ``GET /ui``                   the page (``gateway/admin/ui/index.html``): world map, regions, replicas,
                                model versions per site, load sparklines, recent events.
- ``GET /ui/static/{name}``     its bundled assets (no external resources: works offline).
- ``GET /geogate/v1/world``     JSON: every region's summary (this gateway's own, plus each peer's
                                ``GET /geogate/v1/region`` fetched from its admin listener, then
                                its HTTP listener), a health verdict per region, model versions
                                per site and recent events from every reachable region.
- ``GET /geogate/v1/events``    Server-Sent Events: the same world JSON every ``SSE_INTERVAL_S``
                                (the page uses it; it falls back to polling ``/world`` when the
                                stream cannot be opened).
- ``GET /geogate/v1/region-events``  this gateway's own recent events (peers merge them).
- ``GET|POST /ui/login``, ``POST /ui/logout``  the page's login with admin credentials.

With admin credentials configured (``[admin] token`` / ``token_env`` / ``operators_file``) every
route above but /ui/login needs them (gateway.front.http_adapter.admin_guard). A browser logs in once:
``/ui/login`` asks for the token (the shared admin token or an operator's key), or the link
``/ui?token=...`` (what ``geogate up`` prints) does it; either sets a session cookie
(``geogate_admin_session``: HttpOnly, SameSite=Strict, Secure on a TLS admin listener, valid
``[admin] session_ttl_s``, signed under a key derived from that credential) and redirects to
``/ui`` without the token in the address bar. The cookie serves reads only: the admin API
(promote, canary, rollback) still wants ``Authorization: Bearer``. Gateways fetch each other's
region summary and events with the shared admin token when there is one (with operator keys
only, peers' replica details and events are not shown).

A peer that cannot be fetched is shown as unreachable (``health: "down"``, with the error as
the reason) rather than failing the whole view: during an outage this page is what operators
look at. The world is computed at most once per ``WORLD_CACHE_S`` however many pages watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import aiohttp
import orjson
from aiohttp import web

from core.config import Config, RegionSection
from gateway.front.admin_auth import ADMIN_SESSION_COOKIE, AdminCheck, AdminCredentials

if TYPE_CHECKING:
    from gateway.server.region_state import RegionState

log = logging.getLogger("geogate.status_page")

UI_DIR = Path(__file__).with_name("ui")
# Only these files are served from UI_DIR: nothing else there (the build script) leaks out.
STATIC_FILES: dict[str, str] = {
    "index.html": "text/html",
    "app.js": "application/javascript",
    "style.css": "text/css",
    "coastline.json": "application/json",
}
PEER_TIMEOUT_S = 1.5          # per listener tried; a hung peer must not stall the page
WORLD_CACHE_S = 0.5           # many watchers share one round of peer fetches
SSE_INTERVAL_S = 1.0
SSE_RETRY_MS = 2000           # browser reconnect delay after the stream drops
MAX_EVENTS = 50               # events in the world view, newest first, all regions merged
SAME_EVENT_WINDOW_S = 10.0    # identical events from several regions this close are one event
MAX_LOCAL_EVENTS = 200        # events a gateway remembers about itself
EVENT_SAMPLE_INTERVAL_S = 0.5  # how often a gateway looks for changes worth an event

HEALTHY = "healthy"
DEGRADED = "degraded"
DOWN = "down"


@runtime_checkable
class SummarySource(Protocol):
    """What the gateway hands the status page.

    ``events`` holds recent event dicts ``{"time": unix_s, "kind": "failover"|"promotion"|
    "ejection"|..., "message": str}`` (a ``deque(maxlen=...)``; newest appended last).
    Optionally, the source may also have ``async def model_status() -> dict`` giving release
    records and per-site sync state: ``{model: {"stable": "2", "canary": {"version": "3",
    "weight": 0.1} | None, "sites": {site: {"ready": [...], "loading": [...], "failed": [...]}}}}``;
    without it the page shows what each region's summary reports as ready.
    """

    region: str
    config: Config
    events: Iterable[dict]  # a deque(maxlen=...) in practice

    async def region_summary(self) -> dict: ...


def region_health(summary: dict | None, error: str = "") -> tuple[str, str]:
    """(verdict, reason): ``down`` when unreachable or not ready, ``degraded`` when some replica
    is unhealthy or a pool is in panic, else ``healthy``."""
    if summary is None:
        return DOWN, f"unreachable: {error}" if error else "unreachable"
    if not summary.get("ready", False):
        return DOWN, summary.get("reason") or "not ready"
    replicas = summary.get("replicas") or {}
    healthy, total = int(replicas.get("healthy", 0)), int(replicas.get("total", 0))
    pools = summary.get("pools") or []
    panicking = [p.get("name", "?") for p in pools if p.get("panic")]
    if panicking:
        return DEGRADED, f"pool {', '.join(panicking)} in panic mode ({healthy}/{total} replicas healthy)"
    if healthy < total:
        return DEGRADED, f"{total - healthy} of {total} replicas unhealthy"
    # Healthy by probe but not routable (ejected by outlier detection, draining) also degrades.
    blocked = [r for p in pools for r in p.get("replicas") or [] if r.get("routable") is False]
    if blocked:
        kinds = sorted({r.get("reason") or "not routable" for r in blocked})
        return DEGRADED, f"{len(blocked)} of {total} replicas not routable ({', '.join(kinds)})"
    return HEALTHY, summary.get("reason") or ""


def _event_dict(event: dict, region: str) -> dict:
    return {"time": float(event.get("time", 0.0)), "kind": str(event.get("kind", "event")),
            "message": str(event.get("message", "")), "region": str(event.get("region") or region)}


class WorldView:
    """Builds the world JSON: local summary + peers' summaries, cached for WORLD_CACHE_S."""

    def __init__(self, source: SummarySource):
        self.source = source
        self._session: aiohttp.ClientSession | None = None
        self._cached: dict | None = None
        self._cached_at_s = 0.0
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Loopback and private peers only: never read proxy settings from the environment.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_S), trust_env=False)
        return self._session

    async def get(self) -> dict:
        async with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached_at_s >= WORLD_CACHE_S:
                self._cached = await self._build()
                self._cached_at_s = time.monotonic()
            return self._cached

    def local_events(self) -> list[dict]:
        return [_event_dict(e, self.source.region) for e in list(self.source.events)]

    async def _local(self, region: RegionSection) -> dict:
        try:
            summary = await self.source.region_summary()
            return {"summary": summary, "error": "", "events": self.local_events(), "via": "local"}
        except Exception as exc:  # the page must render even when the gateway's own summary fails
            log.exception("own region summary failed")
            return {"summary": None, "error": f"own summary failed: {exc!r}", "events": self.local_events(),
                    "via": "local"}

    def _peer_headers(self) -> dict[str, str]:
        """The shared admin token for peers' protected views (their full region summary and
        events); without it peers answer the public summary and no events."""
        token = self.source.config.admin_token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _fetch_json(self, url: str, headers: dict[str, str] | None = None) -> dict:
        async with self._client().get(url, headers=headers) as resp:
            if resp.status != 200:
                body = (await resp.text())[:200]
                raise RuntimeError(f"HTTP {resp.status} from {url}: {body}")
            return await resp.json(loads=orjson.loads, content_type=None)

    async def _peer(self, region: RegionSection) -> dict:
        errors = []
        for listener in (region.admin, region.http):
            base = f"http://{listener}"
            # The admin token goes to the peer's admin listener only, never to its client listener.
            headers = self._peer_headers() if listener == region.admin else None
            try:
                summary = await self._fetch_json(f"{base}/geogate/v1/region", headers)
            except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as exc:
                errors.append(f"{listener} {_describe(exc)}")
                if isinstance(exc, TimeoutError):
                    break  # a hung host: its other listener would only add another timeout
                continue
            events: list[dict] = []
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, RuntimeError, ValueError):
                # Best effort: a peer without the status routes simply contributes no events.
                got = await self._fetch_json(f"{base}/geogate/v1/region-events", headers)
                events = [_event_dict(e, region.name) for e in got.get("events", [])]
            return {"summary": summary, "error": "", "events": events, "via": base}
        return {"summary": None, "error": "; ".join(errors), "events": [], "via": ""}

    async def _model_status(self) -> dict:
        hook = getattr(self.source, "model_status", None)
        if hook is None:
            return {}
        try:
            return await hook() or {}
        except Exception as exc:
            log.warning("model_status failed: %r", exc)
            return {}

    async def _build(self) -> dict:
        config = self.source.config
        regions = list(config.regions)
        tasks = [self._local(r) if r.name == self.source.region else self._peer(r) for r in regions]
        results, model_status = await asyncio.gather(asyncio.gather(*tasks), self._model_status())
        out_regions = []
        events: list[dict] = []
        for region, got in zip(regions, results, strict=True):
            summary = got["summary"]
            health, reason = region_health(summary, got["error"])
            location = (summary or {}).get("location") or list(region.location)
            out_regions.append({
                "name": region.name,
                "location": location,
                "local": region.name == self.source.region,
                "reachable": summary is not None,
                "health": health,
                "reason": reason,
                "via": got["via"],
                "summary": summary,
            })
            events.extend(got["events"])
        return {
            "deployment": config.deployment.name,
            "served_by": self.source.region,
            "generated_at": time.time(),
            "regions": out_regions,
            "models": merge_models(out_regions, model_status),
            "events": merge_events(events)[:MAX_EVENTS],
        }


def merge_events(events: list[dict]) -> list[dict]:
    """Newest first; the same event seen by several gateways (a promotion every region notices
    in the store) is listed once, naming every region that reported it."""
    out: list[dict] = []
    for e in sorted(events, key=lambda e: e["time"]):
        for seen in reversed(out[-MAX_EVENTS:]):
            if (seen["kind"], seen["message"]) == (e["kind"], e["message"]) \
                    and e["time"] - seen["time"] <= SAME_EVENT_WINDOW_S:
                if e["region"] not in seen["regions"]:
                    seen["regions"].append(e["region"])
                    seen["region"] = ", ".join(seen["regions"])
                break
        else:
            out.append({**e, "regions": [e["region"]]})
    out.reverse()
    return out


def merge_models(regions: list[dict], model_status: dict) -> dict:
    """Model versions per site: release records (stable/canary) and sync state from
    ``model_status`` when the source provides it, plus what each reachable region reports ready."""
    models: dict[str, dict[str, Any]] = {}
    for name, status in (model_status or {}).items():
        entry = {"stable": status.get("stable"), "canary": status.get("canary"),
                 "effective": status.get("effective", status.get("stable")), "sites": {}}
        for site, v in (status.get("sites") or {}).items():
            entry["sites"][site] = {**v, "ready": list(v.get("ready", [])), "loading": list(v.get("loading", [])),
                                    "failed": list(v.get("failed", []))}
        models[name] = entry
    for region in regions:
        summary = region.get("summary")
        if not summary:
            continue
        for name, info in (summary.get("models") or {}).items():
            entry = models.setdefault(name, {"stable": None, "canary": None, "effective": None, "sites": {}})
            site = entry["sites"].setdefault(region["name"], {"ready": [], "loading": [], "failed": []})
            # The gateway's live view of its replicas is fresher than a site status file.
            site["ready"] = sorted(set(info.get("ready_versions", [])), key=_version_key)
            site["loading"] = [v for v in site["loading"] if v not in site["ready"]]
    return models


# ---------------------------------------------------------------- events from state changes


class ChangeEvents:
    """Turns successive region summaries and release records into operator events.

    The gateway's state is sampled every EVENT_SAMPLE_INTERVAL_S (whether or not anyone is
    watching) and compared with the previous sample: a replica failing or passing its health
    checks, an ejection by outlier detection, the region losing or regaining every routable
    replica (peers take its traffic: a failover), a new stable version (promotion or rollback)
    or a canary change. The first sample is the baseline and makes no events.
    """

    def __init__(self, region: str, maxlen: int = MAX_LOCAL_EVENTS):
        self.region = region
        self.events: deque[dict] = deque(maxlen=maxlen)
        self._replicas: dict[str, tuple[bool, bool]] | None = None
        self._ready: bool | None = None
        self._releases: dict[str, tuple[Any, Any]] | None = None

    def _add(self, now_s: float, kind: str, message: str) -> None:
        self.events.append({"time": now_s, "kind": kind, "message": message, "region": self.region})

    def observe(self, summary: dict, releases: dict | None, now_s: float) -> None:
        # A replica never probed yet is unknown, not unhealthy: no "unhealthy" then "recovery"
        # noise for every replica when a gateway starts.
        replicas = {r["url"]: r for p in summary.get("pools") or [] for r in p.get("replicas") or []
                    if r.get("healthy") or r.get("last_probe_age_s") is not None}
        if self._replicas is not None:
            for url, r in replicas.items():
                healthy, ejected = bool(r.get("healthy")), bool(r.get("ejected"))
                was = self._replicas.get(url)
                if was is None:
                    continue  # first seen (new member or first probe): the baseline
                if was[0] and not healthy:
                    why = r.get("health_reason") or r.get("last_probe_error") or "failed health checks"
                    self._add(now_s, "unhealthy", f"replica {url} is unhealthy: {why}")
                elif healthy and not was[0]:
                    self._add(now_s, "recovery", f"replica {url} is healthy again")
                if ejected and not was[1]:
                    self._add(now_s, "ejection", f"replica {url} ejected for {r.get('ejected_for_s', 0):g} s: "
                                                 f"{r.get('eject_reason') or 'outlier detection'}")
            all_urls = {r["url"] for p in summary.get("pools") or [] for r in p.get("replicas") or []}
            for url in self._replicas.keys() - all_urls:
                self._add(now_s, "membership", f"replica {url} left (removed from config or discovery)")
        self._replicas = {u: (bool(r.get("healthy")), bool(r.get("ejected"))) for u, r in replicas.items()}

        ready = bool(summary.get("ready"))
        if self._ready is None and not ready and not replicas:
            pass  # nothing probed yet: the region's readiness is not known
        else:
            if self._ready is not None and ready != self._ready:
                if ready:
                    self._add(now_s, "failback", f"region {self.region} can serve again; it takes its traffic back")
                else:
                    self._add(now_s, "failover", f"region {self.region} cannot serve "
                                                 f"({summary.get('reason') or 'not ready'}); peers take its traffic")
            self._ready = ready

        if releases is None:
            return
        current = {m: (info.get("stable"), _canary_key(info.get("canary"))) for m, info in releases.items()}
        if self._releases is not None:
            for model, (stable, canary) in current.items():
                old_stable, old_canary = self._releases.get(model, (None, None))
                if stable != old_stable and stable is not None:
                    self._add(now_s, "promotion", f"{model}: version {stable} is now stable"
                                                  + (f" (was {old_stable})" if old_stable else ""))
                if canary != old_canary:
                    if canary is None:
                        self._add(now_s, "canary", f"{model}: canary {old_canary[0]} ended")
                    else:
                        self._add(now_s, "canary", f"{model}: canary version {canary[0]} "
                                                   f"takes {canary[1] * 100:g}% of traffic")
        self._releases = current


def _canary_key(canary: Any) -> tuple[str, float] | None:
    if not canary or not canary.get("version"):
        return None
    return str(canary["version"]), float(canary.get("weight", 0.0))


def resolver_model_status(resolver: Any) -> dict | None:
    """Release records and per-site sync state held by the store's version resolver
    (replicas.releases.resolver.VersionResolver), in the ``model_status`` shape; None without one."""
    records = getattr(resolver, "records", None)
    if records is None:
        return None
    snap = {}
    with contextlib.suppress(Exception):
        snap = resolver.snapshot().get("models", {})
    out: dict[str, dict[str, Any]] = {}
    for name, rec in records.items():
        out[name] = {"stable": rec.stable, "canary": rec.canary,
                     "effective": (snap.get(name) or {}).get("effective", rec.stable), "sites": {}}
    now_s = time.time()
    for site, status in (getattr(resolver, "sites", None) or {}).items():
        for model, ms in status.models.items():
            entry = out.setdefault(model, {"stable": None, "canary": None, "effective": None, "sites": {}})
            entry["sites"][site] = {"ready": list(ms.ready), "loading": list(ms.loading),
                                    "failed": sorted(ms.failed), "errors": dict(ms.failed),
                                    "heartbeat_age_s": round(status.age_s(now_s), 1)}
    return out


class GatewaySummarySource:
    """The SummarySource of a running gateway (gateway.server.region_state.RegionState)."""

    def __init__(self, gw: RegionState):
        self.gw = gw
        self.region = gw.region.name
        self.config = gw.cfg
        self.changes = ChangeEvents(self.region)

    @property
    def events(self) -> list[dict]:
        # Events the gateway records itself (if it keeps any), plus those seen in state changes.
        own = list(self.gw.events)
        return sorted([*own, *self.changes.events], key=lambda e: e.get("time", 0.0))

    async def region_summary(self) -> dict:
        from gateway.admin.region_summary import region_summary

        summary = region_summary(self.gw)
        # Requests outstanding per replica, when the summary doesn't carry them already.
        for pool_json, pool in zip(summary.get("pools") or [], self.gw.pools.pools, strict=False):
            by_url = {s.url: pool.upstream_of(s) for s in pool.states}
            for rep in pool_json.get("replicas") or []:
                up = by_url.get(rep.get("url"))
                if "outstanding" not in rep and up is not None:
                    rep["outstanding"] = getattr(up.load, "outstanding", None)
        return summary

    async def model_status(self) -> dict:
        return resolver_model_status(self.gw.resolver) or {}

    async def sample_forever(self) -> None:
        while True:
            try:
                summary = await self.region_summary()
                self.changes.observe(summary, resolver_model_status(self.gw.resolver), time.time())
            except Exception:
                log.exception("status page: sampling the gateway state failed")
            await asyncio.sleep(EVENT_SAMPLE_INTERVAL_S)


def mount(app: web.Application, gw: RegionState, *, credentials: AdminCredentials | None) -> None:
    """Called by the composition root on the admin app: the status page for this gateway, and a
    background sampler that turns state changes into events."""
    source = GatewaySummarySource(gw)
    add_status_routes(app, summary_source=source, credentials=credentials,
                      secure_cookie=gw.cfg.tls.admin)
    task: asyncio.Task | None = None

    async def start_sampler(_app: web.Application) -> None:
        nonlocal task
        task = asyncio.create_task(source.sample_forever())

    async def stop_sampler(_app: web.Application) -> None:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.on_startup.append(start_sampler)
    app.on_cleanup.append(stop_sampler)


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if str(v).isdigit() else (1, str(v))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {PEER_TIMEOUT_S:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused"
        return f"connection failed: {exc.os_error.strerror or exc.os_error}"
    return str(exc) or type(exc).__name__


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="dark light"><title>geogate status: log in</title><link rel="icon" href="data:,">
<style>body{{font:15px system-ui,sans-serif;display:grid;place-items:center;min-height:90vh;margin:0}}
form{{display:grid;gap:.6em;min-width:22em}}input{{font:inherit;padding:.4em}}p.err{{color:#c0392b}}</style>
</head><body><form method="post" action="/ui/login"><h2>geogate status</h2>{error}
<label for="token">Admin token (the shared admin token, or your operator key)</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<button type="submit">Log in</button></form></body></html>
"""
MAX_LOGIN_BODY_BYTES = 4096


def login_page(error: str = "", status: int = 200) -> web.Response:
    text = LOGIN_PAGE.format(error=f'<p class="err">{html.escape(error)}</p>' if error else "")
    return web.Response(text=text, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def add_login_routes(app: web.Application, credentials: AdminCredentials, *, secure_cookie: bool) -> None:
    """/ui/login (form and POST), /ui/logout; ``logged_in`` turns an accepted token into the
    session cookie and a redirect to /ui."""

    async def login_form(_request: web.Request) -> web.Response:
        return login_page()

    async def login(request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_LOGIN_BODY_BYTES:
            return login_page("the form is too large", 413)
        try:
            form = await request.post()
        except (ValueError, web.HTTPException):
            return login_page("the form could not be read", 400)
        token = form.get("token")
        return logged_in(credentials, credentials.check_token(token if isinstance(token, str) else None),
                         secure_cookie=secure_cookie)

    async def logout(_request: web.Request) -> web.Response:
        resp = _see_other("/ui/login")
        resp.del_cookie(ADMIN_SESSION_COOKIE, path="/")
        return resp

    app.router.add_get("/ui/login", login_form)
    app.router.add_post("/ui/login", login)
    app.router.add_post("/ui/logout", logout)


def logged_in(credentials: AdminCredentials, check: AdminCheck, *, secure_cookie: bool) -> web.Response:
    """The answer to a login attempt: the session cookie and 303 to /ui, or the form again (401)."""
    if not check.ok:
        return login_page(check.message, 401 if check.status == 401 else 403)
    resp = _see_other("/ui")
    resp.set_cookie(ADMIN_SESSION_COOKIE, credentials.session_cookie(check), max_age=int(credentials.session_ttl_s),
                    path="/", httponly=True, samesite="Strict", secure=secure_cookie)
    return resp


def add_status_routes(app: web.Application, *, summary_source: SummarySource,
                      credentials: AdminCredentials | None = None, secure_cookie: bool = False) -> None:
    """Register the status page routes on ``app`` (the gateway's admin application).
    ``credentials`` (configured): the login routes too (the listener's guard checks the rest)."""
    view = WorldView(summary_source)
    # Set on app shutdown so open event streams end at once instead of holding the
    # server's graceful shutdown for its whole timeout.
    stopping = asyncio.Event()
    protected = credentials is not None and credentials.configured

    async def page(request: web.Request) -> web.StreamResponse:
        if protected and "token" in request.query:  # the link geogate up prints: log in with it
            return logged_in(credentials, credentials.check_token(request.query.get("token")),
                             secure_cookie=secure_cookie)
        return web.FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache",
                                                                "Content-Type": "text/html; charset=utf-8"})

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            return _json({"error": f"no static file {name!r} (have: {', '.join(sorted(STATIC_FILES))})"}, 404)
        return web.FileResponse(UI_DIR / name, headers={"Cache-Control": "no-cache",
                                                        "Content-Type": f"{STATIC_FILES[name]}; charset=utf-8"})

    async def world(_request: web.Request) -> web.Response:
        return _json(await view.get())

    async def region_events(_request: web.Request) -> web.Response:
        return _json({"region": summary_source.region, "events": view.local_events()})

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        try:
            await resp.write(f"retry: {SSE_RETRY_MS}\n\n".encode())
            while not stopping.is_set():
                data = orjson.dumps(await view.get())
                await resp.write(b"event: world\ndata: " + data + b"\n\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), SSE_INTERVAL_S)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the browser went away
        return resp

    async def stop_streams(_app: web.Application) -> None:
        stopping.set()

    async def close_view(_app: web.Application) -> None:
        await view.close()

    app.router.add_get("/ui", page)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/static/{name}", static)
    app.router.add_get("/geogate/v1/world", world)
    app.router.add_get("/geogate/v1/events", events)
    app.router.add_get("/geogate/v1/region-events", region_events)
    if protected:
        add_login_routes(app, credentials, secure_cookie=secure_cookie)
    app.on_shutdown.append(stop_streams)
    app.on_cleanup.append(close_view)
