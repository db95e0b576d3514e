"""KServe v2 / geogate wire constants, defined once: header names and the HTTP status <-> gRPC
code mapping used wherever an answer crosses protocols (gateway fronts and upstream clients,
the replica's gRPC server, the loadtest clients).

The status mapping follows Triton where geogate's former tables disagreed: Triton answers a
client's mistake with HTTP 400 on its HTTP endpoint and INVALID_ARGUMENT on gRPC
(``HttpCodeFromError`` in http_server.cc, ``TritonCodeToGrpcCode`` in grpc_utils.cc), so an
unlisted 4xx maps to INVALID_ARGUMENT (the replica's table said UNKNOWN), anything else to INTERNAL.
"""

from __future__ import annotations

import grpc

# ---------------------------------------------------------------- header names
# HTTP header names; gRPC metadata keys are their lower-case forms.

HEADER_LENGTH = "Inference-Header-Content-Length"  # KServe v2 binary extension: JSON header length
HEADER_LENGTH_LC = HEADER_LENGTH.lower()
REGION_HEADER = "geogate-region"  # the region that served the request
REPLICA_HEADER = "geogate-replica"  # the replica that served it
MODEL_VERSION_HEADER = "geogate-model-version"  # the model version that answered
ATTEMPTS_HEADER = "geogate-attempts"  # upstream attempts the gateway made
HOPS_HEADER = "geogate-hops"  # gateway-to-gateway forwards so far (loop guard)
PRIORITY_HEADER = "geogate-priority"  # critical | standard | sheddable
TIMEOUT_HEADER = "geogate-timeout-ms"  # the client's deadline
REQUEST_ID_HEADER = "x-request-id"
GEOGATE_REQUEST_ID_HEADER = "geogate-request-id"
REQUEST_ID_HEADERS = (GEOGATE_REQUEST_ID_HEADER, REQUEST_ID_HEADER)  # in order of preference
AUTHORIZATION_HEADER = "authorization"
API_KEY_HEADER = "x-api-key"

# ---------------------------------------------------------------- HTTP status <-> gRPC code

HTTP_TO_GRPC: dict[int, grpc.StatusCode] = {
    200: grpc.StatusCode.OK,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,  # nginx's "client closed request"
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# The reverse. UNKNOWN (what grpc.aio answers when a servicer raises unexpectedly) and every
# unlisted code are the server's fault: 500.
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_to_grpc(status: int) -> grpc.StatusCode:
    """The gRPC code for an HTTP status (unlisted: 4xx INVALID_ARGUMENT, anything else INTERNAL:
    a 3xx or 5xx that reaches here is an upstream misbehaving)."""
    code = HTTP_TO_GRPC.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL


def grpc_to_http(code: grpc.StatusCode) -> int:
    """The HTTP status for a gRPC code (unlisted: 500)."""
    return GRPC_TO_HTTP.get(code, 500)
