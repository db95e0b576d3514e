"""``file://DIR``: the object store as a local directory (the default; also NFS-style shares).

- Objects are plain files under DIR, so an operator can look at the store with ``ls``.
- Writes are atomic: the content goes to a temp file in ``DIR/.geogate-tmp/`` (same
  filesystem) and is renamed over the target.
- Compare-and-swap: a conditional put takes an exclusive ``fcntl.flock`` on a per-key lock
  file in ``DIR/.geogate-locks/`` (works across processes), compares, then renames.
- ETag = sha256 of the content (hex), so an etag is stable across processes and restarts.
- Blocking file I/O runs in a worker thread (``asyncio.to_thread``), never on the event loop.
- DIR itself is made only by a write through a store opened with ``create=True`` (an operator's
  first push); reads never make it, and writes below it never re-create a DIR that vanished
  (``StoreMissing``). OS errors (permissions, a full disk) become ``StoreUnavailable`` naming
  the store, the operation and the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

from replicas.store.base import (
    Digest,
    GetResult,
    NotFound,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    ProgressCallback,
    RateLimiter,
    StoreError,
    StoreMissing,
    StoreUnavailable,
    check_if_none_match,
    check_key,
)

COPY_CHUNK_BYTES = 1024 * 1024
TMP_DIR = ".geogate-tmp"
LOCK_DIR = ".geogate-locks"
_INTERNAL = (TMP_DIR, LOCK_DIR)


class _Cancelled(Exception):
    """The awaiting task was cancelled: stop copying."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _walk_error(exc: OSError) -> None:
    """os.walk's onerror: a directory removed meanwhile (a concurrent delete) is skipped; any
    other error (permissions, I/O) is raised instead of silently listing less."""
    if not isinstance(exc, FileNotFoundError):
        raise exc


class FileStore(ObjectStore):
    def __init__(self, root: str | os.PathLike[str], *, url: str = "", create: bool = False):
        self.root = Path(root).absolute()
        self.url = url or f"file://{self.root}"
        # Writes may make a missing root directory (only where an operator means it: a push),
        # as long as this store has not seen it exist: one that vanished stays an error.
        self.create_root = create
        self._root_seen = False

    # ------------------------------------------------------------ helpers (run in threads)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _root_problem(self) -> str:
        """Why the root directory is not usable ("" when it is)."""
        if self.root.is_dir():
            self._root_seen = True
            return ""
        if self.root.exists() or self.root.is_symlink():
            return f"store {self.url}: {self.root} is not a directory"
        if self._root_seen:
            return f"store {self.url}: directory {self.root} does not exist any more (it vanished)"
        return f"store {self.url}: directory {self.root} does not exist"

    def _check_root(self) -> None:
        problem = self._root_problem()
        if problem:
            raise StoreMissing(problem)

    def _may_create_root(self) -> bool:
        return self.create_root and not self._root_seen and not self.root.exists() and not self.root.is_symlink()

    def _root_ready(self) -> bool:
        """For reads: True when the root exists; False when it does not but a write through this
        store may make it (the store reads as empty until then: nothing is created); otherwise
        StoreMissing."""
        if self._may_create_root():
            return False
        self._check_root()
        return True

    def _check_root_for_write(self) -> None:
        if self._may_create_root():
            self.root.mkdir(parents=True, exist_ok=True)
        self._check_root()

    def _guard(self, what: str, key: str, fn, *args):
        """Run ``fn`` (in the worker thread), turning OS errors into the store's typed errors."""
        try:
            return fn(*args)
        except StoreError:
            raise
        except OSError as exc:
            problem = self._root_problem()
            if problem:  # the root vanished (or was never there) while we worked
                raise StoreMissing(problem) from None
            raise StoreUnavailable(f"store {self.url}: {what} {key}: {exc.strerror or exc}") from None

    async def _run(self, what: str, key: str, fn, *args):
        return await asyncio.to_thread(self._guard, what, key, fn, *args)

    def _make_parents(self, target: Path) -> None:
        """Create ``target``'s parent directories below the root, one level at a time and never
        the root itself: a root that vanished meanwhile stays gone (FileNotFoundError)."""
        if target.parent.is_dir():
            return
        d = self.root
        for part in target.parent.relative_to(self.root).parts:
            d = d / part
            with contextlib.suppress(FileExistsError):
                d.mkdir()

    def _tmp_path(self) -> Path:
        d = self.root / TMP_DIR
        d.mkdir(exist_ok=True)  # no parents: never re-create a vanished root
        return d / f"{uuid.uuid4().hex}.tmp"

    @contextlib.contextmanager
    def _locked(self, key: str):
        d = self.root / LOCK_DIR
        d.mkdir(exist_ok=True)
        lock_name = hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock"
        with open(d / lock_name, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _commit(self, tmp: Path, target: Path) -> None:
        self._make_parents(target)
        os.replace(tmp, target)

    def _current_etag(self, target: Path) -> str | None:
        try:
            return _sha256_file(target)
        except FileNotFoundError:
            return None

    def _check_conditions(self, key: str, target: Path, if_match: str | None,
                          if_none_match: str | None) -> None:
        if if_match is None and if_none_match is None:
            return
        current = self._current_etag(target)
        if if_none_match == "*" and current is not None:
            raise PreconditionFailed(f"store {self.url}: {key} already exists")
        if if_match is not None and current != if_match:
            what = "does not exist" if current is None else "was changed by someone else"
            raise PreconditionFailed(f"store {self.url}: {key} {what} (expected etag {if_match[:12]}...)")

    def _put_sync(self, key: str, data: bytes, if_match: str | None, if_none_match: str | None) -> str:
        self._check_root_for_write()
        target = self._path(key)
        tmp = self._tmp_path()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_match is None and if_none_match is None:
                self._commit(tmp, target)
            else:
                with self._locked(key):
                    self._check_conditions(key, target, if_match, if_none_match)
                    self._commit(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return hashlib.sha256(data).hexdigest()

    def _get_sync(self, key: str) -> GetResult:
        if not self._root_ready():
            raise NotFound(f"store {self.url}: no object {key}")
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"store {self.url}: no object {key}") from None
        return GetResult(data, hashlib.sha256(data).hexdigest())

    def _head_sync(self, key: str) -> ObjectInfo:
        if not self._root_ready():
            raise NotFound(f"store {self.url}: no object {key}")
        p = self._path(key)
        try:
            if not p.is_file():
                raise FileNotFoundError(key)
            size = p.stat().st_size
            return ObjectInfo(key, size, _sha256_file(p))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"store {self.url}: no object {key}") from None

    def _digest_sync(self, key: str) -> Digest:
        if not self._root_ready():
            raise NotFound(f"store {self.url}: no object {key}")
        p = self._path(key)
        if not p.is_file():
            raise NotFound(f"store {self.url}: no object {key}")
        try:
            return Digest(p.stat().st_size, _sha256_file(p))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"store {self.url}: no object {key}") from None

    def _create_sync(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)

    def _list_sync(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        if not self._root_ready():
            return out
        # Walk only below the deepest directory the prefix names.
        base_rel = prefix.rpartition("/")[0]
        base = self.root / base_rel if base_rel else self.root
        if not base.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(base, onerror=_walk_error):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d not in _INTERNAL]
                rel_dir = ""
            for name in filenames:
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        out.append(ObjectInfo(key, os.stat(os.path.join(dirpath, name)).st_size))
        out.sort(key=lambda o: o.key)
        return out

    def _delete_sync(self, key: str) -> None:
        if not self._root_ready():
            return
        p = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        # Drop directories left empty, so listings and `ls` stay tidy.
        parent = p.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    break
                raise
            parent = parent.parent

    def _copy(self, src: Path, dst: Path, report, rate_limit_bytes_per_s: int = 0,
              cancelled: threading.Event | None = None) -> tuple[int, str]:
        h = hashlib.sha256()
        size = 0
        limiter = RateLimiter(rate_limit_bytes_per_s, time.monotonic())
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while chunk := fin.read(COPY_CHUNK_BYTES):
                if cancelled is not None and cancelled.is_set():
                    raise _Cancelled
                fout.write(chunk)
                h.update(chunk)
                size += len(chunk)
                report(len(chunk))
                delay = limiter.delay_s(len(chunk), time.monotonic())
                if delay > 0:
                    if cancelled is not None:
                        cancelled.wait(delay)  # wakes at once on cancellation
                    else:
                        time.sleep(delay)
            fout.flush()
            os.fsync(fout.fileno())
        return size, h.hexdigest()

    # ------------------------------------------------------------ async interface

    async def get(self, key: str) -> GetResult:
        return await self._run("get", key, self._get_sync, key)

    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: str | None = None) -> str:
        check_if_none_match(if_none_match)
        return await self._run("put", key, self._put_sync, key, bytes(data), if_match, if_none_match)

    async def head(self, key: str) -> ObjectInfo:
        return await self._run("head", key, self._head_sync, key)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return await self._run("list", prefix, self._list_sync, prefix)

    async def delete(self, key: str) -> None:
        await self._run("delete", key, self._delete_sync, key)

    async def digest(self, key: str) -> Digest:
        return await self._run("read", key, self._digest_sync, key)

    async def check(self) -> None:
        await self._run("check", "", self._check_root)

    async def create(self) -> None:
        await self._run("create", "", self._create_sync)

    def _reporter(self, progress: ProgressCallback | None):
        if progress is None:
            return lambda n: None
        loop = asyncio.get_running_loop()
        return lambda n: loop.call_soon_threadsafe(progress, n)

    async def upload_file(self, key: str, path: str, *, progress: ProgressCallback | None = None,
                          if_none_match: str | None = None) -> str:
        check_if_none_match(if_none_match)
        report = self._reporter(progress)

        def work() -> str:
            self._check_root_for_write()
            target = self._path(key)
            tmp = self._tmp_path()
            try:
                _, etag = self._copy(Path(path), tmp, report)
                if if_none_match is None:
                    self._commit(tmp, target)
                else:
                    with self._locked(key):
                        self._check_conditions(key, target, None, if_none_match)
                        self._commit(tmp, target)
                return etag
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

        return await self._run("upload", key, work)

    async def download_file(self, key: str, path: str, *, progress: ProgressCallback | None = None,
                            rate_limit_bytes_per_s: int = 0) -> int:
        report = self._reporter(progress)
        cancelled = threading.Event()

        def work() -> int:
            if not self._root_ready():
                raise NotFound(f"store {self.url}: no object {key}")
            src = self._path(key)
            if not src.is_file():
                raise NotFound(f"store {self.url}: no object {key}")
            size, _ = self._copy(src, Path(path), report, rate_limit_bytes_per_s, cancelled)
            return size

        try:
            return await self._run("download", key, work)
        except asyncio.CancelledError:
            cancelled.set()  # the worker thread stops at its next chunk instead of copying on
            raise
