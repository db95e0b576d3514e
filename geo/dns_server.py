"""`geogate dns --config FILE`: the health-aware GeoDNS responder.

An authoritative server for ``dns.zone`` over UDP and TCP on ``dns.listen``:

- ``dns.service`` A/AAAA: the ``addresses`` of the nearest healthy region(s) (``dns.answers``
  of them), TTL ``dns.ttl``.  The client is located by its EDNS Client Subnet when the query
  carries one (the option is echoed back with the scope prefix the answer holds for), else by
  the query's source address: the regions' ``client_cidrs`` first, then the mmdb database
  (``routing.geoip_database``).  Unknown clients get the configured region order.
- Health comes from ``geo.region_health`` (each region gateway's ``/v2/health/ready``, checked
  every ``dns.check_interval_ms``).  If no region is healthy, every region is answered (fail
  open: a stale answer beats no answer) and that is logged.
- SOA and NS at the apex; NXDOMAIN (SOA in authority) for unknown names in the zone, NODATA
  for other types, REFUSED outside the zone and for zone transfers (AXFR/IXFR; with EDNS an
  Extended DNS Error 18 "Prohibited" says why), NOTIMP for opcodes other than QUERY.  Malformed
  packets get FORMERR when their header is readable, else nothing.  Every packet is handled
  inside its own try: nothing a client sends can stop the server.
- Hostile clients: UDP responses are rate limited per source prefix before a query is even
  parsed (geo.dns_rate_limit; over the limit, 1 in ``rate_limit_slip`` gets a truncated reply
  so real clients retry over TCP).  TCP connections are limited per client address and in all
  (at the global cap the idlest connection makes room), and closed when no complete query
  arrives within ``tcp_idle_timeout_ms`` (RFC 7766 6.2.3), which also bounds a partial length
  prefix or message and a client that does not read its answers.
- ``dns.metrics`` (HOST:PORT, optional): ``/metrics`` and ``/geogate/v1/dns`` (geo.dns_metrics).

Withdrawal time with the default checks: <= ~1.4 s (see geo.region_health);
``loadtests/bench_dns_failover.py`` measures it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import struct
import sys
from collections.abc import Sequence
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from aiohttp import web

from core.logs import setup_logging
from geo.client_locator import ClientLocator
from geo.dns_listeners import _OPCODE_MASK, _QR, _RD, HEADER_LEN, MAX_TCP_MESSAGE, TcpServer, ThrottledLog, UdpProtocol
from geo.dns_metrics import DnsMetrics, build_status_app
from geo.dns_rate_limit import ResponseRateLimiter
from geo.region_health import RegionHealth, RegionHealthMonitor
from geo.region_order import MODE_NEAREST_TO_CLIENT, order_regions

log = logging.getLogger("geogate.dns")

CLASSIC_UDP_PAYLOAD = 512  # RFC 1035 limit without EDNS
OUR_UDP_PAYLOAD = 1232  # DNS flag day 2020: avoids IP fragmentation
APEX_TTL_S = 3600  # SOA/NS change rarely; the service answer carries dns.ttl
MAX_CACHED_RRSETS = 1024
TRANSFER_TYPES = {dns.rdatatype.AXFR: "AXFR", dns.rdatatype.IXFR: "IXFR"}
TRANSFER_REFUSED_TEXT = "zone transfers are not served"


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name if name.endswith(".") else name + ".")


class GeoDnsStartError(RuntimeError):
    """The responder cannot start; the message names the config key and the problem."""


def _formerr_from_header(wire: bytes) -> bytes | None:
    """A bare FORMERR for a packet dnspython could not parse, if its header is readable and it
    is a query (never answer a response: that is how reflection loops start)."""
    if len(wire) < HEADER_LEN:
        return None
    qid, flags = struct.unpack("!HH", wire[:4])
    if flags & _QR:
        return None
    reply_flags = _QR | (flags & _OPCODE_MASK) | (flags & _RD) | dns.rcode.FORMERR
    return struct.pack("!HHHHHH", qid, reply_flags, 0, 0, 0, 0)


class GeoDnsResponder:
    """Turns one query (wire bytes + source address) into one response.  No IO: the
    listeners below feed it; tests can call it directly."""

    def __init__(self, cfg: Any, monitor: RegionHealthMonitor, locator: ClientLocator):
        d = cfg.dns
        self.regions = list(cfg.regions)
        # IP version -> region -> its addresses of that version (what A / AAAA answer).
        self._addresses = {v: {r.name: [a for a in r.addresses if ipaddress.ip_address(a).version == v]
                               for r in self.regions} for v in (4, 6)}
        self.monitor = monitor
        self.locator = locator
        self.answers = d.answers
        self.ttl = d.ttl
        self.zone = _absolute(d.zone)
        self.service = _absolute(d.service)
        if not self.service.is_subdomain(self.zone):
            raise GeoDnsStartError(f"dns.service {d.service!r} is not inside dns.zone {d.zone!r}")
        ns_names = [_absolute(n) for n in d.ns] or [dns.name.from_text("ns1", self.zone)]
        self.ns_rrset = dns.rrset.from_text_list(self.zone, APEX_TTL_S, "IN", "NS",
                                                 [n.to_text() for n in ns_names])
        mname = _absolute(d.soa_mname) if d.soa_mname else ns_names[0]
        rname = _absolute(d.soa_rname) if d.soa_rname else dns.name.from_text("hostmaster", self.zone)
        soa_text = (f"{mname} {rname} {d.soa_serial} {d.soa_refresh_s} {d.soa_retry_s} "
                    f"{d.soa_expire_s} {d.soa_minimum_s}")
        self.soa_rrset = dns.rrset.from_text(self.zone, APEX_TTL_S, "IN", "SOA", soa_text)
        # RFC 2308: a negative answer's SOA carries min(SOA TTL, MINIMUM) as its TTL.
        self.negative_soa_rrset = dns.rrset.from_text(self.zone, min(APEX_TTL_S, d.soa_minimum_s),
                                                      "IN", "SOA", soa_text)
        # Glue for in-zone NS names (all of them share ns_addresses).
        self.glue: dict[dns.name.Name, list[dns.rrset.RRset]] = {}
        v4 = [a for a in d.ns_addresses if ipaddress.ip_address(a).version == 4]
        v6 = [a for a in d.ns_addresses if ipaddress.ip_address(a).version == 6]
        for n in ns_names:
            if n.is_subdomain(self.zone):
                self.glue[n] = ([dns.rrset.from_text_list(n, APEX_TTL_S, "IN", "A", v4)] if v4 else []) + \
                               ([dns.rrset.from_text_list(n, APEX_TTL_S, "IN", "AAAA", v6)] if v6 else [])
        # Names that exist in the zone; their ancestors inside the zone exist too (empty
        # non-terminals answer NODATA, not NXDOMAIN).
        self.names = {self.zone, self.service, *self.glue}
        self.failing_open = False
        self.metrics: DnsMetrics | None = None
        self._log_transfer = ThrottledLog(logging.INFO)
        self._rrsets: dict[tuple[int, tuple[str, ...]], dns.rrset.RRset] = {}

    # ------------------------------------------------------------ region choice

    def choose(self, rdtype: int, client_net: IPNetwork | None) -> tuple[list[str], int, str]:
        """Addresses of type ``rdtype`` to answer, the ECS scope prefix length they hold for,
        and the first region answered ("" if none)."""
        addresses = self._addresses[4 if rdtype == dns.rdatatype.A else 6]
        location, scope = (self.locator.lookup_network(client_net) if client_net is not None else (None, 0))
        order = order_regions("", self.regions, client=location, rtt_s={}, mode=MODE_NEAREST_TO_CLIENT)
        candidates = [n for n in order if addresses[n]]
        healthy = [n for n in candidates if self.monitor.states[n].healthy]
        chosen = healthy[: self.answers] if healthy else candidates  # fail open: all of them
        return [a for n in chosen for a in addresses[n]], scope, chosen[0] if chosen else ""

    def on_region_change(self, state: RegionHealth) -> None:
        if self.metrics is not None:
            self.metrics.region_changed(state)
        none_healthy = not self.monitor.healthy_names()
        if none_healthy and not self.failing_open:
            log.error("no region is healthy: answering every region (fail open) until one recovers")
        elif not none_healthy and self.failing_open:
            log.warning("region %s is healthy again: fail-open mode over", state.name)
        self.failing_open = none_healthy

    # ------------------------------------------------------------ one packet

    def handle(self, wire: bytes, source_ip: str, *, udp: bool) -> bytes | None:
        """The response bytes for one query, or None to stay silent."""
        if len(wire) < HEADER_LEN or wire[2] & 0x80:  # no header, or a response (QR): never answered
            self._count(udp, None)
            return None
        try:
            query = dns.message.from_wire(wire)
        except Exception as exc:  # any parse failure is the sender's problem, never ours
            log.debug("malformed packet from %s: %s", source_ip, exc)
            reply = _formerr_from_header(wire)
            self._count(udp, reply)
            return reply
        if query.flags & dns.flags.QR:
            self._count(udp, None)
            return None
        try:
            response = self._respond(query, source_ip)
        except Exception:
            log.exception("failed to answer a query from %s", source_ip)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
        max_size = MAX_TCP_MESSAGE
        if udp:
            max_size = max(CLASSIC_UDP_PAYLOAD, min(query.payload, OUR_UDP_PAYLOAD)) if query.edns >= 0 \
                else CLASSIC_UDP_PAYLOAD
        try:
            reply = response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            # RFC 2181 9: set TC, send what fits (the header and question); clients retry on TCP.
            response.flags |= dns.flags.TC
            response.answer, response.authority, response.additional = [], [], []
            reply = response.to_wire(max_size=max_size)
        self._count(udp, reply)
        return reply

    def _count(self, udp: bool, reply: bytes | None) -> None:
        if self.metrics is None:
            return
        if reply is None:
            self.metrics.dropped.inc()
        else:
            self.metrics.response("udp" if udp else "tcp", reply[3] & 0x0F)

    def _respond(self, query: dns.message.Message, source_ip: str) -> dns.message.Message:
        response = dns.message.make_response(query, our_payload=OUR_UDP_PAYLOAD)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if query.edns > 0:
            response.set_rcode(dns.rcode.BADVERS)  # we only speak EDNS version 0
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        q = query.question[0]
        qname, rdtype = q.name, q.rdtype
        if rdtype in TRANSFER_TYPES:
            return self._refuse_transfer(query, response, source_ip)
        if q.rdclass != dns.rdataclass.IN or not qname.is_subdomain(self.zone):
            response.set_rcode(dns.rcode.REFUSED)  # not authoritative, and no recursion here
            return response
        response.flags |= dns.flags.AA

        ecs = next((o for o in query.options if isinstance(o, dns.edns.ECSOption)), None)
        client_net, ecs_scope = self._client_network(ecs, source_ip), 0
        exists = qname in self.names or any(n.is_subdomain(qname) for n in self.names)
        if qname == self.zone:
            if rdtype in (dns.rdatatype.SOA, dns.rdatatype.ANY):
                response.answer.append(self.soa_rrset)
            if rdtype in (dns.rdatatype.NS, dns.rdatatype.ANY):
                response.answer.append(self.ns_rrset)
                for glue in self.glue.values():
                    response.additional.extend(glue)
        if qname == self.service and rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.ANY):
            types = (dns.rdatatype.A, dns.rdatatype.AAAA) if rdtype == dns.rdatatype.ANY else (rdtype,)
            for t in types:
                addresses, ecs_scope, first = self.choose(t, client_net)
                if addresses:
                    response.answer.append(self._service_rrset(t, addresses))
                    if self.metrics is not None:
                        self.metrics.answered(first)
        if qname in self.glue:
            response.answer.extend(r for r in self.glue[qname] if rdtype in (r.rdtype, dns.rdatatype.ANY))
        if not response.answer:
            if not exists:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self.negative_soa_rrset)  # NXDOMAIN or NODATA
        if ecs is not None and query.edns >= 0:
            # RFC 7871 7.2.1: echo the family/source prefix/address with our scope.  A scope of
            # 0 means the answer is the same for every client (or the client hid its subnet).
            scope = ecs_scope if (ecs.srclen and qname == self.service) else 0
            response.use_edns(0, 0, OUR_UDP_PAYLOAD, query.payload,
                              options=[dns.edns.ECSOption(ecs.address, ecs.srclen, scope)])
        return response

    def _service_rrset(self, rdtype: int, addresses: list[str]) -> dns.rrset.RRset:
        """The service's A/AAAA RRset for these addresses, built once: parsing the addresses' text
        was a quarter of an answer's cost.  The keys are the orderings of the regions' addresses
        that health and client location produce: a handful, but up to (regions)! while failing
        open, hence the cap."""
        key = (rdtype, tuple(addresses))
        rrset = self._rrsets.get(key)
        if rrset is None:
            rrset = dns.rrset.from_text_list(self.service, self.ttl, "IN", rdtype, addresses)
            if len(self._rrsets) < MAX_CACHED_RRSETS:
                self._rrsets[key] = rrset
        return rrset

    def _refuse_transfer(self, query: dns.message.Message, response: dns.message.Message,
                         source_ip: str) -> dns.message.Message:
        """AXFR/IXFR: REFUSED, as BIND answers a transfer nobody allowed.  The zone is computed per
        client (nearest healthy region), so there is no zone to hand over."""
        qtype = TRANSFER_TYPES[query.question[0].rdtype]
        response.set_rcode(dns.rcode.REFUSED)
        if query.edns >= 0:  # RFC 8914: the reason, for whoever reads dig's output
            response.use_edns(0, 0, OUR_UDP_PAYLOAD, query.payload,
                              options=[dns.edns.EDEOption(dns.edns.EDECode.PROHIBITED, TRANSFER_REFUSED_TEXT)])
        if self.metrics is not None:
            self.metrics.refused_transfer(qtype)
        self._log_transfer("refused %s of %s from %s: %s", qtype, query.question[0].name, source_ip,
                           TRANSFER_REFUSED_TEXT)
        return response

    @staticmethod
    def _client_network(ecs: dns.edns.ECSOption | None, source_ip: str) -> IPNetwork | None:
        try:
            if ecs is not None and ecs.srclen:
                return ipaddress.ip_network(f"{ecs.address}/{ecs.srclen}", strict=False)
            ip = ipaddress.ip_address(source_ip.partition("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            return ipaddress.ip_network(ip)
        except ValueError:
            return None


# ---------------------------------------------------------------- listeners




def _os_reason(exc: OSError) -> str:
    return f"{exc} ({os.strerror(exc.errno)})" if exc.errno else str(exc)


def _split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(cfg: Any, listen: str, *, stop: asyncio.Event | None = None) -> None:
    """Run the responder until ``stop`` is set (or SIGTERM/SIGINT)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    mmdb = cfg.resolve_path(cfg.routing.geoip_database) if cfg.routing.geoip_database else ""
    try:
        locator = ClientLocator(cfg.regions, mmdb_path=mmdb)
    except (OSError, ValueError, RuntimeError) as exc:  # missing or corrupt database
        raise GeoDnsStartError(f"routing.geoip_database: cannot open {mmdb!r}: {exc}") from None
    monitor = RegionHealthMonitor.from_config(cfg)
    responder = GeoDnsResponder(cfg, monitor, locator)
    responder.metrics = DnsMetrics()
    monitor.on_change = responder.on_region_change
    await monitor.start()
    await monitor.wait_first_round()  # answer from real health, not from "nothing probed yet"
    if not monitor.healthy_names():
        responder.failing_open = True
        log.error("no region is healthy at start: answering every region (fail open) until one is")
    d = cfg.dns
    limiter = None
    if d.rate_limit_responses_per_s:
        limiter = ResponseRateLimiter(responses_per_s=d.rate_limit_responses_per_s, slip=d.rate_limit_slip,
                                      ipv4_prefix_len=d.rate_limit_ipv4_prefix_len,
                                      ipv6_prefix_len=d.rate_limit_ipv6_prefix_len,
                                      max_sources=d.rate_limit_max_sources)
    tcp = TcpServer(responder, max_connections=d.tcp_max_connections,
                     max_per_client=d.tcp_max_connections_per_client, idle_timeout_s=d.tcp_idle_timeout_ms / 1000)
    responder.metrics.rate_limiter = limiter
    responder.metrics.tcp = tcp
    host, port = _split_host_port(listen)
    try:
        udp_transport, _ = await loop.create_datagram_endpoint(lambda: UdpProtocol(responder, limiter),
                                                               local_addr=(host, port))
        tcp_server = await loop.create_server(tcp.protocol, host, port, reuse_address=True)
    except OSError as exc:
        await monitor.close()
        raise GeoDnsStartError(f"dns.listen: cannot serve on {listen}: {_os_reason(exc)}") from None
    status_runner: web.AppRunner | None = None
    if cfg.dns.metrics:
        status_runner = web.AppRunner(build_status_app(responder.metrics, monitor, responder), access_log=None)
        await status_runner.setup()
        m_host, m_port = _split_host_port(cfg.dns.metrics)
        try:
            await web.TCPSite(status_runner, m_host, m_port).start()
        except OSError as exc:
            tcp_server.close()
            udp_transport.close()
            await status_runner.cleanup()
            await monitor.close()
            raise GeoDnsStartError(f"dns.metrics: cannot serve on {cfg.dns.metrics}: {_os_reason(exc)}") from None
    log.info("geogate dns serving zone %s (service %s) on %s udp+tcp%s; regions: %s; %s; TCP: %d connections, "
             "%d per client, idle timeout %d ms", responder.zone, responder.service, listen,
             f", metrics on {cfg.dns.metrics}" if cfg.dns.metrics else "",
             ", ".join(f"{s.name}={'up' if s.healthy else 'down'} ({s.reason})" for s in monitor.states.values()),
             f"UDP responses limited to {d.rate_limit_responses_per_s}/s per /{d.rate_limit_ipv4_prefix_len} "
             f"(IPv6 /{d.rate_limit_ipv6_prefix_len}), slip {d.rate_limit_slip}" if limiter is not None
             else "UDP responses not rate limited", d.tcp_max_connections, d.tcp_max_connections_per_client,
             d.tcp_idle_timeout_ms)
    try:
        await stop.wait()
    finally:
        log.info("geogate dns shutting down")
        tcp_server.close()
        tcp.close_all()
        udp_transport.close()
        if status_runner is not None:
            await status_runner.cleanup()
        await monitor.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(tcp_server.wait_closed(), 2.0)
        locator.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the deployment's TOML config file")
    parser.add_argument("--listen", default="", help="HOST:PORT to serve on (default: dns.listen)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    from core.config import ConfigError, load_config

    setup_logging(args.log_level)
    try:
        cfg = load_config(args.config)
        if not cfg.regions:
            raise ConfigError(f"{args.config}: regions: no regions configured, nothing to answer")
    except ConfigError as exc:
        print(f"geogate dns: {exc}", file=sys.stderr)
        return 2
    listen = args.listen or cfg.dns.listen
    try:
        import uvloop

        uvloop.run(serve(cfg, listen))
    except GeoDnsStartError as exc:
        print(f"geogate dns: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="geogate dns")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
