"""How a gateway worker stops, in uvicorn's order (stop listening, drain, wait with a timeout,
cancel the rest), two ways:

- **stop** (SIGTERM / SIGINT: the gateway goes away): readiness turns false (HTTP /v2/health/ready
  503, gRPC health NOT_SERVING, region summary "draining"); new arrivals are still served for
  DRAIN_NOTICE_S so load balancers and peers that poll readiness notice; then the HTTP
  listener closes (keep-alive requests are answered with ``Connection: close``), the gRPC
  server stops with the rest of ``[gateway] drain_timeout_ms`` as its grace, and requests in
  flight finish within it.
- **handover** (SIGUSR1; the worker supervisor's rolling restart sends it to the worker being
  replaced once the replacement serves the same ports): readiness false, and at once both
  listening sockets leave the SO_REUSEPORT group, so every new connection goes to the other
  workers. HTTP keep-alive clients move on their next request (``Connection: close``). gRPC
  clients move when grpc-core closes their connection for its age (``[gateway]
  grpc_max_connection_age_ms``): that GOAWAY is graceful (a second GOAWAY after a PING round
  trip) and comes from a server that still serves, so a call racing it is served, not
  cancelled. The worker waits until channelz shows no gRPC connection left and nothing in
  flight; only then does the gRPC server stop, with nothing left to cut off.

Why the handover: grpc-core's ``grpc_server_shutdown_and_notify`` (behind ``stop(grace)``)
answers CANCELLED to every call it has accepted but the Python server had not asked for yet,
and to every call that reaches a connection after shutdown began and before the client reads
the GOAWAY (grpc/grpc#41785). With 8 channels at 300 calls/s over `--workers 2`, that was 4
of 10,054 calls over 6 rolling restarts here, always 0.50 s after the drain began (the
moment ``stop`` ran); with the handover, 0 (``loadtests/grpc_rolling_restart.py`` measures
it). The Python API has no "stop listening" apart from ``stop``; the worker therefore shuts
down grpc-core's listening socket itself (``shutdown(2)`` on a duplicate of its descriptor,
found by port). grpc-core then logs one line, ``Closing acceptor. Failed accept4: Invalid
argument``: expected. Connections that completed the TCP handshake but were not accepted yet
are reset by the kernel when a listener closes (also on the HTTP port, and with grpc's own
``stop``); ``sysctl net.ipv4.tcp_migrate_req=1`` (Linux 5.14+) moves them to another worker.

The worker's last line says how many requests it cut off: requests it had accepted and did
not answer because it stopped. HTTP: inference requests still in flight when the listener's
cleanup cancels them (``GatewayMetrics.in_flight_now``) less those answered meanwhile
(``answered``). gRPC: calls grpc-core held open (channelz: started, less succeeded and
failed) when the server was stopped with no grace left, which cancels every one of them
(handover); or, for a stop with grace, the calls grpc-core held that no handler had taken yet
when it began (it cancels those at once) plus the handlers still running when the grace ran
out. After a completed handover that is 0 by construction. Long-lived calls (a grpc.health.v1
Watch stream) keep their connection past its age: the handover then ends at the drain timeout
and counts them. A gRPC server stopped with connections still open (the drain timed out, or a
plain stop) may also answer CANCELLED to calls those connections send in the instant before
they read its GOAWAY; such calls never reach this process's handlers and are gone from
channelz with the server, so they cannot be counted: the line gives the number of open
connections instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass

log = logging.getLogger("geogate.gateway")

DRAIN_POLL_S = 0.05
# After readiness turns false (stop), keep serving new arrivals this long so load balancers and
# peers that poll readiness notice before the listeners close (bounded by drain_timeout_ms).
# After the HTTP listener closes, keep-alive clients get as long to send their next request on
# an open connection: it is answered with Connection: close, so they move on cleanly.
DRAIN_NOTICE_S = 0.5
# aiohttp's own wait for handlers at cleanup: the drain above already waited for them.
HTTP_CLEANUP_GRACE_S = 0.25
CHANNELZ_PAGE = 1000
MODE_STOP, MODE_HANDOVER = "stop", "handover"


# ---------------------------------------------------------------------------- gRPC listener


def close_listening_sockets(port: int) -> int:
    """Shut down this process's listening TCP sockets on `port` (grpc-core's: the Python API
    cannot close them apart from stopping the server). Each leaves its SO_REUSEPORT group at
    once. Returns how many were closed."""
    closed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            dup = socket.socket(fileno=os.dup(fd))  # ours to close; the original stays grpc's
        except OSError:
            continue
        with dup:
            try:
                if dup.type != socket.SOCK_STREAM or dup.family not in (socket.AF_INET, socket.AF_INET6) or \
                        not dup.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) or dup.getsockname()[1] != port:
                    continue
                dup.shutdown(socket.SHUT_RD)  # a listening socket: stop listening (grpc keeps the fd)
                closed += 1
            except OSError:
                continue
    return closed


@dataclass(frozen=True, slots=True)
class CallCounts:
    started: int
    succeeded: int
    failed: int

    @property
    def open(self) -> int:
        return max(0, self.started - self.succeeded - self.failed)


class GrpcServerView:
    """This worker's gRPC server as grpc-core's channelz sees it: open connections and call
    counters (grpc-core's own, so calls it cancels before any Python handler runs count too).
    ``grpc._cython.cygrpc`` is where grpcio (and the grpcio-channelz package) read channelz."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server_id: int | None = None
        try:
            from grpc._cython import cygrpc

            self._cz = cygrpc
        except ImportError:  # pragma: no cover (grpcio always has it)
            self._cz = None
            return
        suffix = f":{port}"
        start = 0
        while True:
            page = self._json(self._cz.channelz_get_servers(start))
            for server in page.get("server", []):
                sid = int(server["ref"]["serverId"])
                start = sid + 1
                if any(ls.get("name", "").endswith(suffix) for ls in server.get("listenSocket", [])):
                    self.server_id = sid
            if page.get("end", True) or not page.get("server"):
                break

    @staticmethod
    def _json(raw) -> dict:
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            return {}

    @property
    def available(self) -> bool:
        return self.server_id is not None

    def connections(self) -> int | None:
        """Open client connections (None: channelz cannot tell)."""
        if self.server_id is None:
            return None
        count, start = 0, 0
        try:
            while True:
                page = self._json(self._cz.channelz_get_server_sockets(self.server_id, start, CHANNELZ_PAGE))
                refs = page.get("socketRef", [])
                count += len(refs)
                if page.get("end", True) or not refs:
                    return count
                start = max(int(r["socketId"]) for r in refs) + 1
        except Exception:  # the server is gone (stopped): channelz raises for an unknown id
            return None

    def calls(self) -> CallCounts | None:
        if self.server_id is None:
            return None
        try:
            doc = self._json(self._cz.channelz_get_server(self.server_id))
        except Exception:
            return None
        data = doc.get("server", {}).get("data", {})
        return CallCounts(int(data.get("callsStarted", 0)), int(data.get("callsSucceeded", 0)),
                          int(data.get("callsFailed", 0)))


# ---------------------------------------------------------------------------- the drain


@dataclass
class DrainReport:
    mode: str
    duration_s: float = 0.0
    cut_off_http: int = 0
    cut_off_grpc: int = 0
    grpc_connections_at_stop: int | None = 0
    timed_out: bool = False
    max_connection_age_s: float = 0.0

    @property
    def cut_off(self) -> int:
        return self.cut_off_http + self.cut_off_grpc

    def describe(self, worker: int) -> str:
        text = (f"worker {worker} stopped after {self.duration_s:.2f} s drain ({self.cut_off} requests cut off"
                f"{f': {self.cut_off_http} HTTP, {self.cut_off_grpc} gRPC' if self.cut_off else ''})")
        conns = self.grpc_connections_at_stop
        if conns:
            text += (f"; {conns} gRPC connections were still open when its server stopped: calls they sent "
                     "before reading its GOAWAY may have been answered CANCELLED by grpc-core, uncounted "
                     "(grpc/grpc#41785)")
            if self.mode == MODE_HANDOVER and not self.max_connection_age_s:
                text += "; set [gateway] grpc_max_connection_age_ms so that clients move before the server stops"
            elif self.mode == MODE_HANDOVER:
                text += ("; raise [gateway] drain_timeout_ms above grpc_max_connection_age_ms x 1.1 plus the "
                         "longest request")
        elif conns is None:
            text += "; gRPC connections at stop: unknown (no channelz)"
        return text


class WorkerDrain:
    """Stops one worker's listeners and servers in order (see the module docstring)."""

    def __init__(self, gw, grpc_front, grpc_server, *, http_site, runners: list, grpc_port: int,
                 drain_timeout_s: float, max_connection_age_s: float) -> None:
        self.gw = gw
        self.grpc_front = grpc_front
        self.grpc_server = grpc_server
        self.http_site = http_site
        self.runners = runners
        self.grpc_port = grpc_port
        self.drain_timeout_s = drain_timeout_s
        self.max_connection_age_s = max_connection_age_s
        self.grpc_view = GrpcServerView(grpc_port)  # found while the server listens

    async def run(self, mode: str) -> DrainReport:
        gw = self.gw
        report = DrainReport(mode, max_connection_age_s=self.max_connection_age_s)
        t0 = time.monotonic()
        deadline = t0 + self.drain_timeout_s
        gw.draining = True
        await self.grpc_front.set_serving(False)
        log.info("worker %d draining (%s; %d in flight, up to %.1f s)", gw.worker, mode, gw.load.in_flight,
                 self.drain_timeout_s)
        grpc_stop: asyncio.Future | None = None
        if mode == MODE_HANDOVER:
            closed = close_listening_sockets(self.grpc_port)
            await self.http_site.stop()
            if not self.max_connection_age_s:
                log.warning("worker %d: [gateway] grpc_max_connection_age_ms = 0: gRPC clients stay on this "
                            "worker until its server stops", gw.worker)
            log.info("worker %d: listeners closed (%d gRPC); handing its clients over", gw.worker, closed)
            closed_s = time.monotonic()
            while time.monotonic() < deadline and (  # noqa: ASYNC110  (polling counters beats an Event per request)
                    gw.load.in_flight > 0 or time.monotonic() - closed_s < DRAIN_NOTICE_S
                    or (self.max_connection_age_s and (self.grpc_view.connections() or 0) > 0)):
                await asyncio.sleep(DRAIN_POLL_S)
        else:
            await asyncio.sleep(max(0.0, min(DRAIN_NOTICE_S, deadline - time.monotonic())))
            report.grpc_connections_at_stop = self.grpc_view.connections()
            # Calls grpc-core holds but no handler runs yet are cancelled as the server stops
            # (the rest get its grace): count them now, while channelz still has the server.
            calls = self.grpc_view.calls()
            grpc_running, grpc_answered = gw.metrics.in_flight_now["grpc"], gw.metrics.answered["grpc"]
            pending = max(0, calls.open - grpc_running) if calls is not None else 0
            # grace: the rest of the drain; its GOAWAY tells clients to go elsewhere
            grpc_stop = asyncio.ensure_future(self.grpc_server.stop(max(0.0, deadline - time.monotonic())))
            await self.http_site.stop()  # no new HTTP connections; open ones finish their requests
            closed_s = time.monotonic()
            while time.monotonic() < deadline and (  # noqa: ASYNC110
                    gw.load.in_flight > 0 or time.monotonic() - closed_s < DRAIN_NOTICE_S):
                await asyncio.sleep(DRAIN_POLL_S)
        report.timed_out = time.monotonic() >= deadline
        # Whatever is left is cut off now: account for it exactly, then stop.
        metrics = gw.metrics
        http_left, http_answered = metrics.in_flight_now["http"], metrics.answered["http"]
        if grpc_stop is None:
            report.grpc_connections_at_stop = self.grpc_view.connections()
            calls = self.grpc_view.calls()
            await self.grpc_server.stop(0)  # no grace: every call still open is cancelled now
            report.cut_off_grpc = calls.open if calls is not None else metrics.in_flight_now["grpc"]
        else:
            await grpc_stop  # its grace ends with the drain: what is still running is cancelled
            # No handler starts once the server stops: each one running then was answered or cut off.
            report.cut_off_grpc = pending + max(0, grpc_running - (metrics.answered["grpc"] - grpc_answered))
        for runner in self.runners:
            await runner.cleanup()
        report.cut_off_http = max(0, http_left - (metrics.answered["http"] - http_answered))
        report.duration_s = time.monotonic() - t0
        return report


def install_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> dict[str, str]:
    """SIGTERM/SIGINT: stop; SIGUSR1: handover. Returns a dict whose "mode" says which came first."""
    import signal

    chosen = {"mode": MODE_STOP}

    def ask(mode: str) -> None:
        if not stop.is_set():
            chosen["mode"] = mode
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ask, MODE_STOP)
    loop.add_signal_handler(signal.SIGUSR1, ask, MODE_HANDOVER)
    with contextlib.suppress(ValueError):
        # SIGUSR2 is the supervisor's (rolling restart): a worker it reaches through the
        # process group must not die of it.
        loop.add_signal_handler(signal.SIGUSR2, lambda: None)
    return chosen
