"""core.logs: the one JSON line format and its setup."""

import io
import json
import logging

import pytest

from core.logs import JsonFormatter, setup_logging


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    yield root
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_object_per_line_with_fields_audit_and_exception(root_logger):
    out = io.StringIO()
    setup_logging("debug", stream=out)
    log = logging.getLogger("geogate.test")
    log.info("loaded %s", "demo", extra={"fields": {"model": "demo", "request_id": "r1", "counts": {200: 3}}})
    log.warning("released", extra={"audit": {"who": "alice", "action": "promote"}})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second, third = _lines(out)
    assert first["msg"] == "loaded demo" and first["level"] == "info" and first["logger"] == "geogate.test"
    assert first["model"] == "demo" and first["request_id"] == "r1" and first["counts"] == {"200": 3}
    assert "audit" not in first and "exc" not in first
    assert second["audit"] == {"who": "alice", "action": "promote"}
    assert third["level"] == "error" and "ValueError: boom" in third["exc"]


def test_level_and_replaced_handlers(root_logger):
    root_logger.addHandler(logging.StreamHandler(io.StringIO()))
    out = io.StringIO()
    handler = setup_logging("warning", stream=out)
    assert root_logger.handlers == [handler] and root_logger.level == logging.WARNING
    logging.getLogger("geogate.test").info("not shown")
    logging.getLogger("geogate.test").warning("shown")
    assert [e["msg"] for e in _lines(out)] == ["shown"]


def test_timestamp_digits_and_unserialisable_values():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created = 1700000000.1234567
    record.fields = {"obj": object()}
    entry = json.loads(JsonFormatter(ts_digits=6).format(record))
    assert entry["ts"] == 1700000000.123457
    assert entry["obj"].startswith("<object object")
    assert json.loads(JsonFormatter().format(record))["ts"] == 1700000000.123
