"""A world with model releases, for promotion scenarios: an object store (a local directory, or
moto S3 behind a cuttable TCP proxy), sites with EMPTY model repositories filled by their sync
agents (`geogate sync`), replicas that load what the agents install, gateways whose version
resolver follows the release records and site status, and the `geogate models` CLI as the
operator's hand.

    world = ReleaseWorld(ctx, {"eu-west": 2, "us-east": 1}, s3=True)
    world.start(gateways=["eu-west"])      # v1 pushed, promoted, served everywhere; v2 pushed
    world.models("promote", "demo", "2")   # what an operator types
    world.cut_store() / world.restore_store()   (s3 only)
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

from loadtests.procs import (
    GEOGATE,
    S3_ENV,
    MotoProc,
    PoolConfig,
    RegionConfig,
    ReplicaProc,
    SyncProc,
    TcpProxyProc,
)

LOCATIONS = {"eu-west": (53.35, -6.26), "us-east": (38.9, -77.0), "eu-central": (50.11, 8.68)}
MODEL = "demo"
WHO = "loadtests"
CLI_TIMEOUT_S = 60.0
SERVE_TIMEOUT_S = 90.0
SECTIONS: dict[str, dict[str, Any]] = {
    "health": {"interval_ms": 250, "timeout_ms": 500, "rise": 1, "fall": 2},
    "sync": {"poll_interval_ms": 500, "resolver_poll_interval_ms": 500},
    "dns": {"check_interval_ms": 250, "check_timeout_ms": 200, "fall": 2, "rise": 1},
}


class ReleaseWorld:
    def __init__(self, ctx, sites: dict[str, int], *, s3: bool = False, sections: dict[str, dict] | None = None):
        self.ctx = ctx
        self.sites = sites
        self.s3 = s3
        self.sections = {**SECTIONS, **(sections or {})}
        self.env: dict[str, str] = dict(S3_ENV) if s3 else {}
        self.moto: MotoProc | None = None
        self.proxy: TcpProxyProc | None = None
        self.replicas: dict[str, list[ReplicaProc]] = {}
        self.syncs: dict[str, SyncProc] = {}
        self.regions: list[RegionConfig] = []
        self.cli_log: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup

    def _store(self) -> dict[str, Any]:
        if not self.s3:
            return {"url": "file://" + str(self.ctx.work_dir / "store")}
        self.moto = self.ctx.add(MotoProc(log_dir=self.ctx.log_dir)).wait_ready()
        self.proxy = self.ctx.add(TcpProxyProc(f"127.0.0.1:{self.moto.port}", log_dir=self.ctx.log_dir)).wait_ready()
        return {"url": f"s3://{self.moto.bucket}/geogate", "endpoint_url": f"http://{self.proxy.address}",
                "region": S3_ENV["AWS_DEFAULT_REGION"]}

    def start(self, *, gateways: list[str]) -> None:
        """Sites up and serving v1 (installed by their sync agents), the `gateways` started, v2
        pushed (not promoted)."""
        from replicas.demo.onnx_model import write_repository_entry

        ctx = self.ctx
        self.source = ctx.work_dir / "source"
        for v in (1, 2):
            write_repository_entry(self.source, v)
        store = self._store()
        for site, n in self.sites.items():
            repo = ctx.work_dir / site / "models"
            repo.mkdir(parents=True, exist_ok=True)
            self.replicas[site] = ctx.start_replicas([f"{site}-{chr(ord('a') + i)}" for i in range(n)], repo,
                                                     wait=False)
            self.regions.append(RegionConfig(site, LOCATIONS.get(site, (0.0, 0.0)), pools=[
                PoolConfig(f"{site}-ort", [r.url("http") for r in self.replicas[site]], repository=str(repo))]))
        for reps in self.replicas.values():
            for r in reps:
                r.wait_ready()
        self.config = ctx.write_config(self.regions, sections=self.sections, store=store)
        self.store_section = store
        # setup through the library (one interpreter instead of three CLI runs); the promotion
        # under load goes through the CLI, as an operator would
        asyncio.run(self._push_and_promote([("1", True), ("2", False)]))
        for site in self.sites:
            self.syncs[site] = ctx.add(SyncProc(self.config, site, log_dir=ctx.log_dir, env=self.env))
        self.wait_served("1")
        ctx.start_gateways(self.regions, config=self.config, start=gateways, env=self.env)

    async def _push_and_promote(self, steps: list[tuple[str, bool]]) -> None:
        from replicas.releases.models_cli import push_version
        from replicas.releases.records import Releases
        from replicas.store import open_store

        st = self.store_section
        if self.s3:
            from replicas.store.s3_store import S3Store

            store = S3Store(st["url"], endpoint_url=st["endpoint_url"], region=st["region"],
                            access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])
        else:
            store = open_store(st["url"])
        try:
            for version, promote in steps:
                await push_version(store, MODEL, self.source / MODEL / version, version=version, who=WHO)
                if promote:
                    await Releases(store).promote(MODEL, version, who=WHO)
        finally:
            await store.close()

    def wait_served(self, version: str, timeout_s: float = SERVE_TIMEOUT_S) -> None:
        """Until every replica of every site has `version` READY."""
        procs = [*self.syncs.values()]
        deadline = time.monotonic() + timeout_s
        while not all(r.serves(version, MODEL) for reps in self.replicas.values() for r in reps):
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited:\n{p.output()}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.output(1500)}" for p in procs)
                raise TimeoutError(f"version {version} not READY on every replica after {timeout_s:g} s\n{logs}")
            time.sleep(0.2)

    # ------------------------------------------------------------------ the operator's hand

    def models(self, *args: str) -> str:
        """`geogate models ARGS --config F --who loadtests`; returns its output, raises on a non-zero exit."""
        t0 = time.monotonic()
        out = subprocess.run([*GEOGATE, "models", *args, "--config", str(self.config), "--who", WHO],
                             capture_output=True,
                             text=True, timeout=CLI_TIMEOUT_S, env={**_environ(), **self.env})
        self.cli_log.append({"args": list(args), "rc": out.returncode, "s": round(time.monotonic() - t0, 2)})
        if out.returncode != 0:
            raise RuntimeError(f"geogate models {' '.join(args)} failed ({out.returncode}): "
                               f"{(out.stderr or out.stdout).strip()[-1500:]}")
        return out.stdout

    def cut_store(self) -> str:
        """The object store becomes unreachable: its proxy is killed (connections refused)."""
        assert self.proxy is not None, "cut_store needs the s3 store"
        self.proxy.kill()
        return f"store proxy {self.proxy.address} killed: S3 unreachable (connection refused)"

    def restore_store(self) -> str:
        assert self.proxy is not None and self.moto is not None
        self.proxy = self.ctx.add(TcpProxyProc(f"127.0.0.1:{self.moto.port}", log_dir=self.ctx.log_dir,
                                               port=self.proxy.port)).wait_ready()
        return f"store proxy {self.proxy.address} back"


def _environ() -> dict[str, str]:
    import os

    return {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
