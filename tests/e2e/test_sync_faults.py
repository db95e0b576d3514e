"""The sync agent under faults: a corrupted version, a replica that cannot load a version, the
agent killed (SIGKILL) mid-download, the store unreachable. Real processes throughout."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import orjson
import pytest

from replicas.releases.manifest import MANIFEST_NAME
from tests.e2e.test_sync import (
    _with_store,
    infer,
    promote,
    push,
    ready_versions,
    run,
    serves,
    site,  # noqa: F401
    site_status,
    start_agent,
    wait_for,
    write_config,
)
from tests.s3_fixtures import moto_s3, store_url  # noqa: F401


def _start_with_v1(site, procs):  # noqa: F811
    push(site["store"], site["src"], 1)
    promote(site["store"], 1)
    agent = start_agent(procs, site["config"])
    wait_for(lambda: all(serves(r, 1) for r in site["replicas"]), "v1 served", procs=[agent])
    return agent


def _failed(url: str, version: str) -> str:
    st = site_status(url, "eu")
    return st.models["demo"].failed.get(version, "") if st and "demo" in st.models else ""


def test_corrupted_version_refused_never_loaded(site, procs):  # noqa: F811
    url, reps = site["store"], site["replicas"]
    agent = _start_with_v1(site, procs)
    push(url, site["src"], 2)

    async def corrupt(store):
        key = "models/demo/2/model.onnx"
        data = bytearray((await store.get(key)).data)
        data[len(data) // 3] ^= 0x40  # one flipped bit; size unchanged, manifest unchanged
        await store.put(key, bytes(data))

    run(_with_store(url, corrupt))
    promote(url, 2)
    wait_for(lambda: "sha256" in _failed(url, "2"), "v2 reported failed (checksum)", procs=[agent])
    assert "corrupt, refused: model.onnx" in _failed(url, "2")
    assert not (site["repo"] / "demo" / "2").exists()
    assert all(ready_versions(r) == {"1"} for r in reps)
    assert infer(reps[0])[0] == "1"  # unversioned traffic keeps getting v1
    st = site_status(url, "eu").models["demo"]
    assert st.stable == "2" and st.ready == ["1"] and st.serving == ["1"]


@pytest.mark.parametrize("store_url", ["file"], indirect=True)
def test_replica_load_failure_keeps_old_version(site, procs, tmp_path):  # noqa: F811
    url, reps = site["store"], site["replicas"]
    agent = _start_with_v1(site, procs)
    bad = tmp_path / "bad" / "demo"
    (bad / "2").mkdir(parents=True)
    (bad / "2" / "model.onnx").write_bytes(b"this is not an ONNX model")
    shutil.copy(site["src"] / "config.pbtxt", bad / "config.pbtxt")
    push(url, bad, 2)  # checksums are right: it installs, but no replica can load it
    promote(url, 2)
    wait_for(lambda: "did not become ready" in _failed(url, "2"), "v2 reported failed (load)", procs=[agent])
    assert "version 2" in _failed(url, "2")
    assert all(ready_versions(r) == {"1"} for r in reps)
    assert all(serves(r, 1) for r in reps) and infer(reps[0])[0] == "1"
    assert (site["repo"] / "demo" / "1").is_dir()  # the old version is not collected
    assert agent.alive()


@pytest.mark.parametrize("store_url", ["file"], indirect=True)
def test_store_unreachable_keeps_serving(site, procs):  # noqa: F811
    url, reps = site["store"], site["replicas"]
    agent = _start_with_v1(site, procs)
    root = Path(url.removeprefix("file://"))
    away = root.with_name("store-away")
    root.rename(away)
    try:
        wait_for(lambda: "store unreachable" in agent.output(), "the agent to notice", procs=[agent])
        assert all(serves(r, 1) for r in reps) and agent.alive()
        assert (site["repo"] / "demo" / "1" / MANIFEST_NAME).is_file()
    finally:
        away.rename(root)
    push(url, site["src"], 2)
    promote(url, 2)
    wait_for(lambda: all(serves(r, 2) for r in reps), "v2 served after the store came back", procs=[agent])
    # the status is published at the end of the agent's round: the replicas may serve v2 first
    wait_for(lambda: getattr(site_status(url, "eu"), "store_ok", False), "a status saying the store is back",
             procs=[agent])
    st = site_status(url, "eu")
    assert st.store_ok and time.time() - st.heartbeat_s < 10
    assert "does not exist" in st.store_last_error  # what happened stays visible after recovery
    # A file deleted by hand from an installed version: the agent installs the version again.
    damaged = site["repo"] / "demo" / "2" / "model.onnx"
    size = damaged.stat().st_size
    damaged.unlink()
    wait_for(lambda: damaged.is_file() and damaged.stat().st_size == size, "the damaged version repaired",
             procs=[agent])
    assert all(serves(r, 2) for r in reps)


def test_killed_mid_download_converges_without_half_installs(site, procs, tmp_path):  # noqa: F811
    url, reps, repo = site["store"], site["replicas"], site["repo"]
    # v2 carries a 40 MB padding file; downloads are capped at 10 MB/s so the kill lands mid-way.
    (site["src"] / "2" / "padding.bin").write_bytes(os.urandom(40 * 1024 * 1024))
    cfg = write_config(tmp_path / "slow.toml", url, [f"http://{reps[0].http_url}", f"grpc://{reps[1].grpc_url}"],
                       rate_limit=10 * 1024 * 1024)
    site = {**site, "config": cfg}
    agent = _start_with_v1(site, procs)
    push(url, site["src"], 2)

    violations: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        """Every version directory visible in the repository must be complete."""
        while not stop.is_set():
            model_dir = repo / "demo"
            for vdir in list(model_dir.iterdir()) if model_dir.is_dir() else []:
                if not vdir.name.isdigit():
                    continue
                try:
                    manifest = orjson.loads((vdir / MANIFEST_NAME).read_bytes())
                    for f in manifest["files"]:
                        size = (vdir / f["path"]).stat().st_size
                        if size != f["size"]:
                            violations.append(f"{vdir}: {f['path']} has {size} of {f['size']} bytes")
                except FileNotFoundError as exc:
                    if vdir.exists():
                        violations.append(f"{vdir}: incomplete ({exc.filename} missing)")
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        promote(url, 2)
        staging = repo.parent / ".staging"

        def staged_bytes() -> int:
            return sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) if staging.exists() else 0

        wait_for(lambda: staged_bytes() > 8 * 1024 * 1024, "the download to be under way", procs=[agent])
        agent.kill()  # SIGKILL: no cleanup of any kind
        assert staged_bytes() > 0 and not (repo / "demo" / "2").exists()
        assert all(serves(r, 1) for r in reps)
        agent2 = start_agent(procs, cfg)
        wait_for(lambda: all(serves(r, 2) for r in reps), "v2 served after the restart", procs=[agent2])
        wait_for(lambda: staged_bytes() == 0, "staging cleaned")
        wait_for(lambda: all(ready_versions(r) == {"2"} for r in reps), "v1 unloaded")
        assert (repo / "demo" / "2" / "padding.bin").stat().st_size == 40 * 1024 * 1024
    finally:
        stop.set()
        watcher.join(5)
    assert violations == []
