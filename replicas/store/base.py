"""The one small async interface every object store speaks (DESIGN.md, Model store layout).

Keys are '/'-separated paths relative to the store's root (``models/demo/2/model.onnx``).
Implementations: ``file_store.FileStore`` (``file://DIR``) and ``s3_store.S3Store``
(``s3://bucket/prefix``). Both give the same guarantees, so everything above this module
(manifests, release records, site status, the sync agent) is store-agnostic:

- ``put`` is atomic (readers see the old or the new object, never a torn one) and can be
  conditional: ``if_match=ETAG`` (replace only this exact version) or ``if_none_match="*"``
  (create only); a failed condition raises ``PreconditionFailed``. That compare-and-swap is
  what makes concurrent release updates safe.
- ``upload_file`` / ``download_file`` stream between a local file and the store with flat
  memory and an optional progress callback (called with the bytes moved since the last call).
- Errors are typed: ``NotFound``, ``PreconditionFailed``, ``StoreUnavailable`` (the store
  could not be reached or answered 5xx: callers keep what they have and retry later), and two
  kinds of it: ``StoreMissing`` (the store itself, directory or bucket, is not there) and
  ``StoreTimeout`` (the store did not answer within its timeouts: it hangs).
- Reads never create anything. Only writes through a store opened with ``create=True`` make
  a missing local store directory (an operator's first push); everything else, sync agents
  included, gets ``StoreMissing`` (a store root that vanished in an outage is not silently
  re-created and filled).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

# Progress callback: called with the number of bytes moved since the previous call.
ProgressCallback = Callable[[int], None]


class StoreError(Exception):
    """Base class of every store error; the message names the store and the key."""


class NotFound(StoreError):
    """The object does not exist."""


class PreconditionFailed(StoreError):
    """A conditional put's condition (if_match / if_none_match) did not hold."""


class StoreUnavailable(StoreError):
    """The store could not be reached (network, permissions, 5xx). Retry later."""


class StoreMissing(StoreUnavailable):
    """The store itself does not exist (no such directory, or not a directory; no such bucket)."""


class StoreTimeout(StoreUnavailable):
    """The store did not answer within its connect/read timeout (``waited_s``): it hangs."""

    def __init__(self, message: str, *, waited_s: float):
        super().__init__(message)
        self.waited_s = waited_s


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    # Opaque version tag usable with ``put(if_match=...)``; may be "" in listings where the
    # store cannot produce it cheaply (the local store hashes content: only head/get give it).
    etag: str = ""


@dataclass(frozen=True)
class GetResult:
    data: bytes
    etag: str


@dataclass(frozen=True)
class Digest:
    """What an object holds, as read from the store: its size and sha256 (hex)."""

    size: int
    sha256: str


def check_key(key: str) -> str:
    """Reject keys that could escape the store root or are ambiguous."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key {key!r}: must be a relative path without '.', '..' or '//'")
    return key


class ObjectStore(abc.ABC):
    """Async object store. ``url`` is what operators wrote (for messages)."""

    url: str

    @abc.abstractmethod
    async def get(self, key: str) -> GetResult: ...

    @abc.abstractmethod
    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: str | None = None) -> str:
        """Write ``data``; returns the new etag. ``if_none_match`` may only be "*"."""

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (sorted by key)."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete an object; deleting a missing object is not an error."""

    @abc.abstractmethod
    async def upload_file(self, key: str, path: str, *, progress: ProgressCallback | None = None,
                          if_none_match: str | None = None) -> str:
        """Stream a local file into the store (multipart for big files); returns the etag."""

    @abc.abstractmethod
    async def download_file(self, key: str, path: str, *, progress: ProgressCallback | None = None,
                            rate_limit_bytes_per_s: int = 0) -> int:
        """Stream an object into a local file (created or truncated); returns its size.
        ``rate_limit_bytes_per_s`` > 0 caps the transfer rate (spare a site's WAN link)."""

    @abc.abstractmethod
    async def digest(self, key: str) -> Digest:
        """Size and sha256 of an object's content, streamed (flat memory): for verifying a
        stored version against its manifest without downloading it to disk."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise ``StoreMissing`` when the store itself (directory, bucket) is not there, or
        another ``StoreError`` when it cannot be reached. Creates nothing."""

    @abc.abstractmethod
    async def create(self) -> None:
        """Make the store itself (directory, bucket) when it is missing; nothing when it exists."""

    async def exists(self, key: str) -> bool:
        try:
            await self.head(key)
            return True
        except NotFound:
            return False

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the store must not be used afterwards."""

    async def __aenter__(self) -> ObjectStore:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class RateLimiter:
    """Paces a transfer to at most ``bytes_per_s``: ``delay_s(moved)`` says how long to wait."""

    def __init__(self, bytes_per_s: int, now_s: float):
        self.bytes_per_s = bytes_per_s
        self.start_s = now_s
        self.moved = 0

    def delay_s(self, chunk: int, now_s: float) -> float:
        self.moved += chunk
        if self.bytes_per_s <= 0:
            return 0.0
        return max(0.0, self.start_s + self.moved / self.bytes_per_s - now_s)


def check_if_none_match(value: str | None) -> None:
    if value not in (None, "*"):
        raise ValueError(f"if_none_match supports only '*', got {value!r}")
