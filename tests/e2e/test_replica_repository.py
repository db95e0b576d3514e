"""The model repository extension (HTTP and gRPC): load, version switching through a config override,
unload, index states and reasons, truthful readiness, while inference keeps flowing without a
single failure."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
import tritonclient.http.aio as thttp_aio
from tritonclient.utils import InferenceServerException

from replicas.demo.onnx_model import reference_outputs, write_repository_entry
from tests.procs import ReplicaProc


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0  # not listening (yet)


def index_states(client: thttp.InferenceServerClient, model: str) -> dict[str, tuple[str, str]]:
    return {row["version"]: (row["state"], row["reason"]) for row in client.get_model_repository_index()
            if row["name"] == model}


def _metrics(proc: ReplicaProc) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


class Flow:
    """Unversioned aio gRPC requests in a loop; records every answer's served version and failures."""

    def __init__(self, url: str):
        self.url = url
        self.served: list[str] = []
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _worker(self, seed: int) -> None:
        client = tgrpc_aio.InferenceServerClient(self.url)
        rng = np.random.default_rng(seed)
        try:
            while not self._stop.is_set():
                x = rng.standard_normal((2, 16)).astype(np.float32)
                inp = tgrpc_aio.InferInput("INPUT0", [2, 16], "FP32")
                inp.set_data_from_numpy(x)
                try:
                    result = await client.infer("demo", [inp])
                except InferenceServerException as exc:
                    self.failures.append(str(exc))
                    continue
                version = result.get_response().model_version
                if not np.allclose(result.as_numpy("OUTPUT0"), reference_outputs("tiny", int(version), x),
                                   atol=1e-4):
                    self.failures.append(f"wrong answer from version {version}")
                self.served.append(version)
                await asyncio.sleep(0.002)
        finally:
            await client.close()

    def start(self, workers: int = 4) -> None:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def _until(predicate, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_version_switching_while_requests_flow(tmp_path, procs):
    write_repository_entry(tmp_path, 1)
    proc = ReplicaProc(str(tmp_path))
    procs.append(proc)
    proc.wait_ready()
    http = thttp.InferenceServerClient(proc.http_url)
    grpc_client = tgrpc.InferenceServerClient(proc.grpc_url)
    # repository calls from aio clients, so the flow keeps running on this loop meanwhile
    http_aio = thttp_aio.InferenceServerClient(proc.http_url)
    grpc_aio = tgrpc_aio.InferenceServerClient(proc.grpc_url)
    flow = Flow(proc.grpc_url)
    flow.start()
    try:
        await _until(lambda: len(flow.served) > 10)
        assert set(flow.served) == {"1"}

        # a new version arrives on disk; an HTTP load picks it up (policy `all`) without interruption
        write_repository_entry(tmp_path, 2)
        await http_aio.load_model("demo")
        assert index_states(http, "demo") == {"1": ("READY", ""), "2": ("READY", "")}
        n = len(flow.served)
        await _until(lambda: len(flow.served) > n + 10)
        assert flow.served[-1] == "2"

        # a changed config.pbtxt reloads both versions (new sessions first, then the swap)
        cfg_path = tmp_path / "demo" / "config.pbtxt"
        cfg_path.write_text(cfg_path.read_text().replace("count: 1", "count: 2"))
        await http_aio.load_model("demo")
        assert (await http_aio.get_model_config("demo", "1"))["instance_group"][0]["count"] == 2
        assert index_states(http, "demo") == {"1": ("READY", ""), "2": ("READY", "")}
        n = len(flow.served)
        await _until(lambda: len(flow.served) > n + 10)
        metrics = await asyncio.to_thread(_metrics, proc)
        for v in ("1", "2"):  # the replaced handles' clean-up did not erase the new ones' series
            assert f'geogate_replica_model_ready{{model="demo",version="{v}"}} 1.0' in metrics

        # the sync agent's way: send the config back with a specific version policy (gRPC load)
        cfg = http.get_model_config("demo")
        cfg["version_policy"] = {"specific": {"versions": [1]}}
        await grpc_aio.load_model("demo", config=json.dumps(cfg))
        states = index_states(http, "demo")
        assert states["1"] == ("READY", "") and states["2"] == ("UNAVAILABLE", "unloaded")
        assert not http.is_model_ready("demo", "2") and http.is_model_ready("demo", "1")
        n = len(flow.served)
        await _until(lambda: len(flow.served) > n + 10)
        assert flow.served[-1] == "1"

        # and forward again to version 2 only, over HTTP
        cfg["version_policy"] = {"specific": {"versions": [2]}}
        await http_aio.load_model("demo", config=json.dumps(cfg))
        assert index_states(http, "demo")["2"] == ("READY", "")
        assert index_states(http, "demo")["1"] == ("UNAVAILABLE", "unloaded")
        n = len(flow.served)
        await _until(lambda: len(flow.served) > n + 10)
        assert flow.served[-1] == "2"
        assert status_of(f"http://{proc.http_url}/v2/health/ready") == 200
    finally:
        await flow.stop()
        await http_aio.close()
        await grpc_aio.close()
    assert flow.failures == []
    assert {"1", "2"} <= set(flow.served)

    # unload over gRPC: model gone, index says unloaded, server still ready (nothing left to load)
    grpc_client.unload_model("demo")
    assert not grpc_client.is_model_ready("demo")
    assert index_states(http, "demo")["2"] == ("UNAVAILABLE", "unloaded")
    assert status_of(f"http://{proc.http_url}/v2/models/demo") == 404
    assert status_of(f"http://{proc.http_url}/v2/health/ready") == 200
    # load again over gRPC (config.pbtxt: all versions)
    grpc_client.load_model("demo")
    assert grpc_client.get_model_metadata("demo").versions == ["1", "2"]
    ready = [(m.name, m.version, m.state) for m in grpc_client.get_model_repository_index().models]
    assert ready == [("demo", "1", "READY"), ("demo", "2", "READY")]
    http.close()
    grpc_client.close()


def test_load_failures_are_indexed_and_readiness_is_truthful(tmp_path, procs):
    write_repository_entry(tmp_path, 1)
    proc = ReplicaProc(str(tmp_path))
    procs.append(proc)
    proc.wait_ready()
    http = thttp.InferenceServerClient(proc.http_url)
    ready_url = f"http://{proc.http_url}/v2/health/ready"

    # unknown model
    with pytest.raises(InferenceServerException, match="no model directory"):
        http.load_model("ghost")

    # a broken model file: load answers 400 with the reason, the index shows UNAVAILABLE + reason
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")
    with pytest.raises(InferenceServerException, match="broken"):
        http.load_model("broken")
    state, reason = index_states(http, "broken")["1"]
    assert state == "UNAVAILABLE" and "failed to load" in reason
    # it should be loaded and is not: the replica says so
    assert status_of(ready_url) == 400
    assert not tgrpc.InferenceServerClient(proc.grpc_url).is_server_ready()
    # demo still serves
    assert http.is_model_ready("demo", "1")
    # an explicit unload removes it from what should be loaded: ready again
    http.unload_model("broken")
    assert status_of(ready_url) == 200

    # a bad config override is refused with a reason and changes nothing
    with pytest.raises(InferenceServerException, match="config"):
        http.load_model("demo", config='{"max_batch_size": "lots"')
    assert http.is_model_ready("demo", "1")
    # a policy that selects nothing on disk
    with pytest.raises(InferenceServerException, match="version policy"):
        http.load_model("demo", config=json.dumps({"version_policy": {"specific": {"versions": [9]}}}))
    http.close()


def test_startup_with_broken_model_is_live_not_ready(tmp_path, procs):
    write_repository_entry(tmp_path, 1)
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"garbage")
    proc = ReplicaProc(str(tmp_path))
    procs.append(proc)
    proc.wait_until(lambda: status_of(f"http://{proc.http_url}/v2/models/demo/ready") == 200, 60)
    assert status_of(f"http://{proc.http_url}/v2/health/live") == 200
    assert status_of(f"http://{proc.http_url}/v2/health/ready") == 400
    rows = {(r["name"], r["version"]): r for r in thttp.InferenceServerClient(proc.http_url)
            .get_model_repository_index()}
    assert rows[("broken", "1")]["state"] == "UNAVAILABLE" and rows[("broken", "1")]["reason"]
    assert rows[("demo", "1")]["state"] == "READY"
