"""The admin listener's credentials: the shared ``[admin] token`` and the named operators of
``[admin] operators_file`` (an Authenticator over a keys file), plus signed browser sessions
for the status page."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.front.api_keys import KEY_ID_HEX_CHARS, KEY_PREFIX, MAX_TOKEN_CHARS
from gateway.front.auth import Authenticator

ADMIN_SESSION_COOKIE = "geogate_admin_session"
ADMIN_REALM = 'Bearer realm="geogate-admin"'
DEFAULT_SESSION_TTL_S = 12 * 3600
_SESSION_VERSION = "v1"
_SESSION_KEY_LABEL = b"geogate-admin-session\0"
_SHARED_TOKEN_ID = "-"  # the session cookie's key id for the shared [admin] token


@dataclass(frozen=True, slots=True)
class AdminCheck:
    """The answer to "may this request use the admin listener?". ``who``: the operator's name
    ("" for the shared token); ``key_id``: the operator key's id ("" for the shared token)."""

    ok: bool
    status: int = 200  # 401: no or malformed credentials; 403: wrong ones
    message: str = ""
    who: str = ""
    key_id: str = ""

    def http_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": ADMIN_REALM} if self.status == 401 else {}


def _admin_refusal(status: int, message: str) -> AdminCheck:
    return AdminCheck(False, status, message)


class AdminCredentials:
    """The admin listener's credentials: the shared ``[admin] token`` / ``token_env`` and the
    named operators of ``[admin] operators_file`` (an Authenticator over a keys file).

    ``configured`` is False when neither is set: the admin API is then disabled and the rest
    of the admin listener is open, as before admin credentials existed.

    Browser sessions (the status page): ``session_cookie`` signs ``(key id, expiry)`` with
    HMAC-SHA256 under a key derived from the credential itself (the shared token, or the
    operator key's stored digest), so every worker and every gateway of the deployment accepts
    it without shared state, and rotating the token or revoking the operator key ends it.
    """

    def __init__(self, token: str = "", operators: Authenticator | None = None, *,
                 session_ttl_s: float = DEFAULT_SESSION_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.token = token
        self.operators = operators
        self.session_ttl_s = session_ttl_s
        self.clock = clock

    @property
    def configured(self) -> bool:
        return bool(self.token) or self.operators is not None

    def check_token(self, given: str | None) -> AdminCheck:
        """A bearer token: the shared token or an operator key (``gk_...``)."""
        if not given:
            return _admin_refusal(401, "missing admin credentials: send 'Authorization: Bearer <admin token>'")
        if len(given) > MAX_TOKEN_CHARS or not (given.isascii() and given.isprintable()):
            # Tokens are printable ASCII; anything else (undecodable header bytes arrive as lone
            # surrogates) cannot match and must not reach .encode() (it raised: a 500).
            return _admin_refusal(401, "malformed admin token: expected printable ASCII, at most "
                                       f"{MAX_TOKEN_CHARS} characters")
        if not self.configured:
            return _admin_refusal(403, "admin API disabled: no admin token configured ([admin] token / token_env / "
                                       "operators_file)")
        if self.operators is not None and given.startswith(KEY_PREFIX):
            decision = self.operators.authorize(given, None, limits=False)
            if decision.allowed:
                return AdminCheck(True, who=decision.key_name, key_id=given[len(KEY_PREFIX):][:KEY_ID_HEX_CHARS])
            return _admin_refusal(403, f"invalid operator token: {decision.message}")
        if not self.token or not hmac.compare_digest(given.encode(), self.token.encode()):
            return _admin_refusal(403, "invalid admin token")
        return AdminCheck(True)

    def check_authorization(self, header: str | None) -> AdminCheck:
        """An ``Authorization: Bearer <token>`` header value."""
        if not header:
            return _admin_refusal(401, "missing 'Authorization: Bearer <token>' header")
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return _admin_refusal(401, "Authorization header must be 'Bearer <token>'")
        return self.check_token(given)

    # ------------------------------------------------------------------ browser sessions

    def _session_key(self, key_id: str) -> bytes | None:
        if key_id == _SHARED_TOKEN_ID:
            secret = self.token.encode() if self.token else None
        else:
            secret = self.operators.session_secret(key_id) if self.operators is not None else None
        return hashlib.sha256(_SESSION_KEY_LABEL + secret).digest() if secret else None

    def session_cookie(self, check: AdminCheck) -> str:
        """The cookie value for an accepted ``check`` (valid for ``session_ttl_s``)."""
        key_id = check.key_id or _SHARED_TOKEN_ID
        key = self._session_key(key_id)
        if key is None:
            raise ValueError("no credential to sign a session with")
        payload = f"{_SESSION_VERSION}.{key_id}.{int(self.clock() + self.session_ttl_s)}"
        return payload + "." + hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()

    def check_session(self, cookie: str | None) -> AdminCheck:
        if not cookie:
            return _admin_refusal(401, "no admin session: log in at /ui/login")
        parts = cookie.split(".")
        if len(parts) != 4 or parts[0] != _SESSION_VERSION or not parts[2].isdigit() or not cookie.isascii():
            return _admin_refusal(401, "malformed admin session cookie: log in again at /ui/login")
        key_id, expires = parts[1], int(parts[2])
        key = self._session_key(key_id)
        expected = hmac.new(key, ".".join(parts[:3]).encode(), hashlib.sha256).hexdigest() if key else ""
        if not key or not hmac.compare_digest(expected, parts[3]):
            return _admin_refusal(401, "admin session not valid (token rotated or operator key revoked): "
                                       "log in again at /ui/login")
        if expires < self.clock():
            return _admin_refusal(401, "admin session expired: log in again at /ui/login")
        who = ""
        if key_id != _SHARED_TOKEN_ID and self.operators is not None:
            who = self.operators.key_name(key_id)
        return AdminCheck(True, who=who, key_id="" if key_id == _SHARED_TOKEN_ID else key_id)


def admin_credentials_from_config(cfg: Any) -> AdminCredentials:
    """The gateway's AdminCredentials from ``[admin]`` (a broken operators file raises
    KeysFileError: the gateway must not start with its admin listener less protected than
    configured). The operators file is re-read by ``operators.watch()`` (started by the gateway)."""
    operators = None
    if cfg.admin.operators_file:
        operators = Authenticator(cfg.resolve_path(cfg.admin.operators_file), check_on_request=False)
    return AdminCredentials(cfg.admin_token(), operators, session_ttl_s=cfg.admin.session_ttl_s)
