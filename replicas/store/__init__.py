"""Object stores for model versions, release records and site status (DESIGN.md, Model store
layout). ``open_store(url, store_section)`` picks the implementation by URL scheme."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from replicas.store.base import (
    Digest,
    GetResult,
    NotFound,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    StoreMissing,
    StoreTimeout,
    StoreUnavailable,
)

__all__ = ["Digest", "GetResult", "NotFound", "ObjectInfo", "ObjectStore", "PreconditionFailed", "StoreError",
           "StoreMissing", "StoreTimeout", "StoreUnavailable", "open_store", "open_store_from_config"]


def open_store(url: str, store_section: Any = None, *, base_dir: str = ".", create: bool = True,
               endpoint_url: str = "", region: str = "") -> ObjectStore:
    """The store at ``url`` (``file://DIR`` or ``s3://bucket/prefix``). Opening touches nothing.

    ``store_section`` (core.config.StoreSection, optional) supplies S3 endpoint, region,
    timeouts, retries and the names of the environment variables holding credentials;
    ``endpoint_url`` / ``region`` override it (``geogate models --s3-endpoint``). A relative
    ``file://`` path is relative to ``base_dir`` (the config file's directory). ``create``:
    writes may make a missing local store directory (an operator's first push); reads never
    do, and with ``create=False`` (sync agents, gateways, read-only commands) a missing
    directory is ``StoreMissing``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"store URL {url!r}: expected file://DIR or s3://BUCKET/PREFIX")
    if scheme == "file":
        from replicas.store.file_store import FileStore

        if endpoint_url:
            raise ValueError(f"an S3 endpoint ({endpoint_url}) needs an s3:// store, not {url!r}")
        if not rest:
            raise ValueError(f"store URL {url!r}: expected file://DIR")
        root = Path(rest if os.path.isabs(rest) else os.path.join(base_dir, rest))
        return FileStore(root, url=url, create=create)
    if scheme == "s3":
        from replicas.store.s3_store import S3Store

        kw: dict[str, Any] = {}
        if store_section is not None:
            kw["endpoint_url"] = getattr(store_section, "endpoint_url", "")
            kw["region"] = getattr(store_section, "region", "")
            kw["access_key_id"] = os.environ.get(getattr(store_section, "access_key_id_env", ""), "")
            kw["secret_access_key"] = os.environ.get(getattr(store_section, "secret_access_key_env", ""), "")
            for name in ("connect_timeout_s", "read_timeout_s", "max_attempts"):
                if hasattr(store_section, name):
                    kw[name] = getattr(store_section, name)
        if endpoint_url:
            kw["endpoint_url"] = endpoint_url
        if region:
            kw["region"] = region
        return S3Store(url, **kw)
    raise ValueError(f"store URL {url!r}: unsupported scheme {scheme!r} (file:// or s3://)")


def open_store_from_config(cfg: Any, url_override: str = "", *, create: bool = False, endpoint_url: str = "",
                           region: str = "") -> ObjectStore:
    """The store a config file names (``[store] url``), or ``url_override`` when given.
    ``create``: see open_store (off: a process run from a config does not make the store)."""
    return open_store(url_override or cfg.store.url, cfg.store, base_dir=cfg.base_dir, create=create,
                      endpoint_url=endpoint_url, region=region)
