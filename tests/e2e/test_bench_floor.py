"""`python -m loadtests.bench_floor` (HAProxy, the gateway and the minimal Python proxy, HTTP,
perf_analyzer) runs end to end as a smoke test: every path serves and the table has figures."""

from __future__ import annotations

import subprocess
import sys

PATHS = ("haproxy", "geogate-1w", "minimal-1p")


def test_floor_smoke(tmp_path):
    out = subprocess.run([sys.executable, "-m", "loadtests.bench_floor", "--rounds", "1", "--concurrency", "4"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| 4 |")]
    names = [r[2].strip() for r in rows]
    for path in PATHS:
        assert path in names, (path, out.stdout[-2000:])
    for r in rows:
        assert float(r[3]) > 0 and r[6].strip().endswith("x"), r
