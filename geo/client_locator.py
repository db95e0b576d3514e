"""Where is this client?  CIDR table first, then a MaxMind-format (GeoLite2-City) database.

The client's address is the TCP peer, unless the peer is a trusted proxy: then the
``X-Forwarded-For`` chain is walked right to left, skipping trusted proxies, and the first
untrusted hop is the client (what nginx's ``real_ip_recursive`` and Envoy's ``xff_num_trusted_hops``
do).  An untrusted peer's ``X-Forwarded-For`` is ignored: anyone can write that header.

Lookup order:
1. the regions' ``client_cidrs`` (longest prefix wins): operators' explicit knowledge beats
   a database guess; the hit names the region directly.
2. the mmdb database (``routing.geoip_database``): ``location.latitude/longitude``.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import maxminddb

log = logging.getLogger("geogate.geo")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SOURCE_MMDB = "mmdb"
SOURCE_CIDR = "cidr"
SOURCE_XFF = "xff"

# Lookups cost 15-80 us (address parsing, table scan, database walk); clients repeat, so the
# answers are memoised per (peer, X-Forwarded-For) and per network.  Entries are immutable.
LOCATE_CACHE_ENTRIES = 65536
MAX_CACHED_FORWARDED_FOR_CHARS = 256  # longer (attacker-sized) headers are looked up uncached


@dataclass(frozen=True)
class Location:
    lat: float
    lon: float
    region: str | None = None  # set on a CIDR-table hit: that region serves this client
    source: str = SOURCE_MMDB  # "cidr" (table hit), "mmdb" (peer located), "xff" (forwarded client located)
    client_ip: str = ""


def _parse_ip(text: str) -> IPAddress | None:
    text = text.strip()
    # X-Forwarded-For entries may carry a port ("1.2.3.4:5678", "[2001:db8::1]:443").
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped  # ::ffff:a.b.c.d from dual-stack sockets is an IPv4 client
    return ip


class ClientLocator:
    """Locates clients by address.  ``regions``: objects with ``name``, ``location`` and
    ``client_cidrs`` (``core.config.RegionSection``)."""

    def __init__(self, regions: Sequence[Any], *, mmdb_path: str = "",
                 trusted_proxies: Iterable[str] = ()):
        self._locations = {r.name: (float(r.location[0]), float(r.location[1])) for r in regions}
        table: list[tuple[IPNetwork, str]] = []
        for r in regions:
            for cidr in getattr(r, "client_cidrs", ()) or ():
                table.append((ipaddress.ip_network(cidr, strict=False), r.name))
        # Longest prefix first, so the first containing entry is the most specific one.
        table.sort(key=lambda entry: entry[0].prefixlen, reverse=True)
        self._cidr_table = table
        self._trusted = [ipaddress.ip_network(c, strict=False) for c in trusted_proxies]
        self._reader: maxminddb.Reader | None = None
        if mmdb_path:
            # MODE_AUTO memory-maps the file: lookups are microseconds and never block on IO.
            self._reader = maxminddb.open_database(mmdb_path)
        self._locate_cached = functools.lru_cache(maxsize=LOCATE_CACHE_ENTRIES)(self._locate)
        self._lookup_network_cached = functools.lru_cache(maxsize=LOCATE_CACHE_ENTRIES)(self._lookup_network)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # ------------------------------------------------------------ client address

    def is_trusted(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self._trusted)

    def client_address(self, peer_ip: str, forwarded_for: str | None) -> tuple[IPAddress | None, bool]:
        """The client's address and whether it came from X-Forwarded-For."""
        peer = _parse_ip(peer_ip)
        if peer is None or not forwarded_for or not self.is_trusted(peer):
            return peer, False
        hops = [h for h in (_parse_ip(part) for part in forwarded_for.split(",")) if h is not None]
        if not hops:
            return peer, False
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return hop, True
        # Every hop is a trusted proxy: the leftmost is as close to the client as we can get.
        return hops[0], True

    # ------------------------------------------------------------ lookups

    def lookup_network(self, network: IPNetwork) -> tuple[Location | None, int]:
        """Locate a client network (a single address is a /32 or /128).  Returns the location
        and the prefix length the answer holds for (EDNS Client Subnet scope): the matched
        CIDR or database network, or the queried prefix when nothing matched.  Memoised."""
        return self._lookup_network_cached(network)

    def _lookup_network(self, network: IPNetwork) -> tuple[Location | None, int]:
        for net, region in self._cidr_table:
            # Only a table entry that covers the whole client network may decide for it.
            if net.version == network.version and net.prefixlen <= network.prefixlen \
                    and network.network_address in net:
                lat, lon = self._locations[region]
                return Location(lat, lon, region, SOURCE_CIDR, str(network.network_address)), net.prefixlen
        if self._reader is None:
            return None, network.prefixlen
        try:
            record, prefix_len = self._reader.get_with_prefix_len(network.network_address)
        except ValueError:  # IPv6 address against an IPv4-only database
            return None, network.prefixlen
        loc = (record or {}).get("location") if isinstance(record, dict) else None
        if not loc or "latitude" not in loc or "longitude" not in loc:
            return None, network.prefixlen
        scope = prefix_len
        if prefix_len < network.prefixlen:
            # A more specific CIDR-table entry inside the database's network answers differently:
            # the answer must not be claimed for the whole database network.
            db_net = ipaddress.ip_network(f"{network.network_address}/{prefix_len}", strict=False)
            if any(net.version == db_net.version and net.subnet_of(db_net) for net, _ in self._cidr_table):
                scope = network.prefixlen
        return (Location(float(loc["latitude"]), float(loc["longitude"]), None, SOURCE_MMDB,
                         str(network.network_address)), scope)

    def locate(self, peer_ip: str, forwarded_for: str | None = None) -> Location | None:
        """Locate an HTTP/gRPC client: peer address, or the trusted X-Forwarded-For client."""
        if forwarded_for and len(forwarded_for) > MAX_CACHED_FORWARDED_FOR_CHARS:
            return self._locate(peer_ip, forwarded_for)
        return self._locate_cached(peer_ip, forwarded_for)

    def _locate(self, peer_ip: str, forwarded_for: str | None = None) -> Location | None:
        ip, from_xff = self.client_address(peer_ip, forwarded_for)
        if ip is None:
            return None
        loc, _ = self._lookup_network(ipaddress.ip_network(ip))
        if loc is not None and from_xff and loc.source == SOURCE_MMDB:
            loc = Location(loc.lat, loc.lon, None, SOURCE_XFF, loc.client_ip)
        return loc
