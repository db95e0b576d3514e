"""core.watched_file: a changed, replaced, removed or restored file is noticed; an untouched one is not."""

import asyncio
import os

from core.watched_file import WatchedFiles, file_signature


def test_untouched_files_do_not_change(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("one")
    b.write_text("two")
    w = WatchedFiles(str(a), "", str(b))  # empty paths (optional files) are left out
    assert w.paths == (str(a), str(b))
    assert w.changed() is None


def test_edit_in_place_is_noticed_until_accepted(tmp_path):
    a = tmp_path / "a"
    a.write_text("one")
    w = WatchedFiles(str(a))
    a.write_text("longer content")
    sig = w.changed()
    assert sig is not None and sig == w.signature()
    assert w.changed() == sig  # not accepted yet: still a change (a failed reload is retried)
    w.accept(sig)
    assert w.changed() is None


def test_atomic_replace_with_same_size_and_mtime_is_noticed(tmp_path):
    a, tmp = tmp_path / "a", tmp_path / "a.tmp"
    a.write_text("one")
    tmp.write_text("two")
    st = os.stat(a)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the inode differs
    w = WatchedFiles(str(a))
    os.replace(tmp, a)
    assert w.changed() is not None


def test_removed_and_restored_file(tmp_path):
    a = tmp_path / "a"
    a.write_text("one")
    w = WatchedFiles(str(a))
    a.unlink()
    gone = w.changed()
    assert gone == (None,) and file_signature(str(a)) is None
    w.accept(gone)
    a.write_text("one")
    assert w.changed() is not None


def test_seen_can_be_shared_and_async_check(tmp_path):
    a = tmp_path / "a"
    a.write_text("one")
    first = WatchedFiles(str(a))
    second = WatchedFiles(*first.paths, seen=first.seen)
    a.write_text("three")
    first.accept(first.signature())
    assert first.changed() is None
    assert asyncio.run(second.changed_async()) is not None  # each consumer accepts on its own
