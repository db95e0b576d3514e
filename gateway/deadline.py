"""Client deadlines: one absolute time (monotonic seconds) that bounds every attempt together.

Sources, first found wins:
- HTTP: the ``geogate-timeout-ms`` header, then Triton's ``timeout`` request parameter in the
  JSON header (microseconds, Triton semantics);
- gRPC: the call's deadline (``context.time_remaining()``), then the ``timeout`` parameter;
- otherwise ``[gateway] default_timeout_ms``.
A client cannot extend the gateway's default: the smaller of the two is used.
"""

from __future__ import annotations

import time

TIMEOUT_HEADER = "geogate-timeout-ms"
TIMEOUT_PARAMETER = "timeout"  # microseconds
US_PER_S = 1_000_000
MS_PER_S = 1000.0


class DeadlineError(ValueError):
    """A malformed timeout from the client (a 400 / INVALID_ARGUMENT)."""


def _bounded(now_s: float, timeout_s: float, default_timeout_ms: int) -> float:
    return now_s + min(timeout_s, default_timeout_ms / MS_PER_S)


def http_deadline(now_s: float, header_value: str | None, timeout_parameter_us: object,
                  default_timeout_ms: int) -> float:
    """The deadline of an HTTP request (monotonic seconds)."""
    if header_value:
        try:
            ms = float(header_value)
        except ValueError:
            raise DeadlineError(f"header {TIMEOUT_HEADER} must be a number of milliseconds, "
                                f"got {header_value!r}") from None
        if ms <= 0:
            raise DeadlineError(f"header {TIMEOUT_HEADER} must be > 0, got {header_value!r}")
        return _bounded(now_s, ms / MS_PER_S, default_timeout_ms)
    if timeout_parameter_us is not None:
        if isinstance(timeout_parameter_us, bool) or not isinstance(timeout_parameter_us, int | float):
            raise DeadlineError(f"request parameter 'timeout' must be an integer number of microseconds, "
                                f"got {timeout_parameter_us!r}")
        if timeout_parameter_us > 0:  # Triton: 0 means no timeout
            return _bounded(now_s, timeout_parameter_us / US_PER_S, default_timeout_ms)
    return now_s + default_timeout_ms / MS_PER_S


def grpc_deadline(now_s: float, time_remaining_s: float | None, timeout_parameter_us: int | None,
                  default_timeout_ms: int) -> float:
    """The deadline of a gRPC call (monotonic seconds)."""
    if time_remaining_s is not None:
        return _bounded(now_s, max(0.0, time_remaining_s), default_timeout_ms)
    if timeout_parameter_us:
        return _bounded(now_s, timeout_parameter_us / US_PER_S, default_timeout_ms)
    return now_s + default_timeout_ms / MS_PER_S


def remaining_s(deadline_s: float) -> float:
    return deadline_s - time.monotonic()
