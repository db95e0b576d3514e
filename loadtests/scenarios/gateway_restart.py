"""gateway-restart: a rolling restart of a region's gateway under load.

How the gateway allows it (gateway/main.py): `--workers N` (N > 1) makes every worker bind the
HTTP, gRPC and admin ports with SO_REUSEPORT; SIGTERM drains (readiness false, new arrivals
still served for a short notice, listeners closed, in-flight requests finish, exit 0). There
is no in-process rolling restart (no SIGHUP re-exec: the supervisor forwards SIGTERM to every
worker at once), so the rolling restart is done the way an operator would with two units:
two gateway processes for the same region, each `--workers 2` (so both share the ports
through SO_REUSEPORT), restarted one at a time: SIGTERM the first, wait until it exited (it
drained), start its replacement, wait until its workers serve, then the same for the second.

Why not one process: `geogate gateway --workers N` cannot restart its own workers one at a
time. Its supervisor (gateway/main.py `_supervise`) passes SIGTERM (and SIGINT) to every
worker at once, its SIGHUP only makes the workers re-read the API keys file (no re-exec, no
new code or config), and it never replaces a worker that exits: a worker
that drains after its own SIGTERM exits 0 and is simply gone (capacity N-1 until the whole
gateway restarts), and one that exits non-zero makes the supervisor stop all the others.

Expected: zero failed requests, every answer verified, each old unit drained (exit 0, no
request cut off at the drain deadline).
"""

from __future__ import annotations

import re
import time
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
STOP_WAIT_S = 20.0
START_TIMEOUT_S = 60.0
# A replacement counts as started when each of its workers logged "serving" and the replicas
# had time to pass a first health probe in those workers.
SERVING_MARK = "serving: http"
HEALTH = {"interval_ms": 250, "timeout_ms": 500, "rise": 1, "fall": 2}
CUT_OFF = re.compile(r"stopped after [\d.]+ s drain \((\d+) requests cut off\)")
WHY_TWO_UNITS = ("geogate gateway --workers N has no in-process rolling restart: the supervisor forwards SIGTERM "
                 "to all workers at once, SIGHUP only re-reads the API keys, and no worker that exits is replaced")


class GatewayUnit(Proc):
    """One `geogate gateway --workers N` process (a "unit"), named so two can share a region."""

    def __init__(self, config_path, region: RegionConfig, *, name: str, log_dir, workers: int = WORKERS):
        self.region = region
        self.workers = workers
        args = [*GEOGATE, "gateway", "--config", str(config_path), "--region", region.name,
                "--workers", str(workers)]
        super().__init__(args, name=name, log_dir=log_dir, ports=region.ports)
        self.log_offset = 0

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> GatewayUnit:
        def serving() -> bool:
            text = self.log_path.read_text(errors="replace")[self.log_offset:]
            return text.count(SERVING_MARK) >= self.workers
        self.wait_until(serving, timeout_s, what="serving on every worker")
        return self


class GatewayRestart(Scenario):
    name = "gateway-restart"
    description = "rolling restart of a region's gateway (two SO_REUSEPORT units) under load; zero failures"
    protocol = "http-binary"

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        repo = ctx.demo_repository()
        a, b = ctx.start_replicas(["replica-a", "replica-b"], repo)
        self.region = RegionConfig(REGION, pools=[PoolConfig("eu-ort", [a.url("http"), b.url("grpc")])])
        self.config = ctx.write_config([self.region], sections={"health": HEALTH,
                                                                "gateway": {"drain_timeout_ms": DRAIN_TIMEOUT_MS}})
        self.units = [self._start_unit(ctx, "gateway-1"), self._start_unit(ctx, "gateway-2")]
        for u in self.units:
            u.wait_serving()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not http_ok(f"http://{self.region.http_address}/v2/health/ready"):
            if time.monotonic() > deadline:
                raise TimeoutError("gateway units not ready")
            time.sleep(0.1)
        time.sleep(1.0)  # every worker probed the replicas
        self.duration_s = 8.0 if ctx.quick else 30.0
        url = (f"grpc://{self.region.grpc_address}" if self.protocol == "grpc"
               else f"http://{self.region.http_address}")
        ctx.notes["restarts"] = []
        # several gRPC channels so connections land on every worker of both units
        return LoadSpec(url=url, protocol=self.protocol, model="demo", rate=40.0 if ctx.quick else 150.0,
                        duration_s=self.duration_s, timeout_s=5.0, grpc_channels=4)

    def _start_unit(self, ctx: ScenarioContext, name: str) -> GatewayUnit:
        log_path = ctx.log_dir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        u = GatewayUnit(self.config, self.region, name=name, log_dir=ctx.log_dir)
        u.log_offset = offset
        ctx.procs.append(u)
        return u

    def _restart(self, ctx: ScenarioContext, index: int) -> FaultAction:
        def run() -> str:
            old = self.units[index]
            t0 = time.monotonic()
            code = old.stop(timeout_s=STOP_WAIT_S)  # SIGTERM: drains, then exits
            stopped_s = time.monotonic() - t0
            new = self._start_unit(ctx, old.name)
            new.wait_serving()
            time.sleep(HEALTH["interval_ms"] * 2 / 1000)  # its workers' first probes
            self.units[index] = new
            ctx.notes["restarts"].append({"unit": old.name, "old_pid": old.pid, "exit_code": code,
                                          "drain_s": round(stopped_s, 2), "new_pid": new.pid,
                                          "restart_s": round(time.monotonic() - t0, 2)})
            return f"pid {old.pid} exited {code} after {stopped_s:.2f} s; pid {new.pid} serving"
        return FaultAction(0.0, "restart", f"gateway-{index + 1}", run)

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        first, second = self._restart(ctx, 0), self._restart(ctx, 1)
        first.at_s = round(self.duration_s * 0.15, 1)
        second.at_s = round(self.duration_s * 0.55, 1)
        return [first, second]

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        restarts = ctx.notes.get("restarts", [])
        checks = [check_success_ratio(results, 1.0, name="no failed requests"), check_no_wrong_answers(results),
                  Check("both units restarted", len(restarts) == 2 and all(r["exit_code"] == 0 for r in restarts),
                        f"{restarts}")]
        cut = [int(m.group(1)) for u in ("gateway-1", "gateway-2")
               for m in CUT_OFF.finditer(_read(ctx.log_dir / f"{u}.log"))]
        checks.append(Check("drained without cutting requests off", len(cut) >= 2 * WORKERS and not any(cut),
                            f"requests cut off at the drain deadline, per stopped worker: {cut}"))
        ctx.notes["rolling_restart"] = {"units": 2, "workers_per_unit": WORKERS, "restarts": restarts,
                                        "cut_off_per_worker": cut, "why_two_units": WHY_TWO_UNITS}
        return checks


def _read(path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


SCENARIO = GatewayRestart
