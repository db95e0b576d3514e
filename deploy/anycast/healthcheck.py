#!/usr/bin/env python3
"""ExaBGP health-check process: announce the gateway's anycast prefix while the gateway can serve.

ExaBGP runs this as an API process (see exabgp.conf) and reads announce/withdraw commands from
its stdout.  Every ``--interval-s`` it asks ``GET <url>`` (the gateway's ``/v2/health/ready``,
200 only when the region can serve); ``--rise`` consecutive 200s announce the prefix(es),
``--fall`` consecutive failures (non-200, refused, timeout) withdraw them.  On SIGTERM/SIGINT,
or when ExaBGP goes away (stdin closes), it withdraws and exits.

Only the standard library: it runs under whatever python3 the BGP host has.

    healthcheck.py --url http://127.0.0.1:8000/v2/health/ready --prefix 203.0.113.80/32
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

DEFAULT_INTERVAL_S = 0.5
DEFAULT_TIMEOUT_S = 0.4
DEFAULT_RISE = 3
DEFAULT_FALL = 2


def log(msg: str, **fields: object) -> None:
    # stderr: ExaBGP logs what its processes write there; stdout is the command channel.
    print(json.dumps({"ts": round(time.time(), 3), "logger": "geogate.anycast", "msg": msg, **fields}),
          file=sys.stderr, flush=True)


def probe(url: str, timeout_s: float) -> tuple[bool, str]:
    """(ready, reason): ready only on HTTP 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200, f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read(200).decode(errors="replace").strip()
        return False, f"HTTP {exc.code}" + (f": {body}" if body else "")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"unreachable: {reason}"


class Announcer:
    """Writes ExaBGP API commands; remembers what is announced so each change is sent once."""

    def __init__(self, prefixes: list[str], next_hop: str, attributes: str):
        self.prefixes = prefixes
        self.next_hop = next_hop
        self.attributes = attributes
        self.announced = False

    def _send(self, verb: str) -> None:
        for prefix in self.prefixes:
            line = f"{verb} route {prefix} next-hop {self.next_hop}"
            if verb == "announce" and self.attributes:
                line += f" {self.attributes}"
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def announce(self, reason: str) -> None:
        if not self.announced:
            self._send("announce")
            self.announced = True
            log("announced", prefixes=self.prefixes, reason=reason)

    def withdraw(self, reason: str) -> None:
        if self.announced:
            self._send("withdraw")
            self.announced = False
            log("withdrawn", prefixes=self.prefixes, reason=reason)


def _drain_stdin(stop: threading.Event) -> None:
    # ExaBGP acknowledges each command on our stdin ("done"): read it so the pipe never fills,
    # and treat end-of-file as ExaBGP having gone away.
    try:
        while sys.stdin.readline():
            pass
    except (OSError, ValueError):
        pass
    stop.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="announce an anycast prefix while a gateway is ready (ExaBGP API)")
    p.add_argument("--url", required=True, help="readiness URL, e.g. http://127.0.0.1:8000/v2/health/ready")
    p.add_argument("--prefix", action="append", required=True, help="prefix to announce (repeatable)")
    p.add_argument("--next-hop", default="self", help="next hop (default: self)")
    p.add_argument("--attributes", default="", help='extra route attributes, e.g. "community [65000:80] med 10"')
    p.add_argument("--interval-s", type=float, default=DEFAULT_INTERVAL_S)
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    p.add_argument("--rise", type=int, default=DEFAULT_RISE, help="successes before announcing")
    p.add_argument("--fall", type=int, default=DEFAULT_FALL, help="failures before withdrawing")
    p.add_argument("--no-stdin", action="store_true", help="do not watch stdin (running outside ExaBGP)")
    args = p.parse_args(argv)
    for prefix in args.prefix:
        try:
            ipaddress.ip_network(prefix)
        except ValueError as exc:
            p.error(f"--prefix {prefix!r}: {exc}")

    announcer = Announcer(args.prefix, args.next_hop, args.attributes)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if not args.no_stdin:
        threading.Thread(target=_drain_stdin, args=(stop,), daemon=True).start()

    log("started", url=args.url, prefixes=args.prefix, rise=args.rise, fall=args.fall, interval_s=args.interval_s)
    successes = failures = 0
    next_at = time.monotonic()
    try:
        while not stop.is_set():
            ok, reason = probe(args.url, args.timeout_s)
            if ok:
                successes, failures = successes + 1, 0
                if successes >= args.rise:
                    announcer.announce(reason)
            else:
                successes, failures = 0, failures + 1
                if failures == 1 and announcer.announced:
                    log("probe failed", reason=reason, failures=failures, fall=args.fall)
                if failures >= args.fall:
                    announcer.withdraw(reason)
            next_at = max(next_at + args.interval_s, time.monotonic())
            stop.wait(next_at - time.monotonic())
        announcer.withdraw("health check stopping")
    except BrokenPipeError:  # ExaBGP is gone: nothing left to tell
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
