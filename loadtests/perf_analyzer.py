"""NVIDIA's perf_analyzer (installed by `make triton-env`) as a load generator: one run against
one endpoint at one concurrency, its figures parsed from the summary it prints."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

PERF_ANALYZER = Path(__file__).resolve().parent.parent / ".venv-triton" / "bin" / "perf_analyzer-geogate"


def available() -> bool:
    return PERF_ANALYZER.exists()


def run(url: str, *, protocol: str, concurrency: int, model: str = "demo", interval_ms: int = 1000,
        streaming: bool = False, timeout_s: float = 300.0) -> dict:
    """{"throughput", "p50_ms", "p99_ms", "requests", "errors"} or {"error": the reason it stopped}."""
    argv = [str(PERF_ANALYZER), "-m", model, "-i", protocol, "-u", url, "--concurrency-range", str(concurrency),
            "--measurement-interval", str(interval_ms), "--max-trials", "10", "-s", "50"]
    if streaming:
        argv.append("--streaming")
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout_s:g} s"}
    text = out.stdout + out.stderr
    if out.returncode != 0:
        # e.g. through a round-robin proxy over several Tritons: perf_analyzer reads server-side
        # statistics each window from whichever server answers and stops ("failed to find the
        # requested model version"); a gateway answers statistics summed over its replicas
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit {out.returncode}"}

    def num(pattern: str) -> float:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else float("nan")

    return {"throughput": num(r"Throughput: ([\d.]+) infer/sec"), "p50_ms": num(r"p50 latency: (\d+) usec") / 1000,
            "p99_ms": num(r"p99 latency: (\d+) usec") / 1000, "requests": num(r"Request count: (\d+)"),
            "errors": 0}
