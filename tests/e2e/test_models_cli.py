"""`geogate models ...` as operators run it: real processes, on file:// and on moto s3://."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from replicas.demo.onnx_model import write_repository_entry
from tests.s3_fixtures import moto_s3, store_url  # noqa: F401

GEOGATE = [sys.executable, "-m", "gateway", "models"]


def models(store: str, *args: str, who: str = "tester", check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([*GEOGATE, *args, "--store", store, "--who", who], capture_output=True, text=True,
                       timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"geogate models {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def repo(tmp_path):
    for v in (1, 2, 3):
        write_repository_entry(tmp_path / "repo", v)
    return tmp_path / "repo" / "demo"


def test_push_list_refuse_overwrite(store_url, repo):  # noqa: F811
    out = models(store_url, "push", "demo", str(repo), "--version", "1", "--quiet").stdout
    assert "pushed demo version 1: 2 files" in out
    # A version directory: the version is its name, the config comes from the parent.
    models(store_url, "push", "demo", str(repo / "2"), "--quiet")
    again = models(store_url, "push", "demo", str(repo), "--version", "1", "--quiet", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr and "immutable" in again.stderr
    listing = json.loads(models(store_url, "list", "--json").stdout)
    assert [v["version"] for v in listing["demo"]["versions"]] == ["1", "2"]
    assert all(v["complete"] and v["files"] == 2 for v in listing["demo"]["versions"])
    assert listing["demo"]["release"] is None
    table = models(store_url, "list").stdout
    assert "demo" in table and "1, 2" in table
    models(store_url, "promote", "demo", "2")
    models(store_url, "canary", "demo", "1", "--weight", "0.25")
    rec = json.loads(models(store_url, "list", "--json").stdout)["demo"]["release"]
    assert rec["stable"] == "2" and rec["canary"] == {"version": "1", "weight": 0.25}
    out = models(store_url, "rollback", "demo").stdout
    assert "rolled back the canary" in out
    bad = models(store_url, "promote", "demo", "5", check=False)
    assert bad.returncode == 1 and "not in the store" in bad.stderr
    st = models(store_url, "status", "--json")
    assert json.loads(st.stdout) == {}


def test_racing_promote_processes_one_wins(store_url, repo):  # noqa: F811
    for v in (1, 2, 3):
        models(store_url, "push", "demo", str(repo), "--version", str(v), "--quiet")
    models(store_url, "promote", "demo", "1", who="setup")
    # 8 operators who all looked at generation 1 promote at the same moment.
    procs = [subprocess.Popen([*GEOGATE, "promote", "demo", str(2 + i % 2), "--if-generation", "1",
                               "--store", store_url, "--who", f"op{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(rc for rc, _ in results)
    assert codes == [0] + [3] * 7, results
    assert all("NOT applied" in err for rc, err in results if rc == 3)
    rec = json.loads(models(store_url, "list", "--json").stdout)["demo"]["release"]
    assert rec["generation"] == 2 and len(rec["history"]) == 2
    winner = rec["history"][-1]
    assert winner["who"].startswith("op") and rec["stable"] == winner["version"]


def test_usage_errors(tmp_path):
    p = subprocess.run([*GEOGATE, "list"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "--config FILE or --store URL" in p.stderr
    cfg = tmp_path / "g.toml"
    cfg.write_text('[store]\nurl = "file://st"\nbogus = 1\n')
    p = subprocess.run([*GEOGATE, "list", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "store.bogus: unknown key" in p.stderr
    cfg.write_text('[store]\nurl = "file://st"\n')
    p = subprocess.run([*GEOGATE, "list", "--json", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    # A read never creates the store (tests/e2e/test_hardening_ops.py has the variants).
    assert p.returncode == 1 and f"directory {tmp_path / 'st'} does not exist" in p.stderr, p.stderr
    assert not (tmp_path / "st").exists()
    write_repository_entry(tmp_path / "repo", 1)
    p = subprocess.run([*GEOGATE, "push", "demo", str(tmp_path / "repo" / "demo"), "--quiet", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "st" / "models" / "demo" / "1").is_dir()  # relative to the config file's directory
    t0 = time.monotonic()
    p = subprocess.run([*GEOGATE, "list", "--json", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and list(json.loads(p.stdout)) == ["demo"] and time.monotonic() - t0 < 60
