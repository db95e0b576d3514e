"""A small chaos-scenario framework: real processes, a load phase with timed faults, checks.

A scenario is a class with:
- ``setup(ctx) -> LoadSpec``: start real processes through the context (replicas with
  `geogate replica --enable-test-faults`, gateways from a written TOML config) and say what load
  to send;
- ``actions(ctx) -> list[FaultAction]``: faults at fixed times after the load starts (kill -9,
  SIGSTOP/SIGCONT, replica fault injection via `POST /geogate/test/faults`), built with the
  helpers below;
- ``checks(results, ctx) -> list[Check]``: what must hold afterwards (each with the figures
  that decided it).

`run_scenario` runs setup, the load (faults fired from a thread at their times, each recorded
as an event with the time it actually happened), writes results JSON + PNG report, and ALWAYS
kills every process it started, whatever failed.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests.loadgen import LoadSpec, run_load
from loadtests.procs import GatewayProc, Proc, RegionConfig, ReplicaProc, write_config
from loadtests.report import write_report
from loadtests.results import FaultEvent, build_results, write_results

log = logging.getLogger("geogate.loadtests.scenario")

RESULTS_FILE = "results.json"
REPORT_FILE = "report.png"


@dataclass
class FaultAction:
    """Do `run()` at `at_s` seconds after the load starts; `run` returns a detail string."""

    at_s: float
    kind: str
    target: str
    run: Callable[[], str]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ScenarioContext:
    """What a scenario works with: where to write, how big to be, the processes it started."""

    out_dir: Path
    quick: bool = False
    procs: list[Proc] = field(default_factory=list)
    replicas: dict[str, ReplicaProc] = field(default_factory=dict)
    gateways: dict[str, GatewayProc] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # scenario-specific facts for checks/results

    @property
    def work_dir(self) -> Path:
        return self.out_dir / "work"

    @property
    def log_dir(self) -> Path:
        return self.out_dir / "logs"

    def demo_repository(self, name: str = "models", versions: tuple[int, ...] = (1,), size: str = "tiny") -> Path:
        """A model repository with the demo model's `versions`."""
        from replicas.demo_model import write_repository_entry

        repo = self.work_dir / name
        for v in versions:
            write_repository_entry(repo, v, size=size)
        return repo

    def start_replicas(self, names: list[str], repository: Path, *, timeout_s: float | None = None
                       ) -> list[ReplicaProc]:
        """Start replicas (all at once, then wait for each: startup overlaps)."""
        started = []
        for name in names:
            p = ReplicaProc(repository, name=name, log_dir=self.log_dir)
            self.procs.append(p)
            self.replicas[name] = p
            started.append(p)
        names = self.notes.setdefault("replica_names", {})  # URL -> name, for report legends
        for p in started:
            names[p.url("grpc")] = names[p.url("http")] = p.name
        for p in started:
            p.wait_ready(**({"timeout_s": timeout_s} if timeout_s else {}))
        return started

    def start_gateways(self, regions: list[RegionConfig], *, sections: dict[str, dict[str, Any]] | None = None,
                       start: list[str] | None = None) -> list[GatewayProc]:
        """Write the config for `regions` and start the gateways of `start` (default: all)."""
        config = write_config(self.work_dir / "geogate.toml", regions, store_dir=str(self.work_dir / "store"),
                              sections=sections)
        started = []
        for r in regions:
            if start is not None and r.name not in start:
                continue
            g = GatewayProc(config, r, log_dir=self.log_dir)
            self.procs.append(g)
            self.gateways[r.name] = g
            started.append(g)
        for g in started:
            g.wait_ready()
            g.wait_all_healthy()
        return started

    def teardown(self) -> None:
        """Kill every process this scenario started (SIGKILL reaches stopped ones too)."""
        for p in reversed(self.procs):
            try:
                p.kill()
            except Exception:  # keep killing the others
                log.exception("killing %s failed", p.name)


# ---------------------------------------------------------------------------- fault helpers


def kill(proc: Proc, at_s: float) -> FaultAction:
    def run() -> str:
        proc.kill()
        return f"SIGKILL pid {proc.pid}"
    return FaultAction(at_s, "kill", proc.name, run)


def pause(proc: Proc, at_s: float) -> FaultAction:
    def run() -> str:
        proc.signal(signal.SIGSTOP)
        return f"SIGSTOP pid {proc.pid}"
    return FaultAction(at_s, "stop", proc.name, run)


def resume(proc: Proc, at_s: float) -> FaultAction:
    def run() -> str:
        proc.signal(signal.SIGCONT)
        return f"SIGCONT pid {proc.pid}"
    return FaultAction(at_s, "cont", proc.name, run)


def inject(replica: ReplicaProc, at_s: float, *, delay_ms: int = 0, status: int = 0,
           hang: bool = False) -> FaultAction:
    """Replica fault switch; no arguments clears it."""
    def run() -> str:
        state = replica.set_faults(delay_ms=delay_ms, status=status, hang=hang)
        return ", ".join(f"{k}={v}" for k, v in state.items())
    kind = "fault" if (delay_ms or status or hang) else "clear"
    return FaultAction(at_s, kind, replica.name, run)


class _FaultRunner(threading.Thread):
    """Fires the actions at t0 + at_s (blocking calls are fine here: not the load's event loop)."""

    def __init__(self, actions: list[FaultAction], t0: float, duration_s: float):
        super().__init__(name="fault-runner", daemon=True)
        self.actions = sorted(actions, key=lambda a: a.at_s)
        self.t0 = t0
        self.duration_s = duration_s
        self.events: list[FaultEvent] = []
        self.errors: list[str] = []
        self._cancel = threading.Event()

    def run(self) -> None:
        for a in self.actions:
            if a.at_s > self.duration_s:
                self.errors.append(f"{a.kind} {a.target} at {a.at_s:g} s is after the load ends")
                continue
            if self._cancel.wait(max(0.0, self.t0 + a.at_s - time.monotonic())):
                return
            try:
                detail = a.run()
                kind = a.kind
            except Exception as exc:
                detail, kind = f"{type(exc).__name__}: {exc}", f"{a.kind} failed"
                self.errors.append(f"{a.kind} {a.target}: {detail}")
            self.events.append(FaultEvent(round(time.monotonic() - self.t0, 3), kind, a.target, detail))

    def cancel(self) -> None:
        self._cancel.set()


# ---------------------------------------------------------------------------- scenario


class Scenario:
    """Base class: override `setup`, `actions` and `checks`."""

    name = "scenario"
    description = ""

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        raise NotImplementedError

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        return []

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        return []


@dataclass
class ScenarioOutcome:
    name: str
    passed: bool
    checks: list[Check]
    results: dict[str, Any]
    results_path: Path
    report_path: Path


def run_scenario(scenario: Scenario, out_dir: str | Path, *, quick: bool = False, progress: bool = False,
                 processes: int | None = None) -> ScenarioOutcome:
    """Set up, load with timed faults, check, write results.json + report.png into `out_dir`;
    every process is killed at the end whatever happened."""
    ctx = ScenarioContext(Path(out_dir), quick=quick)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    runner: _FaultRunner | None = None
    try:
        spec = scenario.setup(ctx)
        if processes:
            spec.processes = processes
        actions = scenario.actions(ctx)

        def on_start(t0: float) -> None:
            nonlocal runner
            runner = _FaultRunner(actions, t0, spec.duration_s)
            runner.start()

        load = run_load(spec, progress=progress, on_start=on_start)
        if runner is not None:
            runner.cancel()
            runner.join(timeout=30)
        events = runner.events if runner else []
        results = build_results(load.recorder, spec=spec.to_dict(), duration_s=spec.duration_s, events=events,
                                started_at_unix_s=load.wall_start)
        checks = scenario.checks(results, ctx)
        for err in (runner.errors if runner else []):
            checks.append(Check("fault action", False, err))
        passed = all(c.ok for c in checks)
        results["scenario"] = {
            "name": scenario.name, "description": scenario.description, "quick": quick, "passed": passed,
            "checks": [asdict(c) for c in checks],
            "processes": {p.name: {"pid": p.pid, "args": p.args[2:]} for p in ctx.procs},
            "notes": ctx.notes,
        }
        results_path = write_results(results, ctx.out_dir / RESULTS_FILE)
        report_path = write_report(results, ctx.out_dir / REPORT_FILE,
                                   title=f"scenario {scenario.name}: {'PASSED' if passed else 'FAILED'}")
        return ScenarioOutcome(scenario.name, passed, checks, results, results_path, report_path)
    finally:
        if runner is not None:
            runner.cancel()
        ctx.teardown()


# ---------------------------------------------------------------------------- check helpers


def check_success_ratio(results: dict[str, Any], minimum: float, *, name: str = "success ratio") -> Check:
    t = results["totals"]
    return Check(name, t["sent"] > 0 and t["success_ratio"] >= minimum,
                 f"{t['ok']}/{t['sent']} ok ({t['success_ratio']:.2%}, need >= {minimum:.2%}); "
                 f"failures: {t['failed_by_reason'] or 'none'}")


def check_no_wrong_answers(results: dict[str, Any]) -> Check:
    bad = {r: n for r, n in results["totals"]["failed_by_reason"].items()
           if r.startswith(("wrong answer", "malformed output", "unknown model version", "no model version"))}
    return Check("answers verified", not bad, f"wrong/unverifiable answers: {bad or 'none'}")


def share(counts: dict[str, int], key: str) -> float:
    total = sum(counts.values())
    return counts.get(key, 0) / total if total else 0.0
