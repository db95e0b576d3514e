"""HTTP/1.1 bytes of the replica's fast inference path (``http_fast``): which request targets
it serves (``infer_target``), status lines, the cached Date header, and complete error answers
written outside any handler."""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

import orjson

# model and version names the fast path takes; others (percent-encoding, ...) go to aiohttp
_NAME_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
_INFER_PREFIX, _INFER_SUFFIX = b"/v2/models/", b"/infer"
JSON = "application/json"


class DateCache:
    """The Date header, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


DATE = DateCache()


def status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


STATUS_LINES = {s: status_line(s) for s in (200, 400, 404, 408, 413, 415, 500, 503)}


def error_bytes(status: int, message: str, *, close: bool = False) -> bytes:
    """A complete JSON error answer, for refusals written outside any handler."""
    body = orjson.dumps({"error": message})
    return b"".join([STATUS_LINES.get(status) or status_line(status), b"Content-Type: application/json\r\n",
                     b"Content-Length: ", str(len(body)).encode(), b"\r\nDate: ", DATE.get(), b"\r\n",
                     b"Connection: close\r\n" if close else b"", b"\r\n", body])


def infer_target(url: bytes) -> tuple[str, str] | None:
    """(model, version or "") when `url` is an inference path the fast path takes, else None."""
    if not url.startswith(_INFER_PREFIX) or not url.endswith(_INFER_SUFFIX):
        return None
    parts = url[len(_INFER_PREFIX):-len(_INFER_SUFFIX)].split(b"/")
    if len(parts) == 1:
        model, version = parts[0], b""
    elif len(parts) == 3 and parts[1] == b"versions" and parts[2]:
        model, version = parts[0], parts[2]
    else:
        return None
    if not model or model.translate(None, _NAME_BYTES) or version.translate(None, _NAME_BYTES):
        return None
    return model.decode(), version.decode()
