"""Anycast: ExaBGP with deploy/anycast's health-check process announces the gateway's service
prefix to a BIRD router while the gateway is ready, withdraws it when not, and announces it
again on recovery.  Two network namespaces joined by a veth pair stand for the gateway host
(ExaBGP + a stand-in gateway) and the router (BIRD, deploy/anycast/bird.conf as shipped); the
ExaBGP config is deploy/anycast/exabgp.conf with only the health-check's path changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import Proc

REPO = Path(__file__).resolve().parents[2]
ANYCAST = REPO / "deploy" / "anycast"
PREFIX = "203.0.113.80/32"
ROUTER_ADDR, HOST_ADDR = "10.99.0.1/30", "10.99.0.2/30"  # exist only inside the test's namespaces
GATEWAY_PORT = 8000  # the example config's URL; the port is free in a fresh namespace
EXAMPLE_RUN = "/usr/bin/env python3 /etc/geogate/anycast/healthcheck.py"
WAIT_S = 60.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (ip netns add)")


def _sh(*args: str) -> str:
    out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def _exabgp() -> str:
    path = Path(sys.executable).parent / "exabgp"
    if not path.exists():
        pytest.fail("exabgp is not installed in this environment: pip install exabgp (PyPI)")
    return str(path)


@pytest.fixture
def namespaces():
    if not shutil.which("bird") or not shutil.which("birdc"):
        pytest.fail("BIRD is not installed: apt-get install bird2 (scripts/system-deps.sh does it)")
    tag = f"{os.getpid() % 100000}"
    router, host = f"ggrtr{tag}", f"gghost{tag}"
    veth_r, veth_h = f"ggvr{tag}", f"ggvh{tag}"
    created: list[str] = []
    try:
        for ns in (router, host):
            _sh("ip", "netns", "add", ns)
            created.append(ns)
        _sh("ip", "link", "add", veth_r, "type", "veth", "peer", "name", veth_h)
        _sh("ip", "link", "set", veth_r, "netns", router)
        _sh("ip", "link", "set", veth_h, "netns", host)
        for ns, dev, addr in ((router, veth_r, ROUTER_ADDR), (host, veth_h, HOST_ADDR)):
            _sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield router, host
    finally:
        for ns in created:
            # Anything still running in our namespaces was started by this test.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # removes the veth too


def _routes(sock: str) -> str:
    out = subprocess.run(["birdc", "-s", sock, "show", "route", "all"], capture_output=True, text=True, timeout=10)
    return out.stdout


def _wait(cond, what: str, procs: list[Proc], timeout_s: float = WAIT_S) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if cond():
            return time.monotonic() - start
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}:\n{p.output()[-3000:]}" for p in procs)
    raise AssertionError(f"not {what} after {timeout_s}s\n{logs}")


def test_prefix_follows_gateway_health(namespaces, tmp_path, procs):
    router, host = namespaces
    exabgp = _exabgp()
    sock = str(tmp_path / "bird.ctl")
    state = tmp_path / "gateway.state"
    state.write_text("ok")

    config = (ANYCAST / "exabgp.conf").read_text()
    assert EXAMPLE_RUN in config
    config = config.replace(EXAMPLE_RUN, f"{sys.executable} {ANYCAST / 'healthcheck.py'}")
    (tmp_path / "exabgp.conf").write_text(config)

    bird = Proc(["ip", "netns", "exec", router, "bird", "-f", "-c", str(ANYCAST / "bird.conf"), "-s", sock,
                 "-P", str(tmp_path / "bird.pid")], name="bird")
    procs.append(bird)
    gateway = Proc(["ip", "netns", "exec", host, sys.executable, "-m", "loadtests.geo_standin", "--port",
                    str(GATEWAY_PORT), "--region", "eu-west", "--state-file", str(state)],
                   name="standin-gateway", cwd=str(REPO))
    procs.append(gateway)
    env = {"exabgp.daemon.user": "root", "exabgp.daemon.drop": "false", "exabgp.api.cli": "false",
           "exabgp.log.destination": "stdout"}
    speaker = Proc(["ip", "netns", "exec", host, exabgp, str(tmp_path / "exabgp.conf")], name="exabgp",
                   env=env, cwd=str(tmp_path))
    procs.append(speaker)
    everything = [bird, gateway, speaker]

    took = _wait(lambda: PREFIX in _routes(sock), "announced while the gateway is ready", everything)
    route = _routes(sock)
    assert "via 10.99.0.2" in route and "AS65001" in route, route
    print(f"announced after {took:.1f}s")

    state.write_text("down")  # readiness 503
    took = _wait(lambda: PREFIX not in _routes(sock), "withdrawn after readiness 503", everything)
    print(f"withdrawn {took:.1f}s after readiness went 503")
    assert "withdrawn" in speaker.output()

    state.write_text("ok")
    took = _wait(lambda: PREFIX in _routes(sock), "announced again after recovery", everything)
    print(f"announced again {took:.1f}s after recovery")

    gateway.kill()  # a dead gateway (connection refused) withdraws too
    _wait(lambda: PREFIX not in _routes(sock), "withdrawn after the gateway died", everything)
    assert bird.alive() and speaker.alive()
