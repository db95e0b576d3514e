"""The processes `geogate up` starts for a deployment config, and their command lines.

One derivation for both the default world (whose config `geogate up` wrote) and `--config FILE`:
per region its geogate replicas (one process per replica URL on a local address), its sync
agent and its gateway; the GeoDNS responder; and, when pools are autoscaled (their
``discover_resolver`` is ``[capacity] autoscale_dns``), one autoscaler that starts and stops
those pools' replicas itself. What a config asks for that cannot run here is listed with why.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.world.autoscaler import autoscaler_command, is_autoscaled
from gateway.world.plan import WorldError, city
from gateway.world.ports import bind_problem, free_port, split_host_port
from gateway.world.supervisor import Child

# Stop order (supervisor tiers, highest first): front doors (gateways, DNS) first, so clients
# are turned away cleanly; then sync agents, replicas and the autoscaler together.
TIER_FRONT, TIER_BACK = 1, 0
# logs/<process>.log is rotated at this size, keeping this many old files (gateway.world.supervisor).
CHILD_LOG_MAX_BYTES = 16 * 1024 * 1024
CHILD_LOG_BACKUPS = 3
AUTOSCALER = "autoscaler"


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
    control_token_file: str = ""  # the pool's control_token_file (absolute): the repository API needs it


@dataclass
class AutoscaledPoolLaunch:
    """A pool whose replicas the autoscaler runs (found through DNS SRV by the gateway)."""

    name: str
    region: str
    discover: str  # dns+srv://NAME
    scheme: str  # "grpc" | "http": how the gateway reaches the replicas the SRV records name
    resolver: str  # the autoscaler's DNS HOST:PORT
    repository: str
    min_replicas: int
    max_replicas: int

    @property
    def key(self) -> str:
        """How the autoscaler's status file and override file name this pool."""
        return f"{self.region}/{self.name}"


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
    autoscaled: list[AutoscaledPoolLaunch] = field(default_factory=list)
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
    autoscale_dns: str = ""  # set when any pool is autoscaled: the autoscaler runs
    # The gateways' admin token ([admin] token / token_env), for the status page link printed
    # once ready; never written to world.json.
    admin_token: str = field(default="", repr=False)

    @property
    def autoscale(self) -> bool:
        return bool(self.autoscale_dns)

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    @property
    def autoscaler_workdir(self) -> Path:
        """The autoscaler's unbound config and its replicas' logs."""
        return self.directory / AUTOSCALER

    @property
    def autoscaler_status_path(self) -> Path:
        """The autoscaler's state (JSON, rewritten every round): desired counts and replicas per pool."""
        return self.directory / "autoscaler.json"

    @property
    def autoscale_override_path(self) -> Path:
        """JSON {"REGION/POOL": N} an operator writes to override the gateways' desired counts."""
        return self.directory / "autoscale-override.json"

    def autoscaled_pools(self) -> list[AutoscaledPoolLaunch]:
        return [p for r in self.regions for p in r.autoscaled]

    def binds(self) -> list[tuple[str, str, int, bool]]:
        """(what, host, port, udp too) for every listener at a fixed address."""
        host, port = split_host_port(self.dns_listen)
        out = [("dns.listen", host, port, True)]
        if self.autoscale_dns:
            out.append(("capacity.autoscale_dns", *split_host_port(self.autoscale_dns), True))
        for r in self.regions:
            for what in ("http", "grpc", "admin"):
                out.append((f"region {r.name} {what}", *split_host_port(getattr(r, what)), False))
            for rep in r.replicas:
                out += [(f"replica {rep.url} {p}", rep.host, port, False)
                        for p, port in (("http", rep.http_port), ("grpc", rep.grpc_port),
                                        ("metrics", rep.metrics_port)) if port]
        return out


def _replica_launches(pool: Any, region: str, repository: str, first_index: int, where: str,
                      known_ports: dict[str, tuple[int, int, int]], taken: set[int],
                      skipped: list[str], control_token_file: str = "") -> list[ReplicaLaunch]:
    out: list[ReplicaLaunch] = []
    for url in pool.replicas:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 0
        problem = bind_problem(host, 0)
        if problem:
            skipped.append(f"{where}: replica {url}: {problem}, not started here")
            continue
        if url in known_ports:
            h, g, m = known_ports[url]
        else:
            taken.add(port)
            h = port if parts.scheme == "http" else free_port(host, taken)
            g = port if parts.scheme == "grpc" else free_port(host, taken)
            # pool.metrics_port is one port for every replica of a host: only per-URL
            # metrics_ports can be honoured when several replicas share this machine.
            m = pool.metrics_ports.get(url) or free_port(host, taken)
        out.append(ReplicaLaunch(f"replica-{region}-{first_index + len(out)}", region, url, host, h, g, m,
                                 repository, control_token_file))
    return out


def launch_from_config(cfg: Any, config_path: Path, directory: Path,
                       known_ports: dict[str, tuple[int, int, int]] | None = None) -> Launch:
    """The processes a config describes on this machine. ``known_ports``: replica URL -> (http,
    grpc, metrics) when the caller planned them; otherwise the protocol the URL does not name
    gets a free port."""
    known_ports = known_ports or {}
    taken: set[int] = set()
    regions: list[RegionLaunch] = []
    skipped: list[str] = []
    for region in cfg.regions:
        rl = RegionLaunch(region.name, city(region.name), list(region.location), region.http, region.grpc,
                          region.admin, list(region.addresses), list(region.client_cidrs))
        for pool in region.pools:
            where = f"region {region.name} pool {pool.name}"
            if pool.kind != "geogate":
                skipped.append(f"{where}: kind {pool.kind!r} is not started by geogate up (start it yourself)")
                continue
            if pool.discover and not is_autoscaled(cfg, pool):
                skipped.append(f"{where}: replicas discovered through {pool.discover} are not started by geogate up")
                continue
            if not pool.repository:
                skipped.append(f"{where}: no repository, so nothing for a replica to serve")
                continue
            repository = cfg.resolve_path(pool.repository)
            rl.sync = True
            if pool.discover:  # autoscaled
                # No replicas of ours: the autoscaler starts them once the sync agent has
                # filled the repository (replicas load what is there when they start).
                rl.autoscaled.append(AutoscaledPoolLaunch(
                    pool.name, region.name, pool.discover, pool.discover_scheme, pool.discover_resolver, repository,
                    cfg.capacity.min_replicas, cfg.capacity.max_replicas))
                continue
            token_file = cfg.resolve_path(pool.control_token_file) if pool.control_token_file else ""
            rl.replicas += _replica_launches(pool, region.name, repository, len(rl.replicas), where, known_ports,
                                             taken, skipped, token_file)
        regions.append(rl)
    if not regions:
        raise WorldError(f"{config_path}: no [[regions]]: nothing to start")
    autoscale_dns = cfg.capacity.autoscale_dns if any(r.autoscaled for r in regions) else ""
    return Launch(config_path=config_path.resolve(), directory=directory.resolve(), store_url=cfg.store.url,
                  dns_listen=cfg.dns.listen, dns_service=cfg.dns.service, regions=regions, skipped=skipped,
                  autoscale_dns=autoscale_dns, admin_token=cfg.admin_token())


def check_binds(launch: Launch) -> None:
    """Refuse (saying where and why) a config whose listeners cannot bind on this machine now."""
    problems = [f"{what}: {why}" for what, host, port, udp in launch.binds()
                if (why := bind_problem(host, port, udp=udp))]
    if problems:
        raise WorldError("cannot listen where the config says:\n  " + "\n  ".join(problems))


def prepare_directories(launch: Launch) -> None:
    launch.directory.mkdir(parents=True, exist_ok=True)
    for r in launch.regions:
        for repository in [rep.repository for rep in r.replicas] + [p.repository for p in r.autoscaled]:
            Path(repository).mkdir(parents=True, exist_ok=True)
    # Files left by a world that was killed outright must not pass for this one's.
    (launch.directory / "world.json").unlink(missing_ok=True)
    launch.autoscaler_status_path.unlink(missing_ok=True)


def _geogate(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


def children(launch: Launch) -> list[Child]:
    """The supervised processes, in start order: replicas, sync agents, the autoscaler, gateways, DNS."""
    logs = launch.logs
    config = str(launch.config_path)
    out: list[Child] = []
    for r in launch.regions:
        for rep in r.replicas:
            out.append(Child(rep.name, _geogate(
                "replica", "--repository", rep.repository, "--host", rep.host, "--http-port", str(rep.http_port),
                "--grpc-port", str(rep.grpc_port), "--metrics-port", str(rep.metrics_port),
                *(("--control-token-file", rep.control_token_file) if rep.control_token_file else ())),
                logs / f"{rep.name}.log", tier=TIER_BACK))
    for r in launch.regions:
        if r.sync:
            out.append(Child(f"sync-{r.name}", _geogate("sync", "--config", config, "--site", r.name),
                             logs / f"sync-{r.name}.log", tier=TIER_BACK))
    if launch.autoscale:
        argv = autoscaler_command(config, str(launch.autoscaler_workdir), str(launch.autoscaler_status_path))
        out.append(Child(AUTOSCALER, [*argv, "--desired-file", str(launch.autoscale_override_path)],
                         logs / f"{AUTOSCALER}.log", tier=TIER_BACK))
    for r in launch.regions:
        out.append(Child(f"gateway-{r.name}", _geogate("gateway", "--config", config, "--region", r.name),
                         logs / f"gateway-{r.name}.log", tier=TIER_FRONT))
    out.append(Child("dns", _geogate("dns", "--config", config), logs / "dns.log", tier=TIER_FRONT))
    for child in out:
        child.log_max_bytes, child.log_backups = CHILD_LOG_MAX_BYTES, CHILD_LOG_BACKUPS
    return out
