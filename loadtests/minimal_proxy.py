"""The Python floor for an HTTP/1.1 inference proxy: uvloop + httptools, keep-alive both ways,
no checks, routing, retries, metrics or logs. Not a product part: `bench_floor` measures it
beside HAProxy and the gateway, to tell what any Python proxy costs on a machine from what the
gateway's own features cost. Written by hand because the point is to have nothing else in it.

`python -m loadtests.minimal_proxy PORT UPSTREAM_HOST:PORT` (several processes may share PORT:
SO_REUSEPORT).
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

HEADER_LENGTH = b"inference-header-content-length"


class _Messages(asyncio.Protocol):
    """A connection read by llhttp: each message's headers and body, collected."""

    def __init__(self, parser_class: type) -> None:
        self.parser = parser_class(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)


class _Upstream(_Messages):
    """One keep-alive connection to the replica; one request at a time."""

    def __init__(self) -> None:
        super().__init__(httptools.HttpResponseParser)
        self.waiter: asyncio.Future | None = None

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))

    def connection_lost(self, exc) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("upstream closed"))


class _Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Upstream] = []

    async def exchange(self, data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        loop = asyncio.get_running_loop()
        if self.idle:
            conn = self.idle.pop()
        else:
            _, conn = await loop.create_connection(_Upstream, self.host, self.port)
        conn.waiter = loop.create_future()
        conn.transport.write(data)
        answer = await conn.waiter
        self.idle.append(conn)
        return answer


class _Client(_Messages):
    def __init__(self, pool: _Pool) -> None:
        super().__init__(httptools.HttpRequestParser)
        self.pool = pool

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        asyncio.get_running_loop().create_task(self._answer(self.parser.get_method(), self.url, self.headers,
                                                            b"".join(self.body)))

    async def _answer(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        # Requests on a connection are answered one at a time (perf_analyzer does not pipeline).
        head = [method, b" ", url, b" HTTP/1.1\r\nHost: up\r\nContent-Length: ", b"%d" % len(body), b"\r\n"]
        head += [b"%s: %s\r\n" % (n, v) for n, v in headers if n.lower() in (HEADER_LENGTH, b"content-type")]
        status, rh, rb = await self.pool.exchange(b"".join(head) + b"\r\n" + body)
        out = [b"HTTP/1.1 %d OK\r\nContent-Length: %d\r\n" % (status, len(rb))]
        out += [b"%s: %s\r\n" % (n, v) for n, v in rh if n.lower() in (HEADER_LENGTH, b"content-type")]
        self.transport.write(b"".join(out) + b"\r\n" + rb)


async def serve(port: int, upstream: str) -> None:
    host, _, up_port = upstream.rpartition(":")
    pool = _Pool(host, int(up_port))
    server = await asyncio.get_running_loop().create_server(lambda: _Client(pool), "127.0.0.1", port,
                                                            reuse_port=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))
