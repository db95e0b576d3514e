"""`geogate dns` as a real process, asked with dig: nearest region by EDNS Client Subnet and
by CIDR table, ECS echo with scope, TTL, SOA/NS at the apex, NXDOMAIN/NODATA/REFUSED, TCP,
two answers, and malformed packets that must not hurt it.  The region gateways are stand-in
HTTP processes (loadtests/geo_standin.py) serving the two endpoints the responder reads."""

from __future__ import annotations

import json
import os
import socket
import struct
import urllib.request

import pytest

from geo.mmdb_build import DEMO_NETWORKS, build_city_db
from loadtests.geo_standin import (
    NEW_YORK_NET,
    PARIS_NET,
    REGIONS,
    SINGAPORE_NET,
    StandinGateway,
    dig,
    start_dns,
    wait_dns,
    write_config,
)
from tests.procs import free_port

SERVICE = "infer.geogate.test"
EU, US, AP = "192.0.2.10", "192.0.2.20", "192.0.2.30"
# These tests are about answers, not detection speed (tests/e2e/test_dns_failover.py): generous
# health-check settings keep a loaded machine's slow probe from flipping a region mid-test.
RELAXED_CHECKS = "check_timeout_ms = 2000\nfall = 3"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three stand-in gateways and two responders on them: answers = 1 and answers = 2."""
    tmp = tmp_path_factory.mktemp("dns")
    mmdb = str(tmp / "city.mmdb")
    build_city_db(mmdb, DEMO_NETWORKS)
    gateways: list[StandinGateway] = []
    dnses = []
    try:
        gateways = [StandinGateway(name, loc, str(tmp)) for name, loc, _ in REGIONS]
        for gw in gateways:
            gw.wait_ready()
        port1, port2, metrics_port = free_port(), free_port(), free_port()
        dns1 = start_dns(write_config(str(tmp / "one.toml"), gateways, dns_port=port1, mmdb=mmdb,
                                      dns_extra=f'metrics = "127.0.0.1:{metrics_port}"\n{RELAXED_CHECKS}'))
        dnses.append(dns1)
        dns2 = start_dns(write_config(str(tmp / "two.toml"), gateways, dns_port=port2, mmdb=mmdb,
                                      dns_extra="answers = 2\nns = [\"ns1.geogate.test.\", \"ns2.geogate.test.\"]"
                                                f"\nns_addresses = [\"192.0.2.53\"]\n{RELAXED_CHECKS}"))
        dnses.append(dns2)
        wait_dns(dns1, port1)
        wait_dns(dns2, port2)
        # Every region healthy in both before the tests look at answers.
        for port in (port1, port2):
            dns_proc = dns1 if port == port1 else dns2
            dns_proc.wait_until(lambda p=port: AP in dig(p, SERVICE, "A", f"+subnet={SINGAPORE_NET}").addresses,
                                30, "all regions healthy")
        yield {"port": port1, "port2": port2, "dns": dns1, "dns2": dns2, "gateways": gateways,
               "metrics": f"http://127.0.0.1:{metrics_port}"}
    finally:
        for p in dnses:
            p.stop()
        for gw in gateways:
            gw.stop()


@pytest.mark.parametrize(("subnet", "expected", "scope"), [
    (PARIS_NET, EU, 24), (NEW_YORK_NET, US, 24), (SINGAPORE_NET, AP, 24),
    ("100.64.7.0/24", AP, 16),  # CIDR-table hit (ap-south's client_cidrs 100.64.0.0/16)
    ("198.51.100.128/25", US, 24),  # narrower than the database entry: scope is the /24
])
def test_nearest_region_by_client_subnet(world, subnet, expected, scope):
    r = dig(world["port"], SERVICE, "A", f"+subnet={subnet}")
    assert r.status == "NOERROR" and "aa" in r.flags, r.text
    assert r.addresses == [expected], r.text
    net, srclen = subnet.split("/")
    assert r.client_subnet == f"{net}/{srclen}/{scope}", r.text  # ECS echoed with our scope
    assert r.answer[0][1] == "20"  # TTL = dns.ttl


def test_unknown_client_gets_configured_order(world):
    r = dig(world["port"], SERVICE, "A")  # source 127.0.0.1: not in the database or table
    assert r.status == "NOERROR" and r.addresses == [EU], r.text
    r = dig(world["port"], SERVICE, "A", "+subnet=8.8.8.0/24")
    assert r.addresses == [EU] and r.client_subnet == "8.8.8.0/24/24", r.text


def test_source_prefix_zero_is_not_located(world):
    r = dig(world["port"], SERVICE, "A", "+subnet=0.0.0.0/0")
    assert r.addresses == [EU] and r.client_subnet == "0.0.0.0/0/0", r.text


def test_aaaa_skips_regions_without_ipv6(world):
    r = dig(world["port"], SERVICE, "AAAA", f"+subnet={NEW_YORK_NET}")
    assert r.addresses == ["2001:db8::20"], r.text
    # ap-south has no IPv6 address: Singapore's nearest region that has one is eu-west.
    r = dig(world["port"], SERVICE, "AAAA", f"+subnet={SINGAPORE_NET}")
    assert r.addresses == ["2001:db8::10"], r.text
    r = dig(world["port"], SERVICE, "AAAA", "+subnet=2001:db8:2::/48")
    assert r.addresses == ["2001:db8::20"] and r.client_subnet == "2001:db8:2::/48/48", r.text


def test_two_answers(world):
    r = dig(world["port2"], SERVICE, "A", f"+subnet={PARIS_NET}")
    assert r.addresses == sorted([EU, US]), r.text
    r = dig(world["port2"], SERVICE, "A", f"+subnet={SINGAPORE_NET}")
    assert r.addresses == sorted([AP, EU]), r.text  # Mumbai, then Dublin (7.6k km) before Virginia


def test_soa_and_ns_at_apex(world):
    r = dig(world["port"], "geogate.test", "SOA")
    assert r.status == "NOERROR" and "aa" in r.flags, r.text
    (soa,) = r.answer
    assert soa[0] == "geogate.test." and soa[3] == "SOA"
    assert soa[4:] == ["ns1.geogate.test.", "hostmaster.geogate.test.", "1", "3600", "600", "604800", "20"]
    r = dig(world["port"], "geogate.test", "NS")
    assert [rr[4] for rr in r.answer] == ["ns1.geogate.test."], r.text
    r = dig(world["port2"], "geogate.test", "NS")
    assert sorted(rr[4] for rr in r.answer) == ["ns1.geogate.test.", "ns2.geogate.test."], r.text
    assert ["192.0.2.53"] == sorted({rr[4] for rr in r.sections["ADDITIONAL"] if rr[3] == "A"}), r.text
    r = dig(world["port2"], "ns2.geogate.test", "A")
    assert r.addresses == ["192.0.2.53"], r.text


def test_nxdomain_nodata_refused(world):
    r = dig(world["port"], "nothing-here.geogate.test", "A")
    assert r.status == "NXDOMAIN" and "aa" in r.flags, r.text
    assert r.sections["AUTHORITY"][0][3] == "SOA" and r.sections["AUTHORITY"][0][1] == "20", r.text
    r = dig(world["port"], "deeper.infer.geogate.test", "A")
    assert r.status == "NXDOMAIN", r.text
    r = dig(world["port"], SERVICE, "MX")  # the name exists: NODATA, not NXDOMAIN
    assert r.status == "NOERROR" and r.answer == [] and r.sections["AUTHORITY"][0][3] == "SOA", r.text
    r = dig(world["port"], "ns1.geogate.test", "A")  # exists (NS target), no glue configured
    assert r.status == "NOERROR" and r.answer == [], r.text
    r = dig(world["port"], "example.com", "A")
    assert r.status == "REFUSED" and "aa" not in r.flags, r.text
    r = dig(world["port"], SERVICE, "A", "+subnet=198.51.100.0/24", "-c", "CH")
    assert r.status == "REFUSED", r.text


def test_tcp(world):
    r = dig(world["port"], SERVICE, "A", "+tcp", f"+subnet={NEW_YORK_NET}")
    assert r.status == "NOERROR" and r.addresses == [US], r.text
    r = dig(world["port"], "geogate.test", "SOA", "+tcp")
    assert r.status == "NOERROR" and r.answer[0][3] == "SOA", r.text


def test_malformed_packets_get_formerr_or_nothing(world):
    port = world["port"]
    rng = __import__("random").Random(7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        for size in [0, 1, 5, 11] + [12, 13, 40, 300, 1500] * 5:  # < 12 bytes: no header, no reply
            payload = bytes(rng.getrandbits(8) for _ in range(size))
            if size >= 3:  # a query header (QR clear) over garbage: should get FORMERR back
                payload = payload[:2] + bytes([payload[2] & 0x7F]) + payload[3:]
            s.sendto(payload, ("127.0.0.1", port))
            try:
                reply = s.recv(4096)
            except TimeoutError:
                continue
            assert len(reply) >= 12
            assert reply[:2] == payload[:2]  # same id
            flags = struct.unpack("!H", reply[2:4])[0]
            assert flags & 0x8000 and flags & 0x000F == 1, f"not FORMERR: {reply.hex()}"
        # A response (QR set) is never answered: no reflection loops.
        s.sendto(b"\x12\x34\x81\x80" + b"\x00" * 8, ("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            s.recv(4096)
    # TCP garbage: a bogus length and random bytes, then the connection is simply closed.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(struct.pack("!H", 20) + os.urandom(20))
        c.recv(4096)
    assert world["dns"].alive()
    r = dig(port, SERVICE, "A", f"+subnet={PARIS_NET}")
    assert r.addresses == [EU], r.text  # still answering normally


def test_metrics_and_status(world):
    port = world["port"]
    dig(port, "no-such-name.geogate.test", "A")
    dig(port, SERVICE, "A", f"+subnet={NEW_YORK_NET}")
    dig(port, SERVICE, "A", "+tcp", f"+subnet={NEW_YORK_NET}")
    with urllib.request.urlopen(world["metrics"] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'geogate_dns_responses_total{rcode="NXDOMAIN",transport="udp"}' in text
    assert 'geogate_dns_responses_total{rcode="NOERROR",transport="tcp"}' in text
    assert 'geogate_dns_service_answers_total{region="us-east"}' in text
    for region, _, _ in REGIONS:
        assert f'geogate_dns_region_healthy{{region="{region}"}} 1.0' in text
    assert "geogate_dns_fail_open 0.0" in text
    with urllib.request.urlopen(world["metrics"] + "/geogate/v1/dns", timeout=10) as r:
        status = json.loads(r.read())
    assert status["service"] == "infer.geogate.test." and status["fail_open"] is False
    assert [(g["region"], g["healthy"], g["reason"]) for g in status["regions"]] == [
        (name, True, "ready") for name, _, _ in REGIONS]
