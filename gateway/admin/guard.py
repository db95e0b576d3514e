"""The admin (and metrics) listener's access rule: which paths stay open, admin credentials on
everything else (bearer token or the status page's session cookie), and the region summary as
the public may see it."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.front.admin_auth import ADMIN_SESSION_COOKIE, AdminCheck, AdminCredentials

JSON = "application/json"


def error_response(message: str, status: int, headers: dict | None = None) -> web.Response:
    return web.Response(body=orjson.dumps({"error": message}), status=status, content_type=JSON, headers=headers)




# Open on the admin listener even with admin credentials: load balancers, Kubernetes probes,
# peer gateways and GeoDNS read these; the region summary without credentials leaves out
# replica URLs, routing and peers (public_region_summary); /ui/login is how a browser gets in.
# (/ui/logout only clears the session cookie.)
ADMIN_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/geogate/v1/region", "/ui/login",
                              "/ui/logout"})
ADMIN_API_PREFIX = "/admin/v1/"  # checked by gateway.admin.models_api itself (audit, operator names)
UI_PAGES = frozenset({"/ui", "/ui/"})
ADMIN_CHECK_KEY = web.RequestKey("geogate.admin_check", AdminCheck)
# What the region summary shows without admin credentials (when they are configured).
PUBLIC_SUMMARY_FIELDS = ("region", "location", "ready", "reason", "replicas", "models", "load", "worker")
REDACTED_NOTE = "pools (replica URLs), routing and peers need admin credentials"


def public_region_summary(summary: dict) -> dict:
    """The region summary as peers and GeoDNS need it (readiness, replica counts, models ready,
    load): no replica URLs, no routing or peer details."""
    out = {k: summary[k] for k in PUBLIC_SUMMARY_FIELDS if k in summary}
    out["redacted"] = REDACTED_NOTE
    return out


def admin_request_check(creds: AdminCredentials, request: web.BaseRequest) -> AdminCheck:
    """Admin credentials of a request: ``Authorization: Bearer <token>``, or (reads only) the
    status page's session cookie."""
    header = request.headers.get("Authorization")
    if header:
        return creds.check_authorization(header)
    cookie = request.cookies.get(ADMIN_SESSION_COOKIE) if request.method in ("GET", "HEAD") else None
    if cookie:
        return creds.check_session(cookie)
    return creds.check_authorization(None)


@web.middleware
async def admin_json_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own 404 / 405 on the admin listener as ``{"error": ...}`` like every other answer."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return error_response(f"Not Found: {request.method} {request.path}", 404)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(f"Method Not Allowed: {request.method} {request.path} (allowed: {allowed})", 405,
                              {"Allow": allowed})


def admin_guard(creds: AdminCredentials, *, open_metrics: bool):
    """aiohttp middleware of the admin (and metrics) listener: 401 / 403 with ``{"error": ...}``
    for requests without valid admin credentials, except ADMIN_OPEN_PATHS, the admin API (its
    own check), /metrics with ``open_metrics``, and /ui?token=... (the page logs in with it).
    A browser asking for /ui without a session is sent to /ui/login."""

    @web.middleware
    async def guard(request: web.Request, handler) -> web.StreamResponse:
        path = request.path
        if path in ADMIN_OPEN_PATHS or path.startswith(ADMIN_API_PREFIX) or (open_metrics and path == "/metrics"):
            return await handler(request)
        if path in UI_PAGES and "token" in request.query:
            return await handler(request)
        check = admin_request_check(creds, request)
        if check.ok:
            request[ADMIN_CHECK_KEY] = check
            return await handler(request)
        if path in UI_PAGES and request.method in ("GET", "HEAD") and "Authorization" not in request.headers:
            raise web.HTTPSeeOther("/ui/login")
        return error_response(f"{request.method} {path} needs admin credentials: {check.message}", check.status,
                              check.http_headers())

    return guard
