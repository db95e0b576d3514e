"""Local autoscaler end to end: a real gateway (`geogate gateway`: capacity tracking is on by
default, /geogate/v1/capacity on its admin listener), the autoscaler process owning a real
unbound, real replica processes.

A load ramp through the gateway makes the gateway want 2 replicas; the autoscaler starts a
second replica and registers it in DNS; the gateway discovers it and uses both. The ramp down
(light traffic keeps flowing) lowers the wanted count, but the gateway holds 2 for the
scale-down window; then the autoscaler removes one replica from DNS, waits for the gateway to
let go of it, stops it, and no request (not even an attempt) fails. An operator override
(--desired-file) wins over the gateway's count.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from core.srv_discovery import SrvDiscovery
from gateway.world.srv_registry import UnboundRegistry
from replicas.demo.onnx_model import write_repository_entry
from tests.gateway_procs import get_json
from tests.procs import GEOGATE, Proc, free_port, http_ok

REGION = "eu-west"
POOL = "eu-ort"
SERVICE = f"_grpc._tcp.{POOL}.{REGION}.autoscale.test."
SCALE_DOWN_WINDOW_S = 4.0


def wait_for(pred, timeout_s: float, what: str, procs: list[Proc] = ()):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise AssertionError(f"{p.name} exited while waiting for {what}:\n{p.output()[-4000:]}")
        last = pred()
        if last:
            return last
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})\n{logs}")


def write_config(tmp_path: Path, repo: str, dns: str) -> tuple[Path, dict]:
    ports = {k: free_port() for k in ("http", "grpc", "admin")}
    text = f"""
[deployment]
name = "autoscale-test"

[health]
interval_ms = 300
timeout_ms = 1000
rise = 1
fall = 2

[gateway]
discovery_interval_ms = 300
access_log = false

[capacity]
replica_concurrency_limit = 1
target_utilization = 0.5
min_replicas = 1
max_replicas = 2
in_flight_window_s = 1.0
scale_up_window_s = 1.0
scale_down_window_s = {SCALE_DOWN_WINDOW_S}
standard_max_utilization = 100.0  # this test is about scaling: nothing is refused
sample_interval_ms = 100
autoscale_dns = "{dns}"
autoscale_interval_ms = 300
autoscale_drain_wait_ms = 20000

[[regions]]
name = "{REGION}"
location = [53.35, -6.26]
http = "127.0.0.1:{ports['http']}"
grpc = "127.0.0.1:{ports['grpc']}"
admin = "127.0.0.1:{ports['admin']}"

  [[regions.pools]]
  name = "{POOL}"
  discover = "dns+srv://{SERVICE}"
  discover_scheme = "grpc"
  discover_resolver = "{dns}"
  repository = "{repo}"
"""
    path = tmp_path / "autoscale.toml"
    path.write_text(text)
    return path, ports


class Load:
    """Closed-loop HTTP clients through the gateway; counts answers by status and replica."""

    def __init__(self, url: str, threads: int, pause_s: float = 0.0) -> None:
        self.url = url
        self.pause_s = pause_s
        self.stop_flag = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        client = httpclient.InferenceServerClient(self.url, connection_timeout=30, network_timeout=30)
        x = np.ones((1, 16), dtype=np.float32)
        inp = httpclient.InferInput("INPUT0", [1, 16], "FP32")
        inp.set_data_from_numpy(x)
        while not self.stop_flag.is_set():
            try:
                client.infer("demo", [inp])
                with self.lock:
                    self.ok += 1
            except Exception as exc:  # any failure is what this test is about
                with self.lock:
                    self.failures.append(repr(exc))
            if self.pause_s:
                self.stop_flag.wait(self.pause_s)
        client.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)


def pool_replicas(admin: str) -> list[dict]:
    try:
        summary = get_json(f"http://{admin}/geogate/v1/region")
    except OSError:
        return []
    for p in summary["pools"]:
        if p["name"] == POOL:
            return p["replicas"]
    return []


def routable(admin: str) -> list[str]:
    return sorted(r["url"] for r in pool_replicas(admin) if r["routable"])


def read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())[f"{REGION}/{POOL}"]
    except (OSError, ValueError, KeyError):
        return {}


def srv_answer(dns: str) -> list:
    return asyncio.run(SrvDiscovery(SERVICE, "grpc", resolver=dns, interval_s=1).resolve())


def capacity(admin: str) -> dict:
    return get_json(f"http://{admin}/geogate/v1/capacity")


@pytest.mark.timeout(240)
def test_autoscaler_scales_up_on_load_and_drains_down_without_failures(tmp_path, procs):
    repo = tmp_path / "repo"
    write_repository_entry(repo, 1)
    dns = f"127.0.0.1:{free_port()}"
    config, ports = write_config(tmp_path, str(repo), dns)
    desired_file = tmp_path / "desired.json"
    status_file = tmp_path / "status.json"

    scaler = Proc([sys.executable, "-m", "gateway.world.autoscaler", "--config", str(config), "--desired-file",
                   str(desired_file), "--status-file", str(status_file), "--workdir", str(tmp_path / "as")],
                  name="autoscaler")
    procs.append(scaler)
    gw = Proc([*GEOGATE, "gateway", "--config", str(config), "--region", REGION], name="gateway")
    procs.append(gw)
    admin = f"127.0.0.1:{ports['admin']}"
    http = f"127.0.0.1:{ports['http']}"
    both = [scaler, gw]

    # 1. idle: the gateway wants min_replicas (1); the autoscaler runs one, registered in DNS
    wait_for(lambda: http_ok(f"http://{http}/v2/health/ready"), 120, "the gateway ready with one replica", both)
    cap = capacity(admin)
    assert cap["pools"][POOL]["desired_replicas"] == 1, cap
    # one region: nothing to spill to, however the first samples looked
    assert cap["spill"]["spilling"] is False and set(cap["admission"]) == {"critical", "standard", "sheddable"}
    assert len(srv_answer(dns)) == 1
    first = routable(admin)
    assert len(first) == 1

    # 2. ramp up: in-flight over 0.5 x limit 1 -> the gateway wants 2 -> a second replica joins
    with Load(http, threads=4) as load:
        wait_for(lambda: len(routable(admin)) == 2, 120, "a second routable replica", both)
        cap = capacity(admin)["pools"][POOL]
        assert cap["desired_replicas"] == 2 and "want" in cap["reason"], cap
        st = read_status(status_file)
        assert st["source"] == "gateway" and len(st["replicas"]) == 2, st
        assert len(srv_answer(dns)) == 2
        text = _metrics(admin)
        # both replicas took traffic
        wait_for(lambda: len(_served(_metrics(admin))) == 2, 30, "traffic on the new replica", both)
    assert not load.failures, load.failures[:5]
    assert f'geogate_pool_desired_replicas{{pool="{POOL}",region="{REGION}"}} 2.0' in text
    assert f'geogate_pool_desired_replicas_reason{{pool="{POOL}",reason="in-flight' in text
    assert 'geogate_admission_decisions_total{outcome="shed",priority="standard",region="eu-west"} 0.0' in text
    ramp_down_at = time.monotonic()

    # 3. ramp down, light traffic keeps flowing: the gateway holds 2 for the scale-down window,
    #    then wants 1; the autoscaler drains one replica first, so nothing fails
    with Load(http, threads=1, pause_s=0.05) as load:
        holding = wait_for(lambda: "holding 2" in (r := capacity(admin)["pools"][POOL]["reason"]) and r,
                           30, "the gateway holding 2 replicas in the scale-down window", both)
        assert f"{SCALE_DOWN_WINDOW_S:g} s scale-down window" in holding
        wait_for(lambda: capacity(admin)["pools"][POOL]["desired_replicas"] == 1, 60, "desired back to 1", both)
        assert time.monotonic() - ramp_down_at >= SCALE_DOWN_WINDOW_S  # not before the window ran out
        before = load.ok
        wait_for(lambda: len(read_status(status_file).get("replicas", [])) == 1, 90,
                 "the autoscaler down to one replica", both)
        during = load.ok - before
        time.sleep(1.0)  # traffic keeps going on the remaining replica
    assert during > 0, "no request was answered while the replica drained"
    assert not load.failures, load.failures[:5]
    assert len(routable(admin)) == 1
    assert len(pool_replicas(admin)) == 1  # the other one is gone from the gateway, not just unroutable
    assert len(srv_answer(dns)) == 1
    assert "stopped (exit 0)" in scaler.output(), scaler.output()[-3000:]
    assert "draining" in scaler.output()
    # not even an attempt failed (a retry would have hidden it from the clients): the gateway
    # had stopped choosing the replica before it was asked to stop
    failed = [line for line in _metrics(admin).splitlines()
              if line.startswith("geogate_upstream_attempts_total{") and 'outcome="success"' not in line]
    assert not failed, failed

    # 4. the operator's override wins over the gateway's count
    desired_file.write_text(json.dumps({f"{REGION}/{POOL}": 2}))
    wait_for(lambda: len(routable(admin)) == 2, 120, "a second replica on the operator's word", both)
    assert read_status(status_file)["source"] == "override"


def _served(text: str) -> set[str]:
    return {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
            if line.startswith("geogate_upstream_attempts_total{") and 'outcome="success"' in line}


def _metrics(admin: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        return r.read().decode()


def test_srv_registry_answers_what_discovery_reads(tmp_path):
    """The autoscaler's DNS server, as the gateway's SRV discovery sees it."""
    dns = f"127.0.0.1:{free_port()}"
    reg = UnboundRegistry(tmp_path / "dns", dns, services=[SERVICE]).start()
    try:
        assert srv_answer(dns) == []  # NXDOMAIN: no replicas (a real removal)
        reg.set_targets(SERVICE, [("127.0.0.1", 18101, 1), ("127.0.0.1", 18102, 3)])
        assert srv_answer(dns) == [("grpc://127.0.0.1:18101", 1), ("grpc://127.0.0.1:18102", 3)]
        reg.set_targets(SERVICE, [("127.0.0.1", 18102, 1)])
        assert srv_answer(dns) == [("grpc://127.0.0.1:18102", 1)]
    finally:
        reg.stop()


def test_autoscaler_refuses_a_config_without_its_dns(tmp_path):
    cfg = tmp_path / "plain.toml"
    cfg.write_text('[deployment]\nname = "x"\n')
    p = Proc([sys.executable, "-m", "gateway.world.autoscaler", "--config", str(cfg)], name="autoscaler-bad")
    assert p.popen.wait(60) == 2
    assert "[capacity] autoscale_dns is not set" in p.output()


def test_world_lines_make_an_autoscaled_pool(tmp_path):
    from core.config import parse_config
    from gateway.world.autoscaler import autoscaled_pools, world_capacity_lines, world_pool_lines

    dns = "127.0.0.1:15353"
    text = "\n".join([*world_capacity_lines(dns, max_replicas=3), "[[regions]]", 'name = "eu-west"',
                      'admin = "127.0.1.1:18002"', *world_pool_lines("eu-west", "eu-west-ort", "/r/eu", dns),
                      "[[regions]]", 'name = "us-east"', "  [[regions.pools]]", '  name = "static"',
                      '  replicas = ["grpc://127.0.0.1:1"]'])
    (pool,) = autoscaled_pools(parse_config(text))
    assert (pool.region, pool.pool, pool.service, pool.scheme, pool.repository, pool.admin, pool.max_replicas) == (
        "eu-west", "eu-west-ort", "_grpc._tcp.eu-west-ort.eu-west.autoscale.geogate.", "grpc", "/r/eu",
        "127.0.1.1:18002", 3)
