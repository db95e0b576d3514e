"""`geogate up`: the embedded local world on one machine.

Default shape: three regions at real locations (eu-west Dublin, us-east Virginia, ap-south
Mumbai), each with two ONNX Runtime replicas, a gateway and a sync agent; a local-directory
object store seeded with the demo model (v1 promoted, v2 pushed but not promoted); and the
GeoDNS responder. Each region's gateway listens on its own loopback address (127.0.1.N) with
the same ports, so the address GeoDNS answers is directly usable by clients; where the
machine has no such addresses, every region sits on 127.0.0.1 on its own ports instead.

Steps: plan ports (shifted by PORT_SHIFT_STEP while any is busy) -> write DIR/world.toml ->
derive the processes from that config (the same derivation `--config FILE` uses) -> seed the
store -> start replicas, sync agents, gateways, DNS under the supervisor -> wait until every
region serves the model and GeoDNS answers every region -> write DIR/world.json and print what
runs where plus copy-paste commands -> on Ctrl-C / SIGTERM stop everything, front doors first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.supervisor import Child, Supervisor

DEFAULT_BASE_PORT = 18000
DEFAULT_DIR = ".geogate"
DEFAULT_REGIONS = "eu-west,us-east,ap-south"
DEFAULT_REPLICAS = 2
MAX_REPLICAS = 6
PORT_SHIFT_TRIES = 10
PORT_SHIFT_STEP = 1000
# Port block layout, relative to the base port.
DNS_PORT_OFFSET = 53
REPLICA_PORT_OFFSET = 100
REPLICA_PORTS_PER_REGION = 20  # 3 ports (HTTP, gRPC, metrics) x up to MAX_REPLICAS
GATEWAY_PORTS_PER_REGION = 10  # only when all regions share 127.0.0.1
READY_TIMEOUT_S = 180.0
READY_POLL_S = 0.3
PROBE_TIMEOUT_S = 1.0
DEMO_MODEL = "demo"
DEMO_INPUT = "INPUT0"
DEMO_OUTPUT = "OUTPUT0"
DEMO_FEATURES = 16
SEEDED_BY = "geogate-up"
DNS_SERVICE = "infer.geogate.test."
DNS_ZONE = "geogate.test."
# Stop order (supervisor tiers, highest first): front doors (gateways, DNS) first, so clients
# are turned away cleanly; then sync agents and replicas together.
TIER_FRONT, TIER_BACK = 1, 0

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


class WorldError(Exception):
    """`geogate up` cannot start this world; the message says why and what to change."""


# ---------------------------------------------------------------- addresses and ports


def _bind_problem(host: str, port: int, *, udp: bool = False) -> str | None:
    """None when HOST:PORT can be bound right now (TCP, and UDP too with udp=True), else why not."""
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                # As the servers do: a port whose old connections sit in TIME_WAIT is free.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"{host}:{port} is in use"
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"{host} is not an address of this machine"
                return f"{host}:{port}: {exc.strerror}"
    return None


def distinct_loopback_available() -> bool:
    """Linux routes all of 127.0.0.0/8 to lo; some systems (macOS) only have 127.0.0.1."""
    return _bind_problem("127.0.1.1", 0) is None


def _free_port(host: str, taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------- the default world's config


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
        # All HTTP: the gateway prefers replicas speaking the client's protocol, so a mixed
        # pool would give each protocol only half the replicas; over HTTP every replica takes
        # both kinds of clients (gRPC requests are translated, bytes for tensors unchanged).
        return [f"http://127.0.0.1:{h}" for h, _g, _m in self.replica_ports]


@dataclass
class WorldPlan:
    base_port: int
    directory: Path
    store_url: str
    store_endpoint: str
    dns_port: int
    regions: list[RegionPlan]

    @property
    def config_path(self) -> Path:
        return self.directory / "world.toml"

    def binds(self) -> list[tuple[str, int, bool]]:
        """(host, port, udp too) for everything the world listens on."""
        out = [("127.0.0.1", self.dns_port, True)]
        for r in self.regions:
            out += [(r.ip, r.http_port, False), (r.ip, r.grpc_port, False), (r.ip, r.admin_port, False)]
            out += [("127.0.0.1", p, False) for ports in r.replica_ports for p in ports]
        return out

    def replica_ports_by_url(self) -> dict[str, tuple[int, int, int]]:
        return {u: p for r in self.regions for u, p in zip(r.replica_urls(), r.replica_ports, strict=True)}


def plan_world(*, base_port: int, directory: Path, regions: list[str], replicas: int,
               store_url: str | None, store_endpoint: str = "", distinct_ips: bool | None = None) -> WorldPlan:
    """Ports and paths of a default-shaped world; the base port moves up by PORT_SHIFT_STEP
    while anything in the block is busy."""
    if not regions:
        raise WorldError("--regions: give at least one region")
    for name in regions:
        if name not in REGION_PRESETS:
            raise WorldError(f"--regions: unknown region {name!r}; known: {', '.join(REGION_PRESETS)}")
    if len(set(regions)) != len(regions):
        raise WorldError(f"--regions: a region is named twice in {','.join(regions)}")
    if not 1 <= replicas <= MAX_REPLICAS:
        raise WorldError(f"--replicas must be between 1 and {MAX_REPLICAS}, got {replicas}")
    if store_url and not store_url.startswith(("file://", "s3://")):
        raise WorldError(f"--store {store_url!r}: expected file://DIR or s3://BUCKET/PREFIX")
    if distinct_ips is None:
        distinct_ips = distinct_loopback_available()
    directory = directory.resolve()
    block = REPLICA_PORT_OFFSET + len(regions) * REPLICA_PORTS_PER_REGION
    if not 1024 <= base_port <= 65535 - block:
        raise WorldError(f"--base-port must be between 1024 and {65535 - block}, got {base_port}")
    tried = []
    for attempt in range(PORT_SHIFT_TRIES):
        base = base_port + attempt * PORT_SHIFT_STEP
        if base > 65535 - block:
            break
        plan_regions = []
        for i, name in enumerate(regions):
            lat, lon, city, cidr = REGION_PRESETS[name]
            gw = base if distinct_ips else base + i * GATEWAY_PORTS_PER_REGION
            rbase = base + REPLICA_PORT_OFFSET + i * REPLICA_PORTS_PER_REGION
            plan_regions.append(RegionPlan(
                name=name, ip=f"127.0.1.{i + 1}" if distinct_ips else "127.0.0.1", lat=lat, lon=lon, city=city,
                client_cidr=cidr, http_port=gw, grpc_port=gw + 1, admin_port=gw + 2,
                replica_ports=[(rbase + 3 * j, rbase + 3 * j + 1, rbase + 3 * j + 2) for j in range(replicas)],
                repository=directory / name / "models",
            ))
        plan = WorldPlan(base_port=base, directory=directory,
                         store_url=store_url or f"file://{directory / 'store'}", store_endpoint=store_endpoint,
                         dns_port=base + DNS_PORT_OFFSET, regions=plan_regions)
        busy = [why for h, p, udp in plan.binds() if (why := _bind_problem(h, p, udp=udp))]
        if not busy:
            if attempt:
                print(f"[geogate up] ports from {base_port} are busy ({'; '.join(tried)}); using base port {base}",
                      flush=True)
            return plan
        tried.append(busy[0])
    raise WorldError(f"no free port block found from base port {base_port} (busy: {'; '.join(tried)}); "
                     f"pass another --base-port")


def render_config(plan: WorldPlan) -> str:
    """The world's deployment config: what every process of the world reads."""
    lines = [
        "# Written by `geogate up`: the local world's deployment config.",
        "# Run it again as is with `geogate up --config <this file>`.",
        "[deployment]", 'name = "local-world"', "",
        "[store]", f'url = "{plan.store_url}"',
        *([f'endpoint_url = "{plan.store_endpoint}"'] if plan.store_endpoint else []), "",
        "[routing]", 'mode = "local-first"', 'cutover = "global"', "",
        "[health]", "interval_ms = 500", "timeout_ms = 400", "rise = 2", "fall = 2", "",
        "[sync]", "poll_interval_ms = 1000", "",
        "[dns]", f'listen = "127.0.0.1:{plan.dns_port}"', f'zone = "{DNS_ZONE}"',
        f'service = "{DNS_SERVICE}"', "ttl = 5", "",
    ]
    for r in plan.regions:
        urls = ", ".join(f'"{u}"' for u in r.replica_urls())
        metrics = ", ".join(f'"{u}" = {m}' for u, (_h, _g, m) in zip(r.replica_urls(), r.replica_ports, strict=True))
        lines += [
            "[[regions]]", f'name = "{r.name}"', f"location = [{r.lat}, {r.lon}]  # {r.city}",
            f'http = "{r.http}"', f'grpc = "{r.grpc}"', f'admin = "{r.admin}"',
            f'addresses = ["{r.ip}"]', f'client_cidrs = ["{r.client_cidr}"]', "",
            "  [[regions.pools]]", f'  name = "{r.name}-ort"', '  kind = "geogate"',
            f"  replicas = [{urls}]", f'  repository = "{r.repository}"',
            f"  metrics_ports = {{ {metrics} }}", "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- processes from a config


@dataclass
class ReplicaLaunch:
    name: str
    region: str
    url: str
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: str


@dataclass
class RegionLaunch:
    name: str
    city: str
    location: list[float]
    http: str
    grpc: str
    admin: str
    addresses: list[str]
    client_cidrs: list[str]
    replicas: list[ReplicaLaunch] = field(default_factory=list)
    sync: bool = False


@dataclass
class Launch:
    """Everything `geogate up` starts for one config, and what it leaves out (with why)."""

    config_path: Path
    directory: Path
    store_url: str
    dns_listen: str
    dns_service: str
    regions: list[RegionLaunch]
    skipped: list[str] = field(default_factory=list)

    def binds(self) -> list[tuple[str, str, int, bool]]:
        """(what, host, port, udp too) for every listener."""
        host, port = _split_host_port(self.dns_listen)
        out = [("dns.listen", host, port, True)]
        for r in self.regions:
            for what in ("http", "grpc", "admin"):
                out.append((f"region {r.name} {what}", *_split_host_port(getattr(r, what)), False))
            for rep in r.replicas:
                out += [(f"replica {rep.url} {p}", rep.host, port, False)
                        for p, port in (("http", rep.http_port), ("grpc", rep.grpc_port),
                                        ("metrics", rep.metrics_port)) if port]
        return out


def _city(name: str) -> str:
    return REGION_PRESETS[name][2] if name in REGION_PRESETS else ""


def launch_from_config(cfg: Any, config_path: Path, directory: Path,
                       known_ports: dict[str, tuple[int, int, int]] | None = None) -> Launch:
    """The processes a config describes on this machine: per region its geogate replicas (one
    process per replica URL on a local address), sync agent and gateway; and the GeoDNS
    responder. ``known_ports``: replica URL -> (http, grpc, metrics) when the caller planned
    them; otherwise the protocol the URL does not name gets a free port."""
    known_ports = known_ports or {}
    taken: set[int] = set()
    regions: list[RegionLaunch] = []
    skipped: list[str] = []
    for region in cfg.regions:
        rl = RegionLaunch(region.name, _city(region.name), list(region.location), region.http, region.grpc,
                          region.admin, list(region.addresses), list(region.client_cidrs))
        for pool in region.pools:
            where = f"region {region.name} pool {pool.name}"
            if pool.kind != "geogate":
                skipped.append(f"{where}: kind {pool.kind!r} is not started by geogate up (start it yourself)")
                continue
            if pool.discover:
                skipped.append(f"{where}: replicas discovered through {pool.discover} are not started by geogate up")
                continue
            if not pool.repository:
                skipped.append(f"{where}: no repository, so nothing for a replica to serve")
                continue
            repository = cfg.resolve_path(pool.repository)
            rl.sync = True
            for url in pool.replicas:
                parts = urlsplit(url)
                host, port = parts.hostname or "127.0.0.1", parts.port or 0
                problem = _bind_problem(host, 0)
                if problem:
                    skipped.append(f"{where}: replica {url}: {problem}, not started here")
                    continue
                if url in known_ports:
                    h, g, m = known_ports[url]
                else:
                    taken.add(port)
                    h = port if parts.scheme == "http" else _free_port(host, taken)
                    g = port if parts.scheme == "grpc" else _free_port(host, taken)
                    # pool.metrics_port is one port for every replica of a host: only per-URL
                    # metrics_ports can be honoured when several replicas share this machine.
                    m = pool.metrics_ports.get(url) or _free_port(host, taken)
                rl.replicas.append(ReplicaLaunch(f"replica-{region.name}-{len(rl.replicas)}", region.name, url,
                                                 host, h, g, m, repository))
        regions.append(rl)
    if not regions:
        raise WorldError(f"{config_path}: no [[regions]]: nothing to start")
    return Launch(config_path=config_path.resolve(), directory=directory.resolve(), store_url=cfg.store.url,
                  dns_listen=cfg.dns.listen, dns_service=cfg.dns.service, regions=regions, skipped=skipped)


def check_binds(launch: Launch) -> None:
    problems = [f"{what}: {why}" for what, host, port, udp in launch.binds()
                if (why := _bind_problem(host, port, udp=udp))]
    if problems:
        raise WorldError("cannot listen where the config says:\n  " + "\n  ".join(problems))


def _geogate(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


def children(launch: Launch) -> list[Child]:
    logs = launch.directory / "logs"
    config = str(launch.config_path)
    out: list[Child] = []
    for r in launch.regions:
        for rep in r.replicas:
            out.append(Child(rep.name, _geogate(
                "replica", "--repository", rep.repository, "--host", rep.host, "--http-port", str(rep.http_port),
                "--grpc-port", str(rep.grpc_port), "--metrics-port", str(rep.metrics_port)),
                logs / f"{rep.name}.log", tier=TIER_BACK))
    for r in launch.regions:
        if r.sync:
            out.append(Child(f"sync-{r.name}", _geogate("sync", "--config", config, "--site", r.name),
                             logs / f"sync-{r.name}.log", tier=TIER_BACK))
    for r in launch.regions:
        out.append(Child(f"gateway-{r.name}", _geogate("gateway", "--config", config, "--region", r.name),
                         logs / f"gateway-{r.name}.log", tier=TIER_FRONT))
    out.append(Child("dns", _geogate("dns", "--config", config), logs / "dns.log", tier=TIER_FRONT))
    return out


# ---------------------------------------------------------------- the store


@dataclass
class ModelInfo:
    """A model with a stable version in the store, as `geogate up` found it."""

    name: str
    stable: str
    versions: list[str]  # complete versions, numeric order
    previous: list[str]

    def describe(self) -> str:
        return f"{self.name} (stable v{self.stable}; versions {', '.join(self.versions)})"


async def prepare_store(cfg: Any, seed_dir: Path, *, seed: bool, only_if_empty: bool) -> dict[str, ModelInfo]:
    """Seed the demo model (unless ``seed`` is False): v1 pushed and promoted, v2 pushed but not
    promoted, so an operator can try `geogate models promote demo 2` right away. Idempotent: a
    restarted world keeps what operators did since. ``only_if_empty``: leave a store that
    holds any model alone. Returns the models with a stable version (what the world waits for)."""
    from replicas import demo_model
    from replicas.manifest import list_stored_versions
    from replicas.models_cli import push_version
    from replicas.releases import Releases
    from replicas.store import open_store_from_config

    store = open_store_from_config(cfg)
    try:
        stored = await list_stored_versions(store)
        releases = Releases(store)
        if seed and not (only_if_empty and stored):
            have = {v.version for v in stored.get(DEMO_MODEL, []) if v.complete}
            for version in (1, 2):
                if str(version) not in have:
                    await asyncio.to_thread(demo_model.write_repository_entry, seed_dir, version, size="tiny")
                    await push_version(store, DEMO_MODEL, seed_dir / DEMO_MODEL, version=str(version),
                                       who=SEEDED_BY)
            rec = (await releases.all()).get(DEMO_MODEL)
            if rec is None or not rec.stable:
                await releases.promote(DEMO_MODEL, "1", who=SEEDED_BY)
            stored = await list_stored_versions(store)
        return {name: ModelInfo(name, rec.stable, [v.version for v in stored.get(name, []) if v.complete],
                                list(rec.previous))
                for name, rec in sorted((await releases.all()).items()) if rec.stable}
    finally:
        await store.close()


# ---------------------------------------------------------------- readiness


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _dns_answers(listen: str, name: str, subnet: str, address: str) -> bool:
    """Does the GeoDNS responder answer ``address`` for a client in ``subnet``?"""
    import dns.edns
    import dns.exception
    import dns.message
    import dns.query

    host, port = _split_host_port(listen)
    net, _, bits = subnet.partition("/")
    q = dns.message.make_query(name, "A", use_edns=0,
                               options=[dns.edns.ECSOption(net, int(bits or 24))])
    try:
        resp = dns.query.udp(q, host, port=port, timeout=PROBE_TIMEOUT_S)
    except (dns.exception.DNSException, OSError):
        return False
    return any(rd.address == address for rrset in resp.answer for rd in rrset if hasattr(rd, "address"))


def readiness_checks(launch: Launch, models: dict[str, ModelInfo]) -> dict[str, Any]:
    """Name -> probe. Ready means what a user would try works: every gateway serves every
    stable model, and GeoDNS sends each region's clients to that region."""
    checks: dict[str, Any] = {}
    for r in launch.regions:
        for m in models or []:
            checks[f"{r.name}: {m} ready"] = (_http_ok, f"http://{r.http}/v2/models/{m}/ready")
        if not models:
            checks[f"{r.name}: gateway ready"] = (_http_ok, f"http://{r.http}/v2/health/ready")
        if r.client_cidrs and r.addresses:
            checks[f"GeoDNS answers {r.name}"] = (_dns_answers, launch.dns_listen, launch.dns_service,
                                                  r.client_cidrs[0], r.addresses[0])
    return checks


# ---------------------------------------------------------------- what the world tells users


def _geogate_command() -> str:
    """How to run `geogate` from anywhere: the console script next to this interpreter."""
    script = Path(sys.executable).parent / "geogate"
    return str(script) if script.exists() else f"{sys.executable} -m gateway"


def _main_model(models: dict[str, ModelInfo]) -> str:
    return DEMO_MODEL if DEMO_MODEL in models or not models else next(iter(models))


def release_command(info: ModelInfo | None) -> tuple[str, str] | None:
    """(title, `geogate models ...` arguments) an operator can try next: promote the newest
    version when it is not stable yet, else roll back to the previous stable."""
    if info is None:
        return None
    newest = info.versions[-1] if info.versions else info.stable
    if newest != info.stable:
        return (f"promote v{newest}: sync agents load it in every region, then every gateway switches to it",
                f"promote {info.name} {newest}")
    if info.previous:
        return (f"roll back to v{info.previous[0]} (v{info.stable} is stable now)", f"rollback {info.name}")
    return None


def example_commands(launch: Launch, models: dict[str, ModelInfo]) -> dict[str, str]:
    first = launch.regions[0]
    model = _main_model(models)
    data = ",".join(["0.5"] * DEMO_FEATURES)
    body = ('{"inputs":[{"name":"' + DEMO_INPUT + '","datatype":"FP32","shape":[1,' + str(DEMO_FEATURES)
            + '],"data":[' + data + "]}]}")
    host, port = _split_host_port(launch.dns_listen)
    subnet = f" +subnet={first.client_cidrs[0]}" if first.client_cidrs else ""
    geogate = _geogate_command()
    cmds = {
        "curl": f"curl -s -i -X POST http://{first.http}/v2/models/{model}/infer -d '{body}'",
        "tritonclient": f"{sys.executable} {launch.directory / 'client.py'} {first.grpc}",
        "dig": f"dig @{host} -p {port} +short {launch.dns_service.rstrip('.')} A{subnet}",
    }
    release = release_command(models.get(model))
    if release:
        cmds["release"] = f"{geogate} models {release[1]} --config {launch.config_path}"
    cmds["status"] = f"{geogate} status --config {launch.config_path}"
    return cmds


COMMAND_TITLES = {
    "curl": "inference over HTTP with curl ({region}'s gateway)",
    "tritonclient": "inference over gRPC with tritonclient (add --http and an HTTP address for tritonclient.http)",
    "dig": "GeoDNS: the gateway address for a client in {cidr}",
    "status": "regions, replicas, versions and health at a glance",
}


def endpoints(launch: Launch, supervisor: Supervisor | None, models: dict[str, ModelInfo]) -> dict:
    pids = {c.name: c.pid for c in supervisor.children} if supervisor else {}
    restarts = {c.name: c.restarts for c in supervisor.children} if supervisor else {}
    return {
        "config": str(launch.config_path),
        "directory": str(launch.directory),
        "logs": str(launch.directory / "logs"),
        "store": launch.store_url,
        "models": {m.name: {"stable": m.stable, "versions": m.versions} for m in models.values()},
        "pid": os.getpid(),
        "dns": {"listen": launch.dns_listen, "service": launch.dns_service, "pid": pids.get("dns")},
        "regions": [
            {
                "name": r.name, "city": r.city, "location": r.location, "addresses": r.addresses,
                "http": r.http, "grpc": r.grpc, "admin": r.admin, "client_cidrs": r.client_cidrs,
                "status_page": f"http://{r.admin}/ui",
                "gateway_pid": pids.get(f"gateway-{r.name}"),
                "sync_pid": pids.get(f"sync-{r.name}"),
                "replicas": [
                    {"name": rep.name, "url": rep.url, "http": f"{rep.host}:{rep.http_port}",
                     "grpc": f"{rep.host}:{rep.grpc_port}", "metrics": f"{rep.host}:{rep.metrics_port}",
                     "pid": pids.get(rep.name), "restarts": restarts.get(rep.name, 0)}
                    for rep in r.replicas
                ],
            }
            for r in launch.regions
        ],
        "not_started": launch.skipped,
        "commands": example_commands(launch, models),
    }


def write_endpoints(launch: Launch, supervisor: Supervisor | None, models: dict[str, ModelInfo]) -> Path:
    """DIR/world.json, replaced atomically so scripts never read half a file."""
    path = launch.directory / "world.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(endpoints(launch, supervisor, models), indent=2) + "\n")
    tmp.replace(path)
    return path


CLIENT_SCRIPT = '''"""Written by `geogate up`: one inference through a geogate gateway with tritonclient.

    python client.py [HOST:PORT] [--http] [--model-version N]

Default: gRPC to {default} (the first region's gateway); --http uses tritonclient.http (give
the gateway's HTTP address then).
"""
import argparse

import numpy as np

parser = argparse.ArgumentParser(description="one inference through a geogate gateway")
parser.add_argument("url", nargs="?", default="{default}", help="gateway HOST:PORT")
parser.add_argument("--http", action="store_true", help="KServe v2 over HTTP instead of gRPC")
parser.add_argument("--model", default="{model}")
parser.add_argument("--model-version", default="", help="a specific version (default: the promoted one)")
args = parser.parse_args()

if args.http:
    import tritonclient.http as tc
else:
    import tritonclient.grpc as tc

client = tc.InferenceServerClient(args.url)
x = np.full((1, {features}), 0.5, dtype=np.float32)
inp = tc.InferInput("{input}", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer(args.model, [inp], model_version=args.model_version)
response = result.get_response()
version = response["model_version"] if args.http else response.model_version
out = result.as_numpy("{output}")[0]
print(f"{{args.url}}: {{args.model}} version {{version}} {output}=" + " ".join(f"{{v:.4f}}" for v in out))
'''


def write_client_script(launch: Launch, models: dict[str, ModelInfo]) -> None:
    model = _main_model(models)
    (launch.directory / "client.py").write_text(CLIENT_SCRIPT.format(
        default=launch.regions[0].grpc, model=model, features=DEMO_FEATURES, input=DEMO_INPUT,
        output=DEMO_OUTPUT))


def print_summary(launch: Launch, models: dict[str, ModelInfo], ready_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    # Not a terminal (a log, a pipe): wide enough that no address is cut.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    table = Table(title="geogate local world", title_justify="left")
    for col in ("region", "city", "DNS answer", "gateway HTTP", "gateway gRPC", "status page", "replicas"):
        table.add_column(col, overflow="fold")
    for r in launch.regions:
        table.add_row(r.name, r.city, ", ".join(r.addresses) or "-", r.http, r.grpc, f"http://{r.admin}/ui",
                      "\n".join(rep.url for rep in r.replicas) or "-")
    console.print(table)
    # Plain print from here on: copy-paste lines must never be wrapped.
    first = launch.regions[0]
    lines = [
        f"GeoDNS     {launch.dns_listen} (UDP+TCP) answers {launch.dns_service} with the nearest healthy "
        "region's address",
        f"store      {launch.store_url}   models: {'; '.join(m.describe() for m in models.values()) or '-'}",
        f"config     {launch.config_path}",
        f"endpoints  {launch.directory / 'world.json'}",
        f"logs       {launch.directory / 'logs'}/",
    ]
    lines += [f"not started: {s}" for s in launch.skipped]
    lines += ["", "Try it (copy-paste):"]
    release = release_command(models.get(_main_model(models)))
    for key, cmd in example_commands(launch, models).items():
        title = release[0] if key == "release" and release else COMMAND_TITLES[key]
        title = title.format(region=first.name, cidr=(first.client_cidrs or ["?"])[0])
        lines += [f"# {title}", cmd]
    lines += ["", f"[geogate up] ready in {ready_s:.1f}s. Ctrl-C stops everything."]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- running


async def _wait_ready(checks: dict[str, Any], stop: asyncio.Event, timeout_s: float) -> list[str]:
    """Names of the checks still failing when everything passed (empty), stop was asked, or
    the timeout ran out."""
    pending = dict(checks)
    deadline = time.monotonic() + timeout_s
    while pending and not stop.is_set() and time.monotonic() < deadline:
        results = await asyncio.gather(*(asyncio.to_thread(fn, *args) for fn, *args in pending.values()))
        for name, ok in zip(list(pending), results, strict=True):
            if ok:
                del pending[name]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), READY_POLL_S)
    return list(pending)


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join("      " + s for s in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def run_world(launch: Launch, cfg: Any, *, seed: bool, only_if_empty: bool, ready_timeout_s: float) -> int:
    started = time.monotonic()
    try:
        models = await prepare_store(cfg, launch.directory / "seed", seed=seed, only_if_empty=only_if_empty)
    except Exception as exc:  # any store failure: say which store and why, start nothing
        raise WorldError(f"preparing the store {launch.store_url} failed: {type(exc).__name__}: {exc}") from exc
    write_client_script(launch, models)

    def say(msg: str) -> None:
        print(f"[geogate up] {msg}", flush=True)

    ready = False
    supervisor = Supervisor(
        on_event=say,
        on_spawn=lambda _child: ready and write_endpoints(launch, supervisor, models))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # a second Ctrl-C: no more waiting for graceful exits
            say("second signal: killing every process now")
            supervisor.kill_all()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal)
    try:
        for child in children(launch):
            await supervisor.start(child)
        what = ", ".join(models) or "its replicas"
        say(f"started {len(supervisor.children)} processes; waiting until every region serves {what} "
            f"(logs: {launch.directory / 'logs'}) ...")
        pending = await _wait_ready(readiness_checks(launch, models), stop, ready_timeout_s)
        if stop.is_set():
            say("stopping before ready ...")
            return 130
        if pending:
            say(f"not ready after {ready_timeout_s:.0f}s: {'; '.join(pending)}")
            for child in supervisor.crashing():
                say(f"  {child.name}: {child.restarts} restarts; last log lines ({child.log_path}):\n"
                    f"{_log_tail(child.log_path)}")
            return 1
        ready = True
        write_endpoints(launch, supervisor, models)
        print_summary(launch, models, time.monotonic() - started)
        await stop.wait()
        say("stopping ...")
        return 0
    finally:
        await supervisor.stop_all()
        with contextlib.suppress(OSError):
            (launch.directory / "world.json").unlink()
        say("all processes stopped.")
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


# ---------------------------------------------------------------- command line

EPILOG = """\
Shape options (--regions, --replicas, --base-port, --store, --s3-endpoint) describe the default
world; --config runs a written config instead and cannot be combined with them.

examples:
  geogate up                                   3 regions x 2 replicas, ports from 18000
  geogate up --regions eu-west,us-east --replicas 1 --base-port 24000
  AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
    geogate up --store s3://bucket/geogate --s3-endpoint http://127.0.0.1:9000
  geogate up --config .geogate/world.toml      run a written config (e.g. an edited world.toml)

Port block (base B): each region's gateway HTTP B, gRPC B+1, admin/status page B+2 on its own
loopback address 127.0.1.N (or B+10N.. on 127.0.0.1 where 127.0.1.N do not exist); GeoDNS
B+53 (UDP+TCP); replicas from B+100 (20 ports per region: HTTP, gRPC, metrics per replica).
Writes DIR/world.toml (config), DIR/world.json (endpoints, pids, commands; removed on exit),
DIR/client.py, DIR/logs/, and for the default world DIR/store/ and DIR/<region>/models/.
Ctrl-C or SIGTERM stops every process (a second Ctrl-C kills them at once); a crashed process
is reported and restarted.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--regions", default=None, metavar="A,B,...",
                        help=f"regions to run (default {DEFAULT_REGIONS}); known: {', '.join(REGION_PRESETS)}")
    parser.add_argument("--replicas", type=int, default=None, metavar="N",
                        help=f"ONNX Runtime replicas per region, 1..{MAX_REPLICAS} (default {DEFAULT_REPLICAS})")
    parser.add_argument("--base-port", type=int, default=None, metavar="PORT",
                        help=f"first port of the world's port block (default {DEFAULT_BASE_PORT}); moved up by "
                             f"{PORT_SHIFT_STEP} while any port in the block is busy")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="object store: file://DIR or s3://BUCKET/PREFIX (default file://DIR/store); "
                             "S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    parser.add_argument("--s3-endpoint", default=None, metavar="URL",
                        help="S3 endpoint for --store s3://... (default: AWS, or $AWS_ENDPOINT_URL)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="run the processes this deployment config describes instead of the default world: "
                             "its geogate replicas on local addresses, a sync agent and gateway per region, GeoDNS")
    parser.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR",
                        help=f"where config, endpoints, logs, store and repositories live (default {DEFAULT_DIR})")
    parser.add_argument("--no-seed", action="store_true",
                        help="do not put the demo model into the store (by default: v1 promoted, v2 pushed; "
                             "with --config only when the store holds no model)")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, metavar="SECONDS",
                        help=f"how long to wait for every region to serve (default {READY_TIMEOUT_S:.0f})")


def build_launch(args: argparse.Namespace) -> tuple[Launch, Any]:
    from gateway.config import ConfigError, load_config

    directory = Path(args.dir).resolve()
    if args.config:
        shape = [f"--{n.replace('_', '-')}" for n in ("regions", "replicas", "base_port", "store", "s3_endpoint")
                 if getattr(args, n) is not None]
        if shape:
            raise WorldError(f"--config runs the config as written; drop {', '.join(shape)}")
        path = Path(args.config).resolve()
        try:
            cfg = load_config(path)
        except (OSError, ConfigError) as exc:
            raise WorldError(f"--config {args.config}: {exc}") from exc
        launch = launch_from_config(cfg, path, directory)
        check_binds(launch)
        return launch, cfg
    if args.s3_endpoint and not (args.store or "").startswith("s3://"):
        raise WorldError("--s3-endpoint needs --store s3://BUCKET/PREFIX")
    regions = [r.strip() for r in (args.regions or DEFAULT_REGIONS).split(",") if r.strip()]
    base_port = DEFAULT_BASE_PORT if args.base_port is None else args.base_port
    replicas = DEFAULT_REPLICAS if args.replicas is None else args.replicas
    plan = plan_world(base_port=base_port, directory=directory, regions=regions, replicas=replicas,
                      store_url=args.store, store_endpoint=args.s3_endpoint or "")
    directory.mkdir(parents=True, exist_ok=True)
    plan.config_path.write_text(render_config(plan))
    cfg = load_config(plan.config_path)  # the file every child reads: it must load here too
    return launch_from_config(cfg, plan.config_path, directory, plan.replica_ports_by_url()), cfg


def prepare_directories(launch: Launch) -> None:
    launch.directory.mkdir(parents=True, exist_ok=True)
    for r in launch.regions:
        for rep in r.replicas:
            Path(rep.repository).mkdir(parents=True, exist_ok=True)
    # A world.json left by a world that was killed outright must not pass for this one's.
    (launch.directory / "world.json").unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    import uvloop

    try:
        launch, cfg = build_launch(args)
        prepare_directories(launch)
        return uvloop.run(run_world(launch, cfg, seed=not args.no_seed, only_if_empty=bool(args.config),
                                    ready_timeout_s=args.ready_timeout))
    except WorldError as exc:
        print(f"geogate up: {exc}", file=sys.stderr)
        return 1
