"""Traffic spike through a gateway with the local autoscaler: does capacity follow the load?

Starts the local autoscaler (`python -m gateway.autoscaler`, its own unbound, `geogate replica`
processes) and one region's gateway with gateway.capacity mounted (desired replica counts on
/geogate/v1/capacity and /metrics), then sends open-loop KServe v2 HTTP traffic whose rate
ramps up to a spike and back down, each request tagged with a priority class
(``geogate-priority``: critical / standard / sheddable, mixed). Every half second it records
the desired and running replica counts; every request's latency, status and class.

Writes OUT/results.json and OUT/timeline.png (rate sent / answered, replicas desired and
running, p99 latency per second, refusals (429) per class per second) and prints a summary.

    .venv/bin/python -m loadtests.bench_traffic_spike --quick --out /tmp/spike
    .venv/bin/python -m loadtests.bench_traffic_spike --peak-rate 400 --out /tmp/spike

Refusals by class appear once the coordinator has wired gateway.admission into the fronts;
until then the shed panel shows the 429s the gateway sends (none).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from loadtests.procs import Proc, free_port, http_ok
from replicas.demo_model import write_repository_entry

REGION = "eu-west"
POOL = "eu-ort"
SERVICE = f"_grpc._tcp.{POOL}.{REGION}.autoscale.bench."
CLASSES = ("critical", "standard", "sheddable")
CLASS_MIX = (0.2, 0.5, 0.3)
SAMPLE_EVERY_S = 0.5
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 10.0
MAX_IN_FLIGHT = 512
GATEWAY_WITH_CAPACITY = (
    "import sys, gateway.main as m; m.ADMIN_MOUNTS = (*m.ADMIN_MOUNTS, 'gateway.capacity'); "
    "from gateway.cli import main; sys.exit(main(sys.argv[1:]))"
)
MODEL = "demo-heavy"  # ~0.5-1 ms of CPU per inference: a spike really loads the replicas
BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 1024], "datatype": "FP32",
                               "data": [0.01] * 1024}]}).encode()


def schedule(quick: bool, base: float, peak: float) -> list[tuple[float, float]]:
    """(time_s, rate) points, linear in between: quiet, ramp up, spike, ramp down, quiet."""
    if quick:
        return [(0, base), (5, base), (10, peak), (20, peak), (25, base), (40, base)]
    return [(0, base), (15, base), (30, peak), (60, peak), (75, base), (120, base)]


def rate_at(points: list[tuple[float, float]], t_s: float) -> float:
    for (t0, r0), (t1, r1) in itertools.pairwise(points):
        if t0 <= t_s <= t1:
            return r0 + (r1 - r0) * (t_s - t0) / max(1e-9, t1 - t0)
    return points[-1][1]


def write_config(path: Path, repo: Path, dns: str, ports: dict, *, quick: bool, max_replicas: int) -> None:
    path.write_text(f"""
[deployment]
name = "traffic-spike"

[health]
interval_ms = 300
timeout_ms = 1000
rise = 1
fall = 2

[gateway]
discovery_interval_ms = 300
access_log = false

[capacity]
replica_concurrency_limit = 1
target_utilization = 0.5
min_replicas = 1
max_replicas = {max_replicas}
in_flight_window_s = 3.0
scale_up_window_s = 2.0
scale_down_window_s = {8.0 if quick else 20.0}
sample_interval_ms = 100
autoscale_dns = "{dns}"
autoscale_interval_ms = 300
autoscale_drain_wait_ms = 20000

[[regions]]
name = "{REGION}"
location = [53.35, -6.26]
http = "127.0.0.1:{ports['http']}"
grpc = "127.0.0.1:{ports['grpc']}"
admin = "127.0.0.1:{ports['admin']}"

  [[regions.pools]]
  name = "{POOL}"
  discover = "dns+srv://{SERVICE}"
  discover_scheme = "grpc"
  discover_resolver = "{dns}"
  repository = "{repo}"
""")


def get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return {}


def read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


async def drive(url: str, points: list[tuple[float, float]], duration_s: float, admin: str,
                status_file: Path, seed: int) -> tuple[list, list]:
    rng = random.Random(seed)
    requests: list[tuple[float, float, int, str]] = []  # (sent_at_s, latency_s, status, class)
    samples: list[dict] = []
    in_flight = 0
    conn = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t0 = time.monotonic()

        async def one(sent_s: float, cls: str) -> None:
            nonlocal in_flight
            in_flight += 1
            start = time.monotonic()
            try:
                async with session.post(url, data=BODY, headers={"geogate-priority": cls}) as r:
                    await r.read()
                    status = r.status
            except (TimeoutError, aiohttp.ClientError, OSError):
                status = 0
            finally:
                in_flight -= 1
            requests.append((sent_s, time.monotonic() - start, status, cls))

        async def sampler() -> None:
            while True:
                t = time.monotonic() - t0
                cap = await asyncio.to_thread(get_json, f"http://{admin}/geogate/v1/capacity")
                pool = (cap.get("pools") or {}).get(POOL, {})
                st = (await asyncio.to_thread(read_status, status_file)).get(f"{REGION}/{POOL}", {})
                running = sum(1 for r in st.get("replicas", []) if r.get("registered") and not r.get("draining"))
                samples.append({"t_s": round(t, 3), "desired": pool.get("desired_replicas"),
                                "running": running, "utilization": pool.get("utilization"),
                                "expected_queue_ms": pool.get("expected_queue_ms"), "reason": pool.get("reason", ""),
                                "rate": rate_at(points, t), "in_flight": in_flight})
                await asyncio.sleep(SAMPLE_EVERY_S)

        sample_task = asyncio.ensure_future(sampler())
        tasks: set[asyncio.Task] = set()
        next_s = 0.0
        while next_s < duration_s:
            now = time.monotonic() - t0
            if next_s > now:
                await asyncio.sleep(next_s - now)
            if in_flight < MAX_IN_FLIGHT:
                cls = rng.choices(CLASSES, CLASS_MIX)[0]
                task = asyncio.ensure_future(one(next_s, cls))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                requests.append((next_s, 0.0, -1, "client-overloaded"))
            next_s += rng.expovariate(max(0.1, rate_at(points, next_s)))
        if tasks:
            await asyncio.gather(*tasks)
        # keep sampling a little: the scale-down after the spike
        await asyncio.sleep(SAMPLE_EVERY_S)
        sample_task.cancel()
        await asyncio.gather(sample_task, return_exceptions=True)
    return requests, samples


def per_second(requests: list, duration_s: float) -> dict:
    n = math.ceil(duration_s)
    sent = [0] * n
    ok = [0] * n
    lat: list[list[float]] = [[] for _ in range(n)]
    shed = {c: [0] * n for c in CLASSES}
    errors = [0] * n
    for sent_s, latency_s, status, cls in requests:
        i = min(n - 1, int(sent_s))
        sent[i] += 1
        if status == 200:
            ok[i] += 1
            lat[i].append(latency_s)
        elif status == 429 and cls in shed:
            shed[cls][i] += 1
        else:
            errors[i] += 1
    p99 = [sorted(v)[min(len(v) - 1, int(0.99 * len(v)))] * 1000 if v else float("nan") for v in lat]
    return {"sent": sent, "ok": ok, "p99_ms": p99, "shed": shed, "errors": errors}


def plot(out: Path, series: dict, samples: list) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = list(range(len(series["sent"])))
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    ax = axes[0]
    ax.plot(secs, series["sent"], label="sent / s")
    ax.plot(secs, series["ok"], label="answered 200 / s")
    ax.plot(secs, series["errors"], label="errors / s", color="red")
    ax.set_ylabel("requests / s")
    ax.legend(loc="upper left")
    ax = axes[1]
    ts = [s["t_s"] for s in samples]
    ax.step(ts, [s["desired"] if s["desired"] is not None else float("nan") for s in samples], where="post",
            label=f"desired ({REGION})")
    ax.step(ts, [s["running"] for s in samples], where="post", label=f"running ({REGION})")
    ax.set_ylabel("replicas")
    ax.legend(loc="upper left")
    ax = axes[2]
    ax.plot(secs, series["p99_ms"], label="p99")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax = axes[3]
    for c in CLASSES:
        ax.plot(secs, series["shed"][c], label=f"{c} refused (429)")
    ax.set_ylabel("refused / s")
    ax.set_xlabel("seconds")
    ax.legend(loc="upper left")
    fig.suptitle("geogate: traffic spike with the local autoscaler")
    fig.tight_layout()
    path = out / "timeline.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 s instead of 120 s, lower peak")
    ap.add_argument("--base-rate", type=float, default=20.0, help="requests/s before and after the spike")
    ap.add_argument("--peak-rate", type=float, default=None, help="requests/s at the spike (default 200, quick 150)")
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--out", default="loadtest-out/traffic-spike")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = args.peak_rate or (150.0 if args.quick else 200.0)
    points = schedule(args.quick, args.base_rate, peak)
    duration_s = points[-1][0]
    work = Path(tempfile.mkdtemp(prefix="geogate-spike-"))
    repo = work / "repo"
    write_repository_entry(repo, 1, size="heavy")
    dns = f"127.0.0.1:{free_port()}"
    ports = {k: free_port() for k in ("http", "grpc", "admin")}
    config = work / "spike.toml"
    write_config(config, repo, dns, ports, quick=args.quick, max_replicas=args.max_replicas)
    status_file = work / "autoscaler.json"
    procs: list[Proc] = []
    try:
        procs.append(Proc([sys.executable, "-m", "gateway.autoscaler", "--config", str(config), "--status-file",
                           str(status_file), "--workdir", str(work / "as")], name="autoscaler", log_dir=out))
        gw = Proc([sys.executable, "-c", GATEWAY_WITH_CAPACITY, "gateway", "--config", str(config), "--region",
                   REGION], name="gateway", log_dir=out)
        procs.append(gw)
        gw.wait_until(lambda: http_ok(f"http://127.0.0.1:{ports['http']}/v2/health/ready"), READY_TIMEOUT_S)
        print(f"gateway ready; {duration_s:g} s of traffic: {args.base_rate:g}/s -> {peak:g}/s -> "
              f"{args.base_rate:g}/s", flush=True)
        url = f"http://127.0.0.1:{ports['http']}/v2/models/{MODEL}/infer"
        requests, samples = asyncio.run(drive(url, points, duration_s, f"127.0.0.1:{ports['admin']}",
                                              status_file, seed=1))
    finally:
        for p in reversed(procs):
            p.stop(30.0)
    series = per_second(requests, duration_s)
    png = plot(out, series, samples)
    total = len(requests)
    ok = sum(series["ok"])
    shed = {c: sum(v) for c, v in series["shed"].items()}
    errors = sum(series["errors"])
    peak_running = max((s["running"] for s in samples), default=0)
    peak_desired = max((s["desired"] or 0 for s in samples), default=0)
    final_running = samples[-1]["running"] if samples else 0
    results = {"schedule": points, "requests": total, "ok": ok, "errors": errors, "shed_by_class": shed,
               "peak_desired": peak_desired, "peak_running": peak_running, "final_running": final_running,
               "per_second": series, "samples": samples}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"requests {total}, answered {ok}, errors {errors}, refused by class {shed}")
    print(f"replicas: peak desired {peak_desired}, peak running {peak_running}, at the end {final_running}")
    finite = [v for v in series["p99_ms"] if not math.isnan(v)]
    if finite:
        print(f"p99 per second: best {min(finite):.1f} ms, worst {max(finite):.1f} ms")
    print(f"wrote {out / 'results.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
