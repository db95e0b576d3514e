"""gateway-restart: a rolling restart of a region's gateway workers under load.

One `geogate gateway --workers 2` (workers share the ports with SO_REUSEPORT); SIGUSR2 to its
supervisor (gateway/server/workers.py) replaces the workers one at a time: a replacement
starts, and only once it serves does the old worker drain (readiness false, keep-alive
connections answered with Connection: close, in-flight requests finish, exit 0). Done twice
during the run.

Expected: zero failed requests, every answer verified, every old worker drained without
cutting a request off, all worker processes new after each restart.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from loadtests.loadgen import LoadSpec
from loadtests.procs import GEOGATE, PoolConfig, Proc, RegionConfig, http_ok
from loadtests.scenario import (
    Check,
    FaultAction,
    Scenario,
    ScenarioContext,
    check_no_wrong_answers,
    check_success_ratio,
)

REGION = "eu-west"
WORKERS = 2
DRAIN_TIMEOUT_MS = 5000
START_TIMEOUT_S = 60.0
SERVING_MARK = "serving: http"
HEALTH = {"interval_ms": 250, "timeout_ms": 500, "rise": 1, "fall": 2}
CUT_OFF = re.compile(r"stopped after [\d.]+ s drain \((\d+) requests cut off[:)]")


def worker_pids(supervisor_pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()}
    except OSError:
        return set()


class GatewayRestart(Scenario):
    name = "gateway-restart"
    description = "rolling restart of a gateway's workers (SIGUSR2) under load; zero failures"
    protocol = "http-binary"

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        repo = ctx.demo_repository()
        a, b = ctx.start_replicas(["replica-a", "replica-b"], repo)
        self.region = RegionConfig(REGION, pools=[PoolConfig("eu-ort", [a.url("http"), b.url("grpc")])])
        self.config = ctx.write_config([self.region], sections={"health": HEALTH,
                                                                "gateway": {"drain_timeout_ms": DRAIN_TIMEOUT_MS}})
        self.gateway = Proc([*GEOGATE, "gateway", "--config", str(self.config), "--region", REGION,
                             "--workers", str(WORKERS)], name="gateway", log_dir=ctx.log_dir, ports=self.region.ports)
        ctx.procs.append(self.gateway)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not http_ok(f"http://{self.region.http_address}/v2/health/ready") or \
                len(worker_pids(self.gateway.pid)) != WORKERS:
            if time.monotonic() > deadline:
                raise TimeoutError("gateway not ready")
            time.sleep(0.1)
        time.sleep(1.0)  # every worker probed the replicas
        self.duration_s = 8.0 if ctx.quick else 30.0
        url = (f"grpc://{self.region.grpc_address}" if self.protocol == "grpc"
               else f"http://{self.region.http_address}")
        ctx.notes["restarts"] = []
        # several gRPC channels so connections land on every worker
        return LoadSpec(url=url, protocol=self.protocol, model="demo", rate=40.0 if ctx.quick else 150.0,
                        duration_s=self.duration_s, timeout_s=5.0, grpc_channels=4)

    def _restart(self) -> FaultAction:
        def run() -> str:
            old = worker_pids(self.gateway.pid)
            t0 = time.monotonic()
            os.kill(self.gateway.pid, signal.SIGUSR2)
            deadline = t0 + START_TIMEOUT_S
            while time.monotonic() < deadline:
                now = worker_pids(self.gateway.pid)
                if len(now) == WORKERS and not now & old:
                    break
                time.sleep(0.05)
            new = worker_pids(self.gateway.pid)
            self.restarts.append({"old_pids": sorted(old), "new_pids": sorted(new),
                                  "all_new": len(new) == WORKERS and not new & old,
                                  "restart_s": round(time.monotonic() - t0, 2)})
            return f"workers {sorted(old)} -> {sorted(new)} in {time.monotonic() - t0:.2f} s"
        return FaultAction(0.0, "rolling restart", "gateway", run)

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        self.restarts = ctx.notes["restarts"]
        first, second = self._restart(), self._restart()
        first.at_s = round(self.duration_s * 0.15, 1)
        second.at_s = round(self.duration_s * 0.55, 1)
        return [first, second]

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        restarts = ctx.notes.get("restarts", [])
        checks = [check_success_ratio(results, 1.0, name="no failed requests"), check_no_wrong_answers(results),
                  Check("every worker replaced, twice", len(restarts) == 2 and all(r["all_new"] for r in restarts),
                        f"{restarts}")]
        cut = [int(m.group(1)) for m in CUT_OFF.finditer(_read(ctx.log_dir / "gateway.log"))]
        checks.append(Check("drained without cutting requests off", len(cut) >= 2 * WORKERS and not any(cut),
                            f"requests cut off at the drain deadline, per stopped worker: {cut}"))
        ctx.notes["rolling_restart"] = {"workers": WORKERS, "restarts": restarts, "cut_off_per_worker": cut}
        return checks


def _read(path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


SCENARIO = GatewayRestart
