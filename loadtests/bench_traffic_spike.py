"""Traffic spike on one region of two, with the local autoscaler: does capacity follow the load?

Starts the local autoscaler (`python -m gateway.world.autoscaler`: its own unbound, `geogate replica`
processes for both regions' pools) and two regions' gateways (`geogate gateway`: capacity
tracking, priority classes and load-aware spill are on by default). Open-loop KServe v2 HTTP
traffic goes to eu-west at a rate that ramps up to a spike and back down, and to us-east at a
steady base rate; each request carries a priority class (``geogate-priority``: critical /
standard / sheddable, mixed). Every half second it records the desired and running replica
counts per region and eu-west's spill state; for every request its latency, status, class and
the region that served it (``geogate-region``).

The replicas' inference is slowed by their test fault switch (``--replica-test-delay-ms``,
default 50 ms) and the gateways are told each replica runs one request at a time
(``replica_concurrency_limit = 1``): a slow model without burning this machine's few CPUs, so
the replica count, not the CPU, is what limits capacity. (With a sleep instead of real work,
latency does not grow with queueing inside a replica: p99 shows the gateway's behaviour:
refusals, spill to the other region, retries, not a replica's internal queue.)

Writes OUT/results.json and OUT/timeline.png (rate sent / answered / served by us-east,
replicas desired and running per region, p99 latency per second, refusals (429) per class per
second) and prints a summary.

    .venv/bin/python -m loadtests.bench_traffic_spike --quick --out /tmp/spike
    .venv/bin/python -m loadtests.bench_traffic_spike --peak-rate 80 --out /tmp/spike

With the defaults (one slot per replica, 50 ms per inference, at most 3 replicas per pool:
eu-west can take about 60 requests/s) the 150/s spike outgrows even the scaled-up region:
eu-west scales to its maximum, refuses sheddable requests, spills a share of the rest to
us-east (which scales up for it), then scales back down after the scale-down window.
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

from core.kserve import PRIORITY_HEADER, REGION_HEADER
from loadtests.procs import Proc, free_port, http_ok
from replicas.demo.onnx_model import write_repository_entry

SPIKED = "eu-west"
STEADY = "us-east"
REGIONS = {SPIKED: (53.35, -6.26), STEADY: (38.9, -77.0)}
CLASSES = ("critical", "standard", "sheddable")
CLASS_MIX = (0.2, 0.5, 0.3)
SAMPLE_EVERY_S = 0.5
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 10.0
MAX_IN_FLIGHT = 512
MODEL = "demo"
BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                               "data": [0.01] * 16}]}).encode()


def pool_of(region: str) -> str:
    return f"{region}-ort"


def service_of(region: str) -> str:
    return f"_grpc._tcp.{pool_of(region)}.{region}.autoscale.bench."


def schedule(quick: bool, base: float, peak: float) -> list[tuple[float, float]]:
    """(time_s, rate) points, linear in between: quiet, ramp up, spike, ramp down, quiet (long
    enough for the scale-down window)."""
    if quick:
        return [(0, base), (5, base), (10, peak), (25, peak), (30, base), (50, base)]
    return [(0, base), (15, base), (30, peak), (60, peak), (75, base), (120, base)]


def rate_at(points: list[tuple[float, float]], t_s: float) -> float:
    for (t0, r0), (t1, r1) in itertools.pairwise(points):
        if t0 <= t_s <= t1:
            return r0 + (r1 - r0) * (t_s - t0) / max(1e-9, t1 - t0)
    return points[-1][1]


def write_config(path: Path, repo: Path, dns: str, ports: dict, *, quick: bool, max_replicas: int) -> None:
    regions = []
    for name, (lat, lon) in REGIONS.items():
        p = ports[name]
        regions.append(f"""
[[regions]]
name = "{name}"
location = [{lat}, {lon}]
http = "127.0.0.1:{p['http']}"
grpc = "127.0.0.1:{p['grpc']}"
admin = "127.0.0.1:{p['admin']}"

  [[regions.pools]]
  name = "{pool_of(name)}"
  discover = "dns+srv://{service_of(name)}"
  discover_scheme = "grpc"
  discover_resolver = "{dns}"
  repository = "{repo}"
""")
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

[dns]
check_interval_ms = 250
check_timeout_ms = 500

[capacity]
replica_concurrency_limit = 1
target_utilization = 0.5
min_replicas = 1
max_replicas = {max_replicas}
in_flight_window_s = 3.0
scale_up_window_s = 2.0
scale_down_window_s = {8.0 if quick else 20.0}
sample_interval_ms = 100
sheddable_max_queue_ms = 30.0
standard_max_queue_ms = 300.0
spill_queue_ms = 40.0
spill_min_dwell_ms = 1000
autoscale_dns = "{dns}"
autoscale_interval_ms = 300
autoscale_drain_wait_ms = 20000
""" + "".join(regions))


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


async def drive(urls: dict[str, str], points: list[tuple[float, float]], steady_rate: float, duration_s: float,
                admins: dict[str, str], status_file: Path, seed: int) -> tuple[list, list]:
    """Open-loop traffic: eu-west on `points`, us-east at `steady_rate`."""
    rng = random.Random(seed)
    # (sent_at_s, latency_s, status, class, target region, serving region)
    requests: list[tuple[float, float, int, str, str, str]] = []
    samples: list[dict] = []
    in_flight = 0
    conn = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t0 = time.monotonic()

        async def one(target: str, sent_s: float, cls: str) -> None:
            nonlocal in_flight
            in_flight += 1
            start = time.monotonic()
            served = ""
            try:
                async with session.post(urls[target], data=BODY, headers={PRIORITY_HEADER: cls}) as r:
                    await r.read()
                    status = r.status
                    served = r.headers.get(REGION_HEADER, "")
            except (TimeoutError, aiohttp.ClientError, OSError):
                status = 0
            finally:
                in_flight -= 1
            requests.append((sent_s, time.monotonic() - start, status, cls, target, served))

        async def sampler() -> None:
            while True:
                t = time.monotonic() - t0
                st = await asyncio.to_thread(read_status, status_file)
                row: dict = {"t_s": round(t, 3), "rate": rate_at(points, t), "in_flight": in_flight}
                for region, admin in admins.items():
                    cap = await asyncio.to_thread(get_json, f"http://{admin}/geogate/v1/capacity")
                    pool = (cap.get("pools") or {}).get(pool_of(region), {})
                    reps = st.get(f"{region}/{pool_of(region)}", {}).get("replicas", [])
                    row[region] = {"desired": pool.get("desired_replicas"),
                                   "running": sum(1 for r in reps if r.get("registered") and not r.get("draining")),
                                   "utilization": pool.get("utilization"),
                                   "expected_queue_ms": pool.get("expected_queue_ms"),
                                   "reason": pool.get("reason", ""), "spill": cap.get("spill", {})}
                samples.append(row)
                await asyncio.sleep(SAMPLE_EVERY_S)

        sample_task = asyncio.ensure_future(sampler())
        tasks: set[asyncio.Task] = set()
        next_s = {SPIKED: 0.0, STEADY: 0.0}
        while min(next_s.values()) < duration_s:
            target = min(next_s, key=next_s.get)
            due = next_s[target]
            now = time.monotonic() - t0
            if due > now:
                await asyncio.sleep(due - now)
            if in_flight < MAX_IN_FLIGHT:
                cls = rng.choices(CLASSES, CLASS_MIX)[0]
                task = asyncio.ensure_future(one(target, due, cls))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                requests.append((due, 0.0, -1, "client-overloaded", target, ""))
            rate = rate_at(points, due) if target == SPIKED else steady_rate
            next_s[target] = due + rng.expovariate(max(0.1, rate))
        if tasks:
            await asyncio.gather(*tasks)
        await asyncio.sleep(SAMPLE_EVERY_S)
        sample_task.cancel()
        await asyncio.gather(sample_task, return_exceptions=True)
    return requests, samples


def per_second(requests: list, duration_s: float, region: str) -> dict:
    """Per-second series of the traffic sent to `region`."""
    n = math.ceil(duration_s)
    sent, ok, errors, elsewhere = [0] * n, [0] * n, [0] * n, [0] * n
    lat: list[list[float]] = [[] for _ in range(n)]
    shed = {c: [0] * n for c in CLASSES}
    for sent_s, latency_s, status, cls, target, served in requests:
        if target != region:
            continue
        i = min(n - 1, int(sent_s))
        sent[i] += 1
        if status == 200:
            ok[i] += 1
            lat[i].append(latency_s)
            if served and served != region:
                elsewhere[i] += 1
        elif status == 429 and cls in shed:
            shed[cls][i] += 1
        else:
            errors[i] += 1
    p99 = [sorted(v)[min(len(v) - 1, int(0.99 * len(v)))] * 1000 if v else float("nan") for v in lat]
    return {"sent": sent, "ok": ok, "served_elsewhere": elsewhere, "p99_ms": p99, "shed": shed, "errors": errors}


def plot(out: Path, series: dict, steady: dict, samples: list) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = list(range(len(series["sent"])))
    fig, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    ax = axes[0]
    ax.plot(secs, series["sent"], label=f"sent to {SPIKED} / s")
    ax.plot(secs, series["ok"], label="answered 200 / s")
    ax.plot(secs, series["served_elsewhere"], label=f"... served by {STEADY} (spilled)")
    ax.plot(secs, steady["sent"], label=f"sent to {STEADY} / s", linestyle=":")
    ax.plot(secs, [a + b for a, b in zip(series["errors"], steady["errors"], strict=True)], label="errors / s",
            color="red")
    ax.set_ylabel("requests / s")
    ax.legend(loc="upper left", fontsize="small")
    ax = axes[1]
    ts = [s["t_s"] for s in samples]
    for region, style in ((SPIKED, "-"), (STEADY, "--")):
        ax.step(ts, [s[region]["desired"] if s[region]["desired"] is not None else float("nan") for s in samples],
                where="post", linestyle=style, label=f"desired ({region})")
        ax.step(ts, [s[region]["running"] for s in samples], where="post", linestyle=style,
                label=f"running ({region})")
    ax.set_ylabel("replicas")
    ax.legend(loc="upper left", fontsize="small")
    ax = axes[2]
    ax.plot(secs, series["p99_ms"], label=f"p99, traffic to {SPIKED}")
    ax.plot(secs, steady["p99_ms"], label=f"p99, traffic to {STEADY}", linestyle=":")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.legend(loc="upper left", fontsize="small")
    ax = axes[3]
    for c in CLASSES:
        ax.plot(secs, [a + b for a, b in zip(series["shed"][c], steady["shed"][c], strict=True)],
                label=f"{c} refused (429)")
    ax.set_ylabel("refused / s")
    ax.set_xlabel("seconds")
    ax.legend(loc="upper left", fontsize="small")
    fig.suptitle("geogate: traffic spike on eu-west, local autoscaler, priority shedding, load-aware spill")
    fig.tight_layout()
    path = out / "timeline.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="50 s instead of 120 s")
    ap.add_argument("--base-rate", type=float, default=10.0, help="requests/s before and after the spike")
    ap.add_argument("--peak-rate", type=float, default=150.0,
                    help="requests/s to eu-west at the spike (default: twice what max-replicas can take)")
    ap.add_argument("--steady-rate", type=float, default=8.0, help="requests/s to us-east throughout")
    ap.add_argument("--max-replicas", type=int, default=3, help="per pool")
    ap.add_argument("--replica-delay-ms", type=int, default=50, help="every inference takes this long")
    ap.add_argument("--out", default="loadtest-out/traffic-spike")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = schedule(args.quick, args.base_rate, args.peak_rate)
    duration_s = points[-1][0]
    work = Path(tempfile.mkdtemp(prefix="geogate-spike-"))
    repo = work / "repo"
    write_repository_entry(repo, 1)
    dns = f"127.0.0.1:{free_port()}"
    ports = {r: {k: free_port() for k in ("http", "grpc", "admin")} for r in REGIONS}
    config = work / "spike.toml"
    write_config(config, repo, dns, ports, quick=args.quick, max_replicas=args.max_replicas)
    status_file = work / "autoscaler.json"
    procs: list[Proc] = []
    try:
        procs.append(Proc([sys.executable, "-m", "gateway.world.autoscaler", "--config", str(config), "--status-file",
                           str(status_file), "--workdir", str(work / "as"),
                           "--replica-test-delay-ms", str(args.replica_delay_ms)], name="autoscaler", log_dir=out))
        for region in REGIONS:
            procs.append(Proc([sys.executable, "-m", "gateway", "gateway", "--config", str(config), "--region",
                               region], name=f"gateway-{region}", log_dir=out))
        for p, region in zip(procs[1:], REGIONS, strict=True):
            p.wait_until(lambda region=region: http_ok(f"http://127.0.0.1:{ports[region]['http']}/v2/health/ready"),
                         READY_TIMEOUT_S)
        # both gateways see each other (peer summaries carry the load spill decisions read)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                all(p.get("healthy") for p in get_json(f"http://127.0.0.1:{ports[r]['admin']}/geogate/v1/region")
                    .get("peers", [{}])) for r in REGIONS):
            time.sleep(0.2)
        print(f"gateways ready; {duration_s:g} s of traffic to {SPIKED}: {args.base_rate:g}/s -> "
              f"{args.peak_rate:g}/s -> {args.base_rate:g}/s; {args.steady_rate:g}/s to {STEADY}", flush=True)
        urls = {r: f"http://127.0.0.1:{ports[r]['http']}/v2/models/{MODEL}/infer" for r in REGIONS}
        admins = {r: f"127.0.0.1:{ports[r]['admin']}" for r in REGIONS}
        requests, samples = asyncio.run(drive(urls, points, args.steady_rate, duration_s, admins, status_file,
                                              seed=1))
    finally:
        for p in reversed(procs):
            p.stop(30.0)
    series = per_second(requests, duration_s, SPIKED)
    steady = per_second(requests, duration_s, STEADY)
    png = plot(out, series, steady, samples)
    total = len(requests)
    ok = sum(series["ok"]) + sum(steady["ok"])
    shed = {c: sum(series["shed"][c]) + sum(steady["shed"][c]) for c in CLASSES}
    errors = sum(series["errors"]) + sum(steady["errors"])
    spilled = sum(series["served_elsewhere"])
    peaks = {r: {"desired": max((s[r]["desired"] or 0 for s in samples), default=0),
                 "running": max((s[r]["running"] for s in samples), default=0),
                 "final_running": samples[-1][r]["running"] if samples else 0} for r in REGIONS}
    spill_samples = [s for s in samples if s[SPIKED]["spill"].get("spilling")]
    spilling_s = len(spill_samples) * SAMPLE_EVERY_S
    results = {"schedule": points, "steady_rate": args.steady_rate, "replica_delay_ms": args.replica_delay_ms,
               "requests": total, "ok": ok, "errors": errors, "shed_by_class": shed,
               f"spilled_{SPIKED}_to_{STEADY}": spilled, "spilling_s": spilling_s, "replicas": peaks,
               "per_second": {SPIKED: series, STEADY: steady}, "samples": samples}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"requests {total}, answered {ok}, errors {errors}, refused by class {shed}")
    print(f"{SPIKED} traffic served by {STEADY} (spilled): {spilled}; {SPIKED} spilling for about {spilling_s:g} s")
    for r, pk in peaks.items():
        print(f"replicas {r}: peak desired {pk['desired']}, peak running {pk['running']}, "
              f"at the end {pk['final_running']}")
    for name, s in ((SPIKED, series), (STEADY, steady)):
        finite = [v for v in s["p99_ms"] if not math.isnan(v)]
        if finite:
            print(f"p99 per second, traffic to {name}: best {min(finite):.1f} ms, median "
                  f"{sorted(finite)[len(finite) // 2]:.1f} ms, worst {max(finite):.1f} ms")
    print(f"wrote {out / 'results.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
