"""Network namespaces for scenarios (root only): a "remote host" reachable from this one over a
veth pair, whose link can be taken down to blackhole it.

    ns = NetNamespace.create(index=1)     # ns "gg<pid>n1", host 10.X.1.1 <-> ns 10.X.1.2
    Proc([...], netns=ns.name)            # processes inside listen on ns.address (or its loopback)
    ns.link_down()                        # packets vanish: connects and requests TIME OUT
    ns.link_up()
    ns.delete()

The link is taken down on the namespace's side: the host's end stays up with its route (only
its carrier goes), so packets are still sent and silently dropped, which is what a network
partition looks like to a client (timeouts), unlike a dead process (connection refused) or a
route removed on this host (network unreachable at once).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

IP = shutil.which("ip") or "/usr/sbin/ip"


def netns_supported() -> tuple[bool, str]:
    """(can this process create network namespaces?, why not)."""
    if os.geteuid() != 0:
        return False, f"not running as root (uid {os.geteuid()}): network namespaces need CAP_SYS_ADMIN"
    if not os.path.exists(IP):
        return False, "iproute2's `ip` is not installed"
    return True, ""


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = [IP, "netns", "exec", netns, IP, *args] if netns else [IP, *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or out.returncode}")


def netns_exists(name: str) -> bool:
    out = subprocess.run([IP, "netns", "list"], capture_output=True, text=True)
    return any(line.split()[0] == name for line in out.stdout.splitlines() if line.strip())


@dataclass
class NetNamespace:
    name: str
    host_if: str
    ns_if: str
    host_address: str
    address: str  # the namespace's address, reachable from this host

    @classmethod
    def create(cls, index: int) -> NetNamespace:
        """A namespace with loopback up and a veth link to this host (subnet picked from the pid,
        so scenarios running side by side do not collide)."""
        pid = os.getpid()
        name = f"gg{pid}n{index}"
        subnet = f"10.{200 + pid % 50}.{(pid // 50 % 60) * 4 + index}"
        ns = cls(name, f"{name}h", f"{name}p", f"{subnet}.1", f"{subnet}.2")
        _ip("netns", "add", name)
        try:
            _ip("link", "set", "lo", "up", netns=name)
            _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if)
            _ip("link", "set", ns.ns_if, "netns", name)
            _ip("addr", "add", f"{ns.host_address}/30", "dev", ns.host_if)
            _ip("link", "set", ns.host_if, "up")
            _ip("addr", "add", f"{ns.address}/30", "dev", ns.ns_if, netns=name)
            _ip("link", "set", ns.ns_if, "up", netns=name)
        except Exception:
            ns.delete()
            raise
        return ns

    def link_down(self) -> None:
        _ip("link", "set", self.ns_if, "down", netns=self.name)

    def link_up(self) -> None:
        _ip("link", "set", self.ns_if, "up", netns=self.name)

    def delete(self) -> None:
        """Remove the link and the namespace (kill the processes inside first)."""
        subprocess.run([IP, "link", "del", self.host_if], capture_output=True)
        subprocess.run([IP, "netns", "del", self.name], capture_output=True)
