"""NVIDIA's perf_analyzer (the real binary, installed by `make triton-env`) works against the
gateway unchanged, over HTTP and gRPC: it reads the server and model metadata and config the
gateway answers, sends its requests through it, and every request succeeds."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.gateway_procs import GatewayProc, demo_repository, replica_urls, start_replicas

PERF_ANALYZER = Path(__file__).resolve().parents[2] / ".venv-triton" / "bin" / "perf_analyzer-geogate"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_through_the_gateway(tmp_path, procs, protocol):
    assert PERF_ANALYZER.exists(), "perf_analyzer is missing: run `make triton-env`"
    reps = start_replicas(procs, demo_repository(tmp_path), 2, faults=False)
    gw = GatewayProc(tmp_path, replicas=replica_urls(reps, (protocol,)))
    procs.append(gw)
    gw.wait_ready()
    url = gw.http if protocol == "http" else gw.grpc
    out = subprocess.run([str(PERF_ANALYZER), "-m", "demo", "-i", protocol, "-u", url, "--concurrency-range", "2",
                          "--measurement-interval", "1000", "--max-trials", "10", "-s", "100", "-b", "2"],
                         capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    count = re.search(r"Request count: (\d+)", text)
    assert count and int(count.group(1)) > 0, text[-3000:]
    assert re.search(r"Concurrency: 2, throughput: [\d.]+ infer/sec", text), text[-3000:]
