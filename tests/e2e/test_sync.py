"""The sync agent end to end: real `geogate replica` processes, a real `geogate sync` process,
the store on file:// and on a real moto S3 server; clients are tritonclient HTTP and gRPC."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from replicas.demo.onnx_model import reference_outputs, write_repository_entry
from replicas.releases.models_cli import push_version
from replicas.releases.records import Releases
from replicas.releases.site_status import SiteStatus, read_site
from replicas.store import open_store
from tests.procs import ReplicaProc, free_port, geogate
from tests.s3_fixtures import moto_s3, store_url  # noqa: F401

POLL_MS = 300
WAIT_S = 90.0


def run(coro):
    return asyncio.run(coro)


async def _with_store(url: str, fn):
    store = open_store(url)
    try:
        return await fn(store)
    finally:
        await store.close()


def push(url: str, src: Path, version: int) -> None:
    run(_with_store(url, lambda s: push_version(s, "demo", src, version=str(version), who="test")))


def promote(url: str, version: int) -> None:
    run(_with_store(url, lambda s: Releases(s).promote("demo", str(version), who="test")))


def site_status(url: str, site: str) -> SiteStatus | None:
    return run(_with_store(url, lambda s: read_site(s, site)))


def write_config(path: Path, store: str, replicas: list[str], *, keep_previous: int = 0,
                 rate_limit: int = 0, region: str = "eu") -> Path:
    reps = ", ".join(f'"{u}"' for u in replicas)
    path.write_text(f"""
[store]
url = "{store}"
[sync]
poll_interval_ms = {POLL_MS}
keep_previous = {keep_previous}
load_timeout_ms = 60000
download_rate_limit_bytes_per_s = {rate_limit}
[[regions]]
name = "{region}"
  [[regions.pools]]
  name = "{region}-ort"
  replicas = [{reps}]
  repository = "{region}/models"
""")
    return path


def infer(replica: ReplicaProc, version: str = "", *, grpc: bool = False) -> tuple[str, np.ndarray, np.ndarray]:
    """(version that answered, input, output) for one request to the replica."""
    x = np.random.default_rng().standard_normal((2, 16)).astype(np.float32)
    mod = tgrpc if grpc else thttp
    client = mod.InferenceServerClient(replica.grpc_url if grpc else replica.http_url)
    try:
        inp = mod.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("demo", [inp], model_version=version)
        answered = res.get_response().model_version if grpc else res.get_response()["model_version"]
        return str(answered), x, res.as_numpy("OUTPUT0")
    finally:
        client.close()


def serves(replica: ReplicaProc, version: int, *, grpc: bool = False) -> bool:
    try:
        answered, x, y = infer(replica, str(version), grpc=grpc)
    except Exception:
        return False
    return answered == str(version) and np.allclose(y, reference_outputs("tiny", version, x), atol=1e-4)


def ready_versions(replica: ReplicaProc) -> set[str]:
    client = thttp.InferenceServerClient(replica.http_url)
    try:
        return {r["version"] for r in client.get_model_repository_index()
                if r.get("name") == "demo" and r.get("state") == "READY"}
    finally:
        client.close()


def wait_for(check, what: str, timeout_s: float = WAIT_S, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{logs}")


@pytest.fixture
def site(tmp_path, procs, store_url):  # noqa: F811
    """A site 'eu' with two replicas (one reached over HTTP, one over gRPC) on one repository."""
    repo = tmp_path / "eu" / "models"
    repo.mkdir(parents=True)
    reps = [ReplicaProc(str(repo)), ReplicaProc(str(repo))]
    procs.extend(reps)
    for r in reps:
        r.wait_ready()
    src = tmp_path / "src"
    for v in (1, 2):
        write_repository_entry(src, v)
    cfg = write_config(tmp_path / "geogate.toml", store_url,
                       [f"http://{reps[0].http_url}", f"grpc://{reps[1].grpc_url}"])
    return {"store": store_url, "repo": repo, "replicas": reps, "src": src / "demo", "config": cfg}


def start_agent(procs, cfg: Path, *extra: str):
    agent = geogate("sync", "--config", str(cfg), "--site", "eu", *extra, name="sync-eu")
    procs.append(agent)
    return agent


def test_install_load_promote_unload(site, procs):
    url, reps = site["store"], site["replicas"]
    push(url, site["src"], 1)
    promote(url, 1)
    metrics_port = free_port()
    agent = start_agent(procs, site["config"], "--metrics", f"127.0.0.1:{metrics_port}")
    wait_for(lambda: all(serves(r, 1) for r in reps), "both replicas serving v1", procs=[agent, *reps])
    assert serves(reps[1], 1, grpc=True)
    st = site_status(url, "eu")
    assert st.models["demo"].ready == ["1"] and st.models["demo"].stable == "1"
    assert all(h["ok"] for h in st.replicas.values()) and len(st.replicas) == 2
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'geogate_sync_versions{model="demo",site="eu",state="ready"} 1.0' in metrics
    assert 'geogate_sync_installs_total{outcome="installed",site="eu"} 1.0' in metrics
    assert 'geogate_sync_store_up{site="eu"} 1.0' in metrics

    push(url, site["src"], 2)
    promote(url, 2)
    wait_for(lambda: all(serves(r, 2) for r in reps), "both replicas serving v2", procs=[agent, *reps])
    # Unversioned requests now get v2 on both protocols, and v1 is unloaded, then deleted.
    wait_for(lambda: all(ready_versions(r) == {"2"} for r in reps), "v1 unloaded", procs=[agent])
    assert infer(reps[0])[0] == "2" and infer(reps[1], grpc=True)[0] == "2"
    wait_for(lambda: not (site["repo"] / "demo" / "1").exists(), "v1 directory removed")
    assert sorted(p.name for p in (site["repo"] / "demo").iterdir()) == ["2", "config.pbtxt"]
    assert "specific" in (site["repo"] / "demo" / "config.pbtxt").read_text()
    wait_for(lambda: (s := site_status(url, "eu")) is not None and s.models["demo"].ready == ["2"]
             and s.models["demo"].serving == ["2"], "status: v2 ready")
    shown = subprocess.run([sys.executable, "-m", "gateway", "models", "status", "demo", "--json",
                            "--config", str(site["config"])], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["eu"]["models"]["demo"]["ready"] == ["2"]
    # The heartbeat keeps coming while nothing changes.
    beat = site_status(url, "eu").heartbeat_s
    wait_for(lambda: site_status(url, "eu").heartbeat_s > beat, "a fresh heartbeat", timeout_s=10)
    assert agent.alive()


@pytest.mark.parametrize("store_url", ["file"], indirect=True)
def test_global_cutover_waits_for_the_slow_site(tmp_path, procs, store_url):  # noqa: F811
    """Two real sites; us-east downloads slowly. Gateways' resolvers (global) keep unversioned
    traffic on v1 until both sites report v2 ready; per-site switches eu first."""
    from replicas.releases.resolver import VersionResolver

    src = tmp_path / "src"
    for v in (1, 2):
        write_repository_entry(src, v)
    (src / "demo" / "2" / "padding.bin").write_bytes(os.urandom(30 * 1024 * 1024))
    reps = {}
    for name in ("eu", "us"):
        repo = tmp_path / name / "models"
        repo.mkdir(parents=True)
        reps[name] = ReplicaProc(str(repo))
        procs.append(reps[name])
    for r in reps.values():
        r.wait_ready()
    push(store_url, src / "demo", 1)
    promote(store_url, 1)
    for name, rate in (("eu", 0), ("us", 8 * 1024 * 1024)):
        cfg = write_config(tmp_path / f"{name}.toml", store_url, [f"http://{reps[name].http_url}"],
                           keep_previous=1, rate_limit=rate, region=name)
        procs.append(geogate("sync", "--config", str(cfg), "--site", name, name=f"sync-{name}"))
    wait_for(lambda: all(serves(r, 1) for r in reps.values()), "v1 at both sites", procs=procs)
    push(store_url, src / "demo", 2)

    async def observe() -> list[tuple[str, str, str, str]]:
        store = open_store(store_url)
        glob = VersionResolver(store, cutover="global")
        per = VersionResolver(store, cutover="per-site")
        seen = []
        try:
            await Releases(store).promote("demo", "2", who="test")
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                await glob.refresh()
                await per.refresh()
                row = (glob.resolve("demo", None, "eu").version, glob.resolve("demo", None, "us").version,
                       per.resolve("demo", None, "eu").version, per.resolve("demo", None, "us").version)
                seen.append(row)
                if row == ("2", "2", "2", "2"):
                    return seen
                await asyncio.sleep(0.1)
        finally:
            await store.close()
        raise AssertionError(f"no cutover within {WAIT_S}s: {seen[-3:]}")

    seen = asyncio.run(observe())
    # Global: both regions always agree, and only move to v2 together.
    assert all(g_eu == g_us for g_eu, g_us, _, _ in seen)
    # Per-site: eu (fast) served v2 while us (slow) still served v1, and meanwhile global said v1.
    assert ("1", "1", "2", "1") in seen, sorted(set(seen))
    assert all(serves(r, 2) for r in reps.values())
    # keep_previous = 1: v1 stays installed and loaded for a quick rollback.
    assert all(ready_versions(r) == {"1", "2"} for r in reps.values())
