"""Replica discovery from DNS SRV records (``discover = "dns+srv://_grpc._tcp.eu.example."``).

``resolve()`` asks for the SRV records of the name, then the A and AAAA records of each
target (taken from the answer's additional section when the server sent them there), and
returns ``[(url, weight)]`` sorted by URL: ``"<scheme>://<ip>:<port>"`` (IPv6 in brackets),
the weight being the SRV weight (0 counts as 1: RFC 2782 weight 0 means "rarely", geogate's
weights have no such notion). The same address from several records keeps the largest weight.
SRV priorities are not used for preference: every target is a replica of the pool (health
checks, not DNS, decide which ones take traffic).

What a DNS answer means for the replica set:
- NXDOMAIN, or no SRV records at the name: the set is empty (a real removal).
- A target without address records: that target is left out (logged).
- Timeout, SERVFAIL/REFUSED, no reachable server: ``DiscoveryError``; ``watch()`` keeps the
  last good set and logs why, so a DNS outage never empties a pool.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver

log = logging.getLogger("geogate.geo.srv_discovery")

DISCOVER_PREFIX = "dns+srv://"
DEFAULT_INTERVAL_S = 5.0
DEFAULT_LIFETIME_S = 2.0  # one lookup (all retries) gives up after this
DEFAULT_DNS_PORT = 53
ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)

Replicas = list[tuple[str, int]]
OnUpdate = Callable[[Replicas], Awaitable[None] | None]


class DiscoveryError(Exception):
    """DNS could not give an answer (not: answered that there is nothing)."""


class SrvDiscovery:
    def __init__(self, name: str, scheme: str, *, resolver: str = "", interval_s: float = DEFAULT_INTERVAL_S,
                 lifetime_s: float = DEFAULT_LIFETIME_S):
        if name.startswith(DISCOVER_PREFIX):
            name = name[len(DISCOVER_PREFIX):]
        if not name:
            raise ValueError("SRV discovery needs a name, e.g. dns+srv://_grpc._tcp.eu.example.")
        self.name = name if name.endswith(".") else name + "."
        self.scheme = scheme
        self.interval_s = interval_s
        self.resolver_address = resolver
        self._resolver = _make_resolver(resolver, lifetime_s)
        self.last_good: Replicas | None = None
        self.last_error: str = ""

    def __repr__(self) -> str:
        via = f" via {self.resolver_address}" if self.resolver_address else ""
        return f"SrvDiscovery({self.name}{via})"

    async def resolve(self) -> Replicas:
        """The replicas the SRV records name now; [] when DNS says there are none.
        Raises DiscoveryError when DNS gives no usable answer."""
        try:
            answer = await self._resolver.resolve(self.name, dns.rdatatype.SRV, raise_on_no_answer=True)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise DiscoveryError(f"SRV lookup of {self.name}{self._via()} failed: {_describe(exc)}") from exc

        additional = _additional_addresses(answer)
        records = [r for r in answer if r.target != dns.name.root]  # "." : service explicitly absent
        targets = sorted({r.target for r in records})
        missing = [t for t in targets if t not in additional]
        looked_up = await asyncio.gather(*(self._addresses(t) for t in missing))
        addresses = {**additional, **dict(zip(missing, looked_up, strict=True))}

        weights: dict[str, int] = {}
        for r in records:
            ips = addresses.get(r.target, [])
            if not ips:
                log.warning("SRV %s: target %s has no A/AAAA records; left out", self.name, r.target)
            for ip in ips:
                url = f"{self.scheme}://{_host(ip)}:{r.port}"
                weights[url] = max(weights.get(url, 0), r.weight or 1)
        return sorted(weights.items())

    async def watch(self, on_update: OnUpdate) -> None:
        """Re-resolve every interval_s until cancelled; call on_update(replicas) at the first
        answer and whenever the set changes. DNS failures keep the last good set (logged)."""
        while True:
            try:
                replicas = await self.resolve()
            except DiscoveryError as exc:
                self.last_error = str(exc)
                kept = "no earlier answer" if self.last_good is None else f"keeping {len(self.last_good)} replicas"
                log.warning("%s; %s", exc, kept)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let discovery die: keep the last good set
                self.last_error = f"SRV discovery of {self.name} failed: {_describe(exc)}"
                log.exception("SRV discovery of %s raised; keeping the last good set", self.name)
            else:
                self.last_error = ""
                if replicas != self.last_good:
                    log.info("SRV %s%s: %d replicas: %s", self.name, self._via(), len(replicas),
                             ", ".join(f"{u} (weight {w})" for u, w in replicas) or "none")
                    self.last_good = replicas
                    await _call(on_update, list(replicas))
            await asyncio.sleep(self.interval_s)

    # ------------------------------------------------------------------ internals

    async def _addresses(self, target: dns.name.Name) -> list[str]:
        results = await asyncio.gather(*(self._lookup(target, rtype) for rtype in ADDRESS_TYPES))
        return [ip for ips in results for ip in ips]

    async def _lookup(self, target: dns.name.Name, rtype: dns.rdatatype.RdataType) -> list[str]:
        try:
            answer = await self._resolver.resolve(target, rtype, raise_on_no_answer=True)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise DiscoveryError(f"{dns.rdatatype.to_text(rtype)} lookup of SRV target {target}"
                                 f"{self._via()} failed: {_describe(exc)}") from exc
        return [r.address for r in answer]

    def _via(self) -> str:
        return f" (via {self.resolver_address})" if self.resolver_address else ""


def _make_resolver(address: str, lifetime_s: float) -> dns.asyncresolver.Resolver:
    if not address:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration as exc:
            raise ValueError("SRV discovery: the system has no DNS resolver configured "
                             "(/etc/resolv.conf); set discover_resolver = \"HOST:PORT\"") from exc
    else:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            host, port = address, str(DEFAULT_DNS_PORT)
        host = host.strip("[]")
        ipaddress.ip_address(host)  # ValueError names a bad resolver address
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = int(port)
    resolver.lifetime = lifetime_s
    resolver.timeout = lifetime_s
    resolver.cache = None  # every watch round asks the server: changes show within one interval
    return resolver


def _additional_addresses(answer: dns.resolver.Answer) -> dict[dns.name.Name, list[str]]:
    found: dict[dns.name.Name, list[str]] = {}
    for rrset in answer.response.additional:
        if rrset.rdclass == dns.rdataclass.IN and rrset.rdtype in ADDRESS_TYPES:
            found.setdefault(rrset.name, []).extend(r.address for r in rrset)
    return found


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _describe(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.LifetimeTimeout):
        return f"timed out ({exc})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _call(callback: OnUpdate, replicas: Replicas) -> None:
    try:
        maybe = callback(replicas)
        if inspect.isawaitable(maybe):
            await maybe
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("SRV discovery on_update callback failed")
