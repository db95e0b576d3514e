"""Response rate limiting for `geogate dns` over UDP, in the manner of BIND's RRL.

A token bucket per source prefix (``/24`` of an IPv4 source, ``/56`` of an IPv6 one, both
configurable): ``rate`` responses per second, with a burst of one second's worth.  A source
over its limit gets nothing for most queries and, every ``slip``-th time, a truncated reply
(TC=1, no answer) so that a real client whose address a flood is spoofing can still retry over
TCP, which is not rate limited.  The check runs on the source address alone, before the query
is parsed, so a flooding source costs a dict lookup per packet rather than a parse and an
answer.

Bounded memory: at most ``max_sources`` prefixes are tracked, least recently seen first out
(an ``OrderedDict`` used as an LRU); a prefix idle long enough for its bucket to be full again
is forgotten (it would start full anyway).  Evicting a busy prefix under a flood of spoofed
sources only resets its bucket: the cost is answering it again up to its burst.

Differences from BIND, on purpose: the account is the source prefix, not the (prefix, name,
response) tuple, since this server answers a handful of names; there is no ``window`` of
remembered debt (a source over the limit gets exactly ``rate`` answers per second).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections import OrderedDict

log = logging.getLogger("geogate.dns")

ALLOW = 0
SLIP = 1
DROP = 2

_V6_KEY_BIT = 1 << 129  # IPv6 prefixes are told apart from IPv4 ones in one table of ints
_FORGET_AFTER_REFILL_S = 1.0  # a prefix is forgotten this long after its bucket filled up again
_EXPIRE_PER_CHECK = 2  # stale entries dropped per check (amortized expiry with no timer)
_LOG_INTERVAL_S = 1.0  # at most one "rate limiting" line per second


class _Bucket:
    __slots__ = ("last_s", "over", "tokens")

    def __init__(self, tokens: float, now_s: float):
        self.tokens = tokens
        self.last_s = now_s
        self.over = 0  # responses refused since the prefix was first over its limit


class ResponseRateLimiter:
    """``check(source_ip)`` -> ALLOW, SLIP or DROP; counts what it refused."""

    def __init__(self, *, responses_per_s: int, slip: int, ipv4_prefix_len: int, ipv6_prefix_len: int,
                 max_sources: int, clock=time.monotonic):
        if responses_per_s <= 0:
            raise ValueError("responses_per_s must be > 0 (0 means no limiter: do not build one)")
        self.rate = float(responses_per_s)
        self.burst = float(responses_per_s)
        self.slip = slip
        self.ipv4_prefix_len = ipv4_prefix_len
        self.ipv6_prefix_len = ipv6_prefix_len
        self._v4_shift = 32 - ipv4_prefix_len
        self._v6_shift = 128 - ipv6_prefix_len
        self.max_sources = max_sources
        self.expire_s = self.burst / self.rate + _FORGET_AFTER_REFILL_S
        self._clock = clock
        self._table: OrderedDict[int, _Bucket] = OrderedDict()
        # Counters read by the metrics endpoint (plain ints: this is the flood path).
        self.dropped = 0
        self.slipped = 0
        self.evicted = 0
        self.limited_sources = 0  # prefixes that went over their limit
        self._next_log_s = 0.0
        self._unlogged = 0

    @property
    def sources(self) -> int:
        """Source prefixes tracked now."""
        return len(self._table)

    def _key(self, source_ip: str) -> int | None:
        try:
            if ":" not in source_ip:
                return int.from_bytes(socket.inet_aton(source_ip), "big") >> self._v4_shift
            n = int.from_bytes(socket.inet_pton(socket.AF_INET6, source_ip.partition("%")[0]), "big")
        except OSError:
            return None  # not an IP address (a test's fake source): nothing to account it to
        if n >> 32 == 0xFFFF:  # IPv4-mapped (a dual-stack socket): account it as the IPv4 source
            return (n & 0xFFFFFFFF) >> self._v4_shift
        return _V6_KEY_BIT | (n >> self._v6_shift)

    def prefix_text(self, key: int) -> str:
        """The source prefix a table key stands for, for logs: ``192.0.2.0/24``."""
        if key & _V6_KEY_BIT:
            return str(ipaddress.IPv6Network(((key ^ _V6_KEY_BIT) << self._v6_shift, self.ipv6_prefix_len)))
        return str(ipaddress.IPv4Network((key << self._v4_shift, self.ipv4_prefix_len)))

    def check(self, source_ip: str) -> int:
        key = self._key(source_ip)
        if key is None:
            return ALLOW
        now = self._clock()
        table = self._table
        bucket = table.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = table[key] = _Bucket(self.burst, now)
        else:
            table.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.last_s) * self.rate)
            bucket.last_s = now
            self._expire(now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return ALLOW
        bucket.over += 1
        if bucket.over == 1:
            self.limited_sources += 1
            self._log_limited(key, now)
        if self.slip and bucket.over % self.slip == 0:
            self.slipped += 1
            return SLIP
        self.dropped += 1
        return DROP

    def _expire(self, now: float) -> None:
        table = self._table
        for _ in range(_EXPIRE_PER_CHECK):
            if not table:
                return
            oldest = next(iter(table.values()))
            if now - oldest.last_s < self.expire_s:
                return
            table.popitem(last=False)

    def _make_room(self, now: float) -> None:
        self._expire(now)
        table = self._table
        while len(table) >= self.max_sources:
            table.popitem(last=False)  # the least recently seen prefix, even if still counting
            self.evicted += 1

    def _log_limited(self, key: int, now: float) -> None:
        # A flood of spoofed sources must not become a flood of log lines.
        if now < self._next_log_s:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more prefixes since the last line)" if self._unlogged else ""
        slip = f"1 in {self.slip} of the responses over it sent truncated (TC=1), the others dropped" \
            if self.slip else "responses over it dropped"
        log.warning("rate limiting UDP responses to %s: over %d responses/s; %s%s", self.prefix_text(key),
                    int(self.rate), slip, more)
        self._next_log_s = now + _LOG_INTERVAL_S
        self._unlogged = 0
