"""Errors a replica answers with; the HTTP status picks the gRPC code (core.kserve, as Triton does)."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from core.kserve import http_to_grpc

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
        return http_to_grpc(self.http_status)

    @property
    def outcome(self) -> str:
        return OUTCOME_BY_STATUS.get(self.http_status, "error")


def invalid(message: str) -> InferError:
    return InferError(400, message)


def not_found(message: str) -> InferError:
    return InferError(404, message)


def unavailable(message: str) -> InferError:
    return InferError(503, message)


def too_large(message: str) -> InferError:
    return InferError(413, message)


class LogLimiter:
    """Rate limit for log lines a client can cause (malformed requests, refusals): at most
    `lines_per_interval` lines per `interval_s`; the first line after a suppressed spell says how
    many were dropped (`suppressed`). One hostile client cannot flood the log or its disk."""

    def __init__(self, logger: logging.Logger, *, lines_per_interval: int = 10, interval_s: float = 10.0):
        self.logger = logger
        self.lines_per_interval = lines_per_interval
        self.interval_s = interval_s
        self._window_start_s = -1e18
        self._lines = 0
        self._suppressed = 0

    def log(self, level: int, msg: str, fields: dict[str, Any], *, exc_info: Any = None) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now_s = time.monotonic()
        if now_s - self._window_start_s >= self.interval_s:
            self._window_start_s = now_s
            self._lines = 0
        if self._lines >= self.lines_per_interval:
            self._suppressed += 1
            return
        self._lines += 1
        if self._suppressed:
            fields = {**fields, "suppressed": self._suppressed}
            self._suppressed = 0
        self.logger.log(level, msg, extra={"fields": fields}, exc_info=exc_info)

    def warning(self, msg: str, fields: dict[str, Any]) -> None:
        self.log(logging.WARNING, msg, fields)


def one_line(text: str, max_chars: int = 300) -> str:
    """An error text as one log-friendly line of bounded length (parser messages span lines and
    quote the client's bytes)."""
    line = " ".join(text.split())
    return line if len(line) <= max_chars else line[:max_chars] + "..."
