"""One JSON log line format for every geogate process (gateway, replica, sync agent, DNS
responder, autoscaler), and the setup that installs it on the root logger.

A line is one JSON object: ``ts`` (Unix seconds), ``level``, ``logger``, ``msg``, then what the
caller attached: ``extra={"audit": {...}}`` (the admin API's who-did-what record) under
``audit``, the keys of ``extra={"fields": {...}}`` (request ids, model names...) at top level,
and ``exc`` (the formatted traceback) when there is one.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import orjson

_DUMP_OPTIONS = orjson.OPT_NON_STR_KEYS  # fields may carry dicts keyed by ints (status counts)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; ``ts_digits``: decimals kept of the timestamp."""

    def __init__(self, ts_digits: int = 3) -> None:
        super().__init__()
        self.ts_digits = ts_digits

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, self.ts_digits), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        audit = getattr(record, "audit", None)
        if audit is not None:
            entry["audit"] = audit
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str, option=_DUMP_OPTIONS).decode()


def setup_logging(level: str | int = "info", *, ts_digits: int = 3, stream: TextIO | None = None) -> logging.Handler:
    """Make the root logger write JSON lines to ``stream`` (default stderr) at ``level``,
    replacing any handler already there; returns the handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(ts_digits))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
