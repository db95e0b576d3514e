"""The API key format and the keys file: parsing, hashing, new keys.

API keys look like ``gk_<id>_<secret>``: ``id`` (12 hex characters) is not secret and indexes
the key table, so a request costs one dict lookup and one sha256, never a scan. Only
``sha256(salt || secret)`` is stored, with a random per-key salt, compared in constant time
(``hmac.compare_digest``). The secret is 32 random bytes (256 bits), so a fast hash is enough:
there is nothing to brute-force, and key stretching (scrypt) would cost milliseconds per
request for no gain.

The key table lives in a keys file (TOML, or JSON when the name ends in ``.json``)::

    [anonymous]                      # optional: requests without a key
    enabled = true
    models = ["demo"]                # glob patterns (fnmatch, case-sensitive)
    rate_per_s = 5.0                 # token bucket; 0 = unlimited
    burst = 10
    max_concurrent = 4               # 0 = unlimited
    priority = "sheddable"           # critical | standard | sheddable

    [[keys]]
    name = "team-a"                  # shown in logs and messages
    id = "0123456789ab"
    hash = "sha256:<salt hex>:<digest hex>"
    models = ["demo*"]               # default ["*"]
    rate_per_s = 50.0
    burst = 100
    max_concurrent = 8
    priority = "standard"

``python -m gateway.front.auth new-key NAME [--models ...]`` prints a fresh key once, and the
``[[keys]]`` entry to paste. Who checks keys per request: gateway.front.auth.Authenticator.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.kserve import API_KEY_HEADER, AUTHORIZATION_HEADER

KEY_PREFIX = "gk_"
KEY_ID_HEX_CHARS = 12
SECRET_BYTES = 32
SALT_BYTES = 16
HASH_SCHEME = "sha256"
PRIORITIES = ("critical", "standard", "sheddable")
DEFAULT_PRIORITY = "standard"
MAX_TOKEN_CHARS = 256  # longer "keys" are refused before any work
ANONYMOUS_NAME = "anonymous"


class KeysFileError(ValueError):
    """The keys file (or table) is unusable; the message names the file and the key path."""


# ---------------------------------------------------------------------------- key table


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """One key's (or the anonymous client's) identity and limits."""

    name: str
    key_id: str = ""
    salt: bytes = b""
    digest: bytes = b""
    models: tuple[str, ...] = ("*",)
    rate_per_s: float = 0.0  # 0: unlimited
    burst: float = 0.0  # 0: same as rate_per_s
    max_concurrent: int = 0  # 0: unlimited
    priority: str = DEFAULT_PRIORITY

    def limits(self) -> tuple[float, float, int]:
        return self.rate_per_s, self.burst, self.max_concurrent


@dataclass(frozen=True, slots=True)
class KeyTable:
    keys: dict[str, KeyPolicy]  # by key id
    anonymous: KeyPolicy | None  # None: requests without a key are refused


_POLICY_FIELDS = {"models", "rate_per_s", "burst", "max_concurrent", "priority"}
_KEY_FIELDS = {"name", "id", "hash", *_POLICY_FIELDS}
_ANON_FIELDS = {"enabled", *_POLICY_FIELDS}


def _policy_kwargs(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    models = entry.get("models", ["*"])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise KeysFileError(f"{path}.models: must be a list of non-empty glob patterns, got {models!r}")
    kw["models"] = tuple(models)
    for name, kind in (("rate_per_s", float), ("burst", float), ("max_concurrent", int)):
        if name in entry:
            v = entry[name]
            ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 and \
                (kind is float or isinstance(v, int))
            if not ok:
                raise KeysFileError(f"{path}.{name}: must be a {'number' if kind is float else 'integer'} "
                                    f">= 0, got {v!r}")
            kw[name] = kind(v)
    priority = entry.get("priority", DEFAULT_PRIORITY)
    if priority not in PRIORITIES:
        raise KeysFileError(f"{path}.priority: must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    kw["priority"] = priority
    return kw


def _unknown(path: str, entry: dict[str, Any], known: set[str]) -> None:
    extra = sorted(set(entry) - known)
    if extra:
        raise KeysFileError(f"{path}.{extra[0]}: unknown key (known keys here: {', '.join(sorted(known))})")


def parse_hash(path: str, value: Any) -> tuple[bytes, bytes]:
    """(salt, digest) from ``sha256:<salt hex>:<digest hex>``."""
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) != 3 or parts[0] != HASH_SCHEME:
        raise KeysFileError(f"{path}: must be '{HASH_SCHEME}:<salt hex>:<digest hex>' "
                            "(as printed by `python -m gateway.front.auth new-key`)")
    try:
        salt, digest = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        raise KeysFileError(f"{path}: salt and digest must be hex") from None
    if len(digest) != hashlib.sha256().digest_size or not salt:
        raise KeysFileError(f"{path}: digest must be 32 bytes of sha256 and the salt non-empty")
    return salt, digest


def parse_key_table(table: Any, source: str = "<keys>") -> KeyTable:
    """A validated KeyTable from a parsed TOML/JSON document."""
    if not isinstance(table, dict):
        raise KeysFileError(f"{source}: must be a table/object with 'keys' and optional 'anonymous'")
    _unknown(source, table, {"keys", "anonymous"})
    entries = table.get("keys", [])
    if not isinstance(entries, list):
        raise KeysFileError(f"{source}: keys: must be a list of tables ([[keys]])")
    keys: dict[str, KeyPolicy] = {}
    for i, entry in enumerate(entries):
        path = f"{source}: keys[{i}]"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{path}: must be a table")
        _unknown(path, entry, _KEY_FIELDS)
        name, kid = entry.get("name"), entry.get("id")
        if not isinstance(name, str) or not name:
            raise KeysFileError(f"{path}.name: required, a non-empty string")
        if not isinstance(kid, str) or len(kid) != KEY_ID_HEX_CHARS or \
                any(c not in "0123456789abcdef" for c in kid):
            raise KeysFileError(f"{path}.id: must be {KEY_ID_HEX_CHARS} lower-case hex characters, got {kid!r}")
        if kid in keys:
            raise KeysFileError(f"{path}.id: duplicate key id {kid!r} (also used by key {keys[kid].name!r})")
        salt, digest = parse_hash(f"{path}.hash", entry.get("hash"))
        keys[kid] = KeyPolicy(name=name, key_id=kid, salt=salt, digest=digest, **_policy_kwargs(path, entry))
    anonymous = None
    anon = table.get("anonymous")
    if anon is not None:
        path = f"{source}: anonymous"
        if not isinstance(anon, dict):
            raise KeysFileError(f"{path}: must be a table")
        _unknown(path, anon, _ANON_FIELDS)
        enabled = anon.get("enabled", False)
        if not isinstance(enabled, bool):
            raise KeysFileError(f"{path}.enabled: must be true or false, got {enabled!r}")
        if enabled:
            anonymous = KeyPolicy(name=ANONYMOUS_NAME, **_policy_kwargs(path, anon))
    return KeyTable(keys, anonymous)


def read_keys_file(path: str) -> KeyTable:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {path!r}: {exc.strerror}") from None
    try:
        if path.endswith(".json"):
            doc = json.loads(data)
        else:
            doc = tomllib.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise KeysFileError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'TOML'}: {exc}") from None
    return parse_key_table(doc, path)


# ---------------------------------------------------------------------------- tokens


def new_key() -> tuple[str, str, bytes, bytes]:
    """(the key to give the client, its id, salt, sha256 digest)."""
    kid = secrets.token_hex(KEY_ID_HEX_CHARS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)  # may contain '_': the id before it has none
    salt = secrets.token_bytes(SALT_BYTES)
    return f"{KEY_PREFIX}{kid}_{secret}", kid, salt, hash_secret(salt, secret)


def hash_secret(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8", "surrogatepass")).digest()


def hash_field(salt: bytes, digest: bytes) -> str:
    return f"{HASH_SCHEME}:{salt.hex()}:{digest.hex()}"


def split_key(token: str) -> tuple[str, str] | None:
    """(id, secret) of ``gk_<id>_<secret>``, or None when it does not have that shape."""
    if not token.startswith(KEY_PREFIX):
        return None
    kid, sep, secret = token[len(KEY_PREFIX):].partition("_")
    if not sep or len(kid) != KEY_ID_HEX_CHARS or not secret:
        return None
    return kid, secret


def token_from_headers(headers: Mapping[str, str]) -> str | None:
    """The client's key from ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.

    Works with aiohttp's case-insensitive headers and with gRPC metadata as a dict (gRPC
    metadata keys are always lower case)."""
    value = headers.get(AUTHORIZATION_HEADER) or headers.get("Authorization")
    if value:
        scheme, _, rest = value.strip().partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            return rest.strip()
        return value.strip()  # a bare key in Authorization: accept it, the shape check decides
    value = headers.get(API_KEY_HEADER) or headers.get("X-API-Key")
    return value.strip() if value else None


def shown_prefix(text: str) -> str:
    return repr(text[:KEY_ID_HEX_CHARS + len(KEY_PREFIX)])
