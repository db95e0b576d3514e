"""GeoDNS against hostile clients (issue 17), with a real `geogate dns` process and dig.

- 300 idle TCP connections from one address: the address keeps its per-client share
  (dns.tcp_max_connections_per_client), the rest are closed at once, another client's TCP query
  is answered, and the held ones are closed after dns.tcp_idle_timeout_ms; a partial length
  prefix, a partial message and a byte-by-byte trickle are bounded by the same timeout.
- At dns.tcp_max_connections the idlest connection makes room for a new one.
- AXFR and IXFR (TCP and UDP): REFUSED, with an Extended DNS Error saying why.
- A ~900 q/s UDP flood from one source (bounded in count and time) while another source's 10
  probes all get answers; the flooder sees drops and truncated (TC=1) slips; TCP is not limited.
- The rate limiter's table of sources stays bounded with many sources; /32 prefixes keep
  neighbours apart.

Client sources are picked with `-b` / bind(): all of 127.0.0.0/8 is local on Linux, and the
addresses used here (127.77.x.x and up) are in /24s of their own.  Pure logic (the limiter
with a fake clock, the slip reply) is checked in-process at the end.
"""

from __future__ import annotations

import re
import select
import socket
import struct
import threading
import time
import urllib.request

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from core.config import DnsSection
from loadtests.geo_standin import REGIONS, StandinGateway, dig, start_dns, wait_dns, write_config
from tests.dns_queries import SERVICE, tcp_query
from tests.procs import free_port

EU = "192.0.2.10"
DEFAULTS = DnsSection()
IDLE_TIMEOUT_S = DEFAULTS.tcp_idle_timeout_ms / 1000
LOADED_MACHINE_SLACK_S = 10.0
POLL_S = 0.02

# Client source addresses, each in a /24 of its own (the default rate-limit prefix).
FLOODER, PROBER = "127.77.1.2", "127.77.2.2"
TCP_HOG, TCP_OTHER = "127.77.3.2", "127.77.4.2"
SLOW_SENDER = "127.77.5.2"
CAP_A, CAP_B, CAP_NEWCOMER = "127.77.6.2", "127.77.7.2", "127.77.8.2"
NEIGHBOUR_A, NEIGHBOUR_B = "127.77.9.2", "127.77.9.3"  # one /24: apart only with /32 prefixes

FLOOD_RATE_PER_S = 900
FLOOD_MAX_S = 10.0  # hard bound on the flood's length, whatever happens to the probes
PROBES = 10

# The second responder: small limits so that the global cap, the table bound and /32 prefixes
# show with a few hundred packets.
SMALL_RATE_PER_S = 20
SMALL_TABLE = 64
SMALL_TCP_CAP = 8
SMALL_TCP_PER_CLIENT = 4
SMALL_LIMITS = f"""
rate_limit_responses_per_s = {SMALL_RATE_PER_S}
rate_limit_ipv4_prefix_len = 32
rate_limit_max_sources = {SMALL_TABLE}
tcp_max_connections = {SMALL_TCP_CAP}
tcp_max_connections_per_client = {SMALL_TCP_PER_CLIENT}
"""


def _start(tmp, gateway: StandinGateway, name: str, extra: str) -> dict:
    port, metrics_port = free_port(), free_port()
    proc = start_dns(write_config(str(tmp / f"{name}.toml"), [gateway], dns_port=port,
                                  dns_extra=f'metrics = "127.0.0.1:{metrics_port}"\n{extra}'))
    wait_dns(proc, port)
    proc.wait_until(lambda: dig(port, SERVICE, "A").addresses == [EU], 30, "answering the service")
    return {"port": port, "dns": proc, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One stand-in region gateway and two responders: default limits, and small ones."""
    tmp = tmp_path_factory.mktemp("dns-hard")
    name, loc, _ = REGIONS[0]
    gateway = StandinGateway(name, loc, str(tmp))
    started: list[dict] = []
    try:
        gateway.wait_ready()
        started.append(_start(tmp, gateway, "defaults", ""))
        started.append(_start(tmp, gateway, "small", SMALL_LIMITS))
        yield {"default": started[0], "small": started[1]}
    finally:
        for s in started:
            s["dns"].stop()
        gateway.stop()


# ---------------------------------------------------------------- helpers


def metric(url: str, name: str, default: float | None = None, **labels: str) -> float:
    """A sample's value; ``default`` for a labelled child not created yet (else it must exist)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)"
    m = re.search(r"^" + pattern + r"$", text, re.M)
    if m is None and default is not None:
        return default
    assert m, f"{name} {labels} not in /metrics:\n{text}"
    return float(m.group(1))


def dig_from(port: int, source: str, name: str, rdtype: str, *options: str):
    return dig(port, name, rdtype, "-b", source, *options)




def connect_from(port: int, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.setblocking(False)
    return s


def closed_by_server(s: socket.socket) -> bool:
    """True when the server closed the connection (EOF or reset); data it sent is read and dropped."""
    try:
        while True:
            if s.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def wait_closed(socks: list[socket.socket], timeout_s: float) -> dict[socket.socket, float]:
    """Wait until every socket is closed by the server; returns when each one was seen closed."""
    closed: dict[socket.socket, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(closed) < len(socks) and time.monotonic() < deadline:
        open_ = [s for s in socks if s not in closed]
        readable, _, _ = select.select(open_, [], [], POLL_S * 5)
        now = time.monotonic()
        for s in readable:
            if closed_by_server(s):
                closed[s] = now
    return closed


def read_tcp_answers(s: socket.socket, count: int, timeout_s: float = 10.0) -> list[dns.message.Message]:
    buf = b""
    deadline = time.monotonic() + timeout_s
    answers = []
    while len(answers) < count and time.monotonic() < deadline:
        select.select([s], [], [], POLL_S * 5)
        try:
            chunk = s.recv(65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
            n = struct.unpack("!H", buf[:2])[0]
            answers.append(dns.message.from_wire(buf[2:2 + n]))
            buf = buf[2 + n:]
    return answers


# ---------------------------------------------------------------- TCP


def test_idle_connections_from_one_client_do_not_lock_out_others(world):
    w = world["default"]
    port, per_client = w["port"], DEFAULTS.tcp_max_connections_per_client
    refused_before = metric(w["metrics"], "geogate_dns_tcp_connections_closed_total", reason="per_client_limit")
    idle_before = metric(w["metrics"], "geogate_dns_tcp_connections_closed_total", reason="idle_timeout")
    socks, opened_at = [], {}
    try:
        for _ in range(300):  # more than the old global cap of 256
            s = connect_from(port, TCP_HOG)
            opened_at[s] = time.monotonic()
            socks.append(s)
        # The hog keeps its share; everything over it is closed at once (not after the timeout).
        closed = wait_closed(socks[per_client:], IDLE_TIMEOUT_S * 0.8)
        assert len(closed) == 300 - per_client, f"{len(closed)} of {300 - per_client} over the share closed"
        held = socks[:per_client]
        assert not any(closed_by_server(s) for s in held)
        assert metric(w["metrics"], "geogate_dns_tcp_connections_closed_total",
                      reason="per_client_limit") - refused_before == 300 - per_client
        assert metric(w["metrics"], "geogate_dns_tcp_connections") == per_client

        # Another client's TCP query is answered; the hog's own next connection is not.
        r = dig_from(port, TCP_OTHER, SERVICE, "A", "+tcp")
        assert r.status == "NOERROR" and r.addresses == [EU], r.text
        r = dig_from(port, TCP_HOG, SERVICE, "A", "+tcp")
        assert r.status == "" and "communications error" in r.text, r.text

        # The held ones are idle: closed after the idle timeout, not before.
        closed = wait_closed(held, IDLE_TIMEOUT_S + LOADED_MACHINE_SLACK_S)
        assert len(closed) == per_client
        for s, t in closed.items():
            assert t - opened_at[s] >= IDLE_TIMEOUT_S - 0.1, f"closed after {t - opened_at[s]:.2f}s"
        assert metric(w["metrics"], "geogate_dns_tcp_connections_closed_total",
                      reason="idle_timeout") - idle_before >= per_client
    finally:
        for s in socks:
            s.close()
    w["dns"].wait_until(lambda: metric(w["metrics"], "geogate_dns_tcp_connections") == 0, 10, "no TCP left")


def test_partial_messages_and_trickles_are_bounded_by_the_idle_timeout(world):
    port = world["default"]["port"]
    query = tcp_query()
    socks = [connect_from(port, SLOW_SENDER) for _ in range(4)]
    try:
        start = time.monotonic()
        half_prefix, half_message, trickle, answered = socks
        half_prefix.sendall(query[:1])
        half_message.sendall(query[:2 + 5])
        answered.sendall(tcp_query(qid=7) + tcp_query("geogate.test.", "SOA", qid=8))  # pipelined: two answers
        got = read_tcp_answers(answered, 2)
        assert [(m.id, m.rcode()) for m in got] == [(7, 0), (8, 0)], got
        # One byte every half timeout: the connection never goes quiet, but never completes a
        # query either; it must not live past the timeout.
        pos = 0
        while time.monotonic() - start < IDLE_TIMEOUT_S + LOADED_MACHINE_SLACK_S and not closed_by_server(trickle):
            if pos < len(query) - 1:
                try:
                    trickle.send(query[pos:pos + 1])
                except ConnectionError:
                    break
                pos += 1
            time.sleep(IDLE_TIMEOUT_S / 10)
        trickle_s = time.monotonic() - start
        assert pos < len(query) - 1, "the trickle was never closed"
        assert IDLE_TIMEOUT_S - 0.1 <= trickle_s <= IDLE_TIMEOUT_S + LOADED_MACHINE_SLACK_S, trickle_s
        closed = wait_closed([half_prefix, half_message, answered], LOADED_MACHINE_SLACK_S)
        assert len(closed) == 3
        for t in closed.values():
            assert t - start >= IDLE_TIMEOUT_S - 0.1
    finally:
        for s in socks:
            s.close()


def test_at_the_global_cap_the_idlest_connection_makes_room(world):
    w = world["small"]
    port = w["port"]
    evicted_before = metric(w["metrics"], "geogate_dns_tcp_connections_closed_total", reason="evicted")
    socks = []
    try:
        for source in (CAP_A, CAP_B):
            for _ in range(SMALL_TCP_PER_CLIENT):
                socks.append(connect_from(port, source))  # accepted in this order: oldest first
        w["dns"].wait_until(lambda: metric(w["metrics"], "geogate_dns_tcp_connections") == SMALL_TCP_CAP, 10,
                            "the cap reached")
        # The newest of the eight sends a query (and so is the least idle); the oldest is the victim.
        socks[-1].sendall(tcp_query(qid=9))
        assert [m.id for m in read_tcp_answers(socks[-1], 1)] == [9]
        r = dig_from(port, CAP_NEWCOMER, SERVICE, "A", "+tcp")
        assert r.status == "NOERROR" and r.addresses == [EU], r.text
        assert list(wait_closed(socks[:1], 10)) == [socks[0]]
        assert not any(closed_by_server(s) for s in socks[1:])
        assert metric(w["metrics"], "geogate_dns_tcp_connections_closed_total", reason="evicted") > evicted_before
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- zone transfers


@pytest.mark.parametrize(("rdtype", "options"), [
    ("AXFR", ()), ("IXFR=1", ()), ("AXFR", ("+notcp",)), ("IXFR=1", ("+notcp",)),
])
def test_zone_transfers_are_refused(world, rdtype, options):
    w = world["default"]
    qtype = rdtype.partition("=")[0]
    before = metric(w["metrics"], "geogate_dns_refused_transfers_total", 0.0, qtype=qtype)
    r = dig(w["port"], "geogate.test", rdtype, "+comments", *options)
    assert r.status == "REFUSED", r.text
    assert "; EDE: 18 (Prohibited): (zone transfers are not served)" in r.text, r.text
    assert r.answer == [] and "aa" not in r.flags, r.text
    assert metric(w["metrics"], "geogate_dns_refused_transfers_total", qtype=qtype) == before + 1


def test_zone_transfer_without_edns_is_refused_too(world):
    r = dig(world["default"]["port"], "geogate.test", "AXFR", "+comments", "+noedns")
    assert r.status == "REFUSED" and "EDE" not in r.text, r.text


def test_other_types_keep_their_answers(world):
    port = world["default"]["port"]
    r = dig(port, SERVICE, "TXT")
    assert r.status == "NOERROR" and r.answer == [] and r.sections["AUTHORITY"][0][3] == "SOA", r.text
    r = dig(port, SERVICE, "ANY")
    assert r.status == "NOERROR" and r.addresses == [EU, "2001:db8::10"], r.text


# ---------------------------------------------------------------- UDP flood


class Flood(threading.Thread):
    """UDP queries at a paced rate, round-robin from the given sources, until stopped (at most
    FLOOD_MAX_S), counting full answers, truncated ones (TC=1) and queries never answered."""

    def __init__(self, port: int, sources: list[str], rate_per_s: int):
        super().__init__(daemon=True)
        self.port, self.sources, self.rate_per_s = port, sources, rate_per_s
        self.stop_flag = threading.Event()
        self.sent = self.full = self.truncated = 0
        self.duration_s = 0.0
        self.query = bytearray(dns.message.make_query(SERVICE, "A").to_wire())

    def run(self) -> None:
        socks = []
        try:
            for source in self.sources:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((source, 0))
                s.setblocking(False)
            start = next_s = time.monotonic()
            while not self.stop_flag.is_set() and time.monotonic() - start < FLOOD_MAX_S:
                now = time.monotonic()
                while next_s <= now:
                    struct.pack_into("!H", self.query, 0, self.sent & 0xFFFF)
                    try:
                        socks[self.sent % len(socks)].sendto(self.query, ("127.0.0.1", self.port))
                        self.sent += 1
                    except BlockingIOError:
                        pass
                    next_s += 1 / self.rate_per_s
                self._drain(socks)
                time.sleep(0.002)
            self.duration_s = time.monotonic() - start
            end = time.monotonic() + 1.0  # answers still on their way
            while time.monotonic() < end:
                self._drain(socks)
                time.sleep(0.01)
        finally:
            for s in socks:
                s.close()

    def _drain(self, socks: list[socket.socket]) -> None:
        readable, _, _ = select.select(socks, [], [], 0)
        for s in readable:
            while True:
                try:
                    reply = s.recv(4096)
                except BlockingIOError:
                    break
                if reply[2] & 0x02:  # TC
                    self.truncated += 1
                else:
                    self.full += 1


def test_udp_flood_from_one_source_does_not_starve_others(world):
    w = world["default"]
    port, rate = w["port"], DEFAULTS.rate_limit_responses_per_s
    dropped_before = metric(w["metrics"], "geogate_dns_rate_limited_responses_total", action="dropped")
    slipped_before = metric(w["metrics"], "geogate_dns_rate_limited_responses_total", action="slipped")
    flood = Flood(port, [FLOODER], FLOOD_RATE_PER_S)
    flood.start()
    results = []
    try:
        w["dns"].wait_until(lambda: flood.sent >= FLOOD_RATE_PER_S // 3, 10, "flood under way")
        for _ in range(PROBES):
            r = dig_from(port, PROBER, SERVICE, "A")  # one try, 2 s: no retries hide a loss
            results.append((r.status, r.addresses, "tc" in r.flags))
            time.sleep(0.1)
        # TCP is not rate limited: the flooding address itself gets its answer there.
        tcp = dig_from(port, FLOODER, SERVICE, "A", "+tcp")
        assert flood.is_alive(), "the flood ended before the probes did: not a test of anything"
    finally:
        flood.stop_flag.set()
        flood.join(FLOOD_MAX_S + 5)
    assert results == [("NOERROR", [EU], False)] * PROBES, results
    assert tcp.status == "NOERROR" and tcp.addresses == [EU], tcp.text
    achieved = flood.sent / flood.duration_s
    assert achieved > FLOOD_RATE_PER_S * 0.5, f"the flood reached only {achieved:.0f} q/s"
    # The flooder: about `rate` full answers a second (plus the burst), some slips, many drops.
    assert flood.full <= rate * (flood.duration_s + 1) + rate, (flood.full, flood.duration_s)
    assert flood.truncated > 0
    assert flood.sent - flood.full - flood.truncated > 0
    dropped = metric(w["metrics"], "geogate_dns_rate_limited_responses_total", action="dropped") - dropped_before
    slipped = metric(w["metrics"], "geogate_dns_rate_limited_responses_total", action="slipped") - slipped_before
    assert 0 < flood.truncated <= slipped and dropped > 0  # a busy machine may lose a few on loopback
    assert abs(dropped - slipped) <= 1  # slip 2: every second response over the limit is truncated
    assert metric(w["metrics"], "geogate_dns_rate_limited_sources_total") >= 1


def test_prefix_length_32_keeps_neighbours_apart(world):
    w = world["small"]
    port = w["port"]
    flood = Flood(port, [NEIGHBOUR_A], SMALL_RATE_PER_S * 10)
    flood.start()
    try:
        w["dns"].wait_until(lambda: flood.truncated > 0, 10, "the neighbour limited")
        for _ in range(5):
            r = dig_from(port, NEIGHBOUR_B, SERVICE, "A")
            assert r.status == "NOERROR" and r.addresses == [EU] and "tc" not in r.flags, r.text
    finally:
        flood.stop_flag.set()
        flood.join(FLOOD_MAX_S + 5)


def test_source_table_stays_bounded_with_many_sources(world):
    w = world["small"]
    port = w["port"]
    evictions_before = metric(w["metrics"], "geogate_dns_rate_limit_evictions_total")
    query = dns.message.make_query(SERVICE, "A").to_wire()
    sources = [f"127.{78 + i // 250}.{i % 250}.1" for i in range(300)]
    answered = 0
    for i, source in enumerate(sources):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((source, 0))
            s.settimeout(2)
            s.sendto(query, ("127.0.0.1", port))
            try:
                answered += (s.recv(4096)[2] & 0x02) == 0  # each new source starts with a full bucket
            except TimeoutError:
                pass
        if i % 50 == 49:
            assert metric(w["metrics"], "geogate_dns_rate_limit_sources") <= SMALL_TABLE
    assert answered == len(sources)
    assert metric(w["metrics"], "geogate_dns_rate_limit_sources") <= SMALL_TABLE
    evicted = metric(w["metrics"], "geogate_dns_rate_limit_evictions_total") - evictions_before
    assert evicted >= len(sources) - SMALL_TABLE


def test_metrics_status_shows_the_limits(world):
    w = world["default"]
    import json

    with urllib.request.urlopen(w["metrics"].replace("/metrics", "/geogate/v1/dns"), timeout=10) as r:
        status = json.loads(r.read())
    assert status["rate_limit"]["responses_per_s"] == DEFAULTS.rate_limit_responses_per_s
    assert status["rate_limit"]["ipv4_prefix_len"] == 24 and status["rate_limit"]["ipv6_prefix_len"] == 56
    assert set(status["tcp"]) == {"open_connections", "closed_idle", "refused_per_client", "evicted"}


# ---------------------------------------------------------------- in-process: the limiter's logic
































