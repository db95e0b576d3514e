"""A stand-in region gateway for the GeoDNS / anycast tests and the failover benchmark (here, in
loadtests/, so both can use it: tests may import loadtests, never the other way).

A real HTTP server process (aiohttp on uvloop) that serves only what DNS and anycast health
checks read from a gateway: ``GET /v2/health/ready`` and ``GET /geogate/v1/region``.  It can
be killed (-9), stopped (SIGSTOP: connections hang, a blackhole) or switched through a state
file read on every request:

- ``ok`` (or no file): ready 200;
- ``down``: ready 503 ``{"error": "..."}``;
- ``hang``: ready requests never answer (a blackhole that still accepts connections);
- ``drop-next``: the next ready request never answers, then back to ``ok`` (one lost probe).

    python -m loadtests.geo_standin --port P --region eu-west [--state-file F] [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from aiohttp import web

from loadtests.procs import Proc, free_port, http_ok

HANG_S = 3600

def _state(path: str) -> str:
    if not path:
        return "ok"
    try:
        with open(path) as f:
            return f.read().strip() or "ok"
    except FileNotFoundError:
        return "ok"


def _set_state(path: str, state: str) -> None:
    with open(path, "w") as f:
        f.write(state)


def build_app(region: str, location: list[float], state_file: str) -> web.Application:
    async def ready(_: web.Request) -> web.Response:
        state = _state(state_file)
        if state == "drop-next":
            _set_state(state_file, "ok")
            await asyncio.sleep(HANG_S)
        if state == "hang":
            await asyncio.sleep(HANG_S)
        if state == "down":
            return web.json_response({"error": f"region {region} is draining (stand-in)"}, status=503)
        return web.Response(status=200)

    async def summary(_: web.Request) -> web.Response:
        up = _state(state_file) == "ok"
        return web.json_response({
            "region": region, "location": location, "ready": up, "reason": "" if up else "stand-in down",
            "replicas": {"healthy": 2 if up else 0, "total": 2}, "pools": [], "models": {},
            "load": {"in_flight": 0, "requests_per_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0}})

    app = web.Application()
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/geogate/v1/region", summary)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--lat", type=float, default=0.0)
    p.add_argument("--lon", type=float, default=0.0)
    p.add_argument("--state-file", default="")
    args = p.parse_args(argv)
    import uvloop

    print(f"stand-in gateway {args.region} on {args.host}:{args.port} pid {os.getpid()}", flush=True)
    web.run_app(build_app(args.region, [args.lat, args.lon], args.state_file), host=args.host,
                port=args.port, print=None, access_log=None, loop=uvloop.new_event_loop(),
                shutdown_timeout=0.2)  # hung "drop-next"/"hang" requests must not hold up exit
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- test helpers

# Three regions at real datacenter cities.
REGIONS = [
    # name, (lat, lon), addresses
    ("eu-west", (53.35, -6.26), ["192.0.2.10", "2001:db8::10"]),  # Dublin
    ("us-east", (38.9, -77.0), ["192.0.2.20", "2001:db8::20"]),   # Virginia
    ("ap-south", (19.08, 72.88), ["192.0.2.30"]),                  # Mumbai
]
AP_SOUTH_CLIENT_CIDR = "100.64.0.0/16"  # CIDR-table entry naming ap-south directly

# Client subnets in the test GeoIP database (geo.mmdb_build.DEMO_NETWORKS) and where they go.
PARIS_NET = "203.0.113.0/24"      # nearest: eu-west
NEW_YORK_NET = "198.51.100.0/24"  # nearest: us-east
SINGAPORE_NET = "192.0.2.0/24"    # nearest: ap-south


class StandinGateway:
    """One stand-in gateway process, switchable through its state file."""

    def __init__(self, region: str, location: tuple[float, float], workdir: str, port: int | None = None):
        self.region = region
        self.location = location
        self.port = port or free_port()
        self.workdir = workdir
        self.state_file = os.path.join(workdir, f"standin-{region}.state")
        self.proc: Proc | None = None
        self.start()

    def start(self) -> StandinGateway:
        self.set_state("ok")
        self.proc = Proc(
            [sys.executable, "-m", "loadtests.geo_standin", "--port", str(self.port), "--region", self.region,
             "--lat", str(self.location[0]), "--lon", str(self.location[1]), "--state-file", self.state_file],
            name=f"standin-{self.region}-{self.port}", log_dir=self.workdir)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_state(self, state: str) -> None:
        _set_state(self.state_file, state)

    def wait_ready(self, timeout_s: float = 30.0) -> StandinGateway:
        assert self.proc is not None
        self.proc.wait_until(lambda: http_ok(f"http://{self.address}/v2/health/ready"), timeout_s)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()  # SIGCONT first if it was stopped (a SIGSTOPped process cannot act on SIGTERM)


def write_config(path: str, gateways: list[StandinGateway], *, dns_port: int, mmdb: str = "",
                 routing_mode: str = "nearest-to-client", dns_extra: str = "") -> str:
    """A deployment config for ``gateways`` (in REGIONS order) with GeoDNS on ``dns_port``."""
    lines = ["[routing]", f'mode = "{routing_mode}"']
    if mmdb:
        lines.append(f'geoip_database = "{mmdb}"')
    lines += ["", "[dns]", f'listen = "127.0.0.1:{dns_port}"', 'zone = "geogate.test."',
              'service = "infer.geogate.test."', "ttl = 20", dns_extra, ""]
    for gw in gateways:
        _, loc, addresses = next(r for r in REGIONS if r[0] == gw.region)
        lines += ["[[regions]]", f'name = "{gw.region}"', f"location = [{loc[0]}, {loc[1]}]",
                  f'http = "{gw.address}"', f"addresses = {addresses!r}".replace("'", '"')]
        if gw.region == "ap-south":
            lines.append(f'client_cidrs = ["{AP_SOUTH_CLIENT_CIDR}"]')
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# ---------------------------------------------------------------- dig


class DigResult:
    """The parts of dig's output the tests look at."""

    def __init__(self, text: str):
        import re

        self.text = text
        m = re.search(r"status: (\w+)", text)
        self.status = m.group(1) if m else ""
        m = re.search(r";; flags: ([a-z ]+);", text)
        self.flags = set(m.group(1).split()) if m else set()
        m = re.search(r"; CLIENT-SUBNET: (\S+)", text)
        self.client_subnet = m.group(1) if m else ""
        self.sections: dict[str, list[list[str]]] = {"ANSWER": [], "AUTHORITY": [], "ADDITIONAL": []}
        current = None
        for line in text.splitlines():
            m = re.match(r";; (ANSWER|AUTHORITY|ADDITIONAL) SECTION:", line)
            if m:
                current = m.group(1)
            elif not line.strip() or line.startswith(";"):
                current = None if not line.strip() else current
            elif current:
                self.sections[current].append(line.split())

    @property
    def answer(self) -> list[list[str]]:
        return self.sections["ANSWER"]

    @property
    def addresses(self) -> list[str]:
        return sorted(rr[4] for rr in self.answer if rr[3] in ("A", "AAAA"))


def dig(port: int, name: str, rdtype: str = "A", *options: str, timeout_s: float = 10.0) -> DigResult:
    import subprocess

    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), name, rdtype, "+tries=1", "+time=2", *options],
                         capture_output=True, text=True, timeout=timeout_s)
    return DigResult(out.stdout)


def start_dns(config: str) -> Proc:
    """`geogate dns --config` as a real process (stop it with .stop())."""
    return Proc([sys.executable, "-m", "gateway", "dns", "--config", config], name="geogate-dns",
                log_dir=os.path.dirname(os.path.abspath(config)))


def wait_dns(proc: Proc, port: int, timeout_s: float = 30.0) -> None:
    proc.wait_until(lambda: dig(port, "geogate.test", "SOA").status == "NOERROR", timeout_s, "answering")
