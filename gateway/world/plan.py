"""The default world's shape for `geogate up`: regions, addresses, the port block, and the
deployment config (world.toml) every process of the world reads.

Port block (base B): each region's gateway HTTP B, gRPC B+1, admin B+2 on its own loopback
address 127.0.1.N (or B+10N.. on 127.0.0.1 where 127.0.1.N do not exist); GeoDNS B+53 (UDP+TCP);
with --autoscale the autoscaler's SRV DNS B+54 (UDP+TCP); fixed replicas from B+100 (20 ports
per region). The base moves up by PORT_SHIFT_STEP while any port of the block is busy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.world.autoscaler import world_capacity_lines, world_pool_lines
from gateway.world.ports import bind_problem, distinct_loopback_available

DEFAULT_BASE_PORT = 18000
DEFAULT_DIR = ".geogate"
DEFAULT_REGIONS = "eu-west,us-east,ap-south"
DEFAULT_REPLICAS = 2
MAX_REPLICAS = 6
PORT_SHIFT_TRIES = 10
PORT_SHIFT_STEP = 1000
# Port block layout, relative to the base port.
DNS_PORT_OFFSET = 53
AUTOSCALE_DNS_PORT_OFFSET = 54
REPLICA_PORT_OFFSET = 100
REPLICA_PORTS_PER_REGION = 20  # 3 ports (HTTP, gRPC, metrics) x up to MAX_REPLICAS
GATEWAY_PORTS_PER_REGION = 10  # only when all regions share 127.0.0.1
# With --autoscale, gateways look up the autoscaler's SRV records this often: a replica it
# starts or drains is seen within about a second (the gateway's default is 5 s).
AUTOSCALE_DISCOVERY_INTERVAL_MS = 1000
DNS_SERVICE = "infer.geogate.test."
DNS_ZONE = "geogate.test."

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


def city(region: str) -> str:
    """The preset's city for a region name ("" for names that are not presets)."""
    return REGION_PRESETS[region][2] if region in REGION_PRESETS else ""


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
    replica_ports: list[tuple[int, int, int]]  # (http, grpc, metrics) per fixed replica; none when autoscaled
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

    @property
    def pool(self) -> str:
        return f"{self.name}-ort"

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
    replicas: int = DEFAULT_REPLICAS
    autoscale: bool = False  # replicas are the autoscaler's (replicas = its minimum per pool)

    @property
    def config_path(self) -> Path:
        return self.directory / "world.toml"

    @property
    def autoscale_dns(self) -> str:
        """HOST:PORT of the autoscaler's DNS server (SRV records of the replicas it runs)."""
        return f"127.0.0.1:{self.dns_port + AUTOSCALE_DNS_PORT_OFFSET - DNS_PORT_OFFSET}"

    def binds(self) -> list[tuple[str, int, bool]]:
        """(host, port, udp too) for everything the world listens on at fixed ports."""
        out = [("127.0.0.1", self.dns_port, True)]
        if self.autoscale:
            out.append(("127.0.0.1", self.dns_port + AUTOSCALE_DNS_PORT_OFFSET - DNS_PORT_OFFSET, True))
        for r in self.regions:
            out += [(r.ip, r.http_port, False), (r.ip, r.grpc_port, False), (r.ip, r.admin_port, False)]
            out += [("127.0.0.1", p, False) for ports in r.replica_ports for p in ports]
        return out

    def replica_ports_by_url(self) -> dict[str, tuple[int, int, int]]:
        return {u: p for r in self.regions for u, p in zip(r.replica_urls(), r.replica_ports, strict=True)}


def _check_shape(regions: list[str], replicas: int, store_url: str | None) -> None:
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


def _plan_at(base: int, directory: Path, regions: list[str], replicas: int, *, store_url: str | None,
             store_endpoint: str, distinct_ips: bool, autoscale: bool) -> WorldPlan:
    plan_regions = []
    for i, name in enumerate(regions):
        lat, lon, city_name, cidr = REGION_PRESETS[name]
        gw = base if distinct_ips else base + i * GATEWAY_PORTS_PER_REGION
        rbase = base + REPLICA_PORT_OFFSET + i * REPLICA_PORTS_PER_REGION
        fixed = 0 if autoscale else replicas
        plan_regions.append(RegionPlan(
            name=name, ip=f"127.0.1.{i + 1}" if distinct_ips else "127.0.0.1", lat=lat, lon=lon, city=city_name,
            client_cidr=cidr, http_port=gw, grpc_port=gw + 1, admin_port=gw + 2,
            replica_ports=[(rbase + 3 * j, rbase + 3 * j + 1, rbase + 3 * j + 2) for j in range(fixed)],
            repository=directory / name / "models",
        ))
    return WorldPlan(base_port=base, directory=directory, store_url=store_url or f"file://{directory / 'store'}",
                     store_endpoint=store_endpoint, dns_port=base + DNS_PORT_OFFSET, regions=plan_regions,
                     replicas=replicas, autoscale=autoscale)


def plan_world(*, base_port: int, directory: Path, regions: list[str], replicas: int,
               store_url: str | None, store_endpoint: str = "", distinct_ips: bool | None = None,
               autoscale: bool = False) -> WorldPlan:
    """Ports and paths of a default-shaped world; the base port moves up by PORT_SHIFT_STEP
    while anything in the block is busy. ``autoscale``: each region's pool is the autoscaler's,
    with ``replicas`` as its minimum."""
    _check_shape(regions, replicas, store_url)
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
        plan = _plan_at(base, directory, regions, replicas, store_url=store_url, store_endpoint=store_endpoint,
                        distinct_ips=distinct_ips, autoscale=autoscale)
        busy = [why for h, p, udp in plan.binds() if (why := bind_problem(h, p, udp=udp))]
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
    if plan.autoscale:
        lines += ["# --autoscale: the autoscaler runs each region's pool between min_replicas and",
                  "# max_replicas, following the gateways' desired counts (GET <admin>/geogate/v1/capacity).",
                  "[gateway]", f"discovery_interval_ms = {AUTOSCALE_DISCOVERY_INTERVAL_MS}", "",
                  *world_capacity_lines(plan.autoscale_dns, min_replicas=plan.replicas, max_replicas=MAX_REPLICAS)]
    for r in plan.regions:
        lines += [
            "[[regions]]", f'name = "{r.name}"', f"location = [{r.lat}, {r.lon}]  # {r.city}",
            f'http = "{r.http}"', f'grpc = "{r.grpc}"', f'admin = "{r.admin}"',
            f'addresses = ["{r.ip}"]', f'client_cidrs = ["{r.client_cidr}"]', "",
        ]
        if plan.autoscale:
            lines += world_pool_lines(r.name, r.pool, str(r.repository), plan.autoscale_dns)
            continue
        urls = ", ".join(f'"{u}"' for u in r.replica_urls())
        metrics = ", ".join(f'"{u}" = {m}' for u, (_h, _g, m) in zip(r.replica_urls(), r.replica_ports, strict=True))
        lines += [
            "  [[regions.pools]]", f'  name = "{r.pool}"', '  kind = "geogate"',
            f"  replicas = [{urls}]", f'  repository = "{r.repository}"',
            f"  metrics_ports = {{ {metrics} }}", "",
        ]
    return "\n".join(lines)
