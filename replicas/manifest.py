"""MANIFEST.json: what a model version consists of (DESIGN.md, Model store layout).

``models/{name}/{version}/MANIFEST.json`` lists every file of the version with its size and
sha256, who pushed it and when. It is written LAST on push: a version without a manifest is
incomplete (an interrupted push) and is never used. The sync agent verifies every file's size
and sha256 against it before installing.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

from replicas.store.base import NotFound, ObjectStore

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
HASH_CHUNK_BYTES = 1024 * 1024
MODELS_PREFIX = "models/"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class ManifestError(ValueError):
    """A manifest that cannot be read or does not match the files."""


def check_model_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '.', '-' (not starting with '.' or '-')")
    return name


def check_version(version: str | int) -> str:
    v = str(version)
    if not v.isdigit() or int(v) < 1 or v != str(int(v)):
        raise ValueError(f"version {version!r}: must be a positive integer (Triton version directory)")
    return v


def version_prefix(name: str, version: str) -> str:
    return f"{MODELS_PREFIX}{name}/{version}/"


def manifest_key(name: str, version: str) -> str:
    return version_prefix(name, version) + MANIFEST_NAME


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the version directory, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    files: list[FileEntry]
    who: str
    when: str  # ISO 8601 UTC
    time_s: float = field(default_factory=time.time)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    def to_bytes(self) -> bytes:
        return orjson.dumps({
            "format": MANIFEST_FORMAT, "name": self.name, "version": self.version,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            "total_bytes": self.total_bytes, "who": self.who, "when": self.when, "time_s": self.time_s,
        }, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "MANIFEST.json") -> Manifest:
        try:
            doc = orjson.loads(data)
            files = []
            for f in doc["files"]:
                path = str(f["path"])
                parts = path.split("/")
                if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or path == MANIFEST_NAME:
                    raise ManifestError(f"{where}: unsafe file path {path!r}")
                files.append(FileEntry(path, int(f["size"]), str(f["sha256"])))
            return cls(name=str(doc["name"]), version=str(doc["version"]), files=files,
                       who=str(doc.get("who", "")), when=str(doc.get("when", "")),
                       time_s=float(doc.get("time_s", 0.0)))
        except ManifestError:
            raise
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: not a valid manifest: {exc}") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _describe(files: dict[str, Path]) -> list[FileEntry]:
    return [FileEntry(rel, p.stat().st_size, sha256_file(p)) for rel, p in sorted(files.items())]


async def build_manifest(name: str, version: str, files: dict[str, Path], *, who: str) -> Manifest:
    """The manifest of local files (relative path -> local file); hashing runs in a thread."""
    entries = await asyncio.to_thread(_describe, files)
    return Manifest(name=name, version=version, files=entries, who=who, when=now_iso())


def verify_file(path: str | Path, entry: FileEntry) -> str | None:
    """None when the file matches its manifest entry; otherwise the reason it does not."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return f"{entry.path}: missing"
    if size != entry.size:
        return f"{entry.path}: size {size} bytes, manifest says {entry.size}"
    digest = sha256_file(p)
    if digest != entry.sha256:
        return f"{entry.path}: sha256 {digest[:16]}... does not match manifest {entry.sha256[:16]}..."
    return None


def verify_dir(directory: str | Path, manifest: Manifest) -> list[str]:
    """Every problem found checking ``directory`` against ``manifest`` (empty: all good)."""
    problems = [p for f in manifest.files if (p := verify_file(Path(directory) / f.path, f))]
    return problems


async def read_manifest(store: ObjectStore, name: str, version: str) -> Manifest | None:
    """The version's manifest, or None when the version is absent or incomplete."""
    try:
        got = await store.get(manifest_key(name, version))
    except NotFound:
        return None
    return Manifest.from_bytes(got.data, where=f"{store.url}/{manifest_key(name, version)}")


@dataclass
class StoredVersion:
    name: str
    version: str
    complete: bool  # has MANIFEST.json
    files: int
    total_bytes: int


async def list_stored_versions(store: ObjectStore, name: str | None = None) -> dict[str, list[StoredVersion]]:
    """Model name -> its versions in the store (numeric order), complete or not."""
    prefix = MODELS_PREFIX + (f"{name}/" if name else "")
    found: dict[tuple[str, str], StoredVersion] = {}
    for obj in await store.list(prefix):
        parts = obj.key[len(MODELS_PREFIX):].split("/", 2)
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        sv = found.setdefault((parts[0], parts[1]), StoredVersion(parts[0], parts[1], False, 0, 0))
        if parts[2] == MANIFEST_NAME:
            sv.complete = True
        else:
            sv.files += 1
            sv.total_bytes += obj.size
    out: dict[str, list[StoredVersion]] = {}
    for (model, _), sv in sorted(found.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        out.setdefault(model, []).append(sv)
    return out
