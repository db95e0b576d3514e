"""DNS queries as the GeoDNS tests send them (unit and e2e): the service name and the TCP wire
form (two-byte length prefix)."""

from __future__ import annotations

import struct

import dns.message

SERVICE = "infer.geogate.test."


def tcp_query(name: str = SERVICE, rdtype: str = "A", qid: int = 1) -> bytes:
    q = dns.message.make_query(name, rdtype)
    q.id = qid
    wire = q.to_wire()
    return struct.pack("!H", len(wire)) + wire
