"""How long from `promote` until every site serves the new version?

For each store (the local directory store, then a real moto S3 server), starts N sites, each
with its own model repository, replica processes (`geogate replica`) and sync agent
(`geogate sync`, poll interval 500 ms), pushes and promotes version 1 of the demo model and
waits until every site serves it; then pushes version 2 carrying a padding file so the version
is ``--size-mb`` big (default 100 MB), promotes it and measures:

- push:           uploading version 2 (`push_version`, before the clock starts);
- first site:     promote -> the first site's replicas all answer version 2 correctly;
- all sites:      promote -> every site's replicas answer version 2 (what global cutover waits for);
- status ready:   promote -> every site's status.json lists version 2 ready (what gateways read).

    .venv/bin/python -m loadtests.bench_promotion            # 3 sites x 2 replicas, 100 MB
    .venv/bin/python -m loadtests.bench_promotion --quick    # 2 sites x 1 replica, 100 MB
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # loadtests.* when run as a file

from loadtests.procs import GEOGATE, Proc, ReplicaProc, free_port, port_open
from replicas.demo.onnx_model import write_repository_entry
from replicas.releases.models_cli import push_version
from replicas.releases.records import Releases
from replicas.releases.site_status import read_all_sites
from replicas.store import open_store

POLL_INTERVAL_MS = 500
MAX_WAIT_S = 600.0
CHECK_EVERY_S = 0.05
PADDING_CHUNK = 8 * 1024 * 1024
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def serves(replica: ReplicaProc, version: int) -> bool:
    """The replica answers version ``version`` of the demo model, with that version's outputs."""
    import numpy as np
    import tritonclient.http as thttp

    from replicas.demo.onnx_model import reference_outputs

    x = np.random.default_rng().standard_normal((2, 16)).astype(np.float32)
    client = thttp.InferenceServerClient(replica.http_address)
    try:
        inp = thttp.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("demo", [inp], model_version=str(version))
        return (res.get_response()["model_version"] == str(version)
                and np.allclose(res.as_numpy("OUTPUT0"), reference_outputs("tiny", version, x), atol=1e-4))
    except Exception:
        return False
    finally:
        client.close()


def write_config(path: Path, store_url: str, sites: dict[str, list[ReplicaProc]]) -> None:
    lines = [f'[store]\nurl = "{store_url}"\n', f"[sync]\npoll_interval_ms = {POLL_INTERVAL_MS}\nkeep_previous = 1\n"]
    for name, reps in sites.items():
        urls = ", ".join(f'"http://{r.http_address}"' for r in reps)
        lines.append(f'[[regions]]\nname = "{name}"\n  [[regions.pools]]\n  name = "{name}-ort"\n'
                     f'  replicas = [{urls}]\n  repository = "{name}/models"\n')
    path.write_text("\n".join(lines))


def make_source(root: Path, size_mb: int) -> Path:
    for v in (1, 2):
        write_repository_entry(root, v)
    pad = root / "demo" / "2" / "padding.bin"
    remaining = size_mb * 1024 * 1024 - (root / "demo" / "2" / "model.onnx").stat().st_size
    with open(pad, "wb") as f:
        while remaining > 0:
            n = min(PADDING_CHUNK, remaining)
            f.write(os.urandom(n))
            remaining -= n
    return root / "demo"


async def _store_do(url: str, fn):
    store = open_store(url)
    try:
        return await fn(store)
    finally:
        await store.close()


def wait(check, what: str, procs: list[Proc]) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < MAX_WAIT_S:
        if check():
            return time.monotonic()
        time.sleep(CHECK_EVERY_S)
    logs = "\n".join(f"--- {p.name}\n{p.output()[-2000:]}" for p in procs)
    raise SystemExit(f"timed out waiting for {what}\n{logs}")


def trial(store_label: str, store_url: str, work: Path, src: Path, n_sites: int, replicas_per_site: int,
          size_mb: int) -> dict:
    procs: list[Proc] = []
    try:
        names = [f"site{i}" for i in range(n_sites)]
        sites: dict[str, list[ReplicaProc]] = {}
        for name in names:
            repo = work / name / "models"
            repo.mkdir(parents=True)
            sites[name] = [ReplicaProc(str(repo), name=f"replica-{name}-{i}", log_dir=work / "logs",
                                       enable_test_faults=False) for i in range(replicas_per_site)]
            procs.extend(sites[name])
        for r in (r for reps in sites.values() for r in reps):
            r.wait_ready(120)
        cfg = work / "geogate.toml"
        write_config(cfg, store_url, sites)
        asyncio.run(_store_do(store_url, lambda s: push_version(s, "demo", src, version="1", who="bench")))
        asyncio.run(_store_do(store_url, lambda s: Releases(s).promote("demo", "1", who="bench")))
        for name in names:
            procs.append(Proc([*GEOGATE, "sync", "--config", str(cfg), "--site", name, "--log-level", "warning"],
                              name=f"sync-{name}", log_dir=work / "logs"))
        wait(lambda: all(serves(r, 1) for reps in sites.values() for r in reps), "v1 everywhere", procs)
        t_push = time.monotonic()
        asyncio.run(_store_do(store_url, lambda s: push_version(s, "demo", src, version="2", who="bench")))
        push_s = time.monotonic() - t_push

        t0 = time.monotonic()
        asyncio.run(_store_do(store_url, lambda s: Releases(s).promote("demo", "2", who="bench")))
        done: dict[str, float] = {}
        status_at = None
        while len(done) < n_sites or status_at is None:
            now = time.monotonic()
            if now - t0 > MAX_WAIT_S:
                raise SystemExit(f"{store_label}: not converged after {MAX_WAIT_S}s: {done}")
            for name in names:
                if name not in done and all(serves(r, 2) for r in sites[name]):
                    done[name] = time.monotonic() - t0
            if status_at is None:
                st = asyncio.run(_store_do(store_url, read_all_sites))
                if len(st) == n_sites and all(s.ready("demo", "2") for s in st.values()):
                    status_at = time.monotonic() - t0
            time.sleep(CHECK_EVERY_S)
        return {"store": store_label, "size_mb": size_mb, "sites": f"{n_sites} x {replicas_per_site}",
                "push_s": push_s, "first_s": min(done.values()), "all_s": max(done.values()),
                "status_s": status_at}
    finally:
        for p in reversed(procs):
            p.stop()


def start_moto(log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                name="moto", log_dir=log_dir)
    proc.wait_until(lambda: port_open(port), 30, "listening")
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return proc, endpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 sites x 1 replica")
    ap.add_argument("--sites", type=int, default=None)
    ap.add_argument("--replicas", type=int, default=None, help="replicas per site")
    ap.add_argument("--size-mb", type=int, default=100, help="size of version 2 (padding file)")
    ap.add_argument("--stores", default="file,s3", help="comma-separated: file, s3")
    args = ap.parse_args(argv)
    n_sites = args.sites or (2 if args.quick else 3)
    per_site = args.replicas or (1 if args.quick else 2)
    base = Path(tempfile.mkdtemp(prefix="geogate-bench-promotion-"))
    rows = []
    moto = None
    try:
        src = make_source(base / "src", args.size_mb)
        for label in args.stores.split(","):
            work = base / label
            work.mkdir()
            if label == "file":
                url = f"file://{work / 'store'}"
            elif label == "s3":
                moto, _ = start_moto(base / "logs")
                url = "s3://bench/geogate"
            else:
                raise SystemExit(f"--stores: unknown store {label!r} (file, s3)")
            print(f"running {label} ({n_sites} sites x {per_site} replicas, {args.size_mb} MB)...", flush=True)
            rows.append(trial(label, url, work, src, n_sites, per_site, args.size_mb))
    finally:
        if moto is not None:
            moto.stop()
        shutil.rmtree(base, ignore_errors=True)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"promote -> serving (sync poll {POLL_INTERVAL_MS} ms)")
    for col in ("store", "version size", "sites x replicas", "push", "first site serves", "all sites serve",
                "all status ready"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["store"], f"{r['size_mb']} MB", r["sites"], f"{r['push_s']:.2f} s", f"{r['first_s']:.2f} s",
                      f"{r['all_s']:.2f} s", f"{r['status_s']:.2f} s")
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
