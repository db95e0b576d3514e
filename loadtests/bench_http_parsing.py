"""Micro-benchmark: CPU the gateway spends parsing HTTP/1.1 in its two hand-held places.

    python -m loadtests.bench_http_parsing [--requests N] [--repeat R]

1. The upstream client (gateway.upstream.http1_client.ConnectionPool.post): sequential POSTs on
   one keep-alive connection to a canned-answer server in a CHILD process, so the figure is the
   client's own CPU (time.process_time of this process) per request, parsing included. Two
   answers: Content-Length (what replicas send) and chunked. Then the parsing alone: the same
   answers fed to the client's connection protocol in-process (no socket, no event loop turn).
2. The client connection (gateway.front.http_connection.ClientConnection.data_received): CPU per
   packet for a small request in one packet, a 1 MiB body in 64 KiB packets, and 8 pipelined
   requests in one packet; each request is handed over (re-serialized) to an inner protocol
   (aiohttp's, in the gateway) that is a no-op here, and answered at once.

Each figure is the best of R runs (the least disturbed by other work on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import time

RESPONSE_CL = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 96\r\n"
               b"Date: Thu, 03 Dec 2026 12:00:00 GMT\r\nServer: geogate-replica\r\n"
               b"Geogate-Model-Version: 1\r\n\r\n" + b'{"model_name":"demo","outputs":[]' + b" " * 62 + b"}")
RESPONSE_CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                    b"Server: geogate-replica\r\n\r\n40\r\n" + b"a" * 64 + b"\r\n20\r\n" + b"b" * 32
                    + b"\r\n0\r\n\r\n")
BODY = b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":[' + b"0.5," * 15 + b"0.5]}]}"
HEADERS = {"Content-Type": "application/json", "x-request-id": "0123456789abcdef"}


def _serve(sock: socket.socket, response: bytes) -> None:
    """Answer `response` to each request (requests are told apart by their fixed length)."""

    class Canned(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.seen = 0

        def data_received(self, data):
            self.seen += len(data)
            n, self.seen = divmod(self.seen, _request_len())
            if n:
                self.transport.write(response * n)

    async def main():
        server = await asyncio.get_running_loop().create_server(Canned, sock=sock)
        await server.serve_forever()

    asyncio.run(main())


def _request_len() -> int:
    from gateway.upstream.http1_client import ConnectionPool

    data = ConnectionPool("127.0.0.1:1", max_connections=1)._request_bytes("/v2/models/demo/infer", BODY, HEADERS)
    return len(data) if isinstance(data, bytes) else sum(map(len, data))


async def _client_run(address: str, n: int) -> float:
    from gateway.upstream.http1_client import ConnectionPool

    pool = ConnectionPool(address, max_connections=1)
    try:
        for _ in range(200):  # warm-up: connection open, caches
            await pool.post("/v2/models/demo/infer", BODY, HEADERS, 5.0)
        t0 = time.process_time()
        for _ in range(n):
            r = await pool.post("/v2/models/demo/infer", BODY, HEADERS, 5.0)
        cpu = time.process_time() - t0
        assert r.status == 200 and len(r.body) in (96,), (r.status, len(r.body))
        return cpu / n
    finally:
        await pool.close()


def bench_client(response: bytes, n: int, repeat: int) -> float:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    proc = mp.get_context("spawn").Process(target=_serve, args=(sock, response), daemon=True)
    proc.start()
    try:
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        return min(asyncio.run(_client_run(address, n)) for _ in range(repeat))
    finally:
        proc.terminate()
        proc.join(5)
        sock.close()


def bench_client_parse(response: bytes, n: int, repeat: int) -> float:
    """CPU per answer for the connection protocol alone: send (to a no-op transport), then the
    answer's bytes in one data_received."""
    from gateway.upstream.http1_client import _Conn

    loop = asyncio.new_event_loop()
    best = float("inf")
    try:
        conn = _Conn()
        conn.connection_made(_Transport())
        for _ in range(repeat):
            t0 = time.process_time()
            for _ in range(n):
                waiter = loop.create_future()
                conn.send(b"", waiter)
                conn.data_received(response)
            best = min(best, (time.process_time() - t0) / n)
            assert waiter.result().status == 200 and conn.keep_alive
    finally:
        loop.close()
    return best


class _Transport:
    def write(self, data):
        pass

    def is_closing(self):
        return False

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def writelines(self, data):
        pass

    def close(self):
        pass

    def get_extra_info(self, name, default=None):
        return default


class _Inner:
    def connection_made(self, transport):
        pass

    def data_received(self, data):
        pass

    def connection_lost(self, exc):
        pass


class _Loop:
    """What the connection asks of its loop: the time, and call_soon run at once (the inner
    protocol answers each request as it gets it)."""

    def time(self) -> float:
        return 0.0

    def call_soon(self, fn, *args) -> None:
        fn(*args)

    def call_later(self, delay, fn, *args) -> None:
        pass


class _AnsweringInner(_Inner):
    def __init__(self) -> None:
        self.conn = None

    def data_received(self, data):
        self.conn.request_done()


def bench_guard(packets: list[bytes], n: int, repeat: int) -> float:
    """CPU per packet, feeding `packets` over and over on one connection."""
    from gateway.front.http_connection import ClientConnection
    from gateway.front.slow_clients import GuardLimits

    limits = GuardLimits(10.0, 64 * 1024, max_body_bytes=1 << 30)
    limits.loop = _Loop()
    best = float("inf")
    for _ in range(repeat):
        inner = _AnsweringInner()
        conn = ClientConnection(None, lambda inner=inner: inner, limits, {})
        inner.conn = conn
        conn.connection_made(_Transport())
        feed = conn.data_received
        t0 = time.process_time()
        for _ in range(n):
            for p in packets:
                feed(p)
        best = min(best, (time.process_time() - t0) / (n * len(packets)))
        assert not conn._busy and not conn._queue
    return best


def _infer_request(body: bytes) -> bytes:
    return (b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: gateway:8000\r\nUser-Agent: Python-urllib/3.11\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer 0123456789abcdef0123456789abcdef\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    n, r = args.requests, args.repeat
    print(f"upstream client, Content-Length answer: {bench_client(RESPONSE_CL, n, r) * 1e6:6.1f} us CPU/request")
    print(f"upstream client, chunked answer:        {bench_client(RESPONSE_CHUNKED, n, r) * 1e6:6.1f} us CPU/request")
    for name, answer in (("Content-Length", RESPONSE_CL), ("chunked", RESPONSE_CHUNKED)):
        print(f"upstream client parse only, {name + ':':16}{bench_client_parse(answer, n * 5, r) * 1e9:6.0f} ns/answer")
    small = _infer_request(BODY)
    big = _infer_request(b"x" * (1 << 20))
    big_packets = [big[i:i + 65536] for i in range(0, len(big), 65536)]
    print(f"connection, small request, one packet:   {bench_guard([small], n * 5, r) * 1e9:6.0f} ns/packet")
    print(f"connection, 1 MiB in 64 KiB packets:    {bench_guard(big_packets, n // 4, r) * 1e9:6.0f} ns/packet")
    print(f"connection, 8 pipelined, one packet:  {bench_guard([small * 8], n, r) * 1e9:6.0f} ns/packet")


if __name__ == "__main__":
    main()
