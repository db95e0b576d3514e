"""Addresses and ports for `geogate up`: can this machine listen here, and which port is free."""

from __future__ import annotations

import errno
import socket


def bind_problem(host: str, port: int, *, udp: bool = False) -> str | None:
    """None when HOST:PORT can be bound right now (TCP, and UDP too with udp=True), else why not."""
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                # As the servers do: a port whose old connections sit in TIME_WAIT is free.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"{host}:{port} is in use"
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"{host} is not an address of this machine"
                return f"{host}:{port}: {exc.strerror}"
    return None


def distinct_loopback_available() -> bool:
    """Linux routes all of 127.0.0.0/8 to lo; some systems (macOS) only have 127.0.0.1."""
    return bind_problem("127.0.1.1", 0) is None


def free_port(host: str, taken: set[int]) -> int:
    """A port free on ``host`` now and not in ``taken`` (which it joins)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)
