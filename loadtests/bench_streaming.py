"""Streaming and sequences through geogate vs HAProxy (h2c, from Debian) vs direct, on the same two Tritons.

`python -m loadtests.bench_streaming [--quick] [--concurrency 1,4,16] [--out DIR]`

Two real Triton servers (python backend) serve ``demo`` (one response per request) and
``repeat`` (decoupled: COUNT responses per request, 5 ms apart). Three paths over gRPC
ModelStreamInfer: one Triton directly, HAProxy in HTTP/2 mode (``proto h2`` on its bind and
servers, round-robin) over both, and a geogate gateway over both. Per path and concurrency:
- NVIDIA's ``perf_analyzer --streaming`` on ``demo``: throughput, p50 and p99 latency;
- our own client on ``repeat`` (one stream per concurrent client, requests one after another,
  COUNT responses each): responses/s, time to first response (p50, p99), and lost or
  out-of-order responses (must be 0).
- sequences (``acc_int``, Triton's sequence batcher, a running sum per sequence): as many
  concurrent sequence clients, each running sequences of SEQUENCE_STEPS steps over gRPC unary
  calls: steps/s and the share of sequences that failed or summed wrong (a step on the other
  Triton: "must specify the START flag", or a wrong sum). HAProxy round-robins each call, so
  its sequences split between the two servers; geogate keeps each on the Triton holding it.
Ratios geogate/HAProxy and geogate/direct are printed with the table; results.json in --out.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from loadtests.haproxy import HaproxyProc, require_haproxy
from loadtests.perf_analyzer import available as perf_analyzer_available
from loadtests.perf_analyzer import run as perf_analyzer_run
from loadtests.procs import GatewayProc, PoolConfig, Proc, RegionConfig, free_port, http_ok, write_config
from loadtests.sequence_models import INT_MODEL, write_accumulators
from loadtests.stream_models import write_repeat_model
from replicas.demo.python_backend import write_python_backend_entry

ROOT = Path(__file__).resolve().parent.parent
TRITON_WRAPPER = ROOT / ".venv-triton" / "bin" / "tritonserver-geogate"
RESPONSES_PER_REQUEST = 8
SEQUENCE_STEPS = 6
READY_TIMEOUT_S = 90.0


class Triton(Proc):
    def __init__(self, repository: Path, log_dir: Path, name: str) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        super().__init__([str(TRITON_WRAPPER), "--model-repository", str(repository), "--model-control-mode",
                          "explicit", "--load-model", "demo", "--load-model", "repeat", "--load-model", INT_MODEL,
                          "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                          "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                          "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                          "--log-verbose", "0", "--exit-timeout-secs", "5"], name=name, log_dir=log_dir,
                         ports=[self.http_port, self.grpc_port, self.metrics_port])

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self) -> Triton:
        self.wait_until(lambda: http_ok(f"http://127.0.0.1:{self.http_port}/v2/health/ready"), READY_TIMEOUT_S)
        return self


def perf_analyzer(url: str, concurrency: int, interval_ms: int) -> dict:
    return perf_analyzer_run(url, protocol="grpc", concurrency=concurrency, interval_ms=interval_ms, streaming=True)


def decoupled_load(url: str, concurrency: int, duration_s: float) -> dict:
    """`concurrency` streams, each sending a `repeat` request as soon as the previous one's last
    response arrived: responses/s, time to first response, lost / out-of-order responses."""
    import tritonclient.grpc as grpcclient

    ttfr: list[float] = []
    responses = [0]
    problems: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def client(k: int) -> None:
        c = grpcclient.InferenceServerClient(url)
        got: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result, error: got.put((time.monotonic(), result, error)))
        try:
            i = 0
            while time.monotonic() < stop_at:
                base = 100_000 * k + 100 * i
                inputs = []
                for name, value in (("COUNT", RESPONSES_PER_REQUEST), ("BASE", base)):
                    t = grpcclient.InferInput(name, [1], "INT32")
                    t.set_data_from_numpy(np.array([value], dtype=np.int32))
                    inputs.append(t)
                sent = time.monotonic()
                c.async_stream_infer("repeat", inputs, request_id=f"{k}-{i}")
                outs = []
                first = None
                for _ in range(RESPONSES_PER_REQUEST):
                    t_s, result, error = got.get(timeout=30)
                    if error is not None:
                        problems.append(str(error))
                        break
                    first = first if first is not None else t_s - sent
                    outs.append(int(result.as_numpy("OUT")[0]))
                with lock:
                    responses[0] += len(outs)
                    if first is not None:
                        ttfr.append(first)
                    if outs != list(range(base, base + RESPONSES_PER_REQUEST)):
                        problems.append(f"{k}-{i}: {outs[:4]}...")
                i += 1
        except queue.Empty:
            problems.append(f"stream {k}: a response did not arrive within 30 s")
        finally:
            c.stop_stream()
            c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    ttfr.sort()
    return {"responses_per_s": responses[0] / elapsed,
            "ttfr_p50_ms": 1000 * statistics.median(ttfr) if ttfr else float("nan"),
            "ttfr_p99_ms": 1000 * ttfr[min(len(ttfr) - 1, int(0.99 * len(ttfr)))] if ttfr else float("nan"),
            "lost_or_misordered": len(problems), "problems": problems[:5]}


def sequence_load(url: str, concurrency: int, duration_s: float) -> dict:
    """`concurrency` clients, each running sequences of SEQUENCE_STEPS steps (gRPC unary): steps/s,
    sequences run, and those that failed or summed wrong."""
    import tritonclient.grpc as grpcclient

    done = [0, 0, 0]  # steps, sequences, broken sequences
    reasons: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def client(k: int) -> None:
        c = grpcclient.InferenceServerClient(url)
        try:
            n = 0
            while time.monotonic() < stop_at:
                sid = 1_000_000 * (k + 1) + n
                total, ok, steps = 0, True, 0
                for i in range(SEQUENCE_STEPS):
                    inp = grpcclient.InferInput("INPUT", [1, 1], "INT32")
                    inp.set_data_from_numpy(np.array([[i + 1]], dtype=np.int32))
                    total += i + 1
                    try:
                        res = c.infer(INT_MODEL, [inp], sequence_id=sid, sequence_start=i == 0,
                                      sequence_end=i == SEQUENCE_STEPS - 1)
                        steps += 1
                        if int(res.as_numpy("OUTPUT").reshape(-1)[0]) != total:
                            ok = False
                            reasons.append("wrong sum")
                            break
                    except Exception as exc:  # the split-brain failure this measures
                        ok = False
                        reasons.append(str(exc)[:120])
                        break
                with lock:
                    done[0] += steps
                    done[1] += 1
                    done[2] += 0 if ok else 1
                n += 1
        finally:
            c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"steps_per_s": done[0] / (time.monotonic() - t0), "sequences": done[1], "broken": done[2],
            "broken_share": done[2] / done[1] if done[1] else float("nan"), "reasons": sorted(set(reasons))[:3]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_streaming", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows, one concurrency (smoke run)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated (default 1,4,16)")
    parser.add_argument("--out", default="loadtests/results/streaming", help="output directory")
    args = parser.parse_args(argv)
    if not TRITON_WRAPPER.exists() or not perf_analyzer_available():
        print("tritonserver / perf_analyzer missing: run `make triton-env` first", file=sys.stderr)
        return 2
    require_haproxy()
    levels = [2] if args.quick else [int(c) for c in args.concurrency.split(",")]
    interval_ms, duration_s = (500, 2.0) if args.quick else (2000, 6.0)
    work = Path(tempfile.mkdtemp(prefix="geogate-bench-streaming-"))
    logs = work / "logs"
    repo = work / "repo"
    write_python_backend_entry(repo, 1)
    write_repeat_model(repo, work / "sent")
    write_accumulators(repo)
    procs: list[Proc] = []
    results: dict[str, dict] = {}
    try:
        tritons = [Triton(repo, logs, f"triton{i}") for i in range(2)]
        procs += tritons
        for t in tritons:
            t.wait_ready()
        region = RegionConfig("r1", pools=[PoolConfig("tri", [f"grpc://{t.grpc}" for t in tritons], kind="triton")])
        cfg = write_config(work / "geogate.toml", [region], store_dir=str(work / "store"),
                           sections={"health": {"interval_ms": 300, "timeout_ms": 250}})
        gw = GatewayProc(cfg, region, log_dir=logs)
        procs.append(gw)
        gw.wait_ready()
        gw.wait_all_healthy()
        haproxy = HaproxyProc(work, [t.grpc for t in tritons], log_dir=logs, h2=True)
        procs.append(haproxy)
        haproxy.wait_ready()
        paths = {"direct": tritons[0].grpc, "haproxy": haproxy.address, "geogate": gw.grpc_address}
        for c in levels:
            for name, url in paths.items():
                cell = {"perf_analyzer": perf_analyzer(url, c, interval_ms),
                        "decoupled": decoupled_load(url, c, duration_s),
                        "sequences": sequence_load(url, c, duration_s)}
                results.setdefault(str(c), {})[name] = cell
                print(f"c={c} {name}: {json.dumps(cell)}", flush=True)
    finally:
        for p in reversed(procs):
            p.stop()
    report(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'results.json'}")
    lost = sum(cell["decoupled"]["lost_or_misordered"] + cell["sequences"]["broken"] for by_path in results.values()
               for name, cell in by_path.items() if name == "geogate")
    return 1 if lost else 0


def report(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ModelStreamInfer: perf_analyzer --streaming (demo) and a decoupled model (repeat, "
                        f"{RESPONSES_PER_REQUEST} responses/request)")
    for col in ("c", "path", "pa infer/s", "pa p50 ms", "pa p99 ms", "resp/s", "ttfr p50 ms", "ttfr p99 ms", "lost",
                "seq steps/s", "seq broken", "geogate/haproxy (pa / resp)", "geogate/direct (pa / resp)"):
        table.add_column(col, justify="right")
    for c, by_path in results.items():
        g = by_path.get("geogate", {})
        for name, cell in by_path.items():
            pa, dc = cell["perf_analyzer"], cell["decoupled"]
            ratios = ["", ""]
            if name == "geogate":
                for i, peer in enumerate(("haproxy", "direct")):
                    p = by_path.get(peer, {})
                    pa_ratio = dc_ratio = "-"
                    try:
                        pa_ratio = f"{g['perf_analyzer']['throughput'] / p['perf_analyzer']['throughput']:.2f}x"
                    except (KeyError, ZeroDivisionError):
                        pass
                    try:
                        dc_ratio = f"{g['decoupled']['responses_per_s'] / p['decoupled']['responses_per_s']:.2f}x"
                    except (KeyError, ZeroDivisionError):
                        pass
                    ratios[i] = f"{pa_ratio} / {dc_ratio}"
            nan = float("nan")
            pa_cells = ["fails", "", ""] if "error" in pa else [
                f"{pa.get('throughput', nan):.0f}", f"{pa.get('p50_ms', nan):.2f}", f"{pa.get('p99_ms', nan):.2f}"]
            table.add_row(c, name, *pa_cells, f"{dc['responses_per_s']:.0f}", f"{dc['ttfr_p50_ms']:.2f}",
                          f"{dc['ttfr_p99_ms']:.2f}", str(dc["lost_or_misordered"]),
                          f"{cell['sequences']['steps_per_s']:.0f}",
                          f"{cell['sequences']['broken']}/{cell['sequences']['sequences']}", *ratios)
    Console(width=220).print(table)


if __name__ == "__main__":
    sys.exit(main())
