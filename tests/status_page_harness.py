"""A real aiohttp process serving the status page routes for tests, without the real gateway.

    python -m tests.status_page_harness --config world.toml --data data.json --serve eu-west,us-east

For each region named in ``--serve`` it listens on that region's ``admin`` address (from the
config) with ``GET /geogate/v1/region`` plus ``gateway.admin.status_page.add_status_routes``, the
summary source reading ``--data`` afresh whenever the file changes, so a test rewrites the
file (atomically: write + rename) to change what the regions report. Regions in the config
but not in ``--serve`` have no listener: they are the unreachable ones.

Data file::

    {"summaries": {"eu-west": {<region summary, INTERFACES.md>}, ...},
     "events": {"eu-west": [{"time": 1700000000.0, "kind": "failover", "message": "..."}]},
     "model_status": {"demo": {"stable": "2", "canary": {"version": "3", "weight": 0.1},
                               "sites": {"eu-west": {"ready": [...], "loading": [...], "failed": [...]}}}}}

A region with no entry in ``summaries`` answers ``/geogate/v1/region`` with 503.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass

from aiohttp import web

from core.config import Config, load_config
from gateway.admin.status_page import add_status_routes
from tests.procs import Proc, free_port, http_ok


class DataFile:
    """The JSON file, re-read when its mtime or size changes."""

    def __init__(self, path: str):
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._data: dict = {}

    def get(self) -> dict:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            with open(self.path) as f:
                self._data = json.load(f)
            self._stamp = stamp
        return self._data


class FileSummarySource:
    """``gateway.admin.status_page.SummarySource`` fed from the data file."""

    def __init__(self, region: str, config: Config, data: DataFile):
        self.region = region
        self.config = config
        self._data = data

    @property
    def events(self) -> deque:
        return deque(self._data.get().get("events", {}).get(self.region, []), maxlen=100)

    async def region_summary(self) -> dict:
        data = self._data.get()
        summary = data.get("summaries", {}).get(self.region)
        if summary is None:
            raise RuntimeError(f"harness data has no summary for {self.region!r}")
        if data.get("wobble") and summary.get("load"):
            # Make the load figures move a little (so the page's sparklines have a shape).
            summary = {**summary, "load": wobble(summary["load"], time.time())}
        return summary

    async def model_status(self) -> dict:
        return self._data.get().get("model_status", {})


def wobble(load: dict, now_s: float) -> dict:
    f = 1.0 + 0.25 * math.sin(now_s / 3.0) + 0.1 * math.sin(now_s * 1.7)
    g = 1.0 + 0.4 * max(0.0, math.sin(now_s / 2.0)) ** 4
    return {**load, "requests_per_s": round(load["requests_per_s"] * f, 1),
            "p50_ms": round(load["p50_ms"] * (2 - f * 0.8), 2), "p99_ms": round(load["p99_ms"] * g, 2)}


def make_app(source: FileSummarySource) -> web.Application:
    app = web.Application()

    async def region(_request: web.Request) -> web.Response:
        try:
            return web.json_response(await source.region_summary())
        except RuntimeError as exc:
            return web.json_response({"error": str(exc)}, status=503)

    app.router.add_get("/geogate/v1/region", region)
    add_status_routes(app, summary_source=source)
    return app


async def serve(config: Config, data: DataFile, regions: list[str]) -> None:
    runners = []
    for name in regions:
        host, _, port = config.region(name).admin.rpartition(":")
        runner = web.AppRunner(make_app(FileSummarySource(name, config, data)), shutdown_timeout=2.0)
        await runner.setup()
        await web.TCPSite(runner, host, int(port)).start()
        runners.append(runner)
        print(f"harness: {name} admin on http://{host}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


# ---------------------------------------------------------------- helpers for the tests

REGIONS = {  # name -> location; ap-south is configured but never served: unreachable
    "eu-west": [53.35, -6.26],
    "us-east": [38.9, -77.0],
    "ap-south": [19.08, 72.88],
}
SERVED = ("eu-west", "us-east")


def replica(url: str, *, healthy: bool = True, ejected: bool = False, reason: str = "",
            versions: tuple[str, ...] = ("1", "2"), outstanding: int = 0) -> dict:
    """A ReplicaState.snapshot()-shaped dict."""
    routable = healthy and not ejected
    return {
        "url": url, "scheme": url.partition("://")[0], "address": url.partition("://")[2],
        "pool": "", "kind": "geogate", "weight": 1, "routable": routable,
        "reason": "" if routable else ("ejected" if ejected else "unhealthy"),
        "healthy": healthy, "health_reason": "" if healthy else reason, "last_probe_error": "" if healthy else reason,
        "last_probe_age_s": 0.4, "probe_rtt_ms": 0.8, "ready_versions": {"demo": list(versions)},
        "ready_versions_known": True, "ejected": ejected, "ejected_for_s": 4.2 if ejected else 0.0,
        "eject_reason": reason if ejected else "", "ejection_count": 1 if ejected else 0,
        "consecutive_failures": 0, "draining": False, "outstanding": outstanding,
    }


def summary(region: str, replicas: list[dict], *, pool: str, ready: bool = True, reason: str = "",
            rps: float = 120.0, p50_ms: float = 1.2, p99_ms: float = 4.8, panic: bool = False) -> dict:
    for r in replicas:
        r["pool"] = pool
    healthy = sum(1 for r in replicas if r["healthy"])
    versions = sorted({v for r in replicas if r["healthy"] for v in r["ready_versions"].get("demo", [])})
    return {
        "region": region, "location": REGIONS[region], "ready": ready, "reason": reason,
        "replicas": {"healthy": healthy, "total": len(replicas)},
        "pools": [{"name": pool, "kind": "geogate", "healthy": healthy, "total": len(replicas), "panic": panic,
                   "replicas": replicas}],
        "models": {"demo": {"ready_versions": versions}} if versions else {},
        "load": {"in_flight": 3, "requests_per_s": rps, "p50_ms": p50_ms, "p99_ms": p99_ms},
    }


def config_text(ports: dict[str, dict[str, int]]) -> str:
    """A config for REGIONS; ``ports[region]`` has "http", "grpc" and "admin"."""
    parts = ['[deployment]\nname = "status-test"\n']
    for i, (name, loc) in enumerate(REGIONS.items()):
        p = ports[name]
        parts.append(
            f'[[regions]]\nname = "{name}"\nlocation = {loc}\nhttp = "127.0.0.1:{p["http"]}"\n'
            f'grpc = "127.0.0.1:{p["grpc"]}"\nadmin = "127.0.0.1:{p["admin"]}"\n'
            f'  [[regions.pools]]\n  name = "pool-{i}"\n  replicas = ["grpc://127.0.0.1:{19100 + i}"]\n')
    return "\n".join(parts)


def healthy_world(now_s: float) -> dict:
    """eu-west healthy, us-east degraded (one replica ejected), ap-south unreachable."""
    return {
        "summaries": {
            "eu-west": summary("eu-west", [replica("grpc://127.0.0.1:18101", versions=("2", "3")),
                                           replica("http://127.0.0.1:18110", versions=("2", "3"), outstanding=2)],
                               pool="eu-ort", rps=250.0),
            "us-east": summary("us-east", [replica("grpc://127.0.0.1:18301", versions=("2",)),
                                           replica("grpc://127.0.0.1:18302", ejected=True,
                                                   reason="3 consecutive failures (connect refused)")],
                               pool="us-ort", rps=80.0, p99_ms=9.5),
        },
        "events": {
            "eu-west": [{"time": now_s - 30, "kind": "promotion", "message": "demo version 2 promoted to stable"}],
            "us-east": [{"time": now_s - 5, "kind": "ejection",
                         "message": "ejected grpc://127.0.0.1:18302 for 5 s: 3 consecutive failures"}],
        },
        "model_status": {
            "demo": {"stable": "2", "canary": {"version": "3", "weight": 0.1},
                     "sites": {"ap-south": {"ready": ["2"], "loading": ["3"], "failed": ["4"]}}},
        },
    }


def eu_west_down(data: dict, now_s: float) -> dict:
    """The same world with every eu-west replica failing its probes."""
    data = json.loads(json.dumps(data))
    data["summaries"]["eu-west"] = summary(
        "eu-west", [replica("grpc://127.0.0.1:18101", healthy=False, reason="probe timeout after 500 ms"),
                    replica("http://127.0.0.1:18110", healthy=False, reason="readiness 503")],
        pool="eu-ort", ready=False, reason="all 2 replicas of pool 'eu-ort' are unhealthy", rps=0.0)
    data["events"]["eu-west"].append({"time": now_s, "kind": "failover",
                                      "message": "eu-west: no routable replica; failing over to us-east"})
    return data


def write_data(path: str, data: dict) -> None:
    """Atomic rewrite: the harness never reads a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


@dataclass
class Harness:
    proc: Proc
    config_path: str
    data_path: str
    ports: dict[str, dict[str, int]]

    def admin_url(self, region: str) -> str:
        return f"http://127.0.0.1:{self.ports[region]['admin']}"


def launch(tmpdir: str, data: dict, ports: dict[str, dict[str, int]] | None = None) -> Harness:
    """Write a config and ``data`` under ``tmpdir`` and start the harness serving SERVED;
    returns once every served region answers. The caller stops ``proc``. ``ports`` (per
    region: http, grpc, admin) lets a test put something of its own on a region's addresses."""
    ports = ports or {name: {"http": free_port(), "grpc": free_port(), "admin": free_port()} for name in REGIONS}
    config_path = os.path.join(tmpdir, "world.toml")
    data_path = os.path.join(tmpdir, "status-data.json")
    with open(config_path, "w") as f:
        f.write(config_text(ports))
    write_data(data_path, data)
    proc = Proc([sys.executable, "-m", "tests.status_page_harness", "--config", config_path, "--data", data_path,
                 "--serve", ",".join(SERVED)], name="status-harness")
    harness = Harness(proc, config_path, data_path, ports)
    try:
        for name in SERVED:
            proc.wait_until(lambda n=name: http_ok(f"{harness.admin_url(n)}/geogate/v1/region"), 30.0)
    except BaseException:
        proc.stop()
        raise
    return harness


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="status page test harness")
    ap.add_argument("--config", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--serve", required=True, help="comma-separated regions to listen for")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    asyncio.run(serve(config, DataFile(args.data), [r for r in args.serve.split(",") if r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
