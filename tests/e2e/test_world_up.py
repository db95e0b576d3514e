"""`geogate up` end to end: the real local world (replicas, sync agents, gateways, GeoDNS under
the supervisor) started as a user starts it, in a temp directory on a port block nobody uses.

- every command it prints (curl, the tritonclient script, dig, `geogate status`, and the
  `geogate models promote` it suggests) works exactly as printed;
- inference through every region's gateway over HTTP and gRPC (tritonclient), and over DNS
  (dig the service name with each region's client subnet, call the address it answers);
- a replica killed with SIGKILL is reported and restarted, and its region is whole again;
- promoting v2 with the printed command makes every region answer with version 2;
- SIGTERM stops every process and leaves no port listening;
- other shapes: `--regions/--replicas --store s3://... --s3-endpoint`, `--config FILE` (with
  a gRPC replica URL and a Triton pool it must leave out, saying why), and refusals;
- `--autoscale`: the autoscaler gives the pool its minimum through DNS SRV, the printed
  override scales it up and down again (world.json follows), SIGTERM leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from gateway.world import plan as world_plan
from gateway.world import ports as world_ports
from replicas.demo.onnx_model import reference_outputs
from tests.procs import GEOGATE, Proc, http_ok
from tests.s3_fixtures import moto_s3  # noqa: F401

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
CONVERGE_TIMEOUT_S = 60.0
POLL_S = 0.2
X = np.full((1, 16), 0.5, dtype=np.float32)
TCP_LISTEN = "0A"  # /proc/net/tcp state code


def _base_port() -> int:
    """A port block below the ephemeral range (client sockets never land in it); `geogate up`
    moves it up by 1000 itself if another test holds part of it."""
    return random.randrange(20000, 31000, 100)


# ---------------------------------------------------------------- process and port checks


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # state, ..., starttime (field 22)


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        st = _start_time(p)
        if st is not None:
            out[p] = st
        todo += children.get(p, [])
    return out


def _still_running(procs: dict[int, str]) -> list[int]:
    return [p for p, st in procs.items() if _start_time(p) == st]


def _listening(ports: set[int], *, udp_ports: set[int] = frozenset()) -> set[int]:
    """Which of ``ports`` have a TCP socket in LISTEN (and which of ``udp_ports`` a bound UDP
    socket) on this machine, from /proc/net."""
    found: set[int] = set()
    for name, wanted, listen_only in (("tcp", ports, True), ("tcp6", ports, True),
                                      ("udp", udp_ports, False), ("udp6", udp_ports, False)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            port = int(parts[1].rsplit(":", 1)[1], 16)
            if port in wanted and (not listen_only or parts[3] == TCP_LISTEN):
                found.add(port)
    return found


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


# ---------------------------------------------------------------- the world under test


@dataclass
class World:
    proc: Proc
    directory: Path
    info: dict = field(default_factory=dict)

    @property
    def json_path(self) -> Path:
        return self.directory / "world.json"

    def output(self) -> str:
        return self.proc.output()

    def wait_ready(self) -> World:
        self.proc.wait_until(self.json_path.exists, READY_TIMEOUT_S, "world.json written")
        self.proc.wait_until(lambda: "Ctrl-C stops everything" in self.output(), 10, "summary printed")
        self.reload()
        return self

    def reload(self) -> dict:
        self.info = json.loads(self.json_path.read_text())
        return self.info

    def region(self, name: str) -> dict:
        return next(r for r in self.info["regions"] if r["name"] == name)

    def printed(self, key: str) -> str:
        """The command world.json lists under ``key``, checked to be printed verbatim on its own line."""
        cmd = self.info["commands"][key]
        assert cmd in self.output().splitlines(), f"{key} command not printed as is:\n{cmd}\n{self.output()}"
        return cmd

    def udp_ports(self) -> set[int]:
        """GeoDNS, and the autoscaler's SRV DNS when there is one."""
        return {_port(self.info["dns"]["listen"])} | ({_port(a["dns"])} if (a := self.info["autoscaler"]) else set())

    def tcp_ports(self) -> set[int]:
        ports = self.udp_ports()
        for r in self.info["regions"]:
            ports |= {_port(r[k]) for k in ("http", "grpc", "admin")}
            ports |= {_port(rep[k]) for rep in r["replicas"] for k in ("http", "grpc", "metrics")}
            ports |= {_port(rep[k]) for p in r["autoscaled"] for rep in p["replicas"] for k in ("http", "grpc")}
        return ports

    def stop(self) -> None:
        """SIGTERM to `geogate up` itself (not its group: it must stop its children)."""
        os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.popen.wait(STOP_TIMEOUT_S)


def start_world(tmp: Path, *args: str, env: dict | None = None) -> World:
    directory = tmp / "state"
    proc = Proc([*GEOGATE, "up", "--dir", str(directory), *args], name="geogate-up", cwd=str(tmp), env=env)
    return World(proc, directory)


def run_printed(cmd: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """A printed command, run by a shell exactly as a user pastes it."""
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout_s,
                          cwd="/", check=False)


def infer_http(address: str) -> tuple[dict, dict]:
    """(response headers, body) of one unversioned JSON inference."""
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                   "data": X.ravel().tolist()}]}).encode()
    req = urllib.request.Request(f"http://{address}/v2/models/demo/infer", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return {k.lower(): v for k, v in resp.headers.items()}, json.loads(resp.read())


def check_output(version: str, values) -> None:
    np.testing.assert_allclose(np.asarray(values, dtype=np.float32).reshape(1, -1),
                               reference_outputs("tiny", int(version), X), rtol=1e-4, atol=1e-4)


def tritonclient_infer(region: dict, protocol: str) -> str:
    """Served version of one inference through the region's gateway with tritonclient."""
    tc = httpclient if protocol == "http" else grpcclient
    client = tc.InferenceServerClient(region[protocol])
    try:
        inp = tc.InferInput("INPUT0", [1, 16], "FP32")
        inp.set_data_from_numpy(X)
        result = client.infer("demo", [inp])
        response = result.get_response()
        version = response["model_version"] if protocol == "http" else response.model_version
        check_output(version, result.as_numpy("OUTPUT0"))
        return str(version)
    finally:
        client.close()


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # the thing is still coming up; keep the reason for the message
            last = exc
        time.sleep(POLL_S)
    raise AssertionError(f"{what} not seen within {timeout_s}s (last: {last!r})")


# ---------------------------------------------------------------- the default world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = start_world(tmp_path_factory.mktemp("world"), "--base-port", str(_base_port()))
    try:
        yield w.wait_ready()
    finally:
        if w.proc.alive():
            w.proc.stop(STOP_TIMEOUT_S)


def test_default_shape_is_ready_and_described(world: World):
    info = world.info
    assert [r["name"] for r in info["regions"]] == ["eu-west", "us-east", "ap-south"]
    for r in info["regions"]:
        assert len(r["replicas"]) == 2
        # Every replica reached over HTTP: each protocol's clients use both replicas.
        assert all(rep["url"].startswith("http://127.0.0.1:") for rep in r["replicas"])
        assert r["addresses"] and r["client_cidrs"]
    assert info["models"] == {"demo": {"stable": "1", "versions": ["1", "2"]}}
    assert Path(info["config"]) == world.directory / "world.toml"
    # One table row per region, with the gateway's addresses uncut.
    out = world.output()
    for r in info["regions"]:
        assert re.search(rf"{r['name']}\s.*{re.escape(r['http'])}.*{re.escape(r['grpc'])}", out), out


def test_printed_commands_work_as_printed(world: World):
    first = world.info["regions"][0]

    res = run_printed(world.printed("curl"))
    assert res.returncode == 0, res.stderr
    head, _, body = res.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), res.stdout
    assert f"geogate-region: {first['name']}" in head.lower()
    answer = json.loads(body)
    check_output(answer["model_version"], answer["outputs"][0]["data"])

    res = run_printed(world.printed("tritonclient"))
    assert res.returncode == 0, res.stderr
    m = re.search(r"demo version (\d+) OUTPUT0=(.*)", res.stdout)
    assert m, res.stdout
    check_output(m.group(1), [float(v) for v in m.group(2).split()])

    res = run_printed(world.printed("dig"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [first["addresses"][0]]

    res = run_printed(world.printed("status"))
    assert res.returncode == 0, res.stderr
    for r in world.info["regions"]:
        assert re.search(rf"{r['name']}\W.*healthy", res.stdout), res.stdout

    # The release command is run (and checked) by test_promote_v2_with_the_printed_command.
    assert " models promote demo 2 --config " in world.info["commands"]["release"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_inference_through_every_region(world: World, protocol: str):
    for r in world.info["regions"]:
        tritonclient_infer(r, protocol)
        if protocol == "http":  # local-first: the region's own replicas answer
            headers, _ = infer_http(r["http"])
            assert headers["geogate-region"] == r["name"]
            assert headers["geogate-replica"] in {rep["url"] for rep in r["replicas"]}


def test_geodns_sends_each_region_to_its_gateway(world: World):
    dns_host, dns_port = world.info["dns"]["listen"].rsplit(":", 1)
    service = world.info["dns"]["service"].rstrip(".")
    for r in world.info["regions"]:
        res = subprocess.run(["dig", f"@{dns_host}", "-p", dns_port, "+short", service, "A",
                              f"+subnet={r['client_cidrs'][0]}"], capture_output=True, text=True, timeout=10,
                             check=False)
        assert res.returncode == 0, res.stderr
        (address,) = res.stdout.split()
        assert address == r["addresses"][0]
        headers, answer = infer_http(f"{address}:{_port(r['http'])}")
        assert headers["geogate-region"] == r["name"]
        check_output(answer["model_version"], answer["outputs"][0]["data"])


def test_crashed_replica_is_reported_and_restarted(world: World):
    region = world.region("us-east")
    victim = region["replicas"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    def restarted():
        world.reload()
        rep = next(x for x in world.region("us-east")["replicas"] if x["name"] == victim["name"])
        return rep if rep["pid"] != victim["pid"] and rep["restarts"] >= 1 else None

    fresh = wait_for(restarted, 30, f"{victim['name']} restarted in world.json")
    out = world.output()
    assert f"{victim['name']} (pid {victim['pid']}) killed by SIGKILL" in out
    assert f"{victim['name']} restarted (pid {fresh['pid']}" in out
    # The new process serves the model on the same port, and the region is whole again.
    wait_for(lambda: http_ok(f"http://{fresh['http']}/v2/models/demo/ready"), 60, "restarted replica ready")

    def whole():
        with urllib.request.urlopen(f"http://{region['admin']}/geogate/v1/region", timeout=5) as resp:
            return json.loads(resp.read())["replicas"] == {"healthy": 2, "total": 2}

    wait_for(whole, 30, "us-east 2/2 healthy at its gateway")
    assert tritonclient_infer(region, "grpc")


def test_promote_v2_with_the_printed_command(world: World):
    res = run_printed(world.printed("release"))
    assert res.returncode == 0, res.stderr
    assert "promoted demo version 2" in res.stdout
    for r in world.info["regions"]:
        for protocol in ("http", "grpc"):
            wait_for(lambda r=r, p=protocol: tritonclient_infer(r, p) == "2", CONVERGE_TIMEOUT_S,
                     f"{r['name']} answering version 2 over {protocol}")
        _, answer = infer_http(r["http"])
        assert answer["model_version"] == "2"


def test_sigterm_stops_every_process_and_frees_every_port(world: World):
    world.reload()
    procs = _descendants(world.proc.pid)
    named = {r["gateway_pid"] for r in world.info["regions"]} | {world.info["dns"]["pid"]}
    named |= {rep["pid"] for r in world.info["regions"] for rep in r["replicas"]}
    assert named <= set(procs), "world.json names processes that are not the world's children"
    ports, dns_port = world.tcp_ports(), world.udp_ports()
    # The check below means something only if the world really listens on them now.
    assert _listening(ports, udp_ports=dns_port) == ports

    world.stop()
    assert world.proc.popen.returncode == 0, world.output()[-3000:]
    assert "all processes stopped." in world.output()
    assert _still_running(procs) == []
    assert _listening(ports, udp_ports=dns_port) == set()
    assert not world.json_path.exists()  # scripts must not mistake a stopped world for a running one


# ---------------------------------------------------------------- other shapes


def _run_small_world(w: World, expect_regions: list[str], check=None) -> None:
    """Ready, ``check(w)``, every region serves over HTTP and gRPC, SIGTERM leaves nothing behind."""
    try:
        w.wait_ready()
        assert [r["name"] for r in w.info["regions"]] == expect_regions
        if check:
            check(w)
        for r in w.info["regions"]:
            for protocol in ("http", "grpc"):
                assert tritonclient_infer(r, protocol) == "1"
        res = run_printed(w.printed("curl"))
        assert res.returncode == 0 and " 200 " in res.stdout.splitlines()[0], res.stdout + res.stderr
        procs, ports, dns_port = _descendants(w.proc.pid), w.tcp_ports(), w.udp_ports()
        assert _listening(ports, udp_ports=dns_port) == ports
        w.stop()
        assert w.proc.popen.returncode == 0, w.output()[-3000:]
        assert _still_running(procs) == []
        assert _listening(ports, udp_ports=dns_port) == set()
    finally:
        if w.proc.alive():
            w.proc.stop(STOP_TIMEOUT_S)


def test_regions_replicas_and_s3_store(tmp_path, moto_s3):  # noqa: F811
    store = f"s3://{moto_s3.bucket}/world-{uuid.uuid4().hex[:8]}"
    w = start_world(tmp_path, "--regions", "us-east,ap-southeast", "--replicas", "1", "--store", store,
                    "--s3-endpoint", moto_s3.endpoint_url, "--base-port", str(_base_port()), env=moto_s3.env())
    _run_small_world(w, ["us-east", "ap-southeast"])
    assert all(len(r["replicas"]) == 1 for r in w.info["regions"])
    assert w.info["store"] == store
    text = (w.directory / "world.toml").read_text()
    assert f'url = "{store}"' in text and f'endpoint_url = "{moto_s3.endpoint_url}"' in text


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config_file_runs_as_written(tmp_path):
    """A hand-written config: one region on 127.0.0.1, a geogate pool reached over gRPC (the
    replica's HTTP port is picked by geogate up) and a Triton pool it cannot start."""
    http, grpc, admin, dns, replica = (_free_tcp_port() for _ in range(5))
    config = tmp_path / "mine.toml"
    config.write_text(f"""
[store]
url = "file://{tmp_path / 'store'}"
[health]
interval_ms = 300
[sync]
poll_interval_ms = 500
[dns]
listen = "127.0.0.1:{dns}"
[[regions]]
name = "eu-west"
location = [53.35, -6.26]
http = "127.0.0.1:{http}"
grpc = "127.0.0.1:{grpc}"
admin = "127.0.0.1:{admin}"
addresses = ["127.0.0.1"]
  [[regions.pools]]
  name = "ort"
  replicas = ["grpc://127.0.0.1:{replica}"]
  repository = "{tmp_path / 'repo'}"
  [[regions.pools]]
  name = "gpu"
  kind = "triton"
  replicas = ["grpc://127.0.0.1:1"]
  repository = "{tmp_path / 'triton-repo'}"
""")

    def check(w: World) -> None:
        assert w.info["config"] == str(config)
        (rep,) = w.info["regions"][0]["replicas"]
        assert rep["url"] == f"grpc://127.0.0.1:{replica}" and rep["grpc"] == f"127.0.0.1:{replica}"
        assert any("pool gpu: kind 'triton' is not started" in s for s in w.info["not_started"])
        assert "not started: region eu-west pool gpu" in w.output()
        assert w.info["models"]["demo"]["stable"] == "1"  # an empty store gets the demo model

    _run_small_world(start_world(tmp_path, "--config", str(config)), ["eu-west"], check)


def test_config_with_control_tokens_runs(tmp_path):
    """A pool with a control_token_file: geogate up starts its replicas with that token, so the
    sync agent (which presents it) loads the model and the region serves; the replicas' repository
    API refuses a caller without it."""
    http, grpc, admin, dns, replica = (_free_tcp_port() for _ in range(5))
    token = "world-up-control-token-" + uuid.uuid4().hex
    (tmp_path / "replica-control.token").write_text(token + "\n")
    config = tmp_path / "tokens.toml"
    config.write_text(f"""
[store]
url = "file://{tmp_path / 'store'}"
[health]
interval_ms = 300
[sync]
poll_interval_ms = 500
[dns]
listen = "127.0.0.1:{dns}"
[[regions]]
name = "eu-west"
location = [53.35, -6.26]
http = "127.0.0.1:{http}"
grpc = "127.0.0.1:{grpc}"
admin = "127.0.0.1:{admin}"
addresses = ["127.0.0.1"]
  [[regions.pools]]
  name = "ort"
  replicas = ["http://127.0.0.1:{replica}"]
  repository = "{tmp_path / 'repo'}"
  control_token_file = "replica-control.token"
""")

    def index(authorization: str | None) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{replica}/v2/repository/index", data=b"{}", method="POST",
                                     headers={"Authorization": authorization} if authorization else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def check(w: World) -> None:
        assert w.info["models"]["demo"]["stable"] == "1"
        assert index(None) == 401
        assert index(f"Bearer {token}") == 200

    _run_small_world(start_world(tmp_path, "--config", str(config)), ["eu-west"], check)


def _gateway_pool(region: dict, pool: str) -> list[dict]:
    """The replicas the region's gateway holds in ``pool`` (as its region summary lists them)."""
    with urllib.request.urlopen(f"http://{region['admin']}/geogate/v1/region", timeout=5) as resp:
        summary = json.loads(resp.read())
    return next((p["replicas"] for p in summary["pools"] if p["name"] == pool), [])


def _serving(w: World, region: str) -> list[str]:
    (pool,) = w.region(region)["autoscaled"]
    return sorted(rep["url"] for rep in pool["replicas"] if rep["state"] == "serving")


def test_autoscale_world_scales_through_srv_and_stops_clean(tmp_path):
    """--autoscale: the region's pool gets its minimum from the autoscaler, registered in the
    autoscaler's DNS as SRV records that the gateway discovers and routes to; the printed
    override command scales it up and world.json follows; deleting the override lets the
    gateway's count rule again and the extra replica is drained away; SIGTERM leaves nothing."""
    w = start_world(tmp_path, "--autoscale", "--regions", "eu-west", "--replicas", "1",
                    "--base-port", str(_base_port()))
    try:
        w.wait_ready()
        region = w.region("eu-west")
        assert region["replicas"] == []  # no fixed replicas: the pool is the autoscaler's
        (pool,) = region["autoscaled"]
        assert (pool["pool"], pool["min_replicas"], pool["desired"]) == ("eu-west-ort", 1, 1)

        def gateways_count() -> dict | None:  # the autoscaler's first rounds may predate the gateway
            w.reload()
            (p,) = w.region("eu-west")["autoscaled"]
            return p if p["source"] == "gateway" and "min_replicas" in p["reason"] else None

        # The gateway's own reason (idle: raised to the minimum), as world.json follows it.
        pool = wait_for(gateways_count, 30, "the gateway's desired count in world.json")
        assert pool["desired"] == 1
        (first,) = _serving(w, "eu-west")
        assert "eu-west-ort: autoscaled 1..6, desired 1" in w.output()
        assert f"status {w.info['autoscaler']['status_file']}" in w.output()

        # Registered through DNS SRV: the autoscaler's DNS names it, the gateway found it there.
        service = pool["discover"].removeprefix("dns+srv://")
        dns_host, dns_port = w.info["autoscaler"]["dns"].rsplit(":", 1)
        res = subprocess.run(["dig", f"@{dns_host}", "-p", dns_port, "+short", service, "SRV"],
                             capture_output=True, text=True, timeout=10, check=False)
        assert res.returncode == 0, res.stderr
        assert [line.split()[2] for line in res.stdout.splitlines()] == [str(_port(first))]
        assert [r["url"] for r in _gateway_pool(region, "eu-west-ort")] == [first]

        headers, answer = infer_http(region["http"])
        assert headers["geogate-replica"] == first
        check_output(answer["model_version"], answer["outputs"][0]["data"])
        assert tritonclient_infer(region, "grpc") == "1"
        # the printed promote reaches the running autoscaled replicas (the sync agent follows SRV)
        res = run_printed(w.printed("release"))
        assert res.returncode == 0, res.stderr
        wait_for(lambda: tritonclient_infer(region, "http") == "2" and tritonclient_infer(region, "grpc") == "2",
                 60, "version 2 served by the autoscaled replica")

        # The printed override: a second replica joins; world.json and the log follow.
        res = run_printed(w.printed("autoscale"))
        assert res.returncode == 0, res.stderr
        def two_serving() -> list[str] | None:
            w.reload()
            return urls if len(urls := _serving(w, "eu-west")) == 2 else None

        both = wait_for(two_serving, 60, "two serving replicas in world.json")
        assert first in both
        wait_for(lambda: sorted(r["url"] for r in _gateway_pool(region, "eu-west-ort") if r["routable"]) == both,
                 30, "the gateway routing to both replicas")
        assert "autoscaler: eu-west/eu-west-ort: 2 serving, desired 2 (override" in w.output()

        procs, ports, udp = _descendants(w.proc.pid), w.tcp_ports(), w.udp_ports()
        assert w.info["autoscaler"]["pid"] in procs
        assert _listening(ports, udp_ports=udp) == ports

        # Without the override the gateway's count (1) rules again: one replica is drained away
        # (out of DNS, let go by the gateway, then stopped: only then does world.json drop it).
        Path(w.info["autoscaler"]["override_file"]).unlink()

        def one_left() -> list[dict] | None:
            w.reload()
            (p,) = w.region("eu-west")["autoscaled"]
            return p["replicas"] if len(p["replicas"]) == 1 else None

        (left,) = wait_for(one_left, 60, "back to one replica in world.json")
        assert left["state"] == "serving"
        (gone,) = set(both) - {left["url"]}
        assert "autoscaler: eu-west/eu-west-ort: 1 serving, desired 1 (gateway" in w.output()
        assert [r["url"] for r in _gateway_pool(region, "eu-west-ort")] == [left["url"]]
        assert not _listening({_port(gone)})
        assert tritonclient_infer(region, "http") == "2"

        w.stop()
        assert w.proc.popen.returncode == 0, w.output()[-3000:]
        assert _still_running(procs) == []
        assert _listening(ports, udp_ports=udp) == set()
        assert not w.json_path.exists()
    finally:
        if w.proc.alive():
            w.proc.stop(STOP_TIMEOUT_S)


@pytest.mark.parametrize(("args", "reason"), [
    (["--config", "x.toml", "--replicas", "3"], "--config runs the config as written; drop --replicas"),
    (["--config", "x.toml", "--autoscale"], "--config runs the config as written; drop --autoscale"),
    (["--regions", "eu-west,atlantis"], "unknown region 'atlantis'"),
    (["--replicas", "0"], "--replicas must be between 1 and 6"),
    (["--store", "ftp://x"], "expected file://DIR or s3://BUCKET/PREFIX"),
    (["--s3-endpoint", "http://127.0.0.1:9"], "--s3-endpoint needs --store s3://"),
])
def test_refusals_say_why(tmp_path, args: list[str], reason: str):
    res = subprocess.run([*GEOGATE, "up", "--dir", str(tmp_path), *args], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 1
    assert reason in res.stderr


def test_busy_port_block_moves_up(tmp_path):
    host = "127.0.1.1" if world_ports.distinct_loopback_available() else "127.0.0.1"
    with socket.socket() as s:  # someone else on the first region's gateway port
        while True:  # a block whose first port nobody else (another test's world) holds now
            base = _base_port()
            if world_ports.bind_problem(host, base) is None:
                break
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as bind_problem: TIME_WAIT is free
        s.bind((host, base))
        s.listen()
        plan = world_plan.plan_world(base_port=base, directory=tmp_path, regions=["eu-west"], replicas=1,
                                     store_url=None)
    assert plan.base_port >= base + world_plan.PORT_SHIFT_STEP
    assert plan.regions[0].http_port == plan.base_port


def test_help_documents_every_option():
    res = subprocess.run([*GEOGATE, "up", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0
    for option in ("--regions", "--replicas", "--autoscale", "--base-port", "--store", "--s3-endpoint",
                   "--create-bucket", "--config", "--dir", "--no-seed", "--ready-timeout"):
        assert re.search(rf"^\s+{option}\b.*\S", res.stdout, re.M), option
