"""The replica's HTTP listener with the fast inference path in front of aiohttp: the protocol
factory a site listens with (``FastPathServer``: connections start on ``FastInferProtocol``,
handed over to aiohttp's own server for anything else; one sweeper times request heads and idle
connections; shutdown covers both kinds) and the ``web.AppRunner`` that makes it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from replicas.server.http_fast import DEFAULT_HEAD_TIMEOUT_S, FastInferProtocol

MAX_SWEEP_INTERVAL_S = 1.0
MIN_SWEEP_INTERVAL_S = 0.05

# (status, body, content type, served version or "", Inference-Header-Content-Length or None)
InferAnswer = tuple[int, bytes, str, str, "int | None"]
InferFn = Callable[[str, str, bytes, "str | None", str], Awaitable[InferAnswer]]


class FastPathServer:
    """aiohttp's `web.Server` (the protocol factory a site listens with), with connections
    starting on the fast path. Everything else is aiohttp's, and shutdown covers both kinds."""

    def __init__(self, aiohttp_server: web.Server, infer: InferFn, max_body_bytes: int,
                 head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S):
        self.aiohttp_server = aiohttp_server
        self.infer = infer
        self.max_body_bytes = max_body_bytes
        self.head_timeout_s = head_timeout_s
        self.loop = asyncio.get_running_loop()
        self.fast_connections: set[FastInferProtocol] = set()
        self.watched: set[FastInferProtocol] = set()  # handed over to aiohttp; head times still watched
        self._sweep_interval_s = min(MAX_SWEEP_INTERVAL_S, max(MIN_SWEEP_INTERVAL_S, head_timeout_s / 4))
        self._sweeper = self.loop.call_later(self._sweep_interval_s, self._sweep)
        self._all_idle: asyncio.Event | None = None  # set during shutdown, once no answer is pending

    def __call__(self) -> FastInferProtocol:
        return FastInferProtocol(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.aiohttp_server, name)

    def _sweep(self) -> None:
        now_s = time.monotonic()
        for conn in [*self.fast_connections, *self.watched]:
            conn.check_timeouts(now_s, self.head_timeout_s)
        self._sweeper = self.loop.call_later(self._sweep_interval_s, self._sweep)

    def answered(self) -> None:
        if self._all_idle is not None and not any(c.busy for c in self.fast_connections):
            self._all_idle.set()

    def pre_shutdown(self) -> None:
        for conn in list(self.fast_connections):
            conn.close_when_idle()
        self.aiohttp_server.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """Answers in progress finish (bounded by `timeout`), then every connection closes."""
        self._sweeper.cancel()
        self._all_idle = asyncio.Event()
        self.answered()
        if timeout and not self._all_idle.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_idle.wait(), timeout)
        for conn in list(self.fast_connections):
            with contextlib.suppress(Exception):
                conn.close_now()
        self.fast_connections.clear()
        await self.aiohttp_server.shutdown(timeout)


class FastPathAppRunner(web.AppRunner):
    """An AppRunner whose sites start every connection on the fast inference path."""

    def __init__(self, app: web.Application, infer: InferFn, max_body_bytes: int, *,
                 head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S, **kwargs: Any):
        super().__init__(app, **kwargs)
        self._infer = infer
        self._max_body_bytes = max_body_bytes
        self._head_timeout_s = head_timeout_s

    async def _make_server(self) -> Any:
        return FastPathServer(await super()._make_server(), self._infer, self._max_body_bytes,
                              self._head_timeout_s)
