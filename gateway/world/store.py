"""The world's object store for `geogate up`: seed the demo model, report what is stable.

Seeding puts v1 (pushed and promoted) and v2 (pushed, not promoted) of the demo model in the
store, so an operator can try `geogate models promote demo 2` right away. Idempotent: a
restarted world keeps what operators did since.

The store must exist first: a local world makes a missing file:// directory itself (it is the
world's store), but an S3 bucket is a real resource: without ``--create-bucket`` a missing
bucket stops `geogate up` with an error that names the flag.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.world.plan import WorldError

DEMO_MODEL = "demo"
DEMO_INPUT = "INPUT0"
DEMO_OUTPUT = "OUTPUT0"
DEMO_FEATURES = 16
SEEDED_BY = "geogate-up"


@dataclass
class ModelInfo:
    """A model with a stable version in the store, as `geogate up` found it."""

    name: str
    stable: str
    versions: list[str]  # complete versions, numeric order
    previous: list[str]

    def describe(self) -> str:
        return f"{self.name} (stable v{self.stable}; versions {', '.join(self.versions)})"


def main_model(models: dict[str, ModelInfo]) -> str:
    """The model the printed commands use: the demo model when there, else the first one."""
    return DEMO_MODEL if DEMO_MODEL in models or not models else next(iter(models))


async def ensure_store(store: Any, *, create_bucket: bool, say: Callable[[str], None]) -> None:
    """Make sure the store exists: a missing file:// directory is made; a missing S3 bucket is
    created with ``create_bucket``, otherwise a WorldError names the flag."""
    from replicas.store import StoreMissing

    try:
        await store.check()
        return
    except StoreMissing as exc:
        if store.url.startswith("s3://") and not create_bucket:
            raise WorldError(f"{exc}: create the bucket, or run `geogate up --create-bucket` to have "
                             "geogate up create it") from None
    await store.create()
    say(f"created the store {store.url}" + (f" (bucket at {store.endpoint})" if store.url.startswith("s3://")
                                           else ""))


async def prepare_store(cfg: Any, seed_dir: Path, *, seed: bool, only_if_empty: bool, create_bucket: bool = False,
                        say: Callable[[str], None] = lambda _msg: None) -> dict[str, ModelInfo]:
    """Make sure the store exists (``ensure_store``), seed the demo model (unless ``seed`` is
    False; with ``only_if_empty`` only into a store that holds no model). Returns the models
    with a stable version (what the world waits for)."""
    from replicas.demo import onnx_model as demo_model
    from replicas.releases.manifest import list_stored_versions
    from replicas.releases.models_cli import push_version
    from replicas.releases.records import Releases
    from replicas.store import open_store_from_config

    store = open_store_from_config(cfg)
    try:
        await ensure_store(store, create_bucket=create_bucket, say=say)
        stored = await list_stored_versions(store)
        releases = Releases(store)
        if seed and not (only_if_empty and stored):
            have = {v.version for v in stored.get(DEMO_MODEL, []) if v.complete}
            for version in (1, 2):
                if str(version) not in have:
                    await asyncio.to_thread(demo_model.write_repository_entry, seed_dir, version, size="tiny")
                    await push_version(store, DEMO_MODEL, seed_dir / DEMO_MODEL, version=str(version),
                                       who=SEEDED_BY)
            rec = (await releases.all()).get(DEMO_MODEL)
            if rec is None or not rec.stable:
                await releases.promote(DEMO_MODEL, "1", who=SEEDED_BY)
            stored = await list_stored_versions(store)
        return {name: ModelInfo(name, rec.stable, [v.version for v in stored.get(name, []) if v.complete],
                                list(rec.previous))
                for name, rec in sorted((await releases.all()).items()) if rec.stable}
    finally:
        await store.close()
