"""Build small MaxMind-format (GeoLite2-City shaped) databases for tests and demos.

Records look like GeoLite2-City's: ``{"location": {"latitude": .., "longitude": ..}}``, so
the same reader code works on a real GeoLite2-City file.  The database is IPv6 with IPv4
mapped in (``::a.b.c.d``), as MaxMind ships it, so both families resolve.

    python -m geo.mmdb_build OUT.mmdb 203.0.113.0/24=48.86,2.35 2001:db8:1::/48=40.71,-74.0
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Iterable, Mapping, Sequence

from mmdb_writer import MmdbF64, MMDBWriter
from netaddr import IPSet

DATABASE_TYPE = "GeoLite2-City"

# Documentation / benchmark ranges placed at real cities: what `geogate up` and demos use
# to show nearest-region answers without a commercial database.
DEMO_NETWORKS: dict[str, tuple[float, float]] = {
    "203.0.113.0/24": (48.86, 2.35),     # Paris -> nearest eu-west (Dublin)
    "198.51.100.0/24": (40.71, -74.01),  # New York -> nearest us-east (Virginia)
    "192.0.2.0/24": (1.35, 103.82),      # Singapore -> nearest ap-south (Mumbai)
    "2001:db8:1::/48": (48.86, 2.35),
    "2001:db8:2::/48": (40.71, -74.01),
    "2001:db8:3::/48": (1.35, 103.82),
}


def _record(lat: float, lon: float) -> dict:
    return {"location": {"latitude": MmdbF64(lat), "longitude": MmdbF64(lon)}}


def build_city_db(path: str, networks: Mapping[str, Sequence[float]] | Iterable[tuple[str, Sequence[float]]],
                  *, description: str = "geogate test GeoIP database") -> None:
    """Write ``networks`` (CIDR -> (latitude, longitude)) to ``path``."""
    items = networks.items() if isinstance(networks, Mapping) else networks
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=DATABASE_TYPE,
                        languages=["en"], description=description)
    for cidr, (lat, lon) in items:
        net = ipaddress.ip_network(cidr, strict=False)  # validates, with a clear error
        writer.insert_network(IPSet([str(net)]), _record(float(lat), float(lon)))
    writer.to_db_file(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geo.mmdb_build", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the .mmdb file to write")
    parser.add_argument("networks", nargs="*", metavar="CIDR=LAT,LON",
                        help="networks and where they are (default: the demo networks)")
    args = parser.parse_args(argv)
    networks: dict[str, tuple[float, float]] = {}
    for item in args.networks:
        cidr, sep, coords = item.partition("=")
        try:
            lat_s, lon_s = coords.split(",")
            networks[cidr] = (float(lat_s), float(lon_s))
        except ValueError:
            parser.error(f"expected CIDR=LAT,LON, got {item!r}")
        if not sep:
            parser.error(f"expected CIDR=LAT,LON, got {item!r}")
    build_city_db(args.out, networks or DEMO_NETWORKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
