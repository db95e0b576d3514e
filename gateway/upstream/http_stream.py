"""Streaming HTTP upstream for Triton's generate extension (``/generate``, ``/generate_stream``).

The inference path's lean HTTP/1.1 pool (gateway.upstream.http1_client) reads whole answers;
generate_stream answers are Server-Sent Events that must reach the client as the replica
produces them, so this client (aiohttp's, one session of its own: long streams never hold the
metadata session's connections) hands the answer back chunk by chunk.

``open`` sends the body as received and waits for the status line and the FIRST chunk of the
body: until then nothing has reached the client and a failure (refused, reset, 5xx, timeout)
comes back as a ``Reply`` the caller may retry elsewhere. After it, the caller owns an
``OpenStream``: ``next_chunk`` relays the rest; ``abort`` closes the connection, which Triton
takes as the request's cancellation (its decoupled models see ``is_cancelled()``).
"""

from __future__ import annotations

import asyncio

import aiohttp

from core.kserve import http_to_grpc
from core.tls import ClientTls
from gateway.upstream.http_upstream import CONNECT_TIMEOUT_S, error_text
from gateway.upstream.types import Reply
from health.outcomes import Outcome, classify_http_status

KEEPALIVE_TIMEOUT_S = 30.0
ERROR_BODY_MAX_BYTES = 64 * 1024  # a replica's error answer is read whole up to this size


class OpenStream:
    """A replica's answer whose status and first body chunk have arrived."""

    __slots__ = ("content_type", "first", "response", "status")

    def __init__(self, response: aiohttp.ClientResponse, first: bytes) -> None:
        self.response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "")
        self.first = first  # b"": the answer had no body

    async def next_chunk(self) -> bytes:
        """The next piece of the body as it arrived (b"" at its end); ConnectionError, OSError or
        aiohttp.ClientError when the replica broke the stream."""
        return await self.response.content.readany()

    async def read_rest(self) -> bytes:
        return await self.response.content.read()

    def abort(self) -> None:
        """Close the connection now (the replica cancels the request); never reused."""
        self.response.close()

    def release(self) -> None:
        """The answer was read to its end: the connection goes back to the pool."""
        self.response.release()


class HttpStreamClient:
    """One per worker; replicas are named per call (``Upstream.url`` minus its scheme)."""

    def __init__(self, *, tls: ClientTls | None = None) -> None:
        self.tls = tls  # [tls.upstream]; None: plaintext
        self._ssl = tls.ssl_context if tls is not None else True  # aiohttp's default
        self._session: aiohttp.ClientSession | None = None

    def _base(self, address: str) -> str:
        return self.tls.http_base(address) if self.tls is not None else f"http://{address}"

    def session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the worker's event loop."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_TIMEOUT_S, use_dns_cache=False)
            # auto_decompress off: a compressed answer passes through as the replica sent it.
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent", "Content-Type"))
        return self._session

    async def open(self, address: str, path: str, body: bytes, headers: dict[str, str],
                   timeout_s: float) -> OpenStream | Reply:
        """POST `body` to the replica at `address` and wait (at most `timeout_s`) for the status
        and the first chunk. A success status gives an ``OpenStream``; anything else a ``Reply``
        (a replica's own error answer with its body, or why there was none)."""
        resp: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.session().post(
                    self._base(address) + path, data=body, headers=headers, ssl=self._ssl,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S))
                outcome = classify_http_status(resp.status)
                if outcome is Outcome.SUCCESS:
                    return OpenStream(resp, await resp.content.readany())
                data = await resp.content.read(ERROR_BODY_MAX_BYTES)
        except asyncio.CancelledError:  # the client went away (or its deadline): the replica cancels
            if resp is not None:
                resp.close()
            raise
        except Exception as exc:  # aiohttp.ClientError, OSError, TimeoutError: nothing reached the client
            if resp is not None:
                resp.close()
            return stream_failure(exc, address, timeout_s)
        resp.close()  # an error answer: never keep its connection (its body may not be all read)
        return Reply(outcome, resp.status, http_to_grpc(resp.status), message=error_text(data, resp.status),
                     body=data, content_type=resp.headers.get("Content-Type"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def stream_failure(exc: BaseException, address: str, timeout_s: float) -> Reply:
    """Why a replica gave no answer, as a Reply (the retryable outcomes of gateway.upstream.http_upstream)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Reply(Outcome.CONNECT_FAILURE, 503, http_to_grpc(503),
                     message=f"cannot connect to replica {address}: {exc}")
    if isinstance(exc, TimeoutError):
        return Reply(Outcome.TIMEOUT, 504, http_to_grpc(504),
                     message=f"replica {address} did not answer within {timeout_s * 1000:.0f} ms")
    return Reply(Outcome.RESET, 503, http_to_grpc(503),
                 message=f"connection to replica {address} failed: {type(exc).__name__}: {exc}")
