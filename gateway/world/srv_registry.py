"""A DNS server the local autoscaler owns: `unbound` answering SRV records it rewrites.

Gateways already discover replicas from DNS SRV (``discover = "dns+srv://NAME"`` with
``discover_resolver = "HOST:PORT"``, core.srv_discovery). The autoscaler registers a replica by
adding an SRV record (and the target's A record) and removes it by deleting them; each change
rewrites unbound's config and runs ``unbound-control reload``, so answers change at once
(caching is off; TTL 1 s).

    reg = UnboundRegistry(workdir, "127.0.0.1:5399", services=["_grpc._tcp.eu-ort.eu-west.autoscale.geogate."])
    reg.start()
    reg.set_targets(service, [("127.0.0.1", 18101, 1)])    # (ip, port, weight)
    reg.stop()

Each service name is its own ``local-zone ... static``: with no records it answers NXDOMAIN,
which SRV discovery reads as "no replicas" (a real removal). Target host names are
``r<port>.<service>``, inside the service's zone.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("geogate.gateway.srv_registry")

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
UNBOUND_CONTROL = shutil.which("unbound-control") or "/usr/sbin/unbound-control"
UNBOUND_CHECKCONF = shutil.which("unbound-checkconf") or "/usr/sbin/unbound-checkconf"
READY_TIMEOUT_S = 20.0
CONTROL_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
RECORD_TTL_S = 1
POLL_S = 0.05
PR_SET_PDEATHSIG = 1

Target = tuple[str, int, int]  # (ip, port, weight)


class RegistryError(RuntimeError):
    """unbound could not be started or reconfigured; the message says why."""


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG), so a
    killed autoscaler never leaves replicas or its DNS server behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def unbound_config_text(*, host: str, port: int, workdir: str | os.PathLike[str], control_port: int,
                        zones: Iterable[tuple[str, str]], records: Iterable[str]) -> str:
    """An unbound config answering only `records` (local-data) for `zones` ((name, local-zone type)),
    in the foreground, with remote control on 127.0.0.1:`control_port` without certificates."""
    lines = [
        "server:",
        f"  interface: {host}",
        f"  port: {port}",
        "  do-ip4: yes",
        "  do-ip6: " + ("yes" if ":" in host else "no"),
        "  do-udp: yes",
        "  do-tcp: yes",
        "  do-daemonize: no",
        "  use-syslog: no",
        '  logfile: ""',
        '  chroot: ""',
        '  username: ""',
        f'  directory: "{workdir}"',
        f'  pidfile: "{workdir}/unbound.pid"',
        "  verbosity: 1",
        "  num-threads: 1",
        "  access-control: 127.0.0.0/8 allow",
        "  access-control: ::1 allow",
        # No DNSSEC validation, no trust anchors: a plain local answerer.
        '  module-config: "iterator"',
        "  cache-max-ttl: 0",  # never answer from a cache across a reload
        "  cache-max-negative-ttl: 0",
    ]
    for zone, zone_type in zones:
        lines.append(f'  local-zone: "{zone}" {zone_type}')
    for record in records:
        lines.append(f'  local-data: "{record}"')
    lines += ["remote-control:", "  control-enable: yes", "  control-interface: 127.0.0.1",
              f"  control-port: {control_port}", "  control-use-cert: no"]
    return "\n".join(lines) + "\n"


class UnboundRegistry:
    def __init__(self, workdir: str | os.PathLike[str], listen: str, *, services: Iterable[str]) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.control_port = _free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "unbound.conf"
        self.log_path = self.workdir / "unbound.log"
        self.targets: dict[str, list[Target]] = {_fqdn(s): [] for s in services}
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------ config

    def records(self) -> list[str]:
        lines: list[str] = []
        for service, targets in self.targets.items():
            for ip, port, weight in targets:
                host = f"r{port}.{service}"
                lines.append(f"{service} {RECORD_TTL_S} IN SRV 0 {weight} {port} {host}")
                lines.append(f"{host} {RECORD_TTL_S} IN {'AAAA' if ':' in ip else 'A'} {ip}")
        return lines

    def config_text(self) -> str:
        return unbound_config_text(host=self.host, port=self.port, workdir=self.workdir,
                                   control_port=self.control_port,
                                   zones=[(service, "static") for service in self.targets], records=self.records())

    def _write_config(self) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(self.config_text())
        check = subprocess.run([UNBOUND_CHECKCONF, str(tmp)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RegistryError(f"unbound-checkconf rejected the generated config:\n{check.stdout}{check.stderr}")
        os.replace(tmp, self.config_path)

    # ------------------------------------------------------------ lifecycle

    def answers(self) -> bool:
        import dns.exception
        import dns.message
        import dns.query
        import dns.rdatatype

        q = dns.message.make_query(next(iter(self.targets), "invalid."), dns.rdatatype.SOA)
        try:
            dns.query.udp(q, self.host, port=self.port, timeout=0.5)
        except (dns.exception.DNSException, OSError):
            return False
        return True

    def start(self) -> UnboundRegistry:
        self._write_config()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([UNBOUND, "-d", "-c", str(self.config_path)], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.answers():
            if self.proc.poll() is not None:
                raise RegistryError(f"unbound exited ({self.proc.returncode}) on {self.address}: "
                                    f"{self.log_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RegistryError(f"unbound not answering on {self.address} after {READY_TIMEOUT_S:g} s")
            time.sleep(POLL_S)
        log.info("SRV registry (unbound) answering on %s for %s", self.address, ", ".join(self.targets))
        return self

    def set_targets(self, service: str, targets: Iterable[Target]) -> None:
        """Replace the service's targets and make the change live (reload)."""
        self.targets[_fqdn(service)] = sorted(set(targets))
        self._write_config()
        if self.proc is None or self.proc.poll() is not None:
            raise RegistryError("unbound is not running")
        result = subprocess.run([UNBOUND_CONTROL, "-c", str(self.config_path), "reload"],
                                capture_output=True, text=True, timeout=CONTROL_TIMEOUT_S)
        if result.returncode != 0:
            raise RegistryError(f"unbound-control reload failed: {result.stdout}{result.stderr}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.answers():
            if time.monotonic() > deadline:
                raise RegistryError(f"unbound not answering after reload on {self.address}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT_S)
        log_file = getattr(self, "_log", None)
        if log_file is not None:
            log_file.close()
