"""Helpers for the gateway's end-to-end tests: a demo-model repository, replica processes, a
gateway process on free ports with its TOML written by the test, and small HTTP helpers."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from replicas.demo.onnx_model import write_repository_entry
from tests.procs import GEOGATE, Proc, ReplicaProc, free_port, http_ok

FAST_HEALTH = """
[health]
interval_ms = 300
timeout_ms = 250
rise = 1
fall = 1
consecutive_failures = 2
base_ejection_ms = 2000
max_ejection_ms = 4000
max_ejection_percent = 50
"""


def demo_repository(tmp_path: Path, versions: tuple[int, ...] = (1,)) -> str:
    repo = tmp_path / "repo"
    for v in versions:
        write_repository_entry(repo, v)
    return str(repo)


def start_replicas(procs: list, repo: str, n: int, *, faults: bool = True) -> list[ReplicaProc]:
    reps = []
    for _ in range(n):
        r = ReplicaProc(repo, extra=["--enable-test-faults"] if faults else [])
        procs.append(r)
        reps.append(r)
    for r in reps:
        r.wait_ready()
    return reps


def replica_urls(replicas: list[ReplicaProc], schemes: tuple[str, ...] = ("http", "grpc")) -> list[str]:
    urls = []
    for r in replicas:
        if "http" in schemes:
            urls.append(f"http://{r.http_url}")
        if "grpc" in schemes:
            urls.append(f"grpc://{r.grpc_url}")
    return urls


class GatewayListeners:
    """HOST:PORT of a gateway's three listeners (needs http_port, grpc_port, admin_port)."""

    http_port: int
    grpc_port: int
    admin_port: int

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"


def one_region_toml(gw: GatewayListeners, *, pool: str, kind: str, members: str) -> str:
    """The `[[regions]]` table of a one-region ("r1") config with one pool, on `gw`'s listeners."""
    return f"""[[regions]]
name = "r1"
location = [50.0, 8.0]
http = "{gw.http}"
grpc = "{gw.grpc}"
admin = "{gw.admin}"

  [[regions.pools]]
  name = "{pool}"
  kind = "{kind}"
  {members}
"""


class RegionGatewayProc(GatewayListeners, Proc):
    """A `geogate gateway` process for region "r1": readiness wait and the admin region view."""

    def wait_ready(self, timeout_s: float = 60.0) -> Self:
        self.wait_until(lambda: http_ok(f"http://{self.http}/v2/health/ready"), timeout_s)
        return self

    def region(self) -> dict:
        return get_json(f"http://{self.admin}/geogate/v1/region")


class GatewayProc(RegionGatewayProc):
    def __init__(self, tmp_path: Path, *, replicas: list[str] | None = None, discover: str = "",
                 discover_resolver: str = "", discover_scheme: str = "grpc", gateway_extra: str = "",
                 health: str = FAST_HEALTH, workers: int = 1, name: str = "gw"):
        self.http_port, self.grpc_port, self.admin_port = free_port(), free_port(), free_port()
        if replicas is not None:
            members = f"replicas = {json.dumps(replicas)}"
        else:
            members = (f'discover = "{discover}"\n  discover_scheme = "{discover_scheme}"\n'
                       f'  discover_resolver = "{discover_resolver}"')
        text = f"""
[deployment]
name = "test"
{health}
[gateway]
{gateway_extra}

{one_region_toml(self, pool="p1", kind="geogate", members=members)}"""
        self.config_path = tmp_path / f"{name}-{self.http_port}.toml"
        self.config_path.write_text(text)
        args = ["gateway", "--config", str(self.config_path), "--region", "r1"]
        if workers > 1:
            args += ["--workers", str(workers)]
        super().__init__([*GEOGATE, *args], name=f"{name}-{self.http_port}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=5) as r:
            return r.read().decode()


def get_json(url: str, timeout_s: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def http_call(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None,
              timeout_s: float = 10.0) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP request, errors included."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def set_faults(replica: ReplicaProc, *, delay_ms: int = 0, status: int = 0, hang: bool = False) -> None:
    body = json.dumps({"delay_ms": delay_ms, "status": status, "hang": hang}).encode()
    code, _, text = http_call(f"http://{replica.http_url}/geogate/test/faults", body,
                              {"Content-Type": "application/json"})
    assert code == 200, text


def replica_of(url: str, replicas: list[ReplicaProc]) -> ReplicaProc:
    for r in replicas:
        if url.endswith(r.http_url) or url.endswith(r.grpc_url):
            return r
    raise AssertionError(f"{url} is none of the replicas")


@contextlib.contextmanager
def gateway_with_replicas(tmp: Path, n: int = 3, versions: tuple[int, ...] = (1, 2)):
    """A ready gateway over `n` fresh replicas of the demo model: (gateway, replicas); all
    stopped on exit (module-scoped fixtures share one)."""
    started: list = []
    try:
        reps = start_replicas(started, demo_repository(tmp, versions=versions), n)
        gw = GatewayProc(tmp, replicas=replica_urls(reps))
        started.append(gw)
        gw.wait_ready()
        yield gw, reps
    finally:
        for p in reversed(started):
            p.stop()
