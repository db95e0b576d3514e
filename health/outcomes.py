"""What happened to one request sent to a replica, in the terms routing and health care about.

Both the retry policy (is it safe and useful to try another replica?) and passive outlier
detection (does this count against the replica?) read the same classification, so HTTP statuses
and gRPC codes are mapped once, here.

Failure attribution: only what the replica caused counts against it (refused or reset
connections, its 5xx / UNAVAILABLE, no answer within the gateway's OWN per-try timeout or
default deadline). What the client caused says nothing about the replica and is neither a
failure nor retryable: a deadline the client chose that ran out (``DEADLINE_CLIENT``: the
attempt's limit was the client's remaining time, shorter than the gateway's own), an attempt
cancelled by the client or by the gateway itself (``CANCELLED``: the client went away, a hedge
lost its race), a request refused as malformed (``CLIENT_ERROR``). Otherwise one client with
`geogate-timeout-ms: 0.15` could eject every replica and take its region out of GeoDNS.
"""

from __future__ import annotations

import enum

import grpc


class Outcome(enum.Enum):
    SUCCESS = "success"
    CONNECT_FAILURE = "connect_failure"  # could not open a connection: nothing was sent
    RESET = "reset"  # the connection died mid-request
    TIMEOUT = "timeout"  # no answer within the per-try timeout
    UNAVAILABLE = "unavailable"  # HTTP 503 / gRPC UNAVAILABLE: the replica says "not now"
    SERVER_ERROR = "server_error"  # other 5xx / INTERNAL / UNKNOWN ...: the replica failed
    CLIENT_ERROR = "client_error"  # 4xx / INVALID_ARGUMENT / NOT_FOUND ...: the request's fault
    DEADLINE_CLIENT = "deadline_client"  # the client's own (shorter) deadline ran out first
    CANCELLED = "cancelled"  # the client cancelled, or the gateway did (a losing hedge)

    # Members are singletons compared by identity; Enum's own __hash__ is Python code run on
    # every set and dict lookup of the hot path (several per request).
    __hash__ = object.__hash__

    @property
    def retryable(self) -> bool:
        """Another replica may well succeed (inference requests are idempotent)."""
        return self in _RETRYABLE

    @property
    def is_failure(self) -> bool:
        """Counts against the replica (passive outlier detection). What the client caused never does."""
        return self not in _NOT_FAILURES

    @property
    def no_verdict(self) -> bool:
        """The replica neither failed nor answered: its failure streak is left as it was."""
        return self in _CLIENT_CAUSED_NO_ANSWER


_RETRYABLE = frozenset({Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT, Outcome.UNAVAILABLE})
_CLIENT_CAUSED_NO_ANSWER = frozenset({Outcome.DEADLINE_CLIENT, Outcome.CANCELLED})
_NOT_FAILURES = frozenset({Outcome.SUCCESS, Outcome.CLIENT_ERROR}) | _CLIENT_CAUSED_NO_ANSWER

HTTP_SERVICE_UNAVAILABLE = 503
HTTP_GATEWAY_TIMEOUT = 504
HTTP_REQUEST_TIMEOUT = 408
HTTP_TOO_MANY_REQUESTS = 429


def classify_http_status(status: int) -> Outcome:
    """An upstream HTTP status as an Outcome.

    429 is treated like 503 (the replica is overloaded, another one may have room), 408/504 as a
    timeout; every other 4xx is the request's fault.
    """
    if 200 <= status < 400:
        return Outcome.SUCCESS
    if status in (HTTP_SERVICE_UNAVAILABLE, HTTP_TOO_MANY_REQUESTS):
        return Outcome.UNAVAILABLE
    if status in (HTTP_GATEWAY_TIMEOUT, HTTP_REQUEST_TIMEOUT):
        return Outcome.TIMEOUT
    if 400 <= status < 500:
        return Outcome.CLIENT_ERROR
    return Outcome.SERVER_ERROR


_GRPC_CODES: dict[grpc.StatusCode, Outcome] = {
    grpc.StatusCode.OK: Outcome.SUCCESS,
    grpc.StatusCode.UNAVAILABLE: Outcome.UNAVAILABLE,
    # The replica is out of capacity: like HTTP 429, try elsewhere.
    grpc.StatusCode.RESOURCE_EXHAUSTED: Outcome.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Outcome.TIMEOUT,
    grpc.StatusCode.INTERNAL: Outcome.SERVER_ERROR,
    grpc.StatusCode.UNKNOWN: Outcome.SERVER_ERROR,
    grpc.StatusCode.DATA_LOSS: Outcome.SERVER_ERROR,
    grpc.StatusCode.UNIMPLEMENTED: Outcome.CLIENT_ERROR,
    grpc.StatusCode.INVALID_ARGUMENT: Outcome.CLIENT_ERROR,
    grpc.StatusCode.NOT_FOUND: Outcome.CLIENT_ERROR,
    grpc.StatusCode.ALREADY_EXISTS: Outcome.CLIENT_ERROR,
    grpc.StatusCode.PERMISSION_DENIED: Outcome.CLIENT_ERROR,
    grpc.StatusCode.UNAUTHENTICATED: Outcome.CLIENT_ERROR,
    grpc.StatusCode.FAILED_PRECONDITION: Outcome.CLIENT_ERROR,
    grpc.StatusCode.OUT_OF_RANGE: Outcome.CLIENT_ERROR,
    # The client cancelled: not the replica's fault.
    grpc.StatusCode.CANCELLED: Outcome.CLIENT_ERROR,
    grpc.StatusCode.ABORTED: Outcome.SERVER_ERROR,
}


def classify_grpc_code(code: grpc.StatusCode) -> Outcome:
    """An upstream gRPC status code as an Outcome (unknown codes count as server errors)."""
    return _GRPC_CODES.get(code, Outcome.SERVER_ERROR)
