"""Active health checks against real replica processes (`geogate replica`), over HTTP and gRPC:
healthy after start, ready versions follow loads and unloads, kill -9 -> unhealthy within about
fall * interval, restart on the same ports -> healthy again, hung (SIGSTOP) -> probe timeouts."""

import asyncio
import json
import signal
import time
import urllib.request

import pytest

from core.config import HealthSection
from health.active import ActiveHealthChecker
from health.replica_state import ReplicaState
from replicas.demo.onnx_model import write_repository_entry
from tests.procs import ReplicaProc, async_wait_until

SETTINGS = HealthSection(interval_ms=150, timeout_ms=1000, rise=2, fall=2)
WAIT_S = 30.0
# kill -9 -> unhealthy: fall probes (interval +- 10% jitter apart, each at most timeout_ms),
# plus slack for a loaded 2-core machine.
DETECT_SLACK_S = 3.0


def repository_call(replica: ReplicaProc, path: str, body: dict | None = None) -> int:
    req = urllib.request.Request(f"http://{replica.http_url}/v2/repository/models/demo/{path}",
                                 data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status


@pytest.mark.parametrize("scheme", ["http", "grpc"])
async def test_replica_lifecycle(scheme, tmp_path, procs):
    repo = tmp_path / "models"
    write_repository_entry(repo, 1)
    replica = ReplicaProc(str(repo))
    procs.append(replica)
    await asyncio.to_thread(replica.wait_ready)

    changes: list[bool] = []
    checker = ActiveHealthChecker(SETTINGS, on_change=lambda s: changes.append(s.healthy))
    address = replica.http_url if scheme == "http" else replica.grpc_url
    state = ReplicaState(f"{scheme}://{address}", pool="eu-ort")
    checker.add(state)
    await checker.start()
    try:
        await async_wait_until(lambda: state.healthy, WAIT_S, "healthy")
        assert state.ready_versions == {"demo": {"1"}}
        assert state.has_model("demo", "1") and not state.has_model("demo", "2")
        assert state.probe_rtt_ewma_s > 0

        # A second version appears on disk and is loaded (version_policy all): both ready.
        write_repository_entry(repo, 2)
        assert await asyncio.to_thread(repository_call, replica, "load") == 200
        await async_wait_until(lambda: state.ready_versions == {"demo": {"1", "2"}}, WAIT_S, "seeing version 2")

        # Unloaded: the model is no longer ready there, the replica itself stays healthy.
        assert await asyncio.to_thread(repository_call, replica, "unload") == 200
        await async_wait_until(lambda: not state.has_model("demo"), WAIT_S, "seeing the unload")
        assert state.healthy
        assert await asyncio.to_thread(repository_call, replica, "load") == 200
        await async_wait_until(lambda: state.has_model("demo", "2"), WAIT_S, "seeing the reload")

        # kill -9: unhealthy within about fall probe intervals.
        await asyncio.to_thread(replica.kill)
        killed_at = time.monotonic()
        await async_wait_until(lambda: not state.healthy, WAIT_S, "unhealthy after kill -9")
        took_s = time.monotonic() - killed_at
        limit_s = SETTINGS.fall * (SETTINGS.interval_ms * 1.1 + SETTINGS.timeout_ms) / 1000 + DETECT_SLACK_S
        assert took_s < limit_s, f"unhealthy only after {took_s:.2f} s"
        assert state.health_cause in ("connect refused", "connection reset"), state.health_reason
        assert state.ready_versions == {"demo": {"1", "2"}}  # last known, for panic routing

        # Restart on the same ports: healthy again after `rise` good probes.
        restarted = ReplicaProc(str(repo), http_port=replica.http_port, grpc_port=replica.grpc_port,
                                metrics_port=replica.metrics_port)
        procs.append(restarted)
        await asyncio.to_thread(restarted.wait_ready)
        await async_wait_until(lambda: state.healthy, WAIT_S, "healthy after restart")
        assert state.health_reason == "" and state.ready_versions == {"demo": {"1", "2"}}

        # Hung (SIGSTOP): connections open but nothing answers -> probe timeouts.
        await asyncio.to_thread(restarted.kill, signal.SIGSTOP)
        try:
            await async_wait_until(lambda: not state.healthy, WAIT_S, "unhealthy while hung")
            assert state.health_reason == f"probe timeout after {SETTINGS.timeout_ms} ms"
        finally:
            await asyncio.to_thread(restarted.kill, signal.SIGCONT)
        await async_wait_until(lambda: state.healthy, WAIT_S, "healthy after SIGCONT")
        flips = [h for i, h in enumerate(changes) if i == 0 or h != changes[i - 1]]
        assert flips == [True, False, True, False, True]  # on_change also ran for each version change
        assert len(changes) > len(flips)
    finally:
        await checker.close()
