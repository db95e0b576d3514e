"""Errors a replica answers with, and how each maps to HTTP status and gRPC code (as Triton does)."""

from __future__ import annotations

import grpc

HTTP_STATUS_TO_GRPC: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Prometheus `outcome` label per HTTP status class.
OUTCOME_BY_STATUS: dict[int, str] = {400: "invalid", 404: "not_found", 413: "too_large", 503: "unavailable"}


class InferError(Exception):
    """A request we refuse or fail; `http_status` picks both the HTTP status and the gRPC code."""

    def __init__(self, http_status: int, message: str):
        super().__init__(message)
        self.http_status = http_status
        self.message = message

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return HTTP_STATUS_TO_GRPC.get(self.http_status, grpc.StatusCode.UNKNOWN if self.http_status < 500
                                       else grpc.StatusCode.INTERNAL)

    @property
    def outcome(self) -> str:
        return OUTCOME_BY_STATUS.get(self.http_status, "error")


def invalid(message: str) -> InferError:
    return InferError(400, message)


def not_found(message: str) -> InferError:
    return InferError(404, message)


def unavailable(message: str) -> InferError:
    return InferError(503, message)
