"""Installing a version into a site's model repository, atomically, and removing one.

Install: download every file to ``<repository parent>/.staging/``, verify each file's size and
sha256 against MANIFEST.json (and its signature when ``[signing]`` names a public key), then
rename the staged directory to ``<repository>/<name>/<version>``. The rename is the commit
point: a version directory is either complete (it holds MANIFEST.json) or absent. Removal
unpublishes first (one rename out of the repository) and deletes at leisure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from pathlib import Path

from replicas.releases.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    read_manifest,
    signature_problem,
    verify_dir,
)
from replicas.store import ObjectStore, StoreError, StoreUnavailable
from replicas.sync.metrics import SyncMetrics
from replicas.sync.state import ModelState, Target

log = logging.getLogger("geogate.sync")


class VersionRefused(Exception):
    """A version the agent will not install (incomplete, corrupt); the message says why."""


def clean_staging(targets: list[Target]) -> None:
    """A previous run killed mid-download left partial files: start those versions over."""
    for t in targets:
        if t.staging_root.exists():
            log.info("removing leftover staging", extra={"fields": {"path": str(t.staging_root)}})
            shutil.rmtree(t.staging_root, ignore_errors=True)


def installed_versions(t: Target, name: str) -> set[str]:
    """Versions committed to the repository: MANIFEST.json present (the rename put it there)
    and every file it lists present with its size (someone may have deleted files by hand:
    such a version is installed again). Checksums are not re-read every poll."""
    d = t.repository / name
    if not d.is_dir():
        return set()
    out = set()
    for p in d.iterdir():
        if not p.name.isdigit():
            continue
        try:
            manifest = Manifest.from_bytes((p / MANIFEST_NAME).read_bytes())
            if all((p / f.path).stat().st_size == f.size for f in manifest.files):
                out.add(p.name)
            else:
                log.warning("installed version damaged: installing it again", extra={"fields": {"path": str(p)}})
        except (FileNotFoundError, ManifestError):
            continue
    return out


def remove_version(t: Target, name: str, version: str) -> None:
    """Unpublish first (rename out of the repository), then delete at leisure."""
    src = t.repository / name / version
    if not src.exists():
        return
    trash = t.staging_root / f"trash-{name}-{version}-{uuid.uuid4().hex[:8]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, trash)
    shutil.rmtree(trash, ignore_errors=True)
    log.info("removed version", extra={"fields": {"model": name, "version": version,
                                                  "repository": str(t.repository)}})


def _commit(t: Target, name: str, version: str, stage: Path, manifest: Manifest) -> None:
    (stage / MANIFEST_NAME).write_bytes(manifest.to_bytes())
    model_dir = t.repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / version
    if target.exists():  # unmanaged or damaged: move it out of the way first (one rename)
        trash = t.staging_root / f"trash-{name}-{version}-{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(stage, target)  # the commit point
    fd = os.open(model_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Installer:
    """Fetches, stages, verifies and commits versions from the store into repositories."""

    def __init__(self, store: ObjectStore, site: str, metrics: SyncMetrics, *, rate_limit_bytes_per_s: int = 0,
                 manifest_public_key=None) -> None:
        self.store = store
        self.site = site
        self.metrics = metrics
        self.rate_limit_bytes_per_s = rate_limit_bytes_per_s
        # Ed25519 public key ([signing] public_key_file): install only versions it signed.
        self.manifest_public_key = manifest_public_key

    async def install(self, t: Target, name: str, version: str, st: ModelState) -> None:
        """Install `version` of `name` into `t`'s repository; VersionRefused (why) when it is
        incomplete, unsigned or corrupt; StoreUnavailable when the store does not answer."""
        try:
            manifest = await read_manifest(self.store, name, version)
        except ManifestError as exc:
            raise VersionRefused(f"unreadable manifest: {exc}") from None
        if manifest is None:
            raise VersionRefused("incomplete in the store: no MANIFEST.json (an interrupted push?)")
        if self.manifest_public_key is not None:
            problem = signature_problem(manifest, self.manifest_public_key)
            if problem:
                self.metrics.installs.labels(self.site, "refused").inc()
                raise VersionRefused(f"signature check failed, refused: {problem}")
        stage = t.staging_root / name / f"{version}-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(stage.mkdir, parents=True, exist_ok=True)
        total = manifest.total_bytes
        done = 0
        log.info("downloading version", extra={"fields": {"site": self.site, "model": name, "version": version,
                                                          "bytes": total, "repository": str(t.repository)}})
        try:
            for f in manifest.files:
                dest = stage / f.path
                await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
                st.loading[version] = f"downloading {f.path} ({done}/{total} bytes)"
                try:
                    await self.store.download_file(f"models/{name}/{version}/{f.path}", str(dest),
                                                   rate_limit_bytes_per_s=self.rate_limit_bytes_per_s)
                except StoreError as exc:
                    if isinstance(exc, StoreUnavailable):
                        raise
                    raise VersionRefused(f"{f.path}: {exc}") from None
                done += f.size
                self.metrics.downloaded.inc(f.size)
            st.loading[version] = "verifying checksums"
            problems = await asyncio.to_thread(verify_dir, stage, manifest)
            if problems:
                self.metrics.installs.labels(self.site, "refused").inc()
                raise VersionRefused("corrupt, refused: " + "; ".join(problems))
            await asyncio.to_thread(_commit, t, name, version, stage, manifest)
            self.metrics.installs.labels(self.site, "installed").inc()
            log.info("installed version", extra={"fields": {"site": self.site, "model": name,
                                                            "version": version, "repository": str(t.repository)}})
        finally:
            st.loading.pop(version, None)
            await asyncio.to_thread(shutil.rmtree, stage, True)
