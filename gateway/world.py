"""`geogate up`: the embedded local world on one machine.

Default shape: three regions at real locations (eu-west Dublin, us-east Virginia, ap-south
Mumbai), each with two ONNX Runtime replicas, a gateway and a sync agent; a local-directory
object store seeded with the demo model (v1 promoted, v2 pushed but not promoted); and the
GeoDNS responder.  Each region's gateway listens on its own loopback address (127.0.1.N) with
the same ports, so the GeoDNS answer is directly usable by clients.

Writes `.geogate/world/world.toml` (the deployment config every process reads) and
`.geogate/world/world.json` (endpoints for scripts).  Ctrl-C / SIGTERM stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gateway.supervisor import Child, Supervisor

log = logging.getLogger("geogate.world")

DEFAULT_BASE_PORT = 18000
PORT_SHIFT_TRIES = 10
PORT_SHIFT_STEP = 1000
READY_TIMEOUT_S = 180.0
DEMO_MODEL = "demo"

# Region presets: real datacenter locations (lat, lon) and a documentation-range client
# subnet per region so `dig +subnet=` shows GeoDNS steering without a GeoIP database.
REGION_PRESETS: dict[str, tuple[float, float, str, str]] = {
    "eu-west": (53.35, -6.26, "Dublin", "198.51.100.0/24"),
    "us-east": (38.9, -77.0, "Ashburn", "203.0.113.0/24"),
    "ap-south": (19.08, 72.88, "Mumbai", "192.0.2.0/24"),
    "us-west": (45.52, -122.68, "Portland", "100.64.1.0/24"),
    "eu-central": (50.11, 8.68, "Frankfurt", "100.64.2.0/24"),
    "ap-northeast": (35.68, 139.69, "Tokyo", "100.64.3.0/24"),
    "sa-east": (-23.55, -46.63, "Sao Paulo", "100.64.4.0/24"),
    "ap-southeast": (1.35, 103.82, "Singapore", "100.64.5.0/24"),
}


@dataclass
class RegionPlan:
    name: str
    ip: str
    lat: float
    lon: float
    city: str
    client_cidr: str
    http_port: int
    grpc_port: int
    admin_port: int
    replica_ports: list[tuple[int, int, int]]  # (http, grpc, metrics) per replica
    repository: Path

    @property
    def http(self) -> str:
        return f"{self.ip}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.ip}:{self.grpc_port}"

    @property
    def admin(self) -> str:
        return f"{self.ip}:{self.admin_port}"

    def replica_urls(self) -> list[str]:
        # Alternate protocols so the local world exercises both upstream kinds.
        return [f"grpc://127.0.0.1:{g}" if j % 2 == 0 else f"http://127.0.0.1:{h}"
                for j, (h, g, _m) in enumerate(self.replica_ports)]


@dataclass
class WorldPlan:
    base_port: int
    directory: Path
    store_url: str
    dns_port: int
    regions: list[RegionPlan]

    @property
    def config_path(self) -> Path:
        return self.directory / "world.toml"

    def all_binds(self) -> list[tuple[str, int]]:
        binds = [("127.0.0.1", self.dns_port)]
        for r in self.regions:
            binds += [(r.ip, r.http_port), (r.ip, r.grpc_port), (r.ip, r.admin_port)]
            binds += [("127.0.0.1", p) for ports in r.replica_ports for p in ports]
        return binds


def _bindable(host: str, port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def plan_world(*, base_port: int, directory: Path, regions: list[str], replicas: int,
               store_url: str | None) -> WorldPlan:
    for name in regions:
        if name not in REGION_PRESETS:
            raise SystemExit(f"--regions: unknown region {name!r}; known: {', '.join(REGION_PRESETS)}")
    if not 1 <= replicas <= 6:
        raise SystemExit(f"--replicas must be between 1 and 6, got {replicas}")
    directory = directory.resolve()
    tried = []
    for attempt in range(PORT_SHIFT_TRIES):
        base = base_port + attempt * PORT_SHIFT_STEP
        plan_regions = []
        for i, name in enumerate(regions):
            lat, lon, city, cidr = REGION_PRESETS[name]
            rbase = base + 100 + i * 20
            plan_regions.append(RegionPlan(
                name=name, ip=f"127.0.1.{i + 1}", lat=lat, lon=lon, city=city, client_cidr=cidr,
                http_port=base, grpc_port=base + 1, admin_port=base + 2,
                replica_ports=[(rbase + 3 * j, rbase + 3 * j + 1, rbase + 3 * j + 2) for j in range(replicas)],
                repository=directory / name / "models",
            ))
        plan = WorldPlan(base_port=base, directory=directory,
                         store_url=store_url or f"file://{directory / 'store'}",
                         dns_port=base + 53, regions=plan_regions)
        busy = [f"{h}:{p}" for h, p in plan.all_binds() if not _bindable(h, p)]
        if not busy:
            if attempt:
                print(f"ports from {base_port} are busy ({', '.join(tried)}); using base port {base}")
            return plan
        tried.append(busy[0])
    raise SystemExit(f"no free port block found from base {base_port} (busy: {', '.join(tried)}); "
                     f"pass --base-port")


def render_config(plan: WorldPlan) -> str:
    lines = [
        "# Written by `geogate up`: the local world's deployment config.",
        "[deployment]", 'name = "local-world"', "",
        "[store]", f'url = "{plan.store_url}"', "",
        "[routing]", 'mode = "local-first"', 'cutover = "global"', "",
        "[health]", "interval_ms = 500", "timeout_ms = 400", "rise = 2", "fall = 2", "",
        "[sync]", "poll_interval_ms = 1000", "",
        "[dns]", f'listen = "127.0.0.1:{plan.dns_port}"', 'zone = "geogate.test."',
        'service = "infer.geogate.test."', "ttl = 5", "",
    ]
    for r in plan.regions:
        urls = ", ".join(f'"{u}"' for u in r.replica_urls())
        lines += [
            "[[regions]]", f'name = "{r.name}"', f"location = [{r.lat}, {r.lon}]  # {r.city}",
            f'http = "{r.http}"', f'grpc = "{r.grpc}"', f'admin = "{r.admin}"',
            f'addresses = ["{r.ip}"]', f'client_cidrs = ["{r.client_cidr}"]', "",
            "  [[regions.pools]]", f'  name = "{r.name}-ort"', '  kind = "geogate"',
            f"  replicas = [{urls}]", f'  repository = "{r.repository}"', "",
        ]
    return "\n".join(lines)


def _geogate(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


def _http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def prepare_directories(plan: WorldPlan) -> None:
    plan.directory.mkdir(parents=True, exist_ok=True)
    plan.config_path.write_text(render_config(plan))
    (plan.directory / "client.py").write_text(CLIENT_SCRIPT.format(default=plan.regions[0].grpc))
    for r in plan.regions:
        r.repository.mkdir(parents=True, exist_ok=True)
    if plan.store_url.startswith("file://"):
        Path(plan.store_url[len("file://"):]).mkdir(parents=True, exist_ok=True)


def seed_store(plan: WorldPlan) -> None:
    """Demo model v1 pushed and promoted, v2 pushed but not promoted (so an operator can try
    `geogate models promote demo 2` right away).  Idempotent across restarts of the world."""
    from replicas import demo_model

    seed = plan.directory / "seed"
    for version in (1, 2):
        demo_model.write_repository_entry(seed, version, size="tiny")
    store_args = ["--config", str(plan.config_path)]
    import subprocess

    def models(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(_geogate("models", *args, *store_args), capture_output=True, text=True,
                              check=False)

    listing = models("list", "--json")
    known = listing.stdout if listing.returncode == 0 else ""
    for version in (1, 2):
        if f'"{version}"' in known and DEMO_MODEL in known:
            continue
        r = models("push", DEMO_MODEL, str(seed / DEMO_MODEL), "--version", str(version), "--who", "geogate-up")
        if r.returncode != 0 and "exists" not in (r.stderr + r.stdout):
            raise SystemExit(f"seeding the store failed: {r.stderr or r.stdout}")
    status = models("list", "--json")
    if '"stable": null' in status.stdout or '"stable"' not in status.stdout:
        r = models("promote", DEMO_MODEL, "1", "--who", "geogate-up")
        if r.returncode != 0:
            raise SystemExit(f"promoting demo v1 failed: {r.stderr or r.stdout}")


def endpoints(plan: WorldPlan, supervisor: Supervisor | None = None) -> dict:
    pids = {c.name: c.pid for c in supervisor.children} if supervisor else {}
    return {
        "config": str(plan.config_path),
        "store": plan.store_url,
        "dns": {"listen": f"127.0.0.1:{plan.dns_port}", "service": "infer.geogate.test.",
                "pid": pids.get("dns")},
        "model": DEMO_MODEL,
        "regions": [
            {
                "name": r.name, "city": r.city, "location": [r.lat, r.lon],
                "http": r.http, "grpc": r.grpc, "admin": r.admin, "client_cidr": r.client_cidr,
                "status_page": f"http://{r.admin}/ui",
                "gateway_pid": pids.get(f"gateway-{r.name}"),
                "sync_pid": pids.get(f"sync-{r.name}"),
                "replicas": [
                    {"url": u, "http": f"127.0.0.1:{h}", "grpc": f"127.0.0.1:{g}",
                     "metrics": f"127.0.0.1:{m}", "pid": pids.get(f"replica-{r.name}-{j}")}
                    for j, (u, (h, g, m)) in enumerate(zip(r.replica_urls(), r.replica_ports, strict=True))
                ],
            }
            for r in plan.regions
        ],
    }


def example_commands(plan: WorldPlan) -> dict[str, str]:
    first = plan.regions[0]
    data = ", ".join(["0.5"] * 16)
    body = ('{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":[' + data + "]}]}")
    client = plan.directory / "client.py"
    return {
        "curl": f"curl -s -i -X POST http://{first.http}/v2/models/{DEMO_MODEL}/infer -d '{body}'",
        "tritonclient": f"{sys.executable} {client} {first.grpc}",
        "dig": f"dig @127.0.0.1 -p {plan.dns_port} infer.geogate.test A +subnet={first.client_cidr.split('/')[0]}/24",
    }


CLIENT_SCRIPT = '''"""Written by `geogate up`: one inference through a geogate gateway with tritonclient (gRPC)."""
import sys

import numpy as np
import tritonclient.grpc as grpcclient

url = sys.argv[1] if len(sys.argv) > 1 else "{default}"
client = grpcclient.InferenceServerClient(url)
x = np.full((1, 16), 0.5, dtype=np.float32)
inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer("demo", [inp])
response = result.get_response()
print("served by version", response.model_version, "->", result.as_numpy("OUTPUT0")[0].round(3).tolist())
'''


def print_summary(plan: WorldPlan, supervisor: Supervisor) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="geogate local world", title_justify="left")
    for col in ("region", "city", "gateway HTTP", "gateway gRPC", "admin / status page", "replicas"):
        table.add_column(col)
    for r in plan.regions:
        table.add_row(r.name, r.city, r.http, r.grpc, f"http://{r.admin}/ui",
                      "\n".join(r.replica_urls()))
    console.print(table)
    console.print(f"GeoDNS: 127.0.0.1:{plan.dns_port} (udp+tcp) for infer.geogate.test   "
                  f"store: {plan.store_url}")
    console.print(f"config: {plan.config_path}   endpoints: {plan.directory / 'world.json'}   "
                  f"logs: {plan.directory / 'logs'}")
    console.print("\nTry it (copy-paste):")
    for what, cmd in example_commands(plan).items():
        console.print(f"[bold]# {what}[/bold]")
        console.print(cmd, soft_wrap=True, highlight=False, markup=False)
    console.print(f"[bold]# promote v2 everywhere[/bold]\n{sys.executable} -m gateway models promote demo 2 "
                  f"--config {plan.config_path}", highlight=False)
    console.print("\nCtrl-C stops everything.")


async def run_world(plan: WorldPlan, *, ready_timeout_s: float) -> int:
    await asyncio.to_thread(prepare_directories, plan)
    await asyncio.to_thread(seed_store, plan)

    logs = plan.directory / "logs"
    supervisor = Supervisor(on_event=lambda msg: print(f"[geogate up] {msg}", flush=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    config = str(plan.config_path)
    try:
        for r in plan.regions:
            for j, (h, g, m) in enumerate(r.replica_ports):
                await supervisor.start(Child(
                    f"replica-{r.name}-{j}",
                    _geogate("replica", "--repository", str(r.repository), "--http-port", str(h),
                             "--grpc-port", str(g), "--metrics-port", str(m)),
                    logs / f"replica-{r.name}-{j}.log"))
        for r in plan.regions:
            await supervisor.start(Child(f"sync-{r.name}", _geogate("sync", "--config", config, "--site", r.name),
                                         logs / f"sync-{r.name}.log"))
        for r in plan.regions:
            await supervisor.start(Child(f"gateway-{r.name}",
                                         _geogate("gateway", "--config", config, "--region", r.name),
                                         logs / f"gateway-{r.name}.log"))
        await supervisor.start(Child("dns", _geogate("dns", "--config", config), logs / "dns.log"))

        print(f"[geogate up] starting {len(supervisor.children)} processes; waiting until every region "
              f"serves {DEMO_MODEL} v1 ...", flush=True)
        deadline = time.monotonic() + ready_timeout_s
        pending = {r.name: f"http://{r.http}/v2/models/{DEMO_MODEL}/ready" for r in plan.regions}
        while pending and not stop.is_set() and time.monotonic() < deadline:
            for name, url in list(pending.items()):
                if await asyncio.to_thread(_http_ready, url):
                    del pending[name]
            if pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        if stop.is_set():
            return 130
        if pending:
            print(f"[geogate up] not ready after {ready_timeout_s:.0f}s: {', '.join(pending)} "
                  f"(see {logs})", flush=True)
            return 1
        (plan.directory / "world.json").write_text(json.dumps(
            {**endpoints(plan, supervisor), "commands": example_commands(plan)}, indent=2))
        print_summary(plan, supervisor)
        await stop.wait()
        print("\n[geogate up] stopping ...", flush=True)
        return 0
    finally:
        await supervisor.stop_all()
        print("[geogate up] all processes stopped.", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT,
                        help="first port of the world's port block (shifted by 1000 if busy)")
    parser.add_argument("--regions", default="eu-west,us-east,ap-south",
                        help=f"comma-separated region names from: {', '.join(REGION_PRESETS)}")
    parser.add_argument("--replicas", type=int, default=2, help="ONNX Runtime replicas per region")
    parser.add_argument("--store", default=None, help="object store URL (default: file://<dir>/store)")
    parser.add_argument("--dir", default=".geogate/world", help="where config, store, logs and repositories live")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S,
                        help="seconds to wait for every region to serve the demo model")


def run(args: argparse.Namespace) -> int:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    plan = plan_world(base_port=args.base_port, directory=Path(args.dir), regions=regions,
                      replicas=args.replicas, store_url=args.store)
    return uvloop.run(run_world(plan, ready_timeout_s=args.ready_timeout))
