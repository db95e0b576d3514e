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
as an event with the time it actually happened), the checks, then ALWAYS kills every process it
started (gateway workers and network namespaces included) whatever failed, audits that nothing
is left (no process running, no port listening: the "cleaned up" check), and writes results
JSON (+ trace.json for traced loads) and the PNG report.

Checks are correctness properties; a `Check(goal=True)` is a speed goal, reported (met or
missed) without failing the scenario. `run_phase` runs extra loads inside a scenario (the same
fault behind HAProxy, the direct leg of a comparison), each with its own report under phases/.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from loadtests.loadgen import LoadSpec, run_load
from loadtests.procs import (
    GatewayProc,
    Proc,
    RegionConfig,
    ReplicaProc,
    listening_ports,
    pid_running,
    proc_tree,
    write_config,
)
from loadtests.report import write_report
from loadtests.results import FaultEvent, Recorder, build_results, write_results

P = TypeVar("P", bound=Proc)

log = logging.getLogger("geogate.loadtests.scenario")

# Scenarios pin each replica's concurrency limit instead of letting the gateway learn it from
# the latency knee: on a small shared machine a CPU stall of a few hundred ms looks like
# queueing, the learned limits collapse and the admission controller sheds requests (429,
# "utilization 541% is over 400%", seen in replica-kill), which is not the fault under test.
FIXED_CAPACITY = {"replica_concurrency_limit": 64}
RESULTS_FILE = "results.json"
TRACE_FILE = "trace.json"  # every request (t_s, ok, latency_ms, region, version, reason) when traced
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
    """One property checked after a run. `goal`: a performance goal, reported (met or missed)
    but not deciding whether the scenario passed: scenarios assert correctness, speed goals are
    figures (the machine is shared and small)."""

    name: str
    ok: bool
    detail: str
    goal: bool = False


@dataclass
class ScenarioContext:
    """What a scenario works with: where to write, how big to be, the processes it started."""

    out_dir: Path
    quick: bool = False
    procs: list[Proc] = field(default_factory=list)
    replicas: dict[str, ReplicaProc] = field(default_factory=dict)
    gateways: dict[str, GatewayProc] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # scenario-specific facts for checks/results
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # run after every process is killed
    recorder: Recorder | None = None  # the main load's, once it ran (window percentiles)
    phase_recorders: dict[str, Recorder] = field(default_factory=dict)
    extra_ports: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)  # network namespaces created (deleted by cleanups)

    @property
    def work_dir(self) -> Path:
        return self.out_dir / "work"

    @property
    def log_dir(self) -> Path:
        return self.out_dir / "logs"

    def add(self, proc: P) -> P:
        """Adopt a process started by the scenario itself (killed at teardown)."""
        self.procs.append(proc)
        return proc

    def ports(self) -> set[int]:
        """Every loopback TCP port a process of this scenario listens (or listened) on."""
        return {p for proc in self.procs for p in proc.ports} | set(self.extra_ports)

    def demo_repository(self, name: str = "models", versions: tuple[int, ...] = (1,), size: str = "tiny") -> Path:
        """A model repository with the demo model's `versions`."""
        from replicas.demo.onnx_model import write_repository_entry

        repo = self.work_dir / name
        repo.mkdir(parents=True, exist_ok=True)
        for v in versions:
            write_repository_entry(repo, v, size=size)
        return repo

    def start_replicas(self, names: list[str], repository: Path, *, timeout_s: float | None = None,
                       netns: str | None = None, netns_address: str = "", wait: bool = True) -> list[ReplicaProc]:
        """Start replicas (all at once, then wait for each: startup overlaps)."""
        started = []
        for name in names:
            p = ReplicaProc(repository, name=name, log_dir=self.log_dir, netns=netns, netns_address=netns_address)
            self.procs.append(p)
            self.replicas[name] = p
            started.append(p)
        labels = self.notes.setdefault("replica_names", {})  # URL -> name, for report legends
        for p in started:
            labels[p.url("grpc")] = labels[p.url("http")] = p.name
        for p in started if wait else ():
            p.wait_ready(**({"timeout_s": timeout_s} if timeout_s else {}))
        return started

    def restart_replicas(self, names: list[str]) -> list[ReplicaProc]:
        """Fresh processes for (killed) replicas, on the same ports and repositories (so configs
        and gateways keep pointing at them), started together; returns once all are ready."""
        started = []
        for name in names:
            old = self.replicas[name]
            old.kill()
            p = ReplicaProc(old.repository, name=name, log_dir=self.log_dir, netns=old.netns,
                            netns_address=old.netns_address, ports=(old.http_port, old.grpc_port, old.metrics_port))
            self.procs.append(p)
            self.replicas[name] = p
            started.append(p)
        for p in started:
            p.wait_ready()
        return started

    def write_config(self, regions: list[RegionConfig], *, name: str = "geogate.toml",
                     sections: dict[str, dict[str, Any]] | None = None, store: dict[str, Any] | None = None) -> Path:
        """The scenario's config; `[capacity]` defaults to `FIXED_CAPACITY` (see there)."""
        sections = {"capacity": FIXED_CAPACITY, **(sections or {})}
        return write_config(self.work_dir / name, regions, store_dir=str(self.work_dir / "store"), store=store,
                            sections=sections)

    def start_gateways(self, regions: list[RegionConfig], *, sections: dict[str, dict[str, Any]] | None = None,
                       start: list[str] | None = None, config: Path | None = None, workers: int = 1,
                       wait_healthy: bool = True, env: dict[str, str] | None = None,
                       netns: dict[str, str] | None = None) -> list[GatewayProc]:
        """Write the config for `regions` (unless `config` is given) and start the gateways of
        `start` (default: all); `netns`: region -> namespace to run that gateway in."""
        config = config or self.write_config(regions, sections=sections)
        started = []
        for r in regions:
            if start is not None and r.name not in start:
                continue
            g = GatewayProc(config, r, log_dir=self.log_dir, workers=workers, env=env,
                            netns=(netns or {}).get(r.name))
            self.procs.append(g)
            self.gateways[r.name] = g
            started.append(g)
        for g in started:
            g.wait_ready()
            if wait_healthy:
                g.wait_all_healthy()
        return started

    def teardown(self) -> None:
        """Kill every process this scenario started (SIGKILL reaches stopped ones too), then run
        the cleanups (network namespaces, ...)."""
        for p in reversed(self.procs):
            try:
                p.kill()
            except Exception:  # keep killing the others
                log.exception("killing %s failed", p.name)
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception:
                log.exception("cleanup %s failed", fn)


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
    configurable_duration = False  # True: honours `requested_duration_s` (set from --duration)
    requested_duration_s: float | None = None

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


CLEANUP_WAIT_S = 5.0  # for the kernel to finish tearing down killed processes' sockets


def write_trace(trace: list, path: Path) -> Path:
    import orjson

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(trace))
    return path


def audit_cleanup(pids: set[int], ports: set[int], namespaces: Sequence[str] = ()) -> dict[str, list]:
    """What is left of a scenario after teardown: running processes among `pids` (each
    process and its descendants, captured before the kill), listening sockets on `ports`,
    network namespaces."""
    from loadtests.netns import netns_exists

    deadline = time.monotonic() + CLEANUP_WAIT_S
    while True:
        left = {"processes": sorted(p for p in pids if pid_running(p)),
                "listening_ports": sorted(listening_ports(ports)),
                "namespaces": [n for n in namespaces if netns_exists(n)]}
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def run_scenario(scenario: Scenario, out_dir: str | Path, *, quick: bool = False, progress: bool = False,
                 processes: int | None = None) -> ScenarioOutcome:
    """Set up, load with timed faults, check, tear down (every process is killed whatever
    happened), audit the cleanup, then write results.json + report.png into `out_dir`."""
    # absolute: configs name repositories and stores by path, and a relative one is read
    # relative to the config file's directory
    ctx = ScenarioContext(Path(out_dir).resolve(), quick=quick)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    runner: _FaultRunner | None = None
    pids: set[int] = set()
    load_start = os.getloadavg()
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
            runner.join(timeout=60)
        ctx.recorder = load.recorder
        events = runner.events if runner else []
        results = build_results(load.recorder, spec=spec.to_dict(), duration_s=spec.duration_s, events=events,
                                started_at_unix_s=load.wall_start)
        checks = scenario.checks(results, ctx)
        for err in (runner.errors if runner else []):
            checks.append(Check("fault action", False, err))
    finally:
        if runner is not None:
            runner.cancel()
        for p in ctx.procs:  # workers and other descendants too: the audit checks them all
            if p.alive():
                pids.update(proc_tree(p.pid))
            pids.add(p.pid)
        ctx.teardown()
    left = audit_cleanup(pids, ctx.ports(), ctx.namespaces)
    checks.append(Check("cleaned up", not any(left.values()),
                        f"{len(pids)} processes, {len(ctx.ports())} ports, {len(ctx.namespaces)} network namespaces "
                        f"audited; left running: {left['processes'] or 'none'}; still listening: "
                        f"{left['listening_ports'] or 'none'}; namespaces left: {left['namespaces'] or 'none'}"))
    passed = all(c.ok for c in checks if not c.goal)
    results["scenario"] = {
        "name": scenario.name, "description": scenario.description, "quick": quick, "passed": passed,
        "checks": [asdict(c) for c in checks],
        "processes": {p.name + (f"#{i}" if any(q.name == p.name for q in ctx.procs[:i]) else ""):
                      {"pid": p.pid, "args": p.args[2:]} for i, p in enumerate(ctx.procs)},
        "cleanup": {"audited_pids": sorted(pids), "audited_ports": sorted(ctx.ports()), "left": left},
        # the machine may be shared: its load average frames every figure
        "machine": {"cores": os.cpu_count(), "loadavg_1m_start": round(load_start[0], 2),
                    "loadavg_1m_end": round(os.getloadavg()[0], 2)},
        "notes": ctx.notes,
    }
    results_path = write_results(results, ctx.out_dir / RESULTS_FILE)
    if ctx.recorder is not None and ctx.recorder.trace is not None:
        write_trace(ctx.recorder.trace, ctx.out_dir / TRACE_FILE)
    report_path = write_report(results, ctx.out_dir / REPORT_FILE,
                               title=f"scenario {scenario.name}: {'PASSED' if passed else 'FAILED'}")
    return ScenarioOutcome(scenario.name, passed, checks, results, results_path, report_path)


# ---------------------------------------------------------------------------- extra load phases

PHASES_DIR = "phases"


def run_phase(ctx: ScenarioContext, label: str, spec: LoadSpec, actions: list[FaultAction] | None = None,
              ) -> dict[str, Any]:
    """Run one more load (with its own timed faults) inside a scenario, e.g. the same fault
    against HAProxy, or the "direct" leg of the overhead comparison; write its results and
    report under phases/LABEL/; return the results document (its recorder is kept in
    `ctx.phase_recorders[label]` for window percentiles)."""
    actions = actions or []
    runner: list[_FaultRunner] = []

    def on_start(t0: float) -> None:
        r = _FaultRunner(actions, t0, spec.duration_s)
        runner.append(r)
        r.start()

    try:
        load = run_load(spec, on_start=on_start)
    finally:
        for r in runner:
            r.cancel()
            r.join(timeout=60)
    events = runner[0].events if runner else []
    results = build_results(load.recorder, spec=spec.to_dict(), duration_s=spec.duration_s, events=events,
                            started_at_unix_s=load.wall_start)
    results["phase"] = label
    if runner and runner[0].errors:
        results["phase_errors"] = runner[0].errors
    ctx.phase_recorders[label] = load.recorder
    out = ctx.out_dir / PHASES_DIR / label
    write_results(results, out / RESULTS_FILE)
    if load.recorder.trace is not None:
        write_trace(load.recorder.trace, out / TRACE_FILE)
    write_report(results, out / "report.png", title=label)
    ctx.notes.setdefault("phase_reports", {})[label] = str(out / "report.png")
    return results


def phase_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The figures of a load run that go into a scenario's notes (and side-by-side tables)."""
    t = results["totals"]
    return {"sent": t["sent"], "ok": t["ok"], "failed": t["failed"], "failed_by_reason": t["failed_by_reason"],
            "ok_per_s": t["ok_per_s"], "p50_ms": t["latency_ms"]["p50"], "p99_ms": t["latency_ms"]["p99"],
            "p999_ms": t["latency_ms"]["p999"], "max_ms": t["latency_ms"]["max"]}


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
