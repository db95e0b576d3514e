"""Client geolocation: distance, mmdb lookups (a real MaxMind-format file built with
mmdb-writer), the CIDR table, and trusted-proxy X-Forwarded-For handling."""

from __future__ import annotations

import ipaddress

import pytest

from core.config import parse_config
from geo.client_locator import ClientLocator
from geo.distance import great_circle_km
from geo.mmdb_build import DEMO_NETWORKS, build_city_db

CONFIG = """
[[regions]]
name = "eu-west"
location = [53.35, -6.26]
client_cidrs = ["10.20.0.0/16"]
[[regions]]
name = "us-east"
location = [38.9, -77.0]
client_cidrs = ["10.20.30.0/24", "fd00:1::/32"]
[[regions]]
name = "ap-south"
location = [19.08, 72.88]
"""


@pytest.fixture(scope="module")
def regions():
    return parse_config(CONFIG).regions


@pytest.fixture(scope="module")
def mmdb(tmp_path_factory):
    path = tmp_path_factory.mktemp("geoip") / "city.mmdb"
    build_city_db(str(path), {**DEMO_NETWORKS, "172.16.0.0/12": (35.68, 139.69)})  # + Tokyo
    return str(path)


def test_great_circle_known_distances():
    dublin, virginia, mumbai = (53.35, -6.26), (38.9, -77.0), (19.08, 72.88)
    assert great_circle_km(dublin, dublin) == 0.0
    assert great_circle_km(dublin, virginia) == pytest.approx(5440, rel=0.01)
    assert great_circle_km(dublin, mumbai) == pytest.approx(7600, rel=0.01)
    assert great_circle_km(dublin, virginia) == pytest.approx(great_circle_km(virginia, dublin))
    assert great_circle_km((0, 0), (0, 180)) == pytest.approx(20015, rel=0.001)  # half the equator


def test_mmdb_lookup_ipv4_and_ipv6(regions, mmdb):
    loc = ClientLocator(regions, mmdb_path=mmdb)
    paris = loc.locate("203.0.113.77")
    assert paris is not None and paris.source == "mmdb" and paris.region is None
    assert (paris.lat, paris.lon) == (48.86, 2.35)
    ny = loc.locate("2001:db8:2::1234")
    assert ny is not None and (ny.lat, ny.lon) == (40.71, -74.01)
    tokyo = loc.locate("172.20.1.1")
    assert tokyo is not None and (tokyo.lat, tokyo.lon) == (35.68, 139.69)
    assert loc.locate("8.8.8.8") is None  # not in the database
    assert loc.locate("not-an-ip") is None
    loc.close()


def test_mmdb_prefix_is_the_answers_scope(regions, mmdb):
    loc = ClientLocator(regions, mmdb_path=mmdb)
    found, scope = loc.lookup_network(ipaddress.ip_network("203.0.113.0/26"))
    assert found is not None and scope == 24  # the database's /24 answers for the whole /24
    missing, scope = loc.lookup_network(ipaddress.ip_network("8.8.8.0/24"))
    assert missing is None and scope == 24
    loc.close()


def test_cidr_table_longest_prefix_wins_and_names_region(regions, mmdb):
    loc = ClientLocator(regions, mmdb_path=mmdb)
    eu = loc.locate("10.20.1.1")
    assert eu is not None and eu.region == "eu-west" and eu.source == "cidr"
    assert (eu.lat, eu.lon) == (53.35, -6.26)
    us = loc.locate("10.20.30.40")  # inside both /16 (eu) and /24 (us): the /24 wins
    assert us is not None and us.region == "us-east"
    v6 = loc.locate("fd00:1:2::3")
    assert v6 is not None and v6.region == "us-east"
    # A client network wider than the table entry is not decided by it.
    wide, scope = loc.lookup_network(ipaddress.ip_network("10.0.0.0/8"))
    assert wide is None and scope == 8
    loc.close()


def test_cidr_table_without_database(regions):
    loc = ClientLocator(regions)
    assert loc.locate("10.20.9.9").region == "eu-west"
    assert loc.locate("203.0.113.1") is None


def test_trusted_proxy_forwarded_for_is_honoured(regions, mmdb):
    loc = ClientLocator(regions, mmdb_path=mmdb, trusted_proxies=["127.0.0.0/8", "192.168.0.0/16"])
    # Peer is a trusted proxy; the chain's rightmost untrusted hop is the client.
    found = loc.locate("127.0.0.1", "198.51.100.9, 192.168.1.1")
    assert found is not None and found.source == "xff" and (found.lat, found.lon) == (40.71, -74.01)
    assert found.client_ip == "198.51.100.9"
    # Spoofed leftmost entry: the rightmost untrusted hop (Paris) wins, not the forged one.
    found = loc.locate("127.0.0.1", "198.51.100.9, 203.0.113.5")
    assert found is not None and (found.lat, found.lon) == (48.86, 2.35)
    # Ports and IPv6 brackets in the header are understood.
    found = loc.locate("192.168.7.7", "[2001:db8:3::1]:443")
    assert found is not None and (found.lat, found.lon) == (1.35, 103.82)
    # A forwarded client can also hit the CIDR table.
    found = loc.locate("127.0.0.1", "10.20.30.1")
    assert found is not None and found.region == "us-east"


def test_untrusted_peer_forwarded_for_is_ignored(regions, mmdb):
    loc = ClientLocator(regions, mmdb_path=mmdb, trusted_proxies=["127.0.0.0/8"])
    # The peer (Paris) is not a trusted proxy: its X-Forwarded-For claiming New York is ignored.
    found = loc.locate("203.0.113.50", "198.51.100.9")
    assert found is not None and found.source == "mmdb" and (found.lat, found.lon) == (48.86, 2.35)
    # No trusted proxies configured at all: the header never counts.
    plain = ClientLocator(regions, mmdb_path=mmdb)
    assert plain.locate("127.0.0.1", "198.51.100.9") is None
    # Garbage in the header falls back to the peer.
    assert loc.locate("127.0.0.1", "garbage, also-garbage") is None
    found = loc.locate("::ffff:203.0.113.50")  # IPv4-mapped peer from a dual-stack socket
    assert found is not None and (found.lat, found.lon) == (48.86, 2.35)
