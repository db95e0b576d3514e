"""HAProxy, the peer geogate is compared with: Debian's haproxy, configured by the scenario.

HTTP mode, round-robin, active health checks (`GET /v2/health/ready`, interval/fall/rise like
the gateway's in the same scenario), keep-alive to the servers, `retries` + `option
redispatch` (HAProxy's own retry of a failed connect on another server), optional `backup`
servers (its failover), `nbthread` threads. Started as a scenario process, so it is killed
with the rest at teardown.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from loadtests.procs import Proc, free_port, get_json, http_ok

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
HAPROXY_READY_TIMEOUT_S = 30.0
CHECK_INTER_MS = 250
CHECK_FALL = 2
CHECK_RISE = 1


def haproxy_available() -> bool:
    return Path(HAPROXY).exists()


def require_haproxy() -> None:
    if not haproxy_available():
        raise RuntimeError(f"haproxy not found at {HAPROXY} (Debian: apt-get install haproxy)")


class HaproxyProc(Proc):
    """haproxy -db -f CONFIG over `servers` (HOST:PORT of replicas' HTTP listeners)."""

    def __init__(self, work_dir: Path, servers: list[str], *, name: str = "haproxy", log_dir: Path,
                 backups: list[str] | None = None, threads: int = 1, inter_ms: int = CHECK_INTER_MS,
                 fall: int = CHECK_FALL, rise: int = CHECK_RISE, balance: str = "roundrobin", h2: bool = False):
        # h2: gRPC (HTTP/2 cleartext) on both sides, `proto h2`; servers checked by TCP connect
        self.h2 = h2
        self.port = free_port()
        self.stats_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.n_servers = len(servers) + len(backups or [])
        proto = " proto h2" if h2 else ""
        lines = [f"    server s{i} {s} check inter {inter_ms} fall {fall} rise {rise}{proto}"
                 for i, s in enumerate(servers)]
        lines += [f"    server b{i} {s} check inter {inter_ms} fall {fall} rise {rise} backup{proto}"
                  for i, s in enumerate(backups or [])]
        work_dir.mkdir(parents=True, exist_ok=True)
        self.config = work_dir / f"{name}.cfg"
        self.config.write_text(f"""global
    maxconn 4096
    nbthread {threads}
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 2
    option redispatch
    option http-keep-alive
frontend fe
    bind {self.address}{proto}
    default_backend replicas
frontend stats
    bind 127.0.0.1:{self.stats_port}
    http-request return status 200 content-type application/json lf-string "{{\\"up\\": %[nbsrv(replicas)]}}"
backend replicas
    balance {balance}
{"" if h2 else "    option httpchk GET /v2/health/ready"}
    http-reuse safe
{chr(10).join(lines)}
""")
        super().__init__([HAPROXY, "-db", "-f", str(self.config)], name=name, log_dir=log_dir,
                         ports=[self.port, self.stats_port])

    def servers_up(self) -> int:
        """How many servers HAProxy's health checks consider up (backups included)."""
        return int(get_json(f"http://127.0.0.1:{self.stats_port}/").get("up", -1))

    def wait_ready(self, timeout_s: float = HAPROXY_READY_TIMEOUT_S) -> HaproxyProc:
        """Until HAProxy answers through a server and every server passed its health check."""
        self.wait_until(lambda: (self.h2 or http_ok(f"http://{self.address}/v2/health/ready"))
                        and self.servers_up() == self.n_servers, timeout_s, what="up on every server")
        return self


def start_haproxy(ctx, servers: list[str], *, name: str = "haproxy", backups: list[str] | None = None,
                  threads: int = 1) -> HaproxyProc:
    """Start HAProxy as a process of scenario context `ctx` and wait until every server is up."""
    h = ctx.add(HaproxyProc(ctx.work_dir, servers, name=name, log_dir=ctx.log_dir, backups=backups,
                            threads=threads))
    h.wait_ready()
    time.sleep(CHECK_INTER_MS / 1000)  # one more check round: rise counted everywhere
    return h
