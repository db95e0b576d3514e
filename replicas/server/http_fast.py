"""A lean HTTP/1.1 path for inference requests, in front of aiohttp on the same port.

aiohttp costs about 30 us of event-loop CPU per request here (parser objects, Request and
Response objects, a task per request, routing), as much as the rest of the replica's work per
inference; on a 2-core machine that CPU is taken from the model. Every connection therefore
starts on `FastInferProtocol`, which serves the one hot request shape itself:

    POST /v2/models/{model}[/versions/{version}]/infer HTTP/1.1, with a Content-Length body
    (Content-Encoding identity, gzip or deflate; no Transfer-Encoding, Expect, Upgrade or
    Connection: close)

with the same inference code, answers and headers as the aiohttp handler.

Parsing: every byte goes through llhttp (httptools) in its strict default mode, the parser
aiohttp itself uses for requests; nothing of the head is parsed by hand. Whatever llhttp rejects
(bare LF line ends, CR/NUL/control bytes in header values, invalid header-name characters, bad
chunk sizes, Content-Length with Transfer-Encoding, duplicate Content-Length, ...) is answered
400 with `{"error"}` and the connection is closed: the bytes after it are never read as another
request, so a proxy in front cannot be made to see different request boundaries than we do.

The first request of any other shape (another path or method, HTTP/1.0, chunked bodies, an
unusual head) hands the connection over to aiohttp, starting with that request's first byte:
from then on aiohttp serves that connection, and a second llhttp parser only watches when each
request head starts and ends (the head timeout). Requests on one connection are answered in
order (a pipelined request waits until the previous answer is written).

Limits, on both paths: a request head must be complete within `head_timeout_s` of its first
byte, for every request of a connection (408 and close); idle keep-alive connections close
after KEEPALIVE_TIMEOUT_S; an inference body over `max_body_bytes` gets 413 (a Content-Length
over it before any body byte is read, then close); gzip/deflate bodies are inflated in bounded
steps (`Inflater`) and refused with 413 the moment the output passes the limit.

Framing: llhttp does not say where in its input a request ended, and a hand-over needs the raw
bytes of the request it hands over. So only the current request head's raw bytes are kept, and
when a hot request's head is complete its length is found as the first CRLF CRLF: llhttp in
strict mode rejects a lone CR or LF in a head, so a head it accepted has no earlier one. Its body
is then exactly Content-Length bytes (llhttp checked that the request has no other framing).

This module is the connection protocol (llhttp callbacks, queueing, answering, hand-over, timeouts);
``http_fast_server`` is the listener that starts connections on it and owns aiohttp's server,
``http_wire`` the answer bytes and hot-path targets, ``http_bodies`` body codings and inflation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools
import orjson
from aiohttp.tcp_helpers import tcp_nodelay

from replicas.server.http_bodies import content_coding, inflate
from replicas.server.http_wire import DATE, JSON, STATUS_LINES, error_bytes, infer_target, status_line
from replicas.server.infer_errors import InferError, LogLimiter, one_line

if TYPE_CHECKING:
    from replicas.server.http_fast_server import FastPathServer

log = logging.getLogger("geogate.replica.http")

MAX_HEAD_BYTES = 8192  # a longer head is not the hot path: aiohttp applies its own limits
KEEPALIVE_TIMEOUT_S = 75.0
DEFAULT_HEAD_TIMEOUT_S = 10.0
PAUSE_READING_BYTES = 1 << 20  # a client pipelining this much waits for our answers
# After a refusal that closes (400, 408, 413): how long what the client still sends is read and
# dropped before the close, so that our answer is not lost to a TCP reset (aiohttp's
# "lingering close", bounded).
LINGER_S = 2.0
_REFUSED_HEADERS = frozenset((b"transfer-encoding", b"expect", b"upgrade"))
HEAD_TIMEOUT_MESSAGE = "request head not received within {s:g} s of its first byte (--request-head-timeout-s)"


malformed_log = LogLimiter(log)


class _HandOver(Exception):
    """Raised from a parser callback: stop parsing, aiohttp takes the connection from here."""


class _Refuse(Exception):
    """Raised from a parser callback: stop parsing, answer `status` and close after the answers
    already queued."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _Message:
    """One request as llhttp reports it, until it is complete (per-request state)."""

    __slots__ = ("body", "coding", "content_length", "header_length", "hot", "request_id", "target", "url",
                 "x_request_id")

    def __init__(self) -> None:
        self.url = b""
        self.content_length = -1
        self.header_length: bytes | None = None
        self.request_id = b""
        self.x_request_id = b""
        self.coding: bytes | None = None
        self.hot = True
        self.target: tuple[str, str] = ("", "")
        self.body: list[bytes] = []


class _HeadWatch:
    """After a hand-over: an llhttp parser that only notes when each request head starts and
    ends, for the head timeout. What it rejects, aiohttp's own (strict) llhttp answers."""

    __slots__ = ("parser", "since")

    def __init__(self) -> None:
        self.since = -1.0
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.since = time.monotonic()

    def on_headers_complete(self) -> None:
        self.since = -1.0

    def feed(self, data: bytes) -> None:
        if self.parser is None:
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.parser = None  # aiohttp answers it (and closes); nothing left to time
            self.since = -1.0


class FastInferProtocol(asyncio.Protocol):
    """One client connection: served here while its requests are the hot shape, then by aiohttp."""

    def __init__(self, server: FastPathServer):
        self._server = server
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._msg: _Message | None = None
        self._buf = bytearray()  # raw bytes of the request head being parsed (see the module doc)
        self._skip = 0  # body bytes of the current hot request still to come (not kept in _buf)
        self._queue: deque[tuple[_Message, bytes]] = deque()  # complete requests waiting for an answer
        self._held_bytes = 0  # body bytes of queued and incomplete requests
        self._refusal: tuple[int, str] | None = None  # answered after the queue, then close
        self._handover_at = -1  # offset in _buf of the request aiohttp takes, after the queue
        self._busy = False  # a request is being answered (the next one waits in the queue)
        self._paused = False
        self._write_paused = False
        self._closing = False
        self._eof = False  # the client half-closed (it may still read our answers)
        self._linger_until_s = 0.0  # > 0: refused and half-closed; input is dropped until then
        self._task: asyncio.Task | None = None  # the answer in progress (held: the loop keeps weak refs)
        self._aiohttp: asyncio.Protocol | None = None  # aiohttp's protocol, once handed over
        self._watch: _HeadWatch | None = None
        self.last_active = 0.0
        self.head_since = -1.0  # time.monotonic() the current request's first byte came; -1: not in a head

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        tcp_nodelay(self._transport, True)
        self.last_active = time.monotonic()
        self._server.fast_connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._aiohttp is not None:
            self._watch.feed(data)
            self._aiohttp.data_received(data)
            return
        if self._linger_until_s:
            return
        parser = self._parser
        if parser is None:  # stopped: a hand-over or refusal waits for the queued answers
            if self._handover_at >= 0:
                self._buf += data
                self._check_backlog(len(self._buf))
            return
        skip = self._skip
        if not skip:
            self._buf += data
        elif skip >= len(data):
            self._skip = skip - len(data)
        else:
            self._skip = 0
            with memoryview(data) as view:
                self._buf += view[skip:]
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            self._parser = None
            cause = exc.__context__
            if isinstance(cause, _Refuse):
                self._refusal = (cause.status, cause.message)
            elif not isinstance(cause, _HandOver):
                raise
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parser = None
            self.head_since = -1.0
            message = f"malformed HTTP request: {one_line(str(exc)) or type(exc).__name__}"
            self._refusal = (400, message)
            malformed_log.warning("malformed HTTP request refused", {"error": message, "peer": self._peer()})
        else:
            if self.head_since < 0:
                self._buf.clear()  # only bytes llhttp skips between requests (CR, LF)
            elif len(self._buf) > MAX_HEAD_BYTES:
                self._parser = None  # not the hot path: aiohttp applies its own limits (and times it)
                self.head_since = -1.0
                self._handover_at = self._head_start()
        if not self._busy:
            self._next()
        else:
            self._check_backlog(self._held_bytes + len(self._buf))

    def eof_received(self) -> bool | None:
        if self._aiohttp is not None:
            return self._aiohttp.eof_received()
        if self._linger_until_s:
            return None  # the client read our refusal and closed: close
        if self._busy or self._queue or self._handover_at >= 0:
            self._eof = True  # answer what came (a half-closed client still reads), then close
            return True
        return None

    def pause_writing(self) -> None:
        if self._aiohttp is not None:
            self._aiohttp.pause_writing()
        else:
            self._write_paused = True  # no next answer until the client reads

    def resume_writing(self) -> None:
        if self._aiohttp is not None:
            self._aiohttp.resume_writing()
            return
        self._write_paused = False
        if not self._busy:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.fast_connections.discard(self)
        self._server.watched.discard(self)
        self._transport = None
        self._queue.clear()
        if self._aiohttp is not None:
            self._aiohttp.connection_lost(exc)

    # ------------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        self.head_since = time.monotonic()
        self._msg = _Message()

    def on_url(self, url: bytes) -> None:
        self._msg.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        msg = self._msg
        key = name.lower()
        if key == b"content-length":
            msg.content_length = int(value)  # llhttp checked: digits, once, no Transfer-Encoding
        elif key == b"inference-header-content-length":
            if msg.header_length is not None:
                msg.hot = False
            msg.header_length = value
        elif key == b"geogate-request-id":
            msg.request_id = value
        elif key == b"x-request-id":
            msg.x_request_id = value
        elif key == b"content-encoding":
            if msg.coding is not None:
                msg.hot = False
            msg.coding = value
        elif key in _REFUSED_HEADERS:
            msg.hot = False

    def on_headers_complete(self) -> None:
        self.head_since = -1.0
        msg = self._msg
        parser = self._parser
        target = infer_target(msg.url) if msg.hot else None
        if (target is None or msg.content_length < 0 or parser.get_method() != b"POST"
                or parser.get_http_version() != "1.1" or not parser.should_keep_alive()):
            self._handover_at = self._head_start()
            raise _HandOver
        msg.target = target
        limit = self._server.max_body_bytes
        if msg.content_length > limit:
            raise _Refuse(413, f"request body of {msg.content_length} bytes is over the limit of {limit} bytes")
        buf = self._buf
        end = buf.find(b"\r\n\r\n", self._head_start())
        if end < 0:  # cannot happen for a head llhttp accepted (see the module doc)
            raise _Refuse(400, "malformed HTTP request: no blank line after the head")
        end += 4
        in_buf = min(len(buf) - end, msg.content_length)
        del buf[:end + in_buf]
        self._skip = msg.content_length - in_buf

    def on_body(self, body: bytes) -> None:
        self._msg.body.append(body)
        self._held_bytes += len(body)

    def on_message_complete(self) -> None:
        msg = self._msg
        self._msg = None
        parts = msg.body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        msg.body = []
        self._queue.append((msg, body))

    def _head_start(self) -> int:
        """Offset in _buf of the current request's first byte (llhttp skips CR and LF before it)."""
        buf = self._buf
        if buf[:1] not in (b"\r", b"\n"):
            return 0
        return len(buf) - len(buf.lstrip(b"\r\n"))

    # ------------------------------------------------------------------ answers

    def _check_backlog(self, held_bytes: int) -> None:
        if held_bytes > PAUSE_READING_BYTES and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _next(self) -> None:
        """Not busy: answer the next queued request, or do what follows the queue."""
        transport = self._transport
        if transport is None or self._write_paused:
            return
        if self._queue:
            msg, body = self._queue.popleft()
            self._held_bytes -= len(body)
            self._busy = True
            self.last_active = time.monotonic()
            self._task = self._loop.create_task(self._answer(msg, body))
            return
        if self._refusal is not None:
            self._refuse_now(*self._refusal)
            return
        if self._handover_at >= 0:
            self._hand_over()
            return
        if self._closing or self._eof:
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()

    def _refuse_now(self, status: int, message: str) -> None:
        """Answer `status`, send FIN, drop what still comes for up to LINGER_S, then close."""
        transport = self._transport
        self._refusal = None
        self._queue.clear()
        self._closing = True
        self._linger_until_s = time.monotonic() + LINGER_S
        transport.write(error_bytes(status, message, close=True))
        if transport.can_write_eof():
            transport.write_eof()
        if self._paused:
            self._paused = False
            transport.resume_reading()

    async def _answer(self, msg: _Message, body: bytes) -> None:
        server = self._server
        model, version = msg.target
        try:
            header_length = msg.header_length.decode("latin-1") if msg.header_length is not None else None
            if msg.coding is not None:
                coding = content_coding(msg.coding.decode("latin-1"))
                if coding:
                    body = await inflate(coding, body, server.max_body_bytes)
            status, payload, content_type, version, json_length = await server.infer(
                model, version, body, header_length, (msg.request_id or msg.x_request_id).decode("latin-1"))
        except InferError as exc:
            status, payload, content_type, version, json_length = exc.http_status, orjson.dumps(
                {"error": exc.message}), JSON, "", None
        except Exception:  # the shared path turns every failure into an answer; this is a last resort
            log.exception("inference failed on the fast path")
            status, payload, content_type, version, json_length = 500, b'{"error":"internal error"}', JSON, "", None
        self._task = None
        self._busy = False
        transport = self._transport
        if transport is None or transport.is_closing():
            self._server.answered()
            return  # the client went away
        parts = [STATUS_LINES.get(status) or status_line(status), b"Content-Type: ", content_type.encode(),
                 b"\r\nContent-Length: ", str(len(payload)).encode(), b"\r\nDate: ", DATE.get(), b"\r\n"]
        if version:
            parts += (b"geogate-model-version: ", version.encode(), b"\r\n")
        if json_length is not None:
            parts += (b"Inference-Header-Content-Length: ", str(json_length).encode(), b"\r\n")
        parts.append(b"\r\n")
        transport.writelines([b"".join(parts), payload])
        self.last_active = time.monotonic()
        self._server.answered()
        self._next()

    def _hand_over(self) -> None:
        """From now on aiohttp serves this connection, starting with the request handed over."""
        data = bytes(self._buf[self._handover_at:])
        self._buf = bytearray()
        self._handover_at = -1
        self._server.fast_connections.discard(self)
        self._server.watched.add(self)
        self._watch = _HeadWatch()
        handler = self._server.aiohttp_server()
        self._aiohttp = handler
        handler.connection_made(self._transport)
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        if data:
            self._watch.feed(data)
            handler.data_received(data)
        if self._eof and not handler.eof_received():
            self._transport.close()

    def _peer(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""

    # ------------------------------------------------------------------ timeouts and lifecycle

    def check_timeouts(self, now_s: float, head_timeout_s: float) -> None:
        """The sweeper's call: a request head overdue gets 408 and a close; an idle keep-alive
        connection past KEEPALIVE_TIMEOUT_S is closed (after a hand-over aiohttp times idle ones)."""
        transport = self._transport
        if transport is None:
            return
        if self._linger_until_s:
            if now_s > self._linger_until_s:
                transport.close()
            return
        message = HEAD_TIMEOUT_MESSAGE.format(s=head_timeout_s)
        if self._aiohttp is not None:
            since = self._watch.since
            if since < 0 or now_s - since <= head_timeout_s:
                return
            self._watch.since = -1.0
            self._watch.parser = None
            malformed_log.warning("request head timed out", {"peer": self._peer(), "path": "aiohttp"})
            handler = self._aiohttp
            if getattr(handler, "_request_in_progress", False) or getattr(handler, "_messages", None):
                handler.close()  # aiohttp finishes the answers it owes, then closes
            else:
                transport.write(error_bytes(408, message, close=True))
                transport.close()
            return
        if self.head_since >= 0:
            if now_s - self.head_since > head_timeout_s:
                self.head_since = -1.0
                self._parser = None
                self._handover_at = -1
                self._refusal = (408, message)
                malformed_log.warning("request head timed out", {"peer": self._peer(), "path": "fast"})
                if not self._busy:
                    self._next()
            return
        if (not self._busy and not self._queue and self._refusal is None and self._parser is not None
                and now_s - self.last_active > KEEPALIVE_TIMEOUT_S):
            self.close_when_idle()

    def close_when_idle(self) -> None:
        """Shutdown or keep-alive expiry: no new request is read; close now if idle, else once the
        requests already received are answered."""
        self._closing = True
        if self._aiohttp is None:
            self._parser = None
            self._handover_at = -1
        if not self._busy and not self._queue and self._transport is not None:
            self._transport.close()

    def close_now(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    @property
    def busy(self) -> bool:
        return self._busy
