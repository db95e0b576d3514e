"""Object stores for model versions, release records and site status (DESIGN.md, Model store
layout). ``open_store(url, store_section)`` picks the implementation by URL scheme."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from replicas.store.base import (
    GetResult,
    NotFound,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
)

__all__ = ["GetResult", "NotFound", "ObjectInfo", "ObjectStore", "PreconditionFailed", "StoreError",
           "StoreUnavailable", "open_store"]


def open_store(url: str, store_section: Any = None, *, base_dir: str = ".", create: bool = True) -> ObjectStore:
    """The store at ``url`` (``file://DIR`` or ``s3://bucket/prefix``).

    ``store_section`` (gateway.config.StoreSection, optional) supplies S3 endpoint, region and
    the names of the environment variables holding credentials. A relative ``file://`` path is
    relative to ``base_dir`` (the config file's directory). ``create``: make a missing local
    store directory (a fresh deployment's first push)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"store URL {url!r}: expected file://DIR or s3://BUCKET/PREFIX")
    if scheme == "file":
        from replicas.store.file_store import FileStore

        root = Path(rest if os.path.isabs(rest) else os.path.join(base_dir, rest))
        if create:
            root.mkdir(parents=True, exist_ok=True)
        return FileStore(root, url=url)
    if scheme == "s3":
        from replicas.store.s3_store import S3Store

        kw: dict[str, str] = {}
        if store_section is not None:
            kw["endpoint_url"] = getattr(store_section, "endpoint_url", "")
            kw["region"] = getattr(store_section, "region", "")
            kw["access_key_id"] = os.environ.get(getattr(store_section, "access_key_id_env", ""), "")
            kw["secret_access_key"] = os.environ.get(getattr(store_section, "secret_access_key_env", ""), "")
        return S3Store(url, **kw)
    raise ValueError(f"store URL {url!r}: unsupported scheme {scheme!r} (file:// or s3://)")


def open_store_from_config(cfg: Any, url_override: str = "") -> ObjectStore:
    """The store a config file names (``[store] url``), or ``url_override`` when given."""
    return open_store(url_override or cfg.store.url, cfg.store, base_dir=cfg.base_dir)
