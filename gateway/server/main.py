"""`geogate gateway --config FILE --region R [--workers N]`: run a region's gateway.

Lifecycle of one worker (uvicorn's shape): startup (pools, health checks, listeners) ->
serve -> drain (gateway.server.drain): on SIGTERM/SIGINT readiness turns false first (HTTP
/v2/health/ready 503, gRPC health NOT_SERVING, region summary "draining"), requests in flight
finish (bounded by ``[gateway] drain_timeout_ms``), then the listeners close and the worker
exits 0; on SIGUSR1 (handover) the listeners close at once and the worker waits until its
clients moved to the other workers (gRPC connections closed by their max age) before stopping.

``--workers N`` (N > 1): this process becomes a small supervisor of N worker processes that
all bind the same HTTP, gRPC and admin ports with SO_REUSEPORT (gateway.server.workers:
SIGTERM drains all, SIGUSR2 restarts them one at a time with no failed request, HTTP or
gRPC, a crashed worker is replaced). Metrics use prometheus-client's multiprocess mode (gateway.server.metrics), so
/metrics on any worker reports all of them; the region summary and health state are per
worker (each worker health-checks the replicas itself).

Security (README "Security"): ``[auth] keys_file`` turns on API keys on both client listeners
(re-read when the file changes, or at once on SIGHUP); ``[tls]`` serves them over TLS
(certificates re-read when their files change) and ``[tls.upstream]`` / ``[tls.peers]`` make
the links to replicas and peer gateways TLS (mutual with a client certificate). A bad keys or
certificate file at startup is fatal (exit 2) with a message naming the file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

from core.config import ConfigError, load_config
from core.logs import setup_logging
from gateway.server.drain import HTTP_CLEANUP_GRACE_S, WorkerDrain, install_signals
from gateway.server.workers import WORKER_ENV, announce_ready

log = logging.getLogger("geogate.gateway")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the deployment's TOML config file")
    parser.add_argument("--region", required=True, help="which [[regions]] entry this gateway serves")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes sharing the ports with SO_REUSEPORT (default 1)")


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _bound_socket(address: str, reuse_port: bool) -> socket.socket:
    host, port = _host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


# ---------------------------------------------------------------------------- one worker


async def serve(cfg, region, *, worker: int = 0, workers: int = 1) -> int:
    reuse_port = workers > 1
    from aiohttp import web

    from gateway.server.composition import build_admin_app, build_worker

    w = build_worker(cfg, region, worker=worker, workers=workers)  # StartupError: a bad security file
    state, http_front, grpc_front, auth, server_tls = w.state, w.http_front, w.grpc_front, w.auth, w.server_tls
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    how = install_signals(loop, stop)  # SIGTERM/SIGINT: stop; SIGUSR1: handover
    background: list[asyncio.Task] = [http_front.sweep_task()]
    if auth is not None:
        auth.install_sighup(loop)
        background.append(loop.create_task(auth.watch(), name="keys-file-watch"))
    if server_tls is not None:
        background.append(loop.create_task(server_tls.watch(), name="tls-files-watch"))
    if w.admin_credentials.operators is not None:
        background.append(loop.create_task(w.admin_credentials.operators.watch(), name="operators-file-watch"))

    # startup
    await state.start()
    # shutdown_timeout: the drain (gateway.server.drain) waits for requests itself first
    client_runner = web.AppRunner(http_front.client_app(), access_log=None, handle_signals=False,
                                  shutdown_timeout=HTTP_CLEANUP_GRACE_S)
    admin_runner = web.AppRunner(build_admin_app(w), access_log=None, handle_signals=False)
    runners = [client_runner, admin_runner]
    await client_runner.setup()
    http_front.install_fast_path(client_runner)
    await admin_runner.setup()
    ssl_context = server_tls.ssl_context() if server_tls is not None else None
    sites = [http_front.client_site(client_runner, _bound_socket(region.http, reuse_port), ssl_context),
             web.SockSite(admin_runner, _bound_socket(region.admin, reuse_port),
                          ssl_context=ssl_context if cfg.tls.admin else None)]
    if cfg.gateway.metrics:
        metrics_runner = web.AppRunner(w.admin.metrics_app(), access_log=None, handle_signals=False)
        await metrics_runner.setup()
        runners.append(metrics_runner)
        sites.append(web.SockSite(metrics_runner, _bound_socket(cfg.gateway.metrics, reuse_port)))
    for site in sites:
        await site.start()
    grpc_server = grpc_front.build_server(region.grpc, reuse_port=reuse_port,
                                          credentials=server_tls.grpc_credentials() if server_tls else None)
    await grpc_server.start()
    await grpc_front.set_serving(True)
    announce_ready()
    log.info("gateway %s worker %d serving: http %s, grpc %s, admin %s%s%s", region.name, worker,
             region.http, region.grpc, region.admin,
             f"; TLS{' (client certificates required)' if server_tls.mutual else ''}" if server_tls else "",
             f"; API keys from {auth.keys_file} ({len(auth.key_names)} keys)" if auth else "")

    drain = WorkerDrain(state, grpc_front, grpc_server, http_site=sites[0], runners=runners,
                        grpc_port=_host_port(region.grpc)[1], drain_timeout_s=cfg.gateway.drain_timeout_ms / 1000.0,
                        max_connection_age_s=cfg.gateway.grpc_max_connection_age_ms / 1000.0)

    # serve
    await stop.wait()

    # drain (gateway.server.drain): readiness false first, then listeners, then what is in flight
    report = await drain.run(how["mode"])
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await w.generate.close()
    await state.close()
    log.info(report.describe(worker))
    return 0


def _run_worker(cfg, region, worker: int, workers: int) -> int:
    import uvloop

    return uvloop.run(serve(cfg, region, worker=worker, workers=workers))


def run(args: argparse.Namespace) -> int:
    setup_logging("info", ts_digits=6)
    try:
        cfg = load_config(args.config)
        region = cfg.region(args.region)
    except ConfigError as exc:
        print(f"geogate gateway: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("geogate gateway: --workers must be >= 1", file=sys.stderr)
        return 2
    worker_env = os.environ.get(WORKER_ENV)
    if args.workers > 1 and worker_env is None:
        from gateway.server.workers import supervise

        return supervise(args.config, args.region, args.workers)
    from gateway.server.composition import StartupError

    worker = int(worker_env or 0)
    try:
        return _run_worker(cfg, region, worker, args.workers)
    except StartupError as exc:
        log.error("gateway %s worker %d cannot start: %s", region.name, worker, exc)
        print(f"geogate gateway: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("gateway %s worker %d cannot start: %s", region.name, worker, exc)
        return 1
