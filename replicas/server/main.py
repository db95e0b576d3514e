"""`geogate replica`: an ONNX Runtime server for a Triton-layout model repository (KServe v2).

Lifecycle: startup (listen on HTTP, gRPC and metrics ports: live but not ready) -> load the
repository (ready once every model that should be loaded is) -> serve -> on SIGTERM/SIGINT:
readiness false (HTTP 503, gRPC health NOT_SERVING), new inference refused with 503/UNAVAILABLE
so callers retry elsewhere, in-flight requests finish (bounded by --drain-timeout-s), listeners
close, sessions are freed, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

from core.logs import setup_logging

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_HEAD_TIMEOUT_S = 10.0
HTTP_BACKLOG = 1024
# The ORT worker threads need the GIL back to hand a finished batch over; with Python's default
# 5 ms switch interval a busy event loop can keep them (and so the model) idle that long.
GIL_SWITCH_INTERVAL_S = 0.0005

log = logging.getLogger("geogate.replica")


def _setup_logging(level: str) -> None:
    setup_logging(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # the replica counts requests in metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", required=True, help="model repository directory (Triton layout)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="KServe v2 HTTP port")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="KServe v2 gRPC port")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                        help="Prometheus /metrics port (0 = only on the HTTP port)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest inference request accepted (HTTP body after decompression, gRPC "
                             "message); larger ones get 413 / RESOURCE_EXHAUSTED (default 64 MiB)")
    parser.add_argument("--intra-op-threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads per session (default 1; parallelism comes "
                             "from instance_group count)")
    parser.add_argument("--drain-timeout-s", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                        help="on SIGTERM or unload, how long in-flight requests may take to finish")
    parser.add_argument("--enable-test-faults", action="store_true",
                        help="TESTS ONLY: enable POST /geogate/test/faults (delay, error status, hang)")
    parser.add_argument("--gil-switch-interval-ms", type=float, default=GIL_SWITCH_INTERVAL_S * 1000,
                        help="Python thread switch interval (default 0.5 ms, Python's own is 5 ms): how long "
                             "a finished ORT batch may wait for the event loop to yield the GIL")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--tls-cert", default="", metavar="FILE",
                        help="serve HTTP and gRPC over TLS with this certificate (PEM, with --tls-key); "
                             "re-read when the files change")
    parser.add_argument("--tls-key", default="", metavar="FILE", help="the certificate's private key (PEM)")
    parser.add_argument("--tls-client-ca", default="", metavar="FILE",
                        help="require client certificates signed by this CA (mutual TLS: only the gateway "
                             "with its certificate can call)")
    parser.add_argument("--control-token-file", default="", metavar="FILE",
                        help="require this token (Authorization: Bearer ...) on the repository API: index, "
                             "load, unload over HTTP and gRPC (default: $GEOGATE_REPLICA_CONTROL_TOKEN, else "
                             "open); inference, health and metadata stay open")
    parser.add_argument("--request-head-timeout-s", type=float, default=DEFAULT_HEAD_TIMEOUT_S,
                        help="an HTTP request's line and headers must arrive within this many seconds of its "
                             "first byte, on every request of a connection (else 408 and close; default 10)")


class ReplicaServer:
    def __init__(self, args: argparse.Namespace, control_token=None):
        from replicas.server.grpc_server import GrpcInferenceServicer, ReadinessHealthServicer
        from replicas.server.http_server import HttpApi
        from replicas.server.inference_service import FaultSwitch, InferenceService
        from replicas.server.metrics import ReplicaMetrics
        from replicas.server.repository import ModelRepository

        self.args = args
        self.metrics = ReplicaMetrics()
        self.repository = ModelRepository(Path(args.repository), metrics=self.metrics,
                                          intra_op_threads=max(1, args.intra_op_threads),
                                          drain_timeout_s=args.drain_timeout_s)
        self.faults = FaultSwitch() if args.enable_test_faults else None
        self.service = InferenceService(self.repository, self.metrics, self.faults)
        self.http = HttpApi(self.service, self.repository, self.metrics, max_body_bytes=args.max_body_bytes,
                            faults=self.faults, control_token=control_token,
                            head_timeout_s=getattr(args, "request_head_timeout_s", DEFAULT_HEAD_TIMEOUT_S))
        self.health = ReadinessHealthServicer(self.repository)
        self.grpc_servicer = GrpcInferenceServicer(self.service, self.repository, control_token)
        self._stop = asyncio.Event()
        self._tls_watch: asyncio.Task | None = None  # --tls-cert: certificate files re-read on change

    async def serve(self) -> int:
        from aiohttp import web

        from replicas.server.grpc_server import HEALTH_SYNC_INTERVAL_S, build_server

        args = self.args
        if self.faults is not None:
            log.warning("TEST FAULT SWITCH ENABLED: POST /geogate/test/faults changes inference behaviour")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

        runners: list[web.AppRunner] = []
        grpc_server = build_server(self.grpc_servicer, self.health, max_receive_bytes=args.max_body_bytes)
        server_tls = None
        if getattr(args, "tls_cert", ""):  # the metrics listener stays plaintext (scrapers)
            from core.tls import ServerTls, ServerTlsSettings, TlsConfigError

            try:
                server_tls = ServerTls(ServerTlsSettings(args.tls_cert, args.tls_key, args.tls_client_ca))
            except TlsConfigError as exc:
                log.error("cannot start listeners", extra={"fields": {"error": str(exc)}})
                return 2
            self._tls_watch = asyncio.create_task(server_tls.watch())  # lives as long as the process
        try:
            http_runner = self.http.make_runner(access_log=None, handle_signals=False,
                                                shutdown_timeout=args.drain_timeout_s)
            await http_runner.setup()
            runners.append(http_runner)
            await web.TCPSite(http_runner, args.host, args.http_port, backlog=HTTP_BACKLOG,
                              reuse_address=True,
                              ssl_context=server_tls.ssl_context() if server_tls else None).start()
            if args.metrics_port:
                metrics_runner = web.AppRunner(self.http.build_metrics_app(), access_log=None,
                                               handle_signals=False)
                await metrics_runner.setup()
                runners.append(metrics_runner)
                await web.TCPSite(metrics_runner, args.host, args.metrics_port, reuse_address=True).start()
            address = f"{args.host}:{args.grpc_port}"
            bound = (grpc_server.add_secure_port(address, server_tls.grpc_credentials()) if server_tls
                     else grpc_server.add_insecure_port(address))
            if bound == 0:
                raise OSError(f"cannot listen on {args.host}:{args.grpc_port} (gRPC)")
            await grpc_server.start()
        except OSError as exc:
            log.error("cannot start listeners", extra={"fields": {"error": str(exc)}})
            for r in runners:
                await r.cleanup()
            await grpc_server.stop(None)
            return 1
        log.info("listening (live, loading models)", extra={"fields": {
            "host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port,
            "metrics_port": args.metrics_port, "repository": args.repository}})

        load_task = asyncio.create_task(self.repository.load_all())
        health_task = asyncio.create_task(self._sync_health(HEALTH_SYNC_INTERVAL_S))
        stop_task = asyncio.create_task(self._stop.wait())
        await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if load_task.done():
            ready, reason = self.repository.readiness()
            log.info("repository loaded", extra={"fields": {"ready": ready, "reason": reason}})
        await stop_task
        return await self._shutdown(load_task, health_task, grpc_server, runners)

    async def _sync_health(self, interval_s: float) -> None:
        while True:
            await self.health.sync()
            self.metrics.ready.set(1 if self.repository.readiness()[0] else 0)
            await asyncio.sleep(interval_s)

    async def _shutdown(self, load_task, health_task, grpc_server, runners) -> int:
        started = time.monotonic()
        log.info("shutting down: not ready, draining in-flight requests",
                 extra={"fields": {"inflight": self.service.inflight}})
        self.repository.draining = True
        self.metrics.ready.set(0)
        await self.health.enter_graceful_shutdown()
        health_task.cancel()
        if not load_task.done():
            load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await load_task
        timeout_s = self.args.drain_timeout_s

        async def drain_http() -> None:
            try:
                await asyncio.wait_for(self.service.idle.wait(), timeout_s)
            except TimeoutError:
                log.warning("drain timed out", extra={"fields": {"inflight": self.service.inflight}})
            for r in runners:
                await r.cleanup()

        # gRPC stop(grace): refuse new RPCs now, let running ones finish within the grace period.
        await asyncio.gather(grpc_server.stop(timeout_s), drain_http())
        await self.repository.close()
        log.info("stopped", extra={"fields": {"drain_s": round(time.monotonic() - started, 3)}})
        return 0


def run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    sys.setswitchinterval(args.gil_switch_interval_ms / 1000)
    if not Path(args.repository).is_dir():
        log.error("repository is not a directory", extra={"fields": {"repository": args.repository}})
        return 2
    head_timeout_s = getattr(args, "request_head_timeout_s", DEFAULT_HEAD_TIMEOUT_S)
    if not 0 < head_timeout_s < float("inf"):
        log.error("--request-head-timeout-s must be a positive number of seconds",
                  extra={"fields": {"value": head_timeout_s}})
        return 2
    from replicas.server.repository import ControlToken, ControlTokenError

    try:
        control_token = ControlToken.configured(getattr(args, "control_token_file", ""))
    except ControlTokenError as exc:
        log.error("cannot use the control token", extra={"fields": {"error": str(exc)}})
        return 2
    if control_token is not None:
        log.info("repository API needs the control token")
    import uvloop

    async def main() -> int:
        return await ReplicaServer(args, control_token).serve()

    return uvloop.run(main())
