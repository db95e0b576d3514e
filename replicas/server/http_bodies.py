"""Request bodies of the replica's HTTP paths: the Content-Encoding a body may have, and
inflating gzip/deflate bodies in bounded steps (a compression bomb gets 413, not our memory)."""

from __future__ import annotations

import asyncio
import zlib

from replicas.server.infer_errors import InferError, invalid, one_line, too_large

INFLATE_STEP_BYTES = 1 << 20  # inflated per step; other requests run between steps


def content_coding(value: str | None) -> str:
    """The Content-Encoding of a request body: "" (none or identity), "gzip" or "deflate"."""
    if value is None:
        return ""
    coding = value.strip(" \t").lower()
    if coding in ("", "identity"):
        return ""
    if coding in ("gzip", "x-gzip"):
        return "gzip"
    if coding == "deflate":
        return "deflate"
    raise InferError(415, f"Content-Encoding {one_line(value, 60)!r} is not supported: use gzip, deflate or "
                          "identity")


class Inflater:
    """Inflates a gzip or deflate (zlib) body fed in pieces, `INFLATE_STEP_BYTES` of output at a
    time, and raises 413 as soon as the output passes `limit_bytes`: a small compressed body cannot
    make us inflate (or hold) more than the limit. A piece that inflates to more than one step is
    inflated further in a worker thread (zlib releases the GIL), so a bomb does not hold up the
    event loop and other clients' requests."""

    def __init__(self, coding: str, limit_bytes: int):
        self.coding = coding
        self.limit_bytes = limit_bytes
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS)
        self._out = bytearray()

    async def feed(self, data: bytes) -> None:
        z = self._z
        out = self._out
        inline = True  # small expansions (the usual case) stay on the loop: a thread hop costs more
        while True:
            if z.eof:
                if data or z.unused_data:
                    raise invalid(f"the request body has data after the end of its {self.coding} stream")
                return
            want = min(self.limit_bytes - len(out) + 1, INFLATE_STEP_BYTES)
            try:
                piece = z.decompress(data, want) if inline else await asyncio.to_thread(z.decompress, data, want)
            except zlib.error as exc:
                raise invalid(f"the request body is not valid {self.coding}: {exc}") from None
            out += piece
            if len(out) > self.limit_bytes:
                out.clear()
                raise too_large(f"request body is over the limit of {self.limit_bytes} bytes once inflated "
                                f"({self.coding})")
            data = z.unconsumed_tail
            if not data and len(piece) < want:
                if z.eof and z.unused_data:
                    raise invalid(f"the request body has data after the end of its {self.coding} stream")
                return  # all input consumed and nothing pending
            inline = False

    def finish(self) -> bytearray:
        if not self._z.eof:
            raise invalid(f"the request body's {self.coding} stream is truncated")
        return self._out


async def inflate(coding: str, body: bytes, limit_bytes: int) -> bytearray:
    inflater = Inflater(coding, limit_bytes)
    await inflater.feed(body)
    return inflater.finish()
