"""geo.dns_server and geo.dns_rate_limit in-process: the response-rate limiter, truncated replies,
the [dns] keys' checks, and the TCP server over a mock transport (framing under any split,
per-client accounting and eviction, a client that does not read). The hardening against real
floods and idle connections on real sockets is in tests/e2e/test_hardening_dns.py."""

from __future__ import annotations

import asyncio
import itertools
import re
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import parse_config
from geo.client_locator import ClientLocator
from geo.dns_listeners import TcpServer as _TcpServer
from geo.dns_listeners import UdpProtocol as _UdpProtocol
from geo.dns_listeners import truncated_reply as _truncated_reply
from geo.dns_rate_limit import ALLOW, DROP, SLIP, ResponseRateLimiter
from geo.dns_server import GeoDnsResponder
from geo.region_health import RegionHealthMonitor
from tests.dns_queries import SERVICE, tcp_query


class FakeClock:
    def __init__(self):
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _limiter(clock, **kw) -> ResponseRateLimiter:
    args = {"responses_per_s": 10, "slip": 2, "ipv4_prefix_len": 24, "ipv6_prefix_len": 56, "max_sources": 100}
    return ResponseRateLimiter(**{**args, **kw}, clock=clock)


def test_limiter_rate_burst_and_slip():
    clock = FakeClock()
    rrl = _limiter(clock)
    assert [rrl.check("192.0.2.1") for _ in range(10)] == [ALLOW] * 10  # the burst: one second's worth
    assert [rrl.check("192.0.2.77") for _ in range(6)] == [DROP, SLIP] * 3  # same /24, over the limit
    assert rrl.check("198.51.100.1") == ALLOW  # another /24
    clock.now_s += 0.5
    assert [rrl.check("192.0.2.1") for _ in range(6)] == [ALLOW] * 5 + [DROP]  # refilled at 10/s
    assert (rrl.dropped, rrl.slipped, rrl.limited_sources) == (4, 3, 1)


def test_limiter_prefixes():
    clock = FakeClock()
    rrl = _limiter(clock, responses_per_s=1, slip=0, ipv4_prefix_len=32)
    assert rrl.check("192.0.2.1") == ALLOW and rrl.check("192.0.2.1") == DROP  # slip 0: never truncated
    assert rrl.check("192.0.2.2") == ALLOW  # /32: a neighbour is another source
    assert rrl.check("::ffff:192.0.2.2") == DROP  # an IPv4-mapped source is that IPv4 source
    assert rrl.check("2001:db8:0:1::1") == ALLOW and rrl.check("2001:db8:0:ff::2%eth0") == DROP  # one /56
    assert rrl.check("2001:db8:0:100::1") == ALLOW  # the next /56
    assert rrl.check("not-an-ip") == ALLOW and rrl.check("not-an-ip") == ALLOW  # nothing to account it to
    assert rrl.prefix_text(next(iter(rrl._table))) == "192.0.2.1/32"
    assert rrl.prefix_text(list(rrl._table)[-1]) == "2001:db8:0:100::/56"


def test_limiter_table_is_bounded_and_expires():
    clock = FakeClock()
    rrl = _limiter(clock, max_sources=50)
    for i in range(500):
        assert rrl.check(f"10.{i // 256}.{i % 256}.1") == ALLOW
        assert rrl.sources <= 50
    assert rrl.evicted == 450
    busy = "10.1.243.1"  # the most recent source: still tracked, still counting
    assert rrl.check(busy) == ALLOW
    clock.now_s += rrl.expire_s + 0.1
    for _ in range(30):  # traffic from a few sources expires the idle ones, without a timer
        rrl.check("172.16.0.1")
    assert rrl.sources == 1 and rrl.evicted == 450


def test_truncated_reply_is_header_and_question_only():
    q = dns.message.make_query(SERVICE, dns.rdatatype.A, use_edns=0, payload=4096)
    q.id = 4242
    wire = q.to_wire()
    reply = _truncated_reply(wire)
    assert reply is not None and len(reply) < len(wire)  # no amplification
    m = dns.message.from_wire(reply)
    assert m.id == 4242 and m.flags & dns.flags.QR and m.flags & dns.flags.TC and m.flags & dns.flags.RD
    assert m.rcode() == 0 and m.question == q.question and not m.answer and not m.additional
    assert _truncated_reply(wire[:20]) is None  # cut inside the name
    assert _truncated_reply(wire[:2] + b"\x81\x00" + wire[4:]) is None  # a response: never answered
    bad = bytearray(wire)
    bad[12] = 0xC0  # a compression pointer in the question
    assert _truncated_reply(bytes(bad)) is None


class _FakeDatagramTransport:
    def __init__(self):
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr) -> None:
        self.sent.append(data)


def _responder() -> GeoDnsResponder:
    cfg = parse_config('[[regions]]\nname = "eu-west"\naddresses = ["192.0.2.10"]\n')
    monitor = RegionHealthMonitor.from_config(cfg)
    monitor.states["eu-west"].healthy = True
    return GeoDnsResponder(cfg, monitor, ClientLocator(cfg.regions))


def test_limited_queries_are_dropped_before_the_responder_sees_them():
    responder = _responder()
    parsed = []
    real_handle = responder.handle
    responder.handle = lambda wire, source, *, udp: parsed.append(source) or real_handle(wire, source, udp=udp)
    clock = FakeClock()
    rrl = _limiter(clock, responses_per_s=10, slip=2)
    transport = _FakeDatagramTransport()
    proto = _UdpProtocol(responder, rrl)
    proto.connection_made(transport)  # type: ignore[arg-type]
    query = dns.message.make_query(SERVICE, "A").to_wire()
    for _ in range(100):
        proto.datagram_received(query, ("192.0.2.1", 5353))
    assert len(parsed) == 10  # the burst; the 90 over it never reached the parser
    replies = [dns.message.from_wire(r) for r in transport.sent]
    assert len(replies) == 10 + 45  # the answers, and every second one over the limit slipped
    assert all(not r.flags & dns.flags.TC and r.answer for r in replies[:10])
    assert all(r.flags & dns.flags.TC and not r.answer for r in replies[10:])
    assert (rrl.dropped, rrl.slipped) == (45, 45)
    # Responses (QR set) and header-less packets are never answered, so never counted either.
    proto.datagram_received(b"\x12\x34\x81\x80" + b"\x00" * 8, ("192.0.2.1", 5353))
    proto.datagram_received(b"\x12", ("192.0.2.1", 5353))
    assert (rrl.dropped, rrl.slipped) == (45, 45) and len(transport.sent) == 55
    # Another prefix is unaffected.
    proto.datagram_received(query, ("198.51.100.1", 5353))
    assert parsed[-1] == "198.51.100.1" and len(transport.sent) == 56


@pytest.mark.parametrize(("snippet", "expected"), [
    ("rate_limit_ipv4_prefix_len = 33", "dns.rate_limit_ipv4_prefix_len: must be 1..32, got 33"),
    ("rate_limit_ipv6_prefix_len = 0", "dns.rate_limit_ipv6_prefix_len: must be 1..128, got 0"),
    ("rate_limit_slip = 11", "dns.rate_limit_slip: must be 0..10, got 11"),
    ("rate_limit_responses_per_s = -1", "dns.rate_limit_responses_per_s: must be >= 0, got -1"),
    ("rate_limit_max_sources = 0", "dns.rate_limit_max_sources: must be > 0, got 0"),
    ("tcp_idle_timeout_ms = 0", "dns.tcp_idle_timeout_ms: must be > 0, got 0"),
    ("tcp_max_connections_per_client = 1.5", "dns.tcp_max_connections_per_client: must be an integer, got 1.5"),
    ("tcp_max_connection = 10", "dns.tcp_max_connection: unknown key"),
])
def test_new_dns_keys_are_checked(snippet, expected):
    from core.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_config(f"[dns]\n{snippet}\n")


class _FakeStreamTransport:
    """Just what _TcpConnection uses of an asyncio transport."""

    def __init__(self, peer: str):
        self.peer = peer
        self.written = bytearray()
        self.closed = self.aborted = self.reading_paused = False

    def get_extra_info(self, name: str):
        return (self.peer, 40000) if name == "peername" else None

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False


def _tcp_answers(written: bytes) -> list[dns.message.Message]:
    out, pos = [], 0
    while pos < len(written):
        n = struct.unpack_from("!H", written, pos)[0]
        out.append(dns.message.from_wire(written[pos + 2:pos + 2 + n]))
        pos += 2 + n
    return out


STREAM = b"".join(tcp_query(name, rdtype, qid) for qid, (name, rdtype) in enumerate(
    [(SERVICE, "A"), ("geogate.test.", "SOA"), ("nothing.geogate.test.", "A"), ("geogate.test.", "AXFR")]))


@settings(max_examples=200, deadline=None, database=None)
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_tcp_framing_any_split_gives_the_same_answers(cuts):
    """Pipelined queries arriving in any pieces: every one answered once, in order; a partial
    message left at the end is kept, never answered."""
    async def scenario() -> tuple[list[dns.message.Message], int]:
        server = _TcpServer(_responder(), max_connections=4, max_per_client=2, idle_timeout_s=60)
        conn = server.protocol()
        transport = _FakeStreamTransport("192.0.2.1")
        conn.connection_made(transport)  # type: ignore[arg-type]
        points = sorted({0, *cuts, len(STREAM)})
        for a, b in itertools.pairwise(points):
            conn.data_received(STREAM[a:b])
        conn.data_received(STREAM[:5])  # the start of one more query
        answers = _tcp_answers(bytes(transport.written))
        conn.connection_lost(None)
        return answers, server.open_connections

    answers, left_open = asyncio.run(scenario())
    assert [(m.id, dns.rcode.to_text(m.rcode())) for m in answers] == [
        (0, "NOERROR"), (1, "NOERROR"), (2, "NXDOMAIN"), (3, "REFUSED")]
    assert left_open == 0


def test_tcp_accounting_per_client_and_eviction_in_process():
    async def scenario() -> None:
        server = _TcpServer(_responder(), max_connections=3, max_per_client=2, idle_timeout_s=60)
        conns = []
        for peer in ("192.0.2.1", "192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.3"):
            conn = server.protocol()
            conn.connection_made(_FakeStreamTransport(peer))  # type: ignore[arg-type]
            conns.append(conn)
        t = [c.transport for c in conns]
        assert t[2].aborted and server.refused_per_client == 1  # the third from .1: over its share
        assert t[0].closed and server.evicted == 1  # .3 arrived at the cap: the oldest made room
        assert server.per_client == {"192.0.2.1": 1, "192.0.2.2": 1, "192.0.2.3": 1}
        for c in conns:
            c.connection_lost(None)
        assert server.open_connections == 0 and server.per_client == {}

    asyncio.run(scenario())


def test_a_client_that_does_not_read_its_answers_is_cut_off():
    async def scenario() -> tuple[_FakeStreamTransport, int, int, int]:
        server = _TcpServer(_responder(), max_connections=4, max_per_client=2, idle_timeout_s=0.2)
        conn = server.protocol()
        transport = _FakeStreamTransport("192.0.2.1")
        transport.get_write_buffer_size = lambda: 1 << 20  # type: ignore[method-assign]
        gone = asyncio.Event()
        transport.abort = lambda: (setattr(transport, "aborted", True), gone.set())  # type: ignore[method-assign]
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(tcp_query(qid=1))
        conn.pause_writing()  # the transport's buffer is over its high-water mark
        assert transport.reading_paused
        conn.data_received(tcp_query(qid=2) * 3)  # read before the pause took effect: kept, not answered
        await asyncio.wait_for(gone.wait(), 10)
        return transport, len(_tcp_answers(bytes(transport.written))), server.open_connections, server.closed_idle

    transport, answered, left_open, closed_idle = asyncio.run(scenario())
    assert transport.aborted and not transport.closed  # abort: close() would wait on the unread answers
    assert (answered, left_open, closed_idle) == (1, 0, 1)
