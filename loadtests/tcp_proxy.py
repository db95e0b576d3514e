"""A plain TCP forwarder, for cutting a dependency off on purpose (store-outage):

    python -m loadtests.tcp_proxy --listen 127.0.0.1:9100 --target 127.0.0.1:9000

Clients are configured with the proxy's address. Killing the proxy makes the target
unreachable (new connections refused, open ones reset) while the target keeps its state;
starting it again on the same port (SO_REUSEADDR) makes it reachable again. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import sys

CHUNK_BYTES = 64 * 1024


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        raise argparse.ArgumentTypeError(f"{text!r}: loopback addresses only")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))

    server = await asyncio.start_server(handle, *listen, reuse_address=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.tcp_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on (loopback)")
    p.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to (loopback)")
    args = p.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.listen, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
