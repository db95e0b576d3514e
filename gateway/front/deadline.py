"""Client deadlines: one absolute time (monotonic seconds) that bounds every attempt together.

Sources, first found wins:
- HTTP: the ``geogate-timeout-ms`` header, then Triton's ``timeout`` request parameter in the
  JSON header (microseconds, Triton semantics: 0 means none);
- gRPC: the call's deadline (``context.time_remaining()``), then the ``timeout`` parameter;
- otherwise ``[gateway] default_timeout_ms``.
A client cannot extend the gateway's default: the smaller of the two is used.

Every value a client sends is parsed strictly: ASCII digits only (Python's float()/int() also
read fullwidth and Arabic-Indic digits), finite, positive (the parameter may be 0: "none") and at most
MAX_TIMEOUT_MS; anything else is a DeadlineError (400 / INVALID_ARGUMENT) naming the header or
parameter. A NaN deadline once reached the upstream client's timer and leaked its connection.

``Deadline.client`` says whether the CLIENT chose the binding limit (its timeout is shorter than
the gateway's default): an attempt that runs out of such a deadline says nothing about the
replica (health.outcomes.Outcome.DEADLINE_CLIENT), so one client's short deadlines can never
eject a replica or take a region out of DNS.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from core.kserve import TIMEOUT_HEADER

TIMEOUT_PARAMETER = "timeout"  # microseconds
US_PER_S = 1_000_000
MS_PER_S = 1000.0
MAX_TIMEOUT_MS = 86_400_000  # a day: anything longer is a mistake, not a deadline
MAX_TIMEOUT_US = MAX_TIMEOUT_MS * 1000
# Plain ASCII decimal milliseconds: "250", "0.15", "1e3". [0-9] (not \d) keeps other scripts' digits out.
_MS_TEXT = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")
MAX_HEADER_CHARS = 32


class DeadlineError(ValueError):
    """A malformed timeout from the client (a 400 / INVALID_ARGUMENT)."""


class Deadline(NamedTuple):
    at_s: float  # time.monotonic() seconds
    client: bool  # the client's own timeout (shorter than the gateway's default) is the limit


def parse_timeout_header_ms(value: str) -> float:
    """Milliseconds of a ``geogate-timeout-ms`` value; DeadlineError unless it is a finite ASCII
    number in (0, MAX_TIMEOUT_MS]."""
    if len(value) > MAX_HEADER_CHARS or not _MS_TEXT.fullmatch(value):
        raise DeadlineError(f"header {TIMEOUT_HEADER} must be a positive number of milliseconds "
                            f"(ASCII digits, e.g. 250 or 0.5), got {value[:MAX_HEADER_CHARS]!r}")
    ms = float(value)
    if not math.isfinite(ms) or ms > MAX_TIMEOUT_MS:
        raise DeadlineError(f"header {TIMEOUT_HEADER} must be at most {MAX_TIMEOUT_MS} ms (a day), "
                            f"got {value!r}")
    if ms <= 0:
        raise DeadlineError(f"header {TIMEOUT_HEADER} must be > 0, got {value!r}")
    return ms


def parse_timeout_parameter_us(value: object) -> int:
    """Microseconds of Triton's ``timeout`` request parameter (0: no timeout); DeadlineError
    unless it is an integer in [0, MAX_TIMEOUT_US]."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # JSON 1e6 / 5000000.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise DeadlineError(f"request parameter '{TIMEOUT_PARAMETER}' must be an integer number of "
                            f"microseconds, got {value!r}")
    if value < 0 or value > MAX_TIMEOUT_US:
        raise DeadlineError(f"request parameter '{TIMEOUT_PARAMETER}' must be 0 (none) to {MAX_TIMEOUT_US} "
                            f"microseconds (a day), got {value}")
    return value


def _bounded(now_s: float, timeout_s: float, default_timeout_ms: int) -> Deadline:
    default_s = default_timeout_ms / MS_PER_S
    if timeout_s < default_s:
        return Deadline(now_s + timeout_s, True)
    return Deadline(now_s + default_s, False)


def _default(now_s: float, default_timeout_ms: int) -> Deadline:
    return Deadline(now_s + default_timeout_ms / MS_PER_S, False)


def http_deadline(now_s: float, header_value: str | None, timeout_parameter_us: object,
                  default_timeout_ms: int) -> Deadline:
    """The deadline of an HTTP request. `timeout_parameter_us`: the JSON header's
    ``parameters.timeout`` (None when absent; checked even when the header wins)."""
    us = parse_timeout_parameter_us(timeout_parameter_us) if timeout_parameter_us is not None else 0
    if header_value is not None:
        return _bounded(now_s, parse_timeout_header_ms(header_value) / MS_PER_S, default_timeout_ms)
    if us > 0:  # Triton: 0 means no timeout
        return _bounded(now_s, us / US_PER_S, default_timeout_ms)
    return _default(now_s, default_timeout_ms)


def grpc_deadline(now_s: float, time_remaining_s: float | None, timeout_parameter_us: int | None,
                  default_timeout_ms: int) -> Deadline:
    """The deadline of a gRPC call: its own deadline (grpc gives a finite float or None), else
    the ``timeout`` parameter (checked even when the call's deadline wins)."""
    us = parse_timeout_parameter_us(timeout_parameter_us) if timeout_parameter_us is not None else 0
    if time_remaining_s is not None and math.isfinite(time_remaining_s):
        return _bounded(now_s, max(0.0, time_remaining_s), default_timeout_ms)
    if us > 0:
        return _bounded(now_s, us / US_PER_S, default_timeout_ms)
    return _default(now_s, default_timeout_ms)
