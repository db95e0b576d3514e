"""A promotion across three sites under steady load, end to end with real processes: three
regions (two replicas, a sync agent and a gateway each), the object store on a local directory
and on a real S3-protocol server (moto).

Push v1, promote; push v2, promote while clients call every region's gateway: zero failed
requests, every answer is v1 or v2 and its values are what that version computes (checked
against the version the answer names), the regions never disagree for long (global cutover)
and all of them end on v2.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections import Counter

import numpy as np

from replicas.demo.onnx_model import reference_outputs, write_repository_entry
from replicas.releases.models_cli import push_version
from replicas.releases.records import Releases
from replicas.store import open_store
from tests.multi_region_world import World
from tests.s3_fixtures import moto_s3, store_url  # noqa: F401

ANSWERS_AROUND = 20  # answers each stream gets before and after the promotion
WAIT_S = 90.0


async def _store_op(url: str, op) -> None:
    store = open_store(url)
    try:
        await op(store)
    finally:
        await store.close()


def push(url: str, src, version: int) -> None:
    asyncio.run(_store_op(url, lambda s: push_version(s, "demo", src, version=str(version), who="test")))


def promote(url: str, version: int) -> None:
    asyncio.run(_store_op(url, lambda s: Releases(s).promote("demo", str(version), who="test")))


class CheckedStream:
    """Unversioned JSON inferences in a loop against one gateway; every answer is checked
    against the reference output of the version it names."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.versions: Counter[str] = Counter()
        self.failures: list[str] = []
        self.last_version = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._rng = np.random.default_rng(7)

    def _one(self, conn: http.client.HTTPConnection) -> None:
        x = self._rng.standard_normal((1, 16)).astype(np.float32)
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                       "data": x.ravel().tolist()}]}).encode()
        conn.request("POST", "/v2/models/demo/infer", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            self.failures.append(f"{resp.status}: {data[:200]!r}")
            return
        answer = json.loads(data)
        version = answer["model_version"]
        if resp.getheader("geogate-model-version") != version:
            self.failures.append(f"header {resp.getheader('geogate-model-version')} != body {version}")
        got = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(1, 8)
        if version not in ("1", "2") or not np.allclose(got, reference_outputs("tiny", int(version), x), atol=1e-4):
            self.failures.append(f"version {version}: output does not match that version")
            return
        self.versions[version] += 1
        self.last_version = version

    def _run(self) -> None:
        host, port = self.address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        while not self._stop.is_set():
            try:
                self._one(conn)
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.close()

    def start(self) -> CheckedStream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(40)


def gateway_version(address: str) -> str:
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                       "data": [0.0] * 16}]}).encode()
        conn.request("POST", "/v2/models/demo/infer", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return json.loads(data)["model_version"] if resp.status == 200 else ""
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return ""
    finally:
        conn.close()


def test_promotion_across_three_sites_under_load(tmp_path, procs, store_url):  # noqa: F811
    src = tmp_path / "src"
    for v in (1, 2):
        write_repository_entry(src, v)
    push(store_url, src / "demo", 1)
    promote(store_url, 1)
    world = World(tmp_path, "", procs, store_url=store_url).start()
    gateways = [r.http for r in world.regions.values()]
    world.wait(lambda: all(gateway_version(g) == "1" for g in gateways), WAIT_S, "v1 served in every region")

    streams = [CheckedStream(g).start() for g in gateways]
    try:
        # traffic is flowing everywhere before the promotion starts
        world.wait(lambda: all(s.versions["1"] >= ANSWERS_AROUND for s in streams), WAIT_S,
                   "v1 answers in every region")
        push(store_url, src / "demo", 2)
        promote(store_url, 2)
        promoted_at = time.monotonic()
        world.wait(lambda: all(s.last_version == "2" for s in streams), WAIT_S, "v2 served in every region")
        converged_s = time.monotonic() - promoted_at
        # and keeps flowing, without a failure, after it
        after = [s.versions["2"] for s in streams]
        world.wait(lambda: all(s.versions["2"] >= n + ANSWERS_AROUND for s, n in zip(streams, after, strict=True)),
                   WAIT_S, "more v2 answers in every region")
    finally:
        for s in streams:
            s.stop()
    for s in streams:
        assert s.failures == [], (s.address, s.failures[:5])
        assert s.versions["1"] > 0 and s.versions["2"] > 0, s.versions
    print(f"promotion reached every region in {converged_s:.2f} s; answers per region: "
          f"{[dict(s.versions) for s in streams]}")
