"""The object store interface, the same tests on file:// and on a real moto S3 server."""

from __future__ import annotations

import asyncio
import os

import pytest

from replicas.store import NotFound, PreconditionFailed, StoreUnavailable, open_store
from replicas.store import s3_store as s3_mod
from tests.s3_fixtures import moto_s3, store_url  # noqa: F401


@pytest.fixture
async def store(store_url):  # noqa: F811
    s = open_store(store_url)
    yield s
    await s.close()


async def test_put_get_head_list_delete(store):
    etag = await store.put("a/b/one.json", b'{"x": 1}')
    got = await store.get("a/b/one.json")
    assert got.data == b'{"x": 1}' and got.etag == etag
    info = await store.head("a/b/one.json")
    assert info.size == 8 and info.etag == etag
    await store.put("a/c/two", b"22")
    await store.put("z", b"3")
    keys = [o.key for o in await store.list("a/")]
    assert keys == ["a/b/one.json", "a/c/two"]
    assert [o.key for o in await store.list("a/b")] == ["a/b/one.json"]
    assert [o.size for o in await store.list("a/")] == [8, 2]
    await store.delete("a/b/one.json")
    await store.delete("a/b/one.json")  # idempotent
    with pytest.raises(NotFound):
        await store.get("a/b/one.json")
    with pytest.raises(NotFound):
        await store.head("nope")
    assert not await store.exists("nope") and await store.exists("z")


async def test_conditional_put(store):
    e1 = await store.put("rec", b"v1", if_none_match="*")
    with pytest.raises(PreconditionFailed):
        await store.put("rec", b"again", if_none_match="*")
    e2 = await store.put("rec", b"v2", if_match=e1)
    assert e2 != e1
    with pytest.raises(PreconditionFailed):
        await store.put("rec", b"v3", if_match=e1)  # stale etag
    with pytest.raises(PreconditionFailed):
        await store.put("missing", b"v", if_match=e1)
    assert (await store.get("rec")).data == b"v2"


async def test_racing_conditional_writers_one_wins(store):
    base = await store.put("race", b"0")

    async def writer(i: int) -> bool:
        try:
            await store.put("race", f"w{i}".encode(), if_match=base)
            return True
        except PreconditionFailed:
            return False

    results = await asyncio.gather(*(writer(i) for i in range(12)))
    assert sum(results) == 1
    winner = results.index(True)
    assert (await store.get("race")).data == f"w{winner}".encode()


async def test_streamed_upload_download_with_progress(store, tmp_path, monkeypatch):
    # Smaller parts so the multipart path runs without a huge file.
    monkeypatch.setattr(s3_mod, "PART_BYTES", 5 * 1024 * 1024)
    monkeypatch.setattr(s3_mod, "MULTIPART_THRESHOLD_BYTES", 6 * 1024 * 1024)
    src = tmp_path / "big.bin"
    payload = os.urandom(1024 * 1024) * 11 + b"tail"
    src.write_bytes(payload)
    up: list[int] = []
    await store.upload_file("models/m/1/big.bin", str(src), progress=up.append)
    assert sum(up) == len(payload)
    down: list[int] = []
    dst = tmp_path / "copy.bin"
    n = await store.download_file("models/m/1/big.bin", str(dst), progress=down.append)
    assert n == len(payload) and sum(down) == len(payload)
    assert dst.read_bytes() == payload
    assert (await store.head("models/m/1/big.bin")).size == len(payload)
    with pytest.raises(PreconditionFailed):
        await store.upload_file("models/m/1/big.bin", str(src), if_none_match="*")
    with pytest.raises(NotFound):
        await store.download_file("models/m/1/none", str(dst))


async def test_bad_keys_rejected(store):
    for key in ("../x", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            await store.put(key, b"x")


async def test_unreachable_store_is_typed(tmp_path):
    s3 = open_store("s3://bucket/p")
    s3._client_kwargs["endpoint_url"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    s3._client_kwargs["config"] = s3._client_kwargs["config"].merge(
        s3_mod.AioConfig(connect_timeout=1, retries={"max_attempts": 1}))
    with pytest.raises(StoreUnavailable):
        await s3.get("x")
    await s3.close()
    gone = open_store(f"file://{tmp_path / 'gone'}", create=False)
    with pytest.raises(StoreUnavailable):
        await gone.list("")
