"""Local autoscaler (`geogate up --autoscale`): follow each pool's desired replica count by
starting and stopping `geogate replica` processes, registered through DNS SRV.

    python -m gateway.world.autoscaler --config world.toml [--desired-file F] [--status-file F]

`geogate up --autoscale` runs it as one of the world's children (``autoscaler_command``); the
world's config comes from ``world_capacity_lines`` / ``world_pool_lines`` (see
``is_autoscaled`` for which pools the world must not start replicas for itself).

Which pools: every pool whose ``discover_resolver`` is ``[capacity] autoscale_dns``; the
autoscaler runs that DNS server itself (gateway.world.srv_registry, a real unbound) and answers the
pool's ``discover = "dns+srv://NAME"`` with one SRV record per replica it runs. Replicas serve
the pool's ``repository``.

Every ``autoscale_interval_ms``, per pool:

    desired    GET http://<region admin>/geogate/v1/capacity -> pools[<pool>].desired_replicas
               (gateway.routing.capacity; the gateway's own answer, with its reason), or the
               operator's override from --desired-file (JSON {"<region>/<pool>": N}),
               bounded by [capacity] min_replicas / max_replicas
    scale up   start the missing replicas, wait until each is ready (HTTP readiness), then add
               its SRV record: the gateway discovers it and sends traffic after its first
               successful health check
    scale down for each surplus replica (newest first): remove its SRV record, wait until the
               gateway has forgotten it (its pool in /geogate/v1/region no longer lists the URL,
               which the gateway does once the replica's in-flight requests have finished),
               then SIGTERM (the replica drains itself too: readiness false, in-flight finish)
    crashed    a replica that exited on its own is unregistered and replaced
    no model   while the pool's repository holds no model version yet (the sync agent has not
               installed one), no replica is started: replicas load the repository when they start

No request fails because of a scale-down: the gateway stops choosing the replica before it
is asked to stop, and anything still in flight finishes first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from core.config import Config, ConfigError, load_config
from core.logs import setup_logging
from gateway.admin.capacity_api import add_capacity_routes
from gateway.routing.capacity import CAPACITY_PATH
from gateway.world.srv_registry import UnboundRegistry, die_with_parent

__all__ = ["AutoscaledPool", "LocalAutoscaler", "add_capacity_routes", "autoscaled_pools", "autoscaler_command",
           "is_autoscaled", "repository_has_models", "world_capacity_lines", "world_pool_lines"]

log = logging.getLogger("geogate.autoscaler")

SRV_PREFIX = "dns+srv://"
REGION_PATH = "/geogate/v1/region"
REPLICA_READY_TIMEOUT_S = 120.0
REPLICA_STOP_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 2.0
POLL_S = 0.2
FAULTS_PATH = "/geogate/test/faults"


def service_name(region: str, pool: str, zone: str = "autoscale.geogate.") -> str:
    """The SRV name a world with --autoscale gives a pool."""
    return f"_grpc._tcp.{pool}.{region}.{zone}"


def world_pool_lines(region: str, pool: str, repository: str, dns: str) -> list[str]:
    """The ``[[regions.pools]]`` lines `geogate up --autoscale` writes for an autoscaled pool
    (instead of a ``replicas = [...]`` list)."""
    return ["  [[regions.pools]]", f'  name = "{pool}"', '  kind = "geogate"',
            f'  discover = "{SRV_PREFIX}{service_name(region, pool)}"', '  discover_scheme = "grpc"',
            f'  discover_resolver = "{dns}"', f'  repository = "{repository}"', ""]


def world_capacity_lines(dns: str, *, min_replicas: int = 1, max_replicas: int = 4) -> list[str]:
    """The ``[capacity]`` section `geogate up --autoscale` writes."""
    return ["[capacity]", f'autoscale_dns = "{dns}"', f"min_replicas = {min_replicas}",
            f"max_replicas = {max_replicas}", ""]


def autoscaler_command(config: str, workdir: str, status_file: str = "") -> list[str]:
    """The child process `geogate up --autoscale` supervises (one for the whole world: it
    scales every autoscaled pool of every region)."""
    args = [sys.executable, "-m", "gateway.world.autoscaler", "--config", str(config), "--workdir", str(workdir)]
    return args + (["--status-file", str(status_file)] if status_file else [])


def is_autoscaled(cfg: Config, pool) -> bool:
    """Is this ``[[regions.pools]]`` entry scaled by the local autoscaler? (`geogate up` starts
    no replicas for such a pool, but does run its region's sync agent, which fills the
    repository the autoscaler's replicas serve.)"""
    dns = cfg.capacity.autoscale_dns
    return bool(dns and pool.discover and pool.discover_resolver == dns)


def repository_has_models(path: str | Path) -> bool:
    """Does a Triton-layout repository hold at least one model version (MODEL/N/...)?"""
    try:
        with os.scandir(path) as models:
            for m in models:
                if m.is_dir() and not m.name.startswith("."):
                    with os.scandir(m.path) as versions:
                        if any(v.is_dir() and v.name.isdigit() for v in versions):
                            return True
    except OSError:
        return False
    return False


@dataclass
class AutoscaledPool:
    region: str
    pool: str
    service: str  # SRV name (without dns+srv://)
    scheme: str  # "grpc" | "http": which port goes into the SRV record
    repository: str
    admin: str  # the region gateway's admin HOST:PORT
    min_replicas: int = 1
    max_replicas: int = 10
    control_token_file: str = ""  # the pool's control_token_file (absolute), passed to its replicas

    @property
    def key(self) -> str:
        return f"{self.region}/{self.pool}"


def autoscaled_pools(cfg: Config) -> list[AutoscaledPool]:
    """Pools of the config that discover through the autoscaler's DNS server."""
    out = []
    for region in cfg.regions:
        for pool in region.pools:
            if is_autoscaled(cfg, pool):
                out.append(AutoscaledPool(region.name, pool.name, pool.discover[len(SRV_PREFIX):],
                                          pool.discover_scheme, cfg.resolve_path(pool.repository),
                                          region.admin, cfg.capacity.min_replicas, cfg.capacity.max_replicas,
                                          cfg.resolve_path(pool.control_token_file) if pool.control_token_file
                                          else ""))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedReplica:
    """One `geogate replica` process the autoscaler started."""

    def __init__(self, repository: str, logdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.http_port, self.grpc_port, self.metrics_port = _free_port(), _free_port(), _free_port()
        self.log_path = logdir / f"replica-{self.http_port}.log"
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gateway", "replica", "--repository", repository, "--host", "127.0.0.1",
             "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
             "--metrics-port", str(self.metrics_port), *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=die_with_parent)
        self.started_s = time.monotonic()
        self.registered = False
        self.draining = False

    def port(self, scheme: str) -> int:
        return self.grpc_port if scheme == "grpc" else self.http_port

    def url(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.port(scheme)}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"replica on port {self.http_port} exited ({self.popen.returncode}) "
                                   f"before it was ready: {self.tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(POLL_S)
        raise TimeoutError(f"replica on port {self.http_port} not ready after {timeout_s:g} s: {self.tail()}")

    async def stop(self, timeout_s: float = REPLICA_STOP_TIMEOUT_S) -> int | None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.alive() and time.monotonic() < deadline:  # noqa: ASYNC110 (a child process, no event)
                await asyncio.sleep(POLL_S)
            if self.alive():
                log.warning("replica on port %d did not stop within %.0f s; killing it", self.http_port, timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                await asyncio.to_thread(self.popen.wait, 10)
        self._log.close()
        return self.popen.returncode


@dataclass
class PoolStatus:
    desired: int = 0
    reason: str = ""
    source: str = ""
    replicas: list[ManagedReplica] = field(default_factory=list)


class LocalAutoscaler:
    def __init__(self, pools: list[AutoscaledPool], registry: UnboundRegistry, *, workdir: str | Path,
                 interval_s: float = 1.0, drain_wait_s: float = 30.0, desired_file: str = "",
                 replica_test_delay_ms: int = 0, admin_token: str = "") -> None:
        self.pools = pools
        # The gateways' admin credentials ([admin] token), for /geogate/v1/capacity and the
        # full region summary (which replicas a pool still holds) when the gateways require them.
        self.admin_headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        # Benchmarks on small machines: every inference of the replicas takes this long (the
        # replica's test fault switch), like a busy accelerator, without burning CPU.
        self.replica_test_delay_ms = replica_test_delay_ms
        self._waiting_for_model: set[str] = set()
        self.registry = registry
        self.workdir = Path(workdir)
        self.interval_s = interval_s
        self.drain_wait_s = drain_wait_s
        self.desired_file = desired_file
        self.status: dict[str, PoolStatus] = {p.key: PoolStatus() for p in pools}
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------ desired counts

    def _override(self, pool: AutoscaledPool) -> int | None:
        if not self.desired_file:
            return None
        try:
            table = orjson.loads(Path(self.desired_file).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        value = table.get(pool.key) if isinstance(table, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    async def desired(self, pool: AutoscaledPool) -> tuple[int | None, str, str]:
        """(desired count or None when unknown, reason, source)."""
        override = self._override(pool)
        if override is not None:
            return override, f"operator override in {self.desired_file}", "override"
        assert self.session is not None
        url = f"http://{pool.admin}{CAPACITY_PATH}"
        try:
            async with self.session.get(url, headers=self.admin_headers,
                                        timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as r:
                if r.status != 200:
                    return None, f"{url} answered {r.status}", "gateway"
                body = orjson.loads(await r.read())
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError) as exc:
            return None, f"cannot read {url}: {exc or type(exc).__name__}", "gateway"
        entry = (body.get("pools") or {}).get(pool.pool) or {}
        want = entry.get("desired_replicas")
        if not isinstance(want, int):
            return None, f"{url} has no desired count for pool {pool.pool!r} yet", "gateway"
        return want, str(entry.get("reason", "")), "gateway"

    # ------------------------------------------------------------ scaling

    def _register(self, pool: AutoscaledPool) -> None:
        st = self.status[pool.key]
        self.registry.set_targets(pool.service, [("127.0.0.1", r.port(pool.scheme), 1)
                                                 for r in st.replicas if r.registered and not r.draining])

    async def _scale_up(self, pool: AutoscaledPool, new: list[ManagedReplica]) -> None:
        """Wait until the new replicas are ready, then register them (they count as running
        from the moment they were started, so the next round does not start more)."""
        st = self.status[pool.key]
        assert self.session is not None
        results = await asyncio.gather(*(r.wait_ready(self.session, REPLICA_READY_TIMEOUT_S) for r in new),
                                       return_exceptions=True)
        if self.replica_test_delay_ms:
            results = [res if isinstance(res, BaseException) else await self._set_test_delay(r)
                       for r, res in zip(new, results, strict=True)]
        for r, res in zip(new, results, strict=True):
            if isinstance(res, BaseException):
                log.error("pool %s: replica on port %d failed to start: %s", pool.key, r.http_port, res)
                if r in st.replicas:
                    st.replicas.remove(r)
                await r.stop()
            else:
                r.registered = True
        await asyncio.to_thread(self._register, pool)
        log.info("pool %s: %d replica(s) registered in DNS", pool.key,
                 sum(r.registered and not r.draining for r in st.replicas))

    async def _set_test_delay(self, rep: ManagedReplica) -> BaseException | None:
        assert self.session is not None
        url = f"http://127.0.0.1:{rep.http_port}{FAULTS_PATH}"
        try:
            async with self.session.post(url, json={"delay_ms": self.replica_test_delay_ms},
                                         timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as r:
                if r.status != 200:
                    return RuntimeError(f"{url} answered {r.status}: {(await r.read())[:200]!r}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return RuntimeError(f"cannot set the test delay on {url}: {exc!r}")
        return None

    async def _gateway_lists(self, pool: AutoscaledPool, url: str) -> bool | None:
        """Does the region gateway still hold `url` in the pool? None: cannot tell."""
        assert self.session is not None
        try:
            async with self.session.get(f"http://{pool.admin}{REGION_PATH}", headers=self.admin_headers,
                                        timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as r:
                if r.status != 200:
                    return None
                body = orjson.loads(await r.read())
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError):
            return None
        if "pools" not in body:  # the summary without admin credentials: it cannot tell
            return None
        for p in body.get("pools", []):
            if p.get("name") == pool.pool:
                return any(rep.get("url") == url for rep in p.get("replicas", []))
        return False

    async def _drain(self, pool: AutoscaledPool, rep: ManagedReplica) -> None:
        url = rep.url(pool.scheme)
        rep.draining = True  # (set before the task started too: no second drain of it)
        await asyncio.to_thread(self._register, pool)
        log.info("pool %s: draining %s: removed from DNS, waiting for the gateway to let go", pool.key, url)
        t0 = time.monotonic()
        deadline = t0 + self.drain_wait_s
        while time.monotonic() < deadline:
            listed = await self._gateway_lists(pool, url)
            if listed is False:
                break
            await asyncio.sleep(POLL_S)
        else:
            log.warning("pool %s: gateway still lists %s after %.0f s; stopping it anyway",
                        pool.key, url, self.drain_wait_s)
        rc = await rep.stop()
        if rep in self.status[pool.key].replicas:
            self.status[pool.key].replicas.remove(rep)
        log.info("pool %s: replica %s stopped (exit %s) %.1f s after leaving DNS", pool.key, url, rc,
                 time.monotonic() - t0)

    async def _reap(self, pool: AutoscaledPool) -> None:
        st = self.status[pool.key]
        dead = [r for r in st.replicas if not r.alive() and r.registered and not r.draining]
        if not dead:
            return
        for r in dead:
            log.error("pool %s: replica on port %d exited (%s) on its own; replacing it: %s",
                      pool.key, r.http_port, r.popen.returncode, r.tail(500))
            st.replicas.remove(r)
            await r.stop()
        await asyncio.to_thread(self._register, pool)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or
                               log.error("scaling task failed: %r", t.exception()))

    async def reconcile(self, pool: AutoscaledPool) -> None:
        """One round for one pool. Starting and draining run as background tasks, so a spike
        during a slow drain is answered at once; replicas still starting count as running."""
        st = self.status[pool.key]
        await self._reap(pool)
        want, reason, source = await self.desired(pool)
        active = [r for r in st.replicas if not r.draining]
        if want is None:
            want = max(pool.min_replicas, len(active))
            reason = f"{reason}; keeping the current count"
        want = min(pool.max_replicas, max(pool.min_replicas, want))
        if (want, reason) != (st.desired, st.reason):
            log.info("pool %s: desired %d (%s: %s)", pool.key, want, source, reason)
        st.desired, st.reason, st.source = want, reason, source
        if len(active) < want and not await asyncio.to_thread(repository_has_models, pool.repository):
            if pool.key not in self._waiting_for_model:
                self._waiting_for_model.add(pool.key)
                log.info("pool %s: no model version in %s yet (the sync agent installs them); starting "
                         "replicas once one is there", pool.key, pool.repository)
            return
        self._waiting_for_model.discard(pool.key)
        if len(active) < want:
            extra = ("--enable-test-faults",) if self.replica_test_delay_ms else ()
            if pool.control_token_file:
                extra += ("--control-token-file", pool.control_token_file)
            new = [ManagedReplica(pool.repository, self.workdir, extra) for _ in range(want - len(active))]
            st.replicas.extend(new)
            log.info("pool %s: starting %d replica(s) (http ports %s)", pool.key, len(new),
                     [r.http_port for r in new])
            self._spawn(self._scale_up(pool, new))
        elif len(active) > want:
            # newest registered first; replicas still starting finish starting (next round)
            ready = sorted((r for r in active if r.registered), key=lambda r: r.started_s, reverse=True)
            for r in ready[:len(active) - want]:
                r.draining = True
                self._spawn(self._drain(pool, r))

    async def run(self, stop: asyncio.Event) -> None:
        self.session = aiohttp.ClientSession()
        try:
            while not stop.is_set():
                for pool in self.pools:
                    try:
                        await self.reconcile(pool)
                    except Exception:
                        log.exception("pool %s: reconcile failed", pool.key)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval_s)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop every replica (unregistered first), then the HTTP session."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pool in self.pools:
            st = self.status[pool.key]
            for r in st.replicas:
                r.draining = True
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._register, pool)
            await asyncio.gather(*(r.stop() for r in list(st.replicas)))
            st.replicas.clear()
        if self.session is not None:
            await self.session.close()
            self.session = None

    def snapshot(self) -> dict:
        return {key: {"desired": st.desired, "reason": st.reason, "source": st.source,
                      "replicas": [{"http_port": r.http_port, "grpc_port": r.grpc_port, "registered": r.registered,
                                    "draining": r.draining, "alive": r.alive()} for r in st.replicas]}
                for key, st in self.status.items()}


# ---------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the deployment's TOML config file")
    parser.add_argument("--desired-file", default="",
                        help='JSON {"REGION/POOL": N}: operator override of desired counts (re-read every poll)')
    parser.add_argument("--workdir", default="",
                        help="where unbound's config and replica logs go (default: a temp dir)")
    parser.add_argument("--status-file", default="", help="write the autoscaler's state here (JSON) every poll")
    parser.add_argument("--replica-test-delay-ms", type=int, default=0, metavar="MS",
                        help="benchmarks only: start replicas with --enable-test-faults and make every "
                             "inference take this long (a slow model without burning this machine's CPU)")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def _main(args: argparse.Namespace, cfg: Config) -> int:
    pools = autoscaled_pools(cfg)
    if not pools:
        log.error("no pool discovers through [capacity] autoscale_dns = %r; nothing to scale",
                  cfg.capacity.autoscale_dns)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="geogate-autoscaler-"))
    registry = UnboundRegistry(workdir / "dns", cfg.capacity.autoscale_dns, services=[p.service for p in pools])
    await asyncio.to_thread(registry.start)
    scaler = LocalAutoscaler(pools, registry, workdir=workdir, interval_s=cfg.capacity.autoscale_interval_ms / 1000.0,
                             drain_wait_s=cfg.capacity.autoscale_drain_wait_ms / 1000.0,
                             desired_file=args.desired_file, replica_test_delay_ms=args.replica_test_delay_ms,
                             admin_token=cfg.admin_token())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    status_task = None
    if args.status_file:
        async def write_status() -> None:
            while True:
                await asyncio.to_thread(_write_atomic, args.status_file, orjson.dumps(scaler.snapshot()))
                await asyncio.sleep(scaler.interval_s)
        status_task = loop.create_task(write_status())
    try:
        await scaler.run(stop)
    finally:
        if status_task is not None:
            status_task.cancel()
        await asyncio.to_thread(registry.stop)
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging("info", ts_digits=6)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"geogate autoscaler: {exc}", file=sys.stderr)
        return 2
    if not cfg.capacity.autoscale_dns:
        print("geogate autoscaler: [capacity] autoscale_dns is not set (HOST:PORT the autoscaler's DNS "
              "answers on)", file=sys.stderr)
        return 2
    import uvloop

    return uvloop.run(_main(args, cfg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.world.autoscaler", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
