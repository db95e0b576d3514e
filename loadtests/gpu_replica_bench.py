"""GPU check: the heavy demo model in a `geogate replica` on ONNX Runtime CUDA vs CPU.

    python -m loadtests.gpu_replica_bench [--quick] [--cpu-only] [--requests N] [--concurrency C]

Needs the `onnxruntime-gpu` package (with its `[cuda,cudnn]` extras) in place of `onnxruntime`
(never both in one environment: PLATFORM-NOTES). Writes the heavy demo model
(`replicas.demo.onnx_model.write_repository_entry(dir, 1, size="heavy")`) twice: once with
``instance_group [{ kind: KIND_GPU }]`` (the replica asks ORT for CUDA first) and once with
``KIND_CPU`` (the replica's way to force the CPU: `replicas.server.model_config.wants_gpu`). For each,
a `geogate replica` is started and measured over gRPC:

- batch-1 latency: one single-row request at a time (p50 / p99);
- batched throughput: a closed loop of single-row requests at --concurrency (the replica's
  dynamic batcher merges them), and a closed loop of 64-row requests.

Which execution provider each run really used is read back from the replica
(`geogate_replica_execution_provider_info` on /metrics): asking for CUDA on a machine where it
does not work falls back to CPU silently, so only that answer counts.

Where this onnxruntime build has no CUDA provider (the CPU package, or no GPU), the script says
so and measures the CPU run alone, so the same command works on any machine.

Exit status: 0 measured (both runs, GPU run really on CUDA; or --cpu-only), 2 CUDA not
available in this onnxruntime build (only the CPU run was measured), 3 the replica was asked
for CUDA but ran on CPU, 1 anything else failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from loadtests.procs import ReplicaProc
from replicas.demo.onnx_model import SPECS, reference_outputs, write_repository_entry

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
MODEL = SPECS["heavy"].model_name
WIDTH = SPECS["heavy"].layer_widths[0]
OUT_WIDTH = SPECS["heavy"].layer_widths[-1]
BIG_BATCH_ROWS = 64
READY_TIMEOUT_S = 180.0
PROVIDER_METRIC = "geogate_replica_execution_provider_info"
EXIT_FAILED, EXIT_NO_CUDA, EXIT_FELL_BACK = 1, 2, 3


def write_repository(root: Path, kind: str) -> Path:
    """The heavy demo with every instance group of `kind` (KIND_GPU or KIND_CPU)."""
    model_dir = write_repository_entry(root, 1, size="heavy")
    cfg = model_dir / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("kind: KIND_AUTO", f"kind: {kind}"))
    return root


def provider_of(replica: ReplicaProc) -> str:
    """The execution provider the replica reports for demo-heavy v1 (from its /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{replica.http_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == PROVIDER_METRIC and s.labels.get("model") == MODEL and s.value == 1:
                return s.labels["provider"]
    return "unknown"


async def measure(address: str, *, requests: int, concurrency: int, duration_s: float) -> dict:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def request(rows: int, x: np.ndarray) -> service_pb2.ModelInferRequest:
        req = service_pb2.ModelInferRequest(model_name=MODEL, model_version="1")
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, WIDTH])
        req.raw_input_contents.append(x.tobytes())
        return req

    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, WIDTH)).astype(np.float32)
    xb = rng.standard_normal((BIG_BATCH_ROWS, WIDTH)).astype(np.float32)
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=opts) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        # Correctness first: the answer must be the model's (a wrong device result would show).
        resp = await stub.ModelInfer(request(1, x1), timeout=60)
        got = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(1, OUT_WIDTH)
        if not np.allclose(got, reference_outputs("heavy", 1, x1), rtol=1e-3, atol=1e-3):
            raise RuntimeError("wrong outputs from the replica")
        for _ in range(10):  # warm-up (CUDA kernels, allocator)
            await stub.ModelInfer(request(1, x1), timeout=60)
        single = request(1, x1)
        lat = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await stub.ModelInfer(single, timeout=60)
            lat.append(time.perf_counter() - t0)
        lat_ms = np.array(lat) * 1000.0

        async def closed_loop(req, workers: int) -> float:
            done = 0
            stop_at = time.perf_counter() + duration_s

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < stop_at:
                    await stub.ModelInfer(req, timeout=60)
                    done += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(workers)))
            return done / (time.perf_counter() - t0)

        merged = await closed_loop(single, concurrency)
        big = await closed_loop(request(BIG_BATCH_ROWS, xb), 4)
    return {"batch1_p50_ms": float(np.percentile(lat_ms, 50)), "batch1_p99_ms": float(np.percentile(lat_ms, 99)),
            "merged_rows_per_s": merged, "batch64_rows_per_s": big * BIG_BATCH_ROWS}


def run_one(label: str, kind: str, work: Path, args: argparse.Namespace) -> tuple[str, dict]:
    repo = write_repository(work / label, kind)
    extra = ["--log-level", "warning"]
    if kind == "KIND_CPU":
        extra += ["--intra-op-threads", str(args.cpu_threads)]
    replica = ReplicaProc(repo, name=f"replica-{label}", log_dir=work / "logs", enable_test_faults=False,
                          extra=extra)
    try:
        replica.wait_ready(READY_TIMEOUT_S)
        provider = provider_of(replica)
        print(f"[{label}] asked for {kind}: the replica runs {MODEL} on {provider}", flush=True)
        figures = asyncio.run(measure(replica.grpc_address, requests=args.requests,
                                      concurrency=args.concurrency, duration_s=args.duration_s))
        return provider, figures
    finally:
        replica.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, shorter loops")
    ap.add_argument("--cpu-only", action="store_true",
                    help="measure only the CPU run (to check this script on a machine without a GPU)")
    ap.add_argument("--requests", type=int, default=None, help="batch-1 latency samples (default 500; quick 100)")
    ap.add_argument("--concurrency", type=int, default=64, help="closed-loop single-row requests in flight")
    ap.add_argument("--duration-s", type=float, default=None, help="seconds per throughput loop (default 10; quick 3)")
    ap.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 1,
                    help="ONNX Runtime intra-op threads for the CPU run (default: all cores)")
    args = ap.parse_args(argv)
    args.requests = args.requests or (100 if args.quick else 500)
    args.duration_s = args.duration_s or (3.0 if args.quick else 10.0)

    import onnxruntime as ort

    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, device {ort.get_device()}, providers {available}", flush=True)
    no_cuda = CUDA not in available and not args.cpu_only
    if no_cuda:
        print(f"CUDA is not available: this onnxruntime build offers {available}, so no GPU figures; "
              "measuring the CPU run alone. For the GPU run install onnxruntime-gpu (with its [cuda,cudnn] "
              "extras) instead of onnxruntime on a machine with an NVIDIA GPU.", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="geogate-gpu-bench-"))
    runs = [("cpu", "KIND_CPU")] if args.cpu_only or no_cuda else [("gpu", "KIND_GPU"), ("cpu", "KIND_CPU")]
    results: dict[str, tuple[str, dict]] = {}
    try:
        for label, kind in runs:
            results[label] = run_one(label, kind, work, args)
    except Exception as exc:
        print(f"failed: {type(exc).__name__}: {exc} (logs in {work / 'logs'})", file=sys.stderr)
        return EXIT_FAILED
    print(f"\n{'run':<5} {'provider':<24} {'b1 p50 ms':>9} {'b1 p99 ms':>9} "
          f"{'rows/s @c' + str(args.concurrency):>13} {'rows/s b64':>11}")
    for label, (provider, f) in results.items():
        print(f"{label:<5} {provider:<24} {f['batch1_p50_ms']:>9.3f} {f['batch1_p99_ms']:>9.3f} "
              f"{f['merged_rows_per_s']:>13.0f} {f['batch64_rows_per_s']:>11.0f}")
    if "gpu" in results:
        provider, gpu = results["gpu"]
        cpu = results["cpu"][1]
        print(f"\nGPU vs CPU: batch-1 p50 {cpu['batch1_p50_ms'] / gpu['batch1_p50_ms']:.2f}x faster, "
              f"merged throughput {gpu['merged_rows_per_s'] / cpu['merged_rows_per_s']:.2f}x, "
              f"64-row throughput {gpu['batch64_rows_per_s'] / cpu['batch64_rows_per_s']:.2f}x")
        if provider != CUDA:
            print(f"the GPU run was asked for CUDA but ran on {provider}: ONNX Runtime fell back (missing "
                  "CUDA/cuDNN libraries or no usable GPU); the figures above are CPU figures", file=sys.stderr)
            return EXIT_FELL_BACK
    if no_cuda:
        print("CUDA absent: CPU figures only", file=sys.stderr)
        return EXIT_NO_CUDA
    return 0


if __name__ == "__main__":
    sys.exit(main())
