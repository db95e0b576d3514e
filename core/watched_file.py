"""Notices that files changed on disk, for reloads without a restart (keys files, operators
files, TLS certificates).

A file's signature is its (mtime in ns, size, inode): an in-place edit changes the first two, an
atomic replace (write a temp file, rename it over: what cert-manager, kubelet secret volumes and
editors do) changes the inode even within one mtime tick. A missing file signs as None, so its
disappearance and return both count as changes. Stat calls block: async callers use
``changed_async`` (a worker thread) to keep them off the event loop.
"""

from __future__ import annotations

import asyncio
import os

FileSig = tuple[int, int, int] | None
Signature = tuple[FileSig, ...]


def file_signature(path: str) -> FileSig:
    """(mtime_ns, size, inode) of ``path``, None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class WatchedFiles:
    """One or more files watched together; remembers the signature last ``accept``-ed.

    ``changed()`` does not accept what it saw: the caller accepts after a successful reload
    (so a broken file is retried at the next check) or at once (so it is not re-read until it
    changes again), as its reload policy says."""

    def __init__(self, *paths: str, seen: Signature | None = None) -> None:
        self.paths: tuple[str, ...] = tuple(p for p in paths if p)
        self.seen: Signature = seen if seen is not None else self.signature()

    def signature(self) -> Signature:
        """The files' signature on disk now (blocking)."""
        return tuple(file_signature(p) for p in self.paths)

    def changed(self) -> Signature | None:
        """The new signature when it differs from the accepted one, else None (blocking)."""
        sig = self.signature()
        return sig if sig != self.seen else None

    async def changed_async(self) -> Signature | None:
        """``changed()`` in a worker thread."""
        return await asyncio.to_thread(self.changed)

    def accept(self, sig: Signature) -> None:
        self.seen = sig
