"""Benchmark: does queue-depth scoring (gateway.upstream.load_signals) beat outstanding requests alone?

    python -m loadtests.bench_load_signals [--quick] [--duration-s S] [--rounds N]

Three real Triton servers (``make triton-env``) serve the python-backend demo model with one
request per execute and a fixed execute time, so requests queue inside Triton
(``nv_inference_pending_request_count``). An open-loop Poisson load (--rate, below capacity:
with a closed loop above capacity every replica queues whatever the policy, and the comparison
says nothing) goes either through an in-process balancer (power of two choices, the gateway's
algorithm, over aiohttp keep-alive connections to the Tritons' HTTP ports) or through a real
`geogate gateway`, and replicas are scored by mode:

- ``outstanding``: score = this balancer's outstanding requests;
- ``queue``:       score = outstanding + the replica's scraped queue depth (``LoadSignals``,
                   stale data ignored), as the Gateway API inference extension's picker does;
- ``peak-ewma``:   the gateway's cost without load signals (``gateway.upstream.load_stats.LoadStats.cost``:
                   peak-EWMA latency x (outstanding + 1));
- ``peak-ewma+queue``: the same ``LoadStats.cost`` with the scraper's readings written into it
                   (``on_sample``), exactly as the gateway does with ``metrics_scrape = true``:
                   peak-EWMA latency x (outstanding + queue_depth + 1);
- ``gateway`` / ``gateway+queue``: a real `geogate gateway` process in front of the Tritons,
                   ``metrics_scrape`` off / on (its latency includes the gateway's own hop).

Scenarios (replicas that differ in how fast they answer *this* balancer):
- ``hidden-load``: all three equally fast, but one also serves a second client the balancer
  cannot see (another gateway sharing the replica): its queue is only visible in /metrics;
- ``slow-replica``: one replica takes 3x longer per request, no other traffic.

Prints p50 / p99 latency, throughput and each replica's share per mode. Figures depend on the
machine and whatever else runs on it; modes alternate within a round so drift hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from core.kserve import HEADER_LENGTH, REPLICA_HEADER
from gateway.upstream.load_signals import LoadSignals, ReplicaLoad, ScrapeTarget, metrics_url_for
from gateway.upstream.load_stats import LoadStats
from loadtests.procs import GatewayProc, Proc, RegionConfig, free_port, http_ok
from replicas.demo.onnx_model import reference_outputs
from replicas.demo.python_backend import write_python_backend_entry

TRITON_WRAPPER = Path(__file__).resolve().parent.parent / ".venv-triton" / "bin" / "tritonserver-geogate"
READY_TIMEOUT_S = 90.0
EXECUTE_MS = 20.0  # per request: the replicas, not this host's CPU, are the bottleneck
SLOW_FACTOR = 3.0  # slow-replica scenario: one replica this much slower
RATE_PER_S = 60.0  # offered load: 60% of what the two replicas without extra load can serve
HIDDEN_CONCURRENCY = 6  # hidden-load scenario: the other client's closed loop on replica 0
SCRAPE_INTERVAL_S = 0.2
WARMUP_S = 1.0
GATEWAY_MODES = ("gateway", "gateway+queue")
MODES = ("outstanding", "queue", "peak-ewma", "peak-ewma+queue", *GATEWAY_MODES)
GATEWAY_READY_TIMEOUT_S = 60.0
GATEWAY_HEALTH = {"interval_ms": 300, "timeout_ms": 250, "rise": 1, "fall": 2}
SCENARIOS = ("hidden-load", "slow-replica")
X = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(1, 16)


# ---------------------------------------------------------------------------- Triton


def write_model(root: Path, execute_ms: float) -> str:
    """The demo model, one request per execute, each taking at least `execute_ms`."""
    write_python_backend_entry(root, 1, execute_delay_s=execute_ms / 1000.0, max_batch_size=1)
    return str(root)


class Triton(Proc):
    def __init__(self, repository: str, log_dir: str, name: str):
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        super().__init__([str(TRITON_WRAPPER), "--model-repository", repository, "--model-control-mode", "explicit",
                          "--load-model", "demo", "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                          "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                          "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                          "--log-verbose", "0", "--exit-timeout-secs", "5"], name=name, log_dir=log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


# ---------------------------------------------------------------------------- load


def _body() -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                     "parameters": {"binary_data_size": X.nbytes}}],
                         "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()
    return header + X.tobytes(), {HEADER_LENGTH: str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def hidden_client(url: str, concurrency: int, stop_at_s: float) -> None:
    """Another client of one replica (a separate process): closed loop until `stop_at_s` (unix)."""
    body, headers = _body()

    def loop() -> None:
        while time.time() < stop_at_s:
            req = urllib.request.Request(url + "/v2/models/demo/infer", data=body, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    r.read()
            except OSError:
                time.sleep(0.01)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@dataclass
class RunResult:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    shares: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0


@dataclass
class _State:
    url: str
    weight: int = 1


class _Upstream:
    """The shape of ``gateway.upstream.pool.Upstream`` that the balancer's cost functions read."""

    def __init__(self, url: str) -> None:
        self.state = _State(url)
        self.load = LoadStats()


class Balancer:
    """P2C over replica URLs with outstanding counts and latency kept here, scored per `mode`."""

    def __init__(self, urls: list[str], signals: LoadSignals, mode: str, rng: random.Random):
        self.urls = urls
        self.ups = {u: _Upstream(u) for u in urls}
        self.signals = signals
        self.mode = mode
        self.rng = rng
        if mode == "peak-ewma+queue":
            signals.on_sample = self._on_sample  # what gateway.upstream.pool.RegionPools does

    def _on_sample(self, load: ReplicaLoad, valid_until_s: float) -> None:
        up = self.ups.get(load.url)
        if up is not None:
            up.load.set_queue_depth(load.queue_depth, valid_until_s)

    def score(self, url: str, now_s: float) -> float:
        up = self.ups[url]
        if self.mode == "outstanding":
            return up.load.outstanding
        if self.mode == "queue":
            return self.signals.score(up, now_s)
        return up.load.cost(now_s, up.state.weight)  # peak-ewma (+queue when readings are written)

    def pick(self) -> tuple[str, LoadStats | None]:
        a, b = self.rng.sample(self.urls, 2)
        now = time.monotonic()
        sa, sb = self.score(a, now), self.score(b, now)
        url = a if sa <= sb else b  # a is already a uniformly random choice
        return url, self.ups[url].load

    def replica_of(self, url: str, _headers) -> str:
        return url


class ThroughGateway:
    """Every request to one `geogate gateway`; the replica that served it is in its answer."""

    def __init__(self, gateway_url: str, replica_urls: list[str]) -> None:
        self.gateway_url = gateway_url
        self.urls = replica_urls

    def pick(self) -> tuple[str, LoadStats | None]:
        return self.gateway_url, None

    def replica_of(self, _url: str, headers) -> str:
        served = headers.get(REPLICA_HEADER, "")
        return next((u for u in self.urls if served and served.endswith(u.split("://", 1)[1])), "")


async def open_loop(route: Balancer | ThroughGateway, session: aiohttp.ClientSession, duration_s: float,
                    rate_per_s: float) -> RunResult:
    """Requests at a fixed rate (Poisson arrivals), each timed from its scheduled start, so a
    slow answer cannot slow the offered load down (no coordinated omission)."""
    body, headers = _body()
    res = RunResult(shares=dict.fromkeys(route.urls, 0))
    expected = reference_outputs("tiny", 1, X)
    checked = False
    arrivals = random.Random(1)

    async def one(t0: float, measured: bool) -> None:
        nonlocal checked
        url, load = route.pick()
        served = ""
        if load is not None:
            load.outstanding += 1
        try:
            async with session.post(url + "/v2/models/demo/infer", data=body, headers=headers) as r:
                data = await r.read()
                ok = r.status == 200
                served = route.replica_of(url, r.headers)
                if ok and not checked:
                    n = int(r.headers[HEADER_LENGTH])
                    out = np.frombuffer(data[n:], dtype=np.float32).reshape(1, 8)
                    ok = checked = bool(np.allclose(out, expected, atol=1e-4))
        except (aiohttp.ClientError, OSError):
            ok = False
        finally:
            if load is not None:
                load.outstanding -= 1
                load.observe(time.perf_counter() - t0, time.monotonic())
        if measured:
            if ok and served:
                res.latencies_s.append(time.perf_counter() - t0)
                res.shares[served] += 1
            else:
                res.errors += 1

    start = time.perf_counter()
    measure_from, stop_at = start + WARMUP_S, start + WARMUP_S + duration_s
    tasks = []
    due = start
    while due < stop_at:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due, due >= measure_from)))
        due += arrivals.expovariate(rate_per_s)
    await asyncio.gather(*tasks)
    res.duration_s = duration_s
    return res


async def run_mode(urls: list[str], targets: list[ScrapeTarget], mode: str, duration_s: float,
                   rate_per_s: float, seed: int, gateway_url: str = "") -> RunResult:
    if mode in GATEWAY_MODES:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            return await open_loop(ThroughGateway(gateway_url, urls), session, duration_s, rate_per_s)
    signals = LoadSignals(targets, interval_s=SCRAPE_INTERVAL_S)
    await signals.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            return await open_loop(Balancer(urls, signals, mode, random.Random(seed)), session, duration_s,
                                   rate_per_s)
    finally:
        await signals.close()


def start_gateway(work: Path, name: str, tritons: list[Triton], scrape: bool) -> GatewayProc:
    """`geogate gateway` for one region whose pool is the Tritons (HTTP), scraping their /metrics
    every SCRAPE_INTERVAL_S when `scrape`; returns once it routes to all of them (and, scraping,
    once it has a queue reading of each)."""
    region = RegionConfig("r1")
    ports = ", ".join(f'"{t.url}" = {t.metrics_port}' for t in tritons)
    lines = ['[deployment]', 'name = "bench-load-signals"', '', '[health]']
    lines += [f"{k} = {v}" for k, v in GATEWAY_HEALTH.items()]
    lines += ['', '[[regions]]', 'name = "r1"', f'http = "{region.http_address}"', f'grpc = "{region.grpc_address}"',
              f'admin = "{region.admin_address}"', '', '  [[regions.pools]]', '  name = "tri"', '  kind = "triton"',
              f"  replicas = {json.dumps([t.url for t in tritons])}",
              f"  metrics_scrape = {'true' if scrape else 'false'}",
              f"  metrics_interval_ms = {int(SCRAPE_INTERVAL_S * 1000)}", f"  metrics_ports = {{ {ports} }}", '']
    config = work / f"{name}.toml"
    config.write_text("\n".join(lines))
    gw = GatewayProc(config, region, log_dir=work / "logs", name=name)
    try:
        gw.wait_ready(GATEWAY_READY_TIMEOUT_S).wait_all_healthy(GATEWAY_READY_TIMEOUT_S)
        if scrape:
            gw.wait_until(lambda: all(r.get("queue_depth") is not None for p in gw.region_summary().get("pools", [])
                                      for r in p["replicas"]), GATEWAY_READY_TIMEOUT_S, what="scraping every Triton")
    except BaseException:
        gw.kill()
        raise
    return gw


# ---------------------------------------------------------------------------- report


def summarize(res: RunResult, urls: list[str]) -> dict:
    lat = np.array(res.latencies_s) * 1000.0 if res.latencies_s else np.array([float("nan")])
    total = max(1, sum(res.shares.values()))
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "throughput_per_s": len(res.latencies_s) / res.duration_s, "errors": res.errors,
            "shares": [round(res.shares[u] / total, 3) for u in urls]}


def print_table(scenario: str, rows: dict[str, list[dict]]) -> None:
    print(f"\nscenario {scenario}: replica 0 is the {'shared' if scenario == 'hidden-load' else 'slow'} one")
    print(f"  {'mode':<16} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6}  share per replica")
    for mode, runs in rows.items():
        p50 = float(np.median([r["p50_ms"] for r in runs]))
        p99 = float(np.median([r["p99_ms"] for r in runs]))
        tput = float(np.median([r["throughput_per_s"] for r in runs]))
        errors = sum(r["errors"] for r in runs)
        print(f"  {mode:<16} {p50:>8.2f} {p99:>8.2f} {tput:>8.1f} {errors:>6}  {runs[-1]['shares']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (about 80 s in all)")
    ap.add_argument("--duration-s", type=float, default=None, help="measured seconds per mode and round")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per scenario (modes alternate)")
    ap.add_argument("--scenario", choices=SCENARIOS, action="append", help="default: both")
    ap.add_argument("--mode", choices=MODES, action="append", help="default: all of them")
    ap.add_argument("--rate", type=float, default=RATE_PER_S, help="offered requests per second (Poisson)")
    ap.add_argument("--json", default="", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if not TRITON_WRAPPER.exists():
        print(f"{TRITON_WRAPPER} missing: run `make triton-env` first", file=sys.stderr)
        return 2
    duration_s = args.duration_s or (3.0 if args.quick else 15.0)
    rounds = args.rounds or (1 if args.quick else 2)
    scenarios = args.scenario or list(SCENARIOS)
    work = Path(tempfile.mkdtemp(prefix="geogate-bench-load-signals-"))
    results: dict[str, dict[str, list[dict]]] = {}
    for scenario in scenarios:
        slow = scenario == "slow-replica"
        repos = [write_model(work / f"{scenario}-{i}",
                             EXECUTE_MS * (SLOW_FACTOR if slow and i == 0 else 1.0)) for i in range(3)]
        tritons = [Triton(repo, str(work / "logs"), f"{scenario}-triton{i}") for i, repo in enumerate(repos)]
        try:
            for t in tritons:
                t.wait_until(lambda t=t: http_ok(t.url + "/v2/health/ready")
                             and http_ok(f"http://127.0.0.1:{t.metrics_port}/metrics"), READY_TIMEOUT_S)
            urls = [t.url for t in tritons]
            targets = [ScrapeTarget(t.url, "triton", metrics_url_for(
                t.url, "triton", metrics_ports={t.url: t.metrics_port})) for t in tritons]
            modes = tuple(args.mode or MODES)
            rows: dict[str, list[dict]] = {m: [] for m in modes}
            for r in range(rounds):
                for mode in (modes if r % 2 == 0 else tuple(reversed(modes))):
                    gw = start_gateway(work, f"{scenario}-{mode}-{r}", tritons, mode == "gateway+queue") \
                        if mode in GATEWAY_MODES else None
                    hidden = None
                    if scenario == "hidden-load":
                        hidden = mp.get_context("spawn").Process(
                            target=hidden_client,
                            args=(urls[0], HIDDEN_CONCURRENCY, time.time() + WARMUP_S + duration_s + 0.5))
                        hidden.start()
                        time.sleep(0.5)  # its queue is there before the balancer starts
                    try:
                        res = asyncio.run(run_mode(urls, targets, mode, duration_s, args.rate, seed=r,
                                                   gateway_url=f"http://{gw.http_address}" if gw else ""))
                    finally:
                        if hidden is not None:
                            hidden.join(30)
                        if gw is not None:
                            gw.stop()
                    rows[mode].append(summarize(res, urls))
            results[scenario] = rows
            print_table(scenario, rows)
        finally:
            for t in tritons:
                t.kill()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print("\nqueue = outstanding + scraped queue depth; outstanding = this balancer's in-flight only; "
          "gateway modes go through a real `geogate gateway` (+ its hop); req/s = answered per second at "
          f"the offered {args.rate:g}/s; figures are medians over rounds")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    sys.exit(main())
