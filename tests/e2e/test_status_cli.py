"""`geogate status` against the status page harness (a real aiohttp process per test module)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.procs import free_port
from tests.status_page_harness import eu_west_down, healthy_world, launch, write_data

CLI_TIMEOUT_S = 60


def geogate_status(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "220", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "gateway", "status", *args], capture_output=True, text=True,
                          env=env, timeout=CLI_TIMEOUT_S)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = launch(str(tmp_path_factory.mktemp("status-cli")), healthy_world(time.time()))
    yield h
    h.proc.stop()


def test_json_is_the_world_view(harness):
    out = geogate_status("--url", harness.admin_url("us-east"), "--json")
    assert out.returncode == 0, out.stderr
    world = json.loads(out.stdout)
    assert world["served_by"] == "us-east"
    assert {r["name"]: r["health"] for r in world["regions"]} == {
        "eu-west": "healthy", "us-east": "degraded", "ap-south": "down"}
    assert world["models"]["demo"]["stable"] == "2"


def test_tables_show_regions_replicas_versions_and_events(harness):
    # No --url: the first region's admin address from the config.
    out = geogate_status("--config", harness.config_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "served by eu-west" in text
    lines: dict[str, str] = {}  # first line starting with each word: the regions table comes first
    for line in text.splitlines():
        if line.strip():
            lines.setdefault(line.split()[0], line)
    assert "healthy" in lines["eu-west"] and "2/2" in lines["eu-west"] and "250.0" in lines["eu-west"]
    assert "degraded" in lines["us-east"] and "not routable (ejected)" in lines["us-east"]
    assert "unreachable" in lines["ap-south"] and "connection refused" in lines["ap-south"]
    ejected = next(line for line in text.splitlines() if "grpc://127.0.0.1:18302" in line)
    assert "ejected" in ejected and "3 consecutive failures" in ejected
    demo = next(line for line in text.splitlines() if line.strip().startswith("demo "))
    assert "3 @ 10%" in demo and "ready 2,3" in demo and "loading 3" in demo and "failed 4" in demo
    assert "demo version 2 promoted to stable" in text and "ejection" in text


def test_falls_back_to_the_next_region_when_the_first_is_down(harness, tmp_path):
    # Same deployment, but the first region's admin address is dead: the CLI asks the next one.
    config = open(harness.config_path).read()
    dead = f"127.0.0.1:{free_port()}"
    config = config.replace(f'admin = "127.0.0.1:{harness.ports["eu-west"]["admin"]}"', f'admin = "{dead}"', 1)
    path = tmp_path / "first-down.toml"
    path.write_text(config)
    out = geogate_status("--config", str(path), "--json")
    assert out.returncode == 0, out.stderr
    world = json.loads(out.stdout)
    assert world["served_by"] == "us-east"  # the gateway's own config still reaches eu-west


def test_reflects_a_region_going_down(harness):
    write_data(harness.data_path, eu_west_down(healthy_world(time.time()), time.time()))
    try:
        deadline = time.monotonic() + 20
        while True:
            world = json.loads(geogate_status("--url", harness.admin_url("us-east"), "--json").stdout)
            eu = next(r for r in world["regions"] if r["name"] == "eu-west")
            if eu["health"] == "down" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert eu["health"] == "down" and "unhealthy" in eu["reason"]
        text = geogate_status("--url", harness.admin_url("us-east")).stdout
        assert any("probe timeout after 500 ms" in line and "unhealthy" in line for line in text.splitlines())
        assert "failover" in text
    finally:
        write_data(harness.data_path, healthy_world(time.time()))


def test_unreachable_gateway_is_an_error_naming_the_address():
    port = free_port()
    out = geogate_status("--url", f"http://127.0.0.1:{port}")
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr and "refused" in out.stderr.lower()


def test_watch_refreshes_until_interrupted(harness):
    env = {**os.environ, "COLUMNS": "160"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "status", "--url", harness.admin_url("eu-west"),
                             "--watch", "--json", "--interval-s", "0.7"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
        assert first["served_by"] == second["served_by"] == "eu-west"
        # a fresh world each time (the gateway caches one for 0.5 s; the interval is longer)
        assert second["generated_at"] > first["generated_at"]
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=CLI_TIMEOUT_S)
    assert rc == 0, proc.stderr.read()
