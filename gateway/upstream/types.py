"""What travels between the fronts, the forwarder and the upstream clients: one inference call
(in the client's protocol) and one reply. The HTTP status <-> gRPC code mapping is core.kserve's."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from gateway.upstream.proto_peek import InferRequestPeek
from health.outcomes import Outcome

PROTOCOL_HTTP = "http"
PROTOCOL_GRPC = "grpc"


@dataclass(frozen=True, slots=True)
class SequenceParams:
    """Triton's sequence parameters of one request (gateway.routing.sequences reads them):
    ``sequence_id`` (an unsigned integer or a non-empty string), ``sequence_start`` and
    ``sequence_end``; ``error`` says why they are malformed (answered 400 / INVALID_ARGUMENT)."""

    id: int | str
    start: bool = False
    end: bool = False
    error: str = ""


@dataclass(slots=True)
class InferCall:
    protocol: str  # the CLIENT's protocol: "http" | "grpc"
    model: str
    requested_version: str | None  # what the client asked for
    version: str | None  # what the resolver chose (None: replica default)
    request_id: str
    deadline_s: float  # monotonic
    hops: int = 0
    # The client chose deadline_s (its timeout was shorter than the gateway's default): running
    # out of it is the client's doing, never the replica's (gateway.front.deadline.Deadline.client).
    client_deadline: bool = False
    started_s: float = 0.0  # monotonic arrival time: the deadline's budget is deadline_s - started_s
    # Who asked (for nearest-to-client routing): the socket peer and X-Forwarded-For as received.
    client_ip: str = ""
    forwarded_for: str | None = None
    # Priority class as the client sent it (geogate-priority header / metadata; "" if none) and
    # the default of the caller's API key (None: no key or no default).
    priority: str = ""
    key_priority: str | None = None
    # HTTP form: the body exactly as received, and its parsed JSON header
    body: bytes = b""
    header: dict | None = None
    header_len: str | None = None  # Inference-Header-Content-Length, as received
    content_encoding: str | None = None
    accept_encoding: str | None = None
    # gRPC form: the serialized ModelInferRequest and what proto_peek read from it
    raw: bytes = b""
    peek: InferRequestPeek | None = None
    # A stateful model's sequence (sequence_id non-zero / non-empty); None: not part of one.
    sequence: SequenceParams | None = None


@dataclass(slots=True)
class Reply:
    outcome: Outcome
    http_status: int = 200
    grpc_code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""  # the error text, for non-success replies
    body: bytes = b""  # HTTP body, or serialized ModelInferResponse for gRPC calls
    header_len: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    model_version: str = ""
    # Set when a peer gateway served the request: where, as the peer's response headers said.
    region: str = ""
    replica: str = ""
    # Seconds for a Retry-After header / retry-after trailer (shed or rate-limited answers).
    retry_after_s: int = 0


# Enum properties and `.value` go through descriptors (about a microsecond each in 3.11):
# plain lookups for the hot path.
OUTCOME_NAME: dict[Outcome, str] = {o: o.value for o in Outcome}
RETRYABLE: frozenset[Outcome] = frozenset(o for o in Outcome if o.retryable)
FAILURES: frozenset[Outcome] = frozenset(o for o in Outcome if o.is_failure)
NO_VERDICT: frozenset[Outcome] = frozenset(o for o in Outcome if o.no_verdict)
