"""Release records: which version of a model is stable, which is the canary (DESIGN.md).

``releases/{name}.json``::

    {"name": "demo", "stable": "2", "canary": {"version": "3", "weight": 0.1},
     "previous": ["1"], "generation": 7,
     "history": [{"generation": 7, "action": "canary", "version": "3", "weight": 0.1,
                  "stable": "2", "who": "alice", "when": "2026-...Z"}, ...]}

Every change is read-modify-write with compare-and-swap on the record's ETag. If another
operator changed the record in between, the write fails and the operation raises
``ConflictError`` naming what they did: nothing is silently overwritten, the history stays
complete, and the operator re-reads and decides again.

Semantics:
- ``promote V``: V becomes stable; the old stable goes to the front of ``previous``; a canary
  of V is cleared (it graduated).
- ``canary V --weight W``: V gets fraction W (0 < W <= 1) of unversioned traffic; W = 0
  clears the canary.
- ``rollback``: undoes the riskiest thing first: an active canary is cleared; with no canary,
  the stable goes back to the most recent previous stable.

``promote`` and ``canary`` with ``verify=True`` (the CLI's and the admin API's default) first
check every file of the version in the store against MANIFEST.json (size and sha256,
streamed): a corrupt version raises ``CorruptVersion`` and the record is not touched.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from replicas.releases.manifest import (
    ManifestError,
    check_model_name,
    check_version,
    now_iso,
    read_manifest,
    verify_in_store,
)
from replicas.store.base import NotFound, ObjectStore, PreconditionFailed

RELEASES_PREFIX = "releases/"
MAX_PREVIOUS = 10  # previous stables remembered for rollback
MAX_HISTORY = 500  # history entries kept in the record (oldest dropped first)


class ReleaseError(Exception):
    """An operation that cannot be done; the message says why, for the operator."""


class ConflictError(ReleaseError):
    """Someone else changed the release record between our read and our write."""


class UnknownVersion(ReleaseError):
    """The version is not in the store, or is incomplete (no MANIFEST.json)."""


class CorruptVersion(ReleaseError):
    """The version's files in the store do not match its MANIFEST.json (or it is unreadable)."""


class UnknownModel(ReleaseError):
    """No release record for the model."""


def release_key(name: str) -> str:
    return f"{RELEASES_PREFIX}{name}.json"


@dataclass
class ReleaseRecord:
    name: str
    stable: str | None = None
    canary: dict[str, Any] | None = None  # {"version": str, "weight": float}
    previous: list[str] = field(default_factory=list)
    generation: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def canary_version(self) -> str | None:
        return self.canary["version"] if self.canary else None

    @property
    def canary_weight(self) -> float:
        return float(self.canary["weight"]) if self.canary else 0.0

    def wanted_versions(self, keep_previous: int) -> list[str]:
        """What a site keeps installed, most important first: stable, canary, previous stables."""
        out: list[str] = []
        for v in [self.stable, self.canary_version, *self.previous[:keep_previous]]:
            if v and v not in out:
                out.append(v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stable": self.stable, "canary": self.canary, "previous": self.previous,
                "generation": self.generation, "history": self.history}

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "") -> ReleaseRecord:
        try:
            d = orjson.loads(data)
            canary = d.get("canary")
            if canary is not None:
                canary = {"version": str(canary["version"]), "weight": float(canary["weight"])}
            return cls(name=str(d["name"]), stable=None if d.get("stable") is None else str(d["stable"]),
                       canary=canary, previous=[str(v) for v in d.get("previous", [])],
                       generation=int(d.get("generation", 0)), history=list(d.get("history", [])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ReleaseError(f"release record {where or '?'} is not valid: {exc}") from None


@dataclass
class Draft:
    """A record read for modification, with the ETag the write must still match."""

    record: ReleaseRecord
    etag: str | None  # None: the record does not exist yet (create-only write)
    base: ReleaseRecord


class Releases:
    """Release records in one store."""

    def __init__(self, store: ObjectStore):
        self.store = store

    async def read(self, name: str) -> tuple[ReleaseRecord | None, str | None]:
        try:
            got = await self.store.get(release_key(name))
        except NotFound:
            return None, None
        return ReleaseRecord.from_bytes(got.data, where=release_key(name)), got.etag

    async def get(self, name: str) -> ReleaseRecord | None:
        return (await self.read(name))[0]

    async def names(self) -> list[str]:
        return sorted(o.key[len(RELEASES_PREFIX):-len(".json")] for o in await self.store.list(RELEASES_PREFIX)
                      if o.key.endswith(".json") and "/" not in o.key[len(RELEASES_PREFIX):])

    async def all(self) -> dict[str, ReleaseRecord]:
        out = {}
        for name in await self.names():
            rec = await self.get(name)
            if rec is not None:
                out[name] = rec
        return out

    # ------------------------------------------------------------ compare-and-swap core

    async def begin(self, name: str) -> Draft:
        check_model_name(name)
        rec, etag = await self.read(name)
        if rec is None:
            rec = ReleaseRecord(name=name)
        return Draft(record=copy.deepcopy(rec), etag=etag, base=rec)

    async def commit(self, draft: Draft, entry: dict[str, Any]) -> ReleaseRecord:
        """Write the draft if the record is unchanged since ``begin``; else ``ConflictError``."""
        rec = draft.record
        rec.generation = draft.base.generation + 1
        rec.history.append({"generation": rec.generation, **entry, "stable": rec.stable,
                            "canary": rec.canary, "when": now_iso(), "time_s": time.time()})
        del rec.history[:-MAX_HISTORY]
        try:
            if draft.etag is None:
                await self.store.put(release_key(rec.name), rec.to_bytes(), if_none_match="*")
            else:
                await self.store.put(release_key(rec.name), rec.to_bytes(), if_match=draft.etag)
        except PreconditionFailed:
            raise ConflictError(await self._describe_conflict(draft)) from None
        return rec

    async def _describe_conflict(self, draft: Draft) -> str:
        now, _ = await self.read(draft.record.name)
        base = f"release record of {draft.record.name!r} was changed by someone else while you were updating it"
        if now is None:
            return f"{base} (it was deleted); nothing was written: re-read and retry"
        last = now.history[-1] if now.history else {}
        what = " ".join(str(x) for x in (last.get("action"), last.get("version")) if x)
        return (f"{base}: generation {draft.base.generation} -> {now.generation}"
                f" ({what or 'unknown change'} by {last.get('who', '?')} at {last.get('when', '?')});"
                " your change was NOT applied: re-read (`geogate models list`) and retry")

    async def _update(self, name: str, expected_generation: int | None, mutate) -> ReleaseRecord:
        draft = await self.begin(name)
        if expected_generation is not None and draft.base.generation != expected_generation:
            last = draft.base.history[-1] if draft.base.history else {}
            raise ConflictError(
                f"release record of {name!r} is at generation {draft.base.generation}, you expected "
                f"{expected_generation} (last change: {last.get('action', '?')} {last.get('version', '')} by "
                f"{last.get('who', '?')} at {last.get('when', '?')}); your change was NOT applied")
        entry = mutate(draft.record)
        return await self.commit(draft, entry)

    async def _require_version(self, name: str, version: str, *, verify: bool = False) -> None:
        try:
            manifest = await read_manifest(self.store, name, version)
        except ManifestError as exc:
            raise CorruptVersion(f"version {version} of {name!r}: {exc}; the release was NOT changed") from None
        if manifest is None:
            raise UnknownVersion(f"version {version} of {name!r} is not in the store {self.store.url}"
                                 " (or incomplete: no MANIFEST.json); push it first")
        if verify:
            problems = await verify_in_store(self.store, manifest)
            if problems:
                raise CorruptVersion(
                    f"version {version} of {name!r} in the store {self.store.url} does not match its MANIFEST.json "
                    f"({'; '.join(problems)}); sites would refuse it, so the release was NOT changed: push a "
                    "good copy as a new version")

    # ------------------------------------------------------------ operations

    async def promote(self, name: str, version: str | int, *, who: str,
                      expected_generation: int | None = None, verify: bool = False) -> ReleaseRecord:
        """``verify``: check the version's files in the store against its manifest first."""
        version = check_version(version)
        check_model_name(name)
        await self._require_version(name, version, verify=verify)

        def mutate(rec: ReleaseRecord) -> dict[str, Any]:
            if rec.stable == version:
                raise ReleaseError(f"version {version} is already the stable version of {name!r}")
            old = rec.stable
            if old is not None:
                rec.previous = [old, *[v for v in rec.previous if v not in (old, version)]][:MAX_PREVIOUS]
            else:
                rec.previous = [v for v in rec.previous if v != version]
            rec.stable = version
            if rec.canary_version == version:
                rec.canary = None
            return {"action": "promote", "version": version, "from": old, "who": who}

        return await self._update(name, expected_generation, mutate)

    async def set_canary(self, name: str, version: str | int, weight: float, *, who: str,
                         expected_generation: int | None = None, verify: bool = False) -> ReleaseRecord:
        """``verify``: check the version's files in the store against its manifest first."""
        version = check_version(version)
        check_model_name(name)
        if not 0.0 <= weight <= 1.0:
            raise ReleaseError(f"canary weight must be between 0 and 1 (a fraction of traffic), got {weight}")
        if weight > 0:
            await self._require_version(name, version, verify=verify)

        def mutate(rec: ReleaseRecord) -> dict[str, Any]:
            if weight == 0:
                if rec.canary_version != version:
                    raise ReleaseError(f"version {version} is not the canary of {name!r}"
                                       f" (canary: {rec.canary_version or 'none'})")
                rec.canary = None
                return {"action": "canary-clear", "version": version, "who": who}
            if rec.stable is None:
                raise ReleaseError(f"{name!r} has no stable version yet: promote one before adding a canary")
            if rec.stable == version:
                raise ReleaseError(f"version {version} is the stable version of {name!r}; a canary must differ")
            rec.canary = {"version": version, "weight": float(weight)}
            return {"action": "canary", "version": version, "weight": float(weight), "who": who}

        return await self._update(name, expected_generation, mutate)

    async def rollback(self, name: str, *, who: str, expected_generation: int | None = None) -> ReleaseRecord:
        def mutate(rec: ReleaseRecord) -> dict[str, Any]:
            if rec.generation == 0:
                raise UnknownModel(f"no release record for {name!r}: nothing to roll back")
            if rec.canary is not None:
                version = rec.canary_version
                rec.canary = None
                return {"action": "rollback-canary", "version": version, "who": who}
            if not rec.previous:
                raise ReleaseError(f"{name!r} has no previous stable version to roll back to"
                                   f" (stable: {rec.stable})")
            old = rec.stable
            rec.stable = rec.previous.pop(0)
            return {"action": "rollback", "version": rec.stable, "from": old, "who": who}

        return await self._update(name, expected_generation, mutate)
