"""`geogate bench sweep --quick` (the data-path sweep with perf_analyzer, HAProxy and geogate)
runs end to end as a smoke test: every cell has figures, geogate never fails where a direct
call succeeds, and the results file says so."""

from __future__ import annotations

import json
import subprocess

from tests.procs import GEOGATE


def test_sweep_smoke(tmp_path):
    out = subprocess.run([*GEOGATE, "bench", "sweep", "--quick", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    cells = doc["cells"]
    assert {(c["protocol"], c["concurrency"]) for c in cells} == {("http", 1), ("http", 8), ("grpc", 1), ("grpc", 8)}
    for c in cells:
        grpc_only = ("geogate-Nw-g",) if c["protocol"] == "grpc" else ()
        paths = ("direct", "haproxy", "geogate-1w", "geogate-Nw", *grpc_only)
        for path in paths:
            assert "error" not in c[path] and c[path]["throughput"] > 0, (c["protocol"], c["concurrency"], path,
                                                                          c[path])
        assert c["geogate-Nw/haproxy"] > 0
    assert "perf_analyzer sweep" in out.stdout
