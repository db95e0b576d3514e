"""GeoDNS's sockets: the UDP protocol (response rate limiting before any parsing, TC=1 slips)
and the DNS-over-TCP listener (RFC 7766: pipelined, length-prefixed; per-client and global
connection limits with idlest-first eviction, idle timeout). What to answer is the
responder's job (geo.dns_server.GeoDnsResponder)."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from geo.dns_rate_limit import SLIP, ResponseRateLimiter

if TYPE_CHECKING:
    from geo.dns_server import GeoDnsResponder

log = logging.getLogger("geogate.dns")

HEADER_LEN = 12
MAX_QNAME_WIRE = 255  # RFC 1035 2.3.4
MAX_TCP_MESSAGE = 65535
LOG_INTERVAL_S = 1.0  # lines about what hostile clients do: at most one per second per kind
_QR = 0x8000
_OPCODE_MASK = 0x7800
_TC = 0x0200
_RD = 0x0100


class ThrottledLog:
    """One line per ``interval_s`` at most; the next line says how many were left out.  What
    hostile clients cause must not flood the log."""

    def __init__(self, level: int, interval_s: float = LOG_INTERVAL_S):
        self.level = level
        self.interval_s = interval_s
        self._next_s = 0.0
        self._left_out = 0

    def __call__(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next_s:
            self._left_out += 1
            return
        if self._left_out:
            msg += f" ({self._left_out} similar lines left out)"
            self._left_out = 0
        self._next_s = now + self.interval_s
        log.log(self.level, msg, *args)


def truncated_reply(wire: bytes) -> bytes | None:
    """A rate limiter's "slip": the query's header and question with QR and TC set and nothing
    else, built from the raw bytes (no parse, no answer; never larger than the query).  A real
    client retries over TCP; anything but a plain one-question query gets nothing."""
    qid, flags, qdcount = struct.unpack_from("!HHH", wire)
    if qdcount != 1 or flags & (_QR | _OPCODE_MASK):
        return None
    pos, end = HEADER_LEN, len(wire)
    while True:  # the question's name: uncompressed labels up to the root
        if pos >= end or pos - HEADER_LEN >= MAX_QNAME_WIRE:
            return None
        label_len = wire[pos]
        if label_len == 0:
            break
        if label_len & 0xC0:  # a compression pointer or an extended label type: not in a sane question
            return None
        pos += 1 + label_len
    pos += 1 + 4  # the root label, QTYPE and QCLASS
    if pos > end:
        return None
    return struct.pack("!HHHHHH", qid, _QR | _TC | (flags & _RD), 1, 0, 0, 0) + wire[HEADER_LEN:pos]


class UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: GeoDnsResponder, limiter: ResponseRateLimiter | None = None):
        self.responder = responder
        self.limiter = limiter
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            # Rate limit on the source alone, before any parsing: a flooding prefix costs a
            # table lookup per packet.  Packets never answered (no header, QR set) are not counted.
            if self.limiter is not None and len(data) >= HEADER_LEN and not data[2] & 0x80:
                verdict = self.limiter.check(addr[0])
                if verdict:
                    if verdict == SLIP and self.transport is not None:
                        reply = truncated_reply(data)
                        if reply is not None:
                            self.transport.sendto(reply, addr)
                    return
            reply = self.responder.handle(data, addr[0], udp=True)
            if reply is not None and self.transport is not None:
                self.transport.sendto(reply, addr)
        except Exception:
            log.exception("UDP packet from %s dropped", addr[0] if addr else "?")

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)  # e.g. ICMP port unreachable from a client gone away


class TcpConnection(asyncio.Protocol):
    """One DNS-over-TCP connection (RFC 7766): 2-byte length-prefixed messages; pipelined
    queries are answered in order.  Memory is bounded: complete queries are answered as they
    arrive, so what stays buffered is one partial message (< 64 KiB); while the client does not
    read its answers, reading pauses (the transport's write buffer is the bound)."""

    def __init__(self, server: TcpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.client = "?"
        self.buffer = bytearray()
        self.last_query_s = 0.0  # loop time of the connection's start or its last complete query
        self.timer: asyncio.TimerHandle | None = None
        self.write_paused = False
        self.released = False  # out of the server's accounting (closing, or never admitted)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else "?"
        self.server.admit(self)

    def data_received(self, data: bytes) -> None:
        if self.released:
            return
        self.buffer += data
        self._answer_complete_queries()

    def _answer_complete_queries(self) -> None:
        buf = self.buffer
        while not self.write_paused and len(buf) >= 2:
            end = 2 + ((buf[0] << 8) | buf[1])
            if len(buf) < end:
                return  # a partial message: the idle timer keeps running
            wire = bytes(buf[2:end])
            del buf[:end]
            reply = self.server.responder.handle(wire, self.client, udp=False)
            if reply is None:  # not a query (or no header): nothing sensible follows on this stream
                self.server.close(self)
                return
            self.transport.write(struct.pack("!H", len(reply)) + reply)  # type: ignore[union-attr]
            self.server.touch(self)

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its queries until it does (the
        # idle timer closes the connection if it never does).
        self.write_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._answer_complete_queries()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.release(self)

    def on_timer(self) -> None:
        self.timer = None
        if self.released:
            return
        idle_s = self.server.loop.time() - self.last_query_s
        if idle_s >= self.server.idle_timeout_s:
            self.server.closed_idle += 1
            self.server.close(self)
        else:
            self.timer = self.server.loop.call_later(self.server.idle_timeout_s - idle_s, self.on_timer)


class TcpServer:
    """The TCP listener's connections: per-client and global limits, idle timeout.

    At ``tcp_max_connections_per_client`` a client's new connection is closed at once.  At
    ``tcp_max_connections`` the connection idle longest (no complete query for the longest time)
    is closed to make room: idle connections held by a hostile client cannot lock everyone out,
    and an attacker would have to open connections faster than a legitimate client sends its
    query to hurt it.  RFC 7766 6.2.3 lets servers close idle connections under pressure."""

    def __init__(self, responder: GeoDnsResponder, *, max_connections: int, max_per_client: int,
                 idle_timeout_s: float):
        self.responder = responder
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.idle_timeout_s = idle_timeout_s
        self.loop = asyncio.get_running_loop()
        # Least recently active first (a query moves a connection to the end).
        self.connections: OrderedDict[TcpConnection, None] = OrderedDict()
        self.per_client: dict[str, int] = {}
        self.closed_idle = 0
        self.refused_per_client = 0
        self.evicted = 0
        self._log_refused = ThrottledLog(logging.WARNING)
        self._log_evicted = ThrottledLog(logging.WARNING)

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def protocol(self) -> TcpConnection:
        return TcpConnection(self)

    def admit(self, conn: TcpConnection) -> None:
        held = self.per_client.get(conn.client, 0)
        if held >= self.max_per_client:
            self.refused_per_client += 1
            self._log_refused("refusing a TCP connection from %s: it has %d open (dns.tcp_max_connections_per_client)",
                              conn.client, held)
            conn.released = True
            conn.transport.abort()  # type: ignore[union-attr]
            return
        if len(self.connections) >= self.max_connections:
            victim = next(iter(self.connections))
            self.evicted += 1
            self._log_evicted("%d TCP connections open (dns.tcp_max_connections): closing the idlest, from %s "
                              "(no query for %.1f s), for a new one from %s", len(self.connections), victim.client,
                              self.loop.time() - victim.last_query_s, conn.client)
            self.close(victim)
        self.connections[conn] = None
        self.per_client[conn.client] = held + 1
        conn.last_query_s = self.loop.time()
        conn.timer = self.loop.call_later(self.idle_timeout_s, conn.on_timer)

    def touch(self, conn: TcpConnection) -> None:
        if not conn.released:
            conn.last_query_s = self.loop.time()
            self.connections.move_to_end(conn)

    def release(self, conn: TcpConnection) -> None:
        """Out of the accounting (idempotent: on close and again when the connection is lost)."""
        if conn.released:
            return
        conn.released = True
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self.connections.pop(conn, None)
        left = self.per_client.get(conn.client, 1) - 1
        if left > 0:
            self.per_client[conn.client] = left
        else:
            self.per_client.pop(conn.client, None)

    def close(self, conn: TcpConnection) -> None:
        self.release(conn)
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.abort()  # answers the client is not reading would keep close() waiting forever
        else:
            transport.close()

    def close_all(self) -> None:
        for conn in list(self.connections):
            self.close(conn)


# ---------------------------------------------------------------- process
