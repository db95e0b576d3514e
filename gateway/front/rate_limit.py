"""Per-client request limits: a token bucket (rate + burst) and a concurrency limiter.

Both are plain objects for one event loop (no locks: the gateway's request path runs on one
asyncio loop per worker process; with ``--workers N`` each worker enforces its own share, so
an operator sets per-worker limits or divides by N).

Token bucket: ``rate_per_s`` tokens are added per second up to ``burst``; a request takes one.
When none is left the caller gets how long until one will be, which becomes ``Retry-After``.
Time comes from ``time.monotonic`` (never the wall clock: NTP steps must not mint tokens).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Clock = Callable[[], float]
RETRY_AFTER_MIN_S = 1  # HTTP Retry-After is whole seconds; never tell a client "0"
TOKEN_EPSILON = 1e-9  # float refill arithmetic must not refuse a token that is due


class TokenBucket:
    """``try_take()`` returns 0.0 when the request may go now, else the seconds to wait."""

    __slots__ = ("_clock", "_last_s", "_tokens", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: float | None = None, *, clock: Clock = time.monotonic) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s!r}")
        burst = max(1.0, rate_per_s if burst is None else burst)
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst  # start full: a fresh client may burst at once
        self._last_s = clock()

    def _refill(self, now_s: float) -> None:
        elapsed = now_s - self._last_s
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_s)
            self._last_s = now_s

    def try_take(self, n: float = 1.0, now_s: float | None = None) -> float:
        """Take `n` tokens if there are; otherwise take nothing and return the wait (s)."""
        now = self._clock() if now_s is None else now_s
        self._refill(now)
        if self._tokens + TOKEN_EPSILON >= n:
            self._tokens = max(0.0, self._tokens - n)
            return 0.0
        if n > self.burst:
            return math.inf  # can never be satisfied
        return (n - self._tokens) / self.rate_per_s

    def tokens(self, now_s: float | None = None) -> float:
        """Tokens available now (for status pages and tests)."""
        self._refill(self._clock() if now_s is None else now_s)
        return self._tokens

    def same_limits(self, rate_per_s: float, burst: float | None) -> bool:
        b = max(1.0, rate_per_s if burst is None else burst)
        return self.rate_per_s == float(rate_per_s) and self.burst == float(b)


class ConcurrencyLimiter:
    """At most ``limit`` requests in flight; ``try_acquire()`` then ``release()`` once."""

    __slots__ = ("in_flight", "limit")

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"limit must be > 0, got {limit!r}")
        self.limit = int(limit)
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        if self.in_flight > 0:
            self.in_flight -= 1


def retry_after_header(wait_s: float) -> str:
    """The HTTP ``Retry-After`` value (delta-seconds, rounded up, at least 1)."""
    if not math.isfinite(wait_s):
        return "3600"
    return str(max(RETRY_AFTER_MIN_S, math.ceil(wait_s)))


def format_wait(wait_s: float) -> str:
    """A wait for messages: "0.12 s"; an impossible one says so."""
    if not math.isfinite(wait_s):
        return "never (the request needs more tokens than the burst allows)"
    return f"{wait_s:.2f} s"
