"""A real DNS server for tests: `unbound` answering a test zone from `local-data` records.

    server = UnboundServer(tmp_path, zones=["eu.example."])
    server.start([*srv_records("_grpc._tcp.eu.example.", [("r1.eu.example.", "127.0.0.1", 18101, 10)])])
    server.address            # "127.0.0.1:PORT": give it to SrvDiscovery(resolver=...) / dig -p
    server.set_records([...])  # rewrite the config and `unbound-control reload` (or restart)
    server.stop()

Each zone is a `local-zone: "<zone>" static`: names in it without records answer NXDOMAIN,
so removing every record is a real removal. Remote control listens on its own free loopback
port without certificates (`control-use-cert: no`), which is what makes `reload` cheap.
The `unbound_server` pytest fixture starts one with no records and stops it afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from gateway.world.srv_registry import unbound_config_text
from tests.procs import Proc, free_port

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
UNBOUND_CONTROL = shutil.which("unbound-control") or "/usr/sbin/unbound-control"
UNBOUND_CHECKCONF = shutil.which("unbound-checkconf") or "/usr/sbin/unbound-checkconf"
READY_TIMEOUT_S = 20.0
CONTROL_TIMEOUT_S = 15.0
DEFAULT_TTL_S = 1


def srv_records(service: str, targets: Iterable[tuple[str, str, int, int]], *, ttl_s: int = DEFAULT_TTL_S,
                priority: int = 0) -> list[str]:
    """local-data lines for an SRV service: targets are (host name, IPv4/IPv6, port, weight);
    each host gets its A/AAAA record too (once, even when it serves several ports)."""
    lines: list[str] = []
    hosts: dict[str, str] = {}
    for host, ip, port, weight in targets:
        lines.append(f"{service} {ttl_s} IN SRV {priority} {weight} {port} {host}")
        hosts[host] = ip
    for host, ip in hosts.items():
        rtype = "AAAA" if ":" in ip else "A"
        lines.append(f"{host} {ttl_s} IN {rtype} {ip}")
    return lines


class UnboundServer:
    """One unbound process on 127.0.0.1:<free port> serving `local-data` for the given zones."""

    def __init__(self, workdir: str | Path, *, zones: Sequence[str] = ("example.",)):
        """`zones`: zone names, each optionally followed by an unbound local-zone type
        ("eu.example. refuse" answers REFUSED for everything in it); the default type is static."""
        self.workdir = Path(workdir) / f"unbound-{id(self):x}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.zones: list[tuple[str, str]] = []
        self._set_zones(zones)
        self.port = free_port()
        self.control_port = free_port()
        self.config_path = self.workdir / "unbound.conf"
        self.records: list[str] = []
        self.proc: Proc | None = None

    def _set_zones(self, zones: Sequence[str]) -> None:
        self.zones = []
        for spec in zones:
            name, _, zone_type = spec.partition(" ")
            self.zones.append((name if name.endswith(".") else name + ".", zone_type.strip() or "static"))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------ config

    def _config_text(self) -> str:
        return unbound_config_text(host="127.0.0.1", port=self.port, workdir=self.workdir,
                                   control_port=self.control_port, zones=self.zones, records=self.records)

    def _write_config(self) -> None:
        self.config_path.write_text(self._config_text())
        check = subprocess.run([UNBOUND_CHECKCONF, str(self.config_path)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"unbound-checkconf rejected {self.config_path}:\n{check.stdout}{check.stderr}")

    # ------------------------------------------------------------ lifecycle

    def start(self, records: Iterable[str] = ()) -> UnboundServer:
        self.records = list(records)
        self._write_config()
        self.proc = Proc([UNBOUND, "-d", "-c", str(self.config_path)], name=f"unbound-{self.port}")
        self.proc.wait_until(self.answers, READY_TIMEOUT_S, what="answering DNS queries")
        return self

    def answers(self) -> bool:
        """True when the server answers a query for the first zone (any rcode)."""
        query = dns.message.make_query(self.zones[0][0], dns.rdatatype.SOA)
        try:
            dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.5)
        except (dns.exception.DNSException, OSError):
            return False
        return True

    def control(self, *args: str) -> str:
        result = subprocess.run([UNBOUND_CONTROL, "-c", str(self.config_path), *args],
                                capture_output=True, text=True, timeout=CONTROL_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"unbound-control {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stdout}{result.stderr}")
        return result.stdout

    def set_records(self, records: Iterable[str], *, restart: bool = False,
                    zones: Sequence[str] | None = None) -> None:
        """Replace every local-data record (and the zones, when given), then reload (or
        restart) so the change is live."""
        self.records = list(records)
        if zones is not None:
            self._set_zones(zones)
        self._write_config()
        if self.proc is None or not self.proc.alive():
            self.start(self.records)
        elif restart:
            self.stop()
            self.start(self.records)
        else:
            self.control("reload")
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not self.answers():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"unbound not answering after reload:\n{self.proc.output()[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def output(self) -> str:
        return self.proc.output() if self.proc else ""


@pytest.fixture
def unbound_server(tmp_path):
    """A running UnboundServer for zones `example.` with no records; stopped afterwards."""
    server = UnboundServer(tmp_path, zones=["example."])
    server.start()
    try:
        yield server
    finally:
        server.stop()
