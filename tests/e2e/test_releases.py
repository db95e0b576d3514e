"""Release records (compare-and-swap on ETag) and manifests, on file:// and on moto s3://."""

from __future__ import annotations

import asyncio

import pytest

from replicas.demo.onnx_model import write_repository_entry
from replicas.releases.manifest import Manifest, list_stored_versions, manifest_key, read_manifest, verify_dir
from replicas.releases.models_cli import PushError, push_version
from replicas.releases.records import ConflictError, ReleaseError, Releases, UnknownVersion
from replicas.store import open_store
from tests.s3_fixtures import moto_s3, store_url  # noqa: F401


@pytest.fixture
async def store(store_url):  # noqa: F811
    s = open_store(store_url)
    yield s
    await s.close()


@pytest.fixture
def repo(tmp_path):
    for v in (1, 2, 3, 4):
        write_repository_entry(tmp_path / "repo", v)
    return tmp_path / "repo" / "demo"


async def _push(store, repo, *versions):
    for v in versions:
        await push_version(store, "demo", repo, version=str(v), who="tester")


async def test_push_writes_manifest_last_and_refuses_overwrite(store, repo):
    await _push(store, repo, 1)
    m = await read_manifest(store, "demo", "1")
    assert m is not None and m.who == "tester"
    assert sorted(f.path for f in m.files) == ["config.pbtxt", "model.onnx"]
    assert m.file("model.onnx").size == (repo / "1" / "model.onnx").stat().st_size
    with pytest.raises(PushError, match="already exists"):
        await _push(store, repo, 1)
    # An interrupted push (files, no manifest) is listed as incomplete and cannot be promoted.
    await store.put("models/demo/9/model.onnx", b"partial")
    listed = {v.version: v.complete for v in (await list_stored_versions(store))["demo"]}
    assert listed == {"1": True, "9": False}
    with pytest.raises(UnknownVersion, match="incomplete"):
        await Releases(store).promote("demo", "9", who="x")


async def test_promote_canary_rollback_semantics(store, repo):
    await _push(store, repo, 1, 2, 3)
    rel = Releases(store)
    with pytest.raises(ReleaseError, match="no stable version yet"):
        await rel.set_canary("demo", "2", 0.1, who="a")
    r = await rel.promote("demo", "1", who="alice")
    assert (r.stable, r.previous, r.generation) == ("1", [], 1)
    r = await rel.promote("demo", "2", who="bob")
    assert (r.stable, r.previous) == ("2", ["1"])
    with pytest.raises(ReleaseError, match="already the stable"):
        await rel.promote("demo", "2", who="bob")
    with pytest.raises(ReleaseError, match="between 0 and 1"):
        await rel.set_canary("demo", "3", 1.5, who="c")
    r = await rel.set_canary("demo", "3", 0.25, who="carol")
    assert r.canary == {"version": "3", "weight": 0.25} and r.wanted_versions(1) == ["2", "3", "1"]
    # rollback first removes the canary, leaving the stable alone ...
    r = await rel.rollback("demo", who="dave")
    assert (r.stable, r.canary, r.previous) == ("2", None, ["1"])
    # ... then goes back to the previous stable.
    r = await rel.rollback("demo", who="dave")
    assert (r.stable, r.previous) == ("1", [])
    with pytest.raises(ReleaseError, match="no previous stable"):
        await rel.rollback("demo", who="dave")
    # Promoting the canary's version graduates it (the canary is cleared).
    await rel.set_canary("demo", "3", 0.5, who="erin")
    r = await rel.promote("demo", "3", who="erin")
    assert (r.stable, r.canary, r.previous) == ("3", None, ["1"])
    actions = [(h["action"], h["version"], h["who"]) for h in r.history]
    assert actions == [("promote", "1", "alice"), ("promote", "2", "bob"), ("canary", "3", "carol"),
                       ("rollback-canary", "3", "dave"), ("rollback", "1", "dave"),
                       ("canary", "3", "erin"), ("promote", "3", "erin")]
    assert [h["generation"] for h in r.history] == list(range(1, 8)) and r.generation == 7


async def test_concurrent_promotes_exactly_one_wins(store, repo):
    await _push(store, repo, 1, 2, 3, 4)
    rel = Releases(store)
    await rel.promote("demo", "1", who="setup")
    racers = 8
    barrier = asyncio.Barrier(racers)

    async def operator(i: int):
        draft = await rel.begin("demo")  # everyone reads generation 1 ...
        await barrier.wait()  # ... then all write at once
        draft.record.stable = str(2 + i % 3)
        try:
            return await rel.commit(draft, {"action": "promote", "version": draft.record.stable, "who": f"op{i}"})
        except ConflictError as exc:
            return exc

    results = await asyncio.gather(*(operator(i) for i in range(racers)))
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, ConflictError)]
    assert len(winners) == 1 and len(losers) == racers - 1
    assert "NOT applied" in str(losers[0]) and "generation 1 -> 2" in str(losers[0])
    final = await rel.get("demo")
    assert final.generation == 2 and final.stable == winners[0].stable
    assert [h["who"] for h in final.history] == ["setup", winners[0].history[-1]["who"]]

    # The high-level operation with the generation an operator looked at: same outcome.
    outcomes = await asyncio.gather(*(rel.promote("demo", str(v), who=f"p{v}", expected_generation=2)
                                      for v in (1, 3, 4) if str(v) != final.stable), return_exceptions=True)
    assert sum(not isinstance(o, Exception) for o in outcomes) <= 1
    assert all(isinstance(o, ConflictError) for o in outcomes if isinstance(o, Exception))


async def test_retrying_operators_lose_nothing(store, repo):
    await _push(store, repo, 1, 2)
    rel = Releases(store)
    await rel.promote("demo", "1", who="setup")

    async def operator(i: int) -> int:
        conflicts = 0
        while True:
            try:
                rec = await rel.get("demo")
                target = "2" if rec.stable == "1" else "1"
                await rel.promote("demo", target, who=f"op{i}", expected_generation=rec.generation)
                return conflicts
            except ConflictError:
                conflicts += 1

    await asyncio.gather(*(operator(i) for i in range(6)))
    final = await rel.get("demo")
    assert final.generation == 7
    assert sorted(h["who"] for h in final.history[1:]) == [f"op{i}" for i in range(6)]
    # Every promotion is in the history, in generation order, alternating versions.
    assert [h["version"] for h in final.history] == ["1", "2", "1", "2", "1", "2", "1"]


async def test_manifest_verify_catches_corrupted_byte(store, repo, tmp_path):
    await _push(store, repo, 2)
    m = await read_manifest(store, "demo", "2")
    local = tmp_path / "dl"
    local.mkdir()
    for f in m.files:
        await store.download_file(f"models/demo/2/{f.path}", str(local / f.path))
    assert verify_dir(local, m) == []
    data = bytearray((local / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (local / "model.onnx").write_bytes(bytes(data))
    problems = verify_dir(local, m)
    assert len(problems) == 1 and "model.onnx: sha256" in problems[0]
    (local / "config.pbtxt").write_text("short")
    assert any("config.pbtxt: size" in p for p in verify_dir(local, m))
    # A manifest cannot point outside the version directory.
    bad = m.to_bytes().replace(b'"model.onnx"', b'"../../x"')
    with pytest.raises(ValueError, match="unsafe"):
        Manifest.from_bytes(bad)
    assert (await store.head(manifest_key("demo", "2"))).size > 0
