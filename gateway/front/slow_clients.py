"""Slow and malformed clients on the client listener: the bounds each connection
(gateway.front.http_connection.ClientConnection) is held to, the sweep that refuses connections
whose head or body is overdue, the raw JSON refusal they write, and the listener's logger, which
turns a client's malformed HTTP that aiohttp meets into one rate-limited warning line."""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from gateway.front.request_checks import ClientErrorLog

JSON = "application/json"
LISTENER_LOGGER = "geogate.gateway.http.listener"


def raw_error(status: int, reason: str, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {JSON}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class GuardLimits:
    """The bounds of one listener's connections (``[limits]`` and ``[gateway] max_body_bytes``);
    ``malformed_log`` is where refused malformed requests are counted (the listener's
    rate-limited log by default). ``loop`` is set when the listener starts."""

    __slots__ = ("body_timeout_s", "head_timeout_s", "idle_timeout_s", "loop", "malformed_log", "max_body_bytes",
                 "max_head_bytes")

    def __init__(self, head_timeout_s: float, max_head_bytes: int, malformed_log: ClientErrorLog | None = None,
                 *, body_timeout_s: float = 60.0, max_body_bytes: int = 1 << 62, idle_timeout_s: float = 75.0
                 ) -> None:
        self.head_timeout_s = head_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_head_bytes = max_head_bytes
        self.body_timeout_s = body_timeout_s
        self.max_body_bytes = max_body_bytes
        self.malformed_log = malformed_log if malformed_log is not None else \
            ClientErrorLog(logging.getLogger(LISTENER_LOGGER))
        self.loop: asyncio.AbstractEventLoop | None = None


async def sweep_slow_clients(conns: dict, limits: GuardLimits) -> None:
    """Refuse connections whose request head or body is overdue (run as a task per worker):
    one pass over the listener's connections per interval, no timer per request."""
    interval = min(1.0, max(0.05, min(limits.head_timeout_s, limits.body_timeout_s) / 4))
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        now = loop.time()
        for conn, refusal in [(c, r) for c in conns.values() if (r := c.overdue(now)) is not None]:
            conn.refuse(*refusal)


class ListenerLog:
    """The client listener's aiohttp server logger. aiohttp logs a request it cannot parse (a
    client's malformed HTTP: 400) with a traceback at error level; here that is one rate-limited
    warning line. A handler that raised (a gateway bug: 500) stays at error with its traceback,
    rate-limited too, so a client that finds one cannot flood the log with it."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.malformed = ClientErrorLog(logger)
        self.crashes = ClientErrorLog(logger)

    def debug(self, *args, **kw) -> None:
        self.logger.debug(*args, **kw)

    def warning(self, *args, **kw) -> None:
        self.logger.warning(*args, **kw)

    def exception(self, msg: str, *args, exc_info=True, **kw) -> None:
        if isinstance(exc_info, HttpProcessingError):
            peer = f" from {args[0]}" if args else ""
            self.malformed.refused(f"a malformed HTTP request{peer}", exc_info.message or str(exc_info))
        elif self.crashes.allow():
            self.logger.error(msg, *args, exc_info=exc_info, **kw)
