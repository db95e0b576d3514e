"""The load generator engine: open-loop (arrival rate, optionally a rate schedule) and
closed-loop (fixed concurrency), in one or several processes.

Open loop: request k has an intended send time fixed by the rate schedule alone, whatever the
server does; its latency is measured from that intended time, so a stalled server shows up as
latency (no coordinated omission). In-flight requests are capped: a send due while the cap is
reached is counted as a failure ("client overloaded"), never silently delayed. How late the
generator itself sent is recorded too (`send_lag_ms`): a large lag means the client, not the
server, was the bottleneck; add processes.

Closed loop: C workers, each sending its next request when the previous one finished: the
throughput ceiling at that concurrency. Latency is measured from the actual send.

Several processes (`processes=N`): each runs its own uvloop event loop with 1/N of the rate
(interleaved by a phase offset) or of the concurrency; all start at one shared monotonic
instant; their per-second recorders (HDR histograms included) are merged at the end.

Every run stops by itself: the schedule ends at `duration_s`, then in-flight requests get at
most `timeout_s` (+ a grace) to finish; what is still running is counted as "unfinished at end".

Use from code (benchmarks, scenarios)::

    spec = LoadSpec(url="grpc://127.0.0.1:8001", protocol="grpc", rate=500, duration_s=10)
    run = run_load(spec, progress=True)                # blocking; or `await run_load_async(spec)`
    results = build_results(run.recorder, spec=spec.to_dict(), duration_s=spec.duration_s)
    write_results(results, "out/results.json"); write_report(results, "out/report.png")

(processes > 1 uses the "spawn" start method: a script calling it needs the usual
`if __name__ == "__main__":` guard.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue as queue_mod
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadtests.clients import PROTOCOLS, make_client, parse_target
from loadtests.results import Recorder
from loadtests.verify import Verifier

REASON_OVERLOADED = "client overloaded"
REASON_UNFINISHED = "unfinished at end"

DEFAULT_MAX_IN_FLIGHT = 1024
DEFAULT_TIMEOUT_S = 10.0
MAX_DURATION_S = 3600.0  # a runaway schedule cannot keep a machine busy for days
END_GRACE_S = 1.0  # after the last request's timeout, before leftovers are cancelled
START_DELAY_S = 0.3  # between "all workers ready" and the shared start instant
WORKER_READY_TIMEOUT_S = 120.0
PROGRESS_INTERVAL_S = 0.5
WARMUP_REQUESTS = 2  # per process, before the clock starts; never recorded
WARMUP_TIMEOUT_S = 2.0


class SpecError(ValueError):
    """A load specification that cannot run; the message names the field."""


def parse_schedule(text: str) -> list[tuple[float, float]]:
    """"0:100,10:500,20:100" -> [(0.0, 100.0), (10.0, 500.0), (20.0, 100.0)]: from t seconds on,
    send at that many requests per second (piecewise constant)."""
    steps: list[tuple[float, float]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            t_s, rate = (float(v) for v in part.split(":"))
        except ValueError as exc:
            raise SpecError(f"schedule: step {part!r} is not START_S:RATE (e.g. '0:100,10:500')") from exc
        if t_s < 0 or rate < 0:
            raise SpecError(f"schedule: step {part!r}: start and rate must be >= 0")
        if steps and t_s <= steps[-1][0]:
            raise SpecError(f"schedule: step {part!r} does not start after the previous step")
        steps.append((t_s, rate))
    if not steps:
        raise SpecError("schedule: empty")
    if steps[0][0] != 0:
        steps.insert(0, (0.0, 0.0))
    return steps


def rate_at(schedule: list[tuple[float, float]], t_s: float) -> tuple[float, float]:
    """(rate at t_s, when that step ends: the next step's start, or infinity)."""
    for i in range(len(schedule) - 1, -1, -1):
        if t_s >= schedule[i][0]:
            end = schedule[i + 1][0] if i + 1 < len(schedule) else float("inf")
            return schedule[i][1], end
    return 0.0, schedule[0][0]


@dataclass
class LoadSpec:
    url: str
    protocol: str = "http"
    model: str = "demo"
    duration_s: float = 10.0
    rate: float | None = None  # open loop: requests per second (all processes together)
    schedule: list[tuple[float, float]] | None = None  # open loop with steps; wins over rate
    concurrency: int | None = None  # closed loop
    processes: int = 1
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT  # open loop, all processes together
    timeout_s: float = DEFAULT_TIMEOUT_S
    model_version: str = ""  # ask for this version ("" = the server's choice)
    assume_version: str | None = None  # verify against this version instead of the response's
    grpc_channels: int = 1
    max_connections: int = 0  # HTTP connections per process; 0: as many as requests in flight
    trace: bool = False  # keep every request's outcome (Recorder.trace) for sub-second figures
    meta: dict[str, Any] = field(default_factory=dict)  # free-form, copied into the results

    @property
    def mode(self) -> str:
        return "closed-loop" if self.concurrency else "open-loop"

    def validate(self) -> LoadSpec:
        if self.protocol not in PROTOCOLS:
            raise SpecError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        try:
            parse_target(self.url, self.protocol)
        except ValueError as exc:
            raise SpecError(f"url: {exc}") from exc
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise SpecError(f"duration_s must be in (0, {MAX_DURATION_S:g}], got {self.duration_s!r}")
        open_loop = self.rate is not None or self.schedule is not None
        if open_loop == bool(self.concurrency):
            raise SpecError("give either a rate (or schedule) for open loop, or a concurrency for closed loop")
        if self.rate is not None and self.schedule is None and self.rate <= 0:
            raise SpecError(f"rate must be > 0 requests/s, got {self.rate!r}")
        if self.concurrency is not None and self.concurrency < 1:
            raise SpecError(f"concurrency must be >= 1, got {self.concurrency!r}")
        if self.processes < 1:
            raise SpecError(f"processes must be >= 1, got {self.processes!r}")
        if self.concurrency and self.processes > self.concurrency:
            raise SpecError(f"processes ({self.processes}) must not exceed concurrency ({self.concurrency})")
        if self.max_in_flight < self.processes:
            raise SpecError(f"max_in_flight must be >= processes, got {self.max_in_flight!r}")
        if self.timeout_s <= 0:
            raise SpecError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        Verifier(self.model)  # raises ValueError naming the models it can check
        return self

    def effective_schedule(self) -> list[tuple[float, float]]:
        if self.schedule is not None:
            return list(self.schedule)
        return [(0.0, float(self.rate or 0.0))]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mode"] = self.mode
        if d["schedule"] is not None:
            d["schedule"] = [list(s) for s in d["schedule"]]
        return d


# ---------------------------------------------------------------------------- one process


class _Worker:
    """One process's share of the load, on its own event loop."""

    def __init__(self, spec: LoadSpec, share: int, shares: int):
        self.spec = spec
        self.share = share
        self.shares = shares
        self.recorder = Recorder(trace=spec.trace)
        self.verifier = Verifier(spec.model, assume_version=spec.assume_version)
        self.client = make_client(spec.protocol, spec.url, self.verifier, model_version=spec.model_version,
                                  timeout_s=spec.timeout_s, max_connections=spec.max_connections,
                                  grpc_channels=spec.grpc_channels)
        for v in (spec.assume_version, spec.model_version):
            if v:
                self.verifier.expected(v)  # precompute outside the measured window

    async def prepare(self) -> None:
        """Open the client and send a few unrecorded warm-up requests: connections get opened and
        the served version's reference outputs computed before the clock starts, not inside it."""
        await self.client.start()
        warmups = [self.client.infer(self.share + i * self.shares, time.monotonic()) for i in range(WARMUP_REQUESTS)]
        with contextlib.suppress(Exception):  # a dead target shows in the measured run, not here
            await asyncio.wait_for(asyncio.gather(*warmups, return_exceptions=True),
                                   min(self.spec.timeout_s, WARMUP_TIMEOUT_S))

    async def run(self, t0: float) -> None:
        """Send this process's share from t0 on (after `prepare`); closes the client at the end."""
        try:
            # every process waits for the same start instant
            delay = t0 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.spec.concurrency:
                await self._closed_loop(t0)
            else:
                await self._open_loop(t0)
        finally:
            await self.client.close()

    async def _one(self, index: int, intended_s: float, t0: float) -> None:
        rec = self.recorder
        rec.in_flight += 1
        try:
            r = await self.client.infer(index, intended_s)
        finally:
            rec.in_flight -= 1
        rec.record(intended_s - t0, r.ok, r.latency_s, region=r.region, replica=r.replica,
                   version=r.model_version, reason=r.reason)

    async def _open_loop(self, t0: float) -> None:
        spec, rec = self.spec, self.recorder
        schedule = spec.effective_schedule()
        cap = max(1, spec.max_in_flight // self.shares)
        end = t0 + spec.duration_s
        tasks: set[asyncio.Task] = set()
        index = self.share
        # This process sends every shares-th request of the whole schedule, phase-shifted by its
        # share so N processes interleave instead of firing in bursts. Times are computed from
        # the step's start (not accumulated) so float error never drifts.
        step_start, k = 0.0, 0
        while True:
            rate, step_end = rate_at(schedule, step_start)
            if rate <= 0:
                if step_end == float("inf"):
                    break
                step_start, k = step_end, 0
                continue
            gap = self.shares / rate
            rel = step_start + gap * (k + self.share / self.shares)
            if rel >= step_end:  # this step is over: continue in the next one
                step_start, k = step_end, 0
                continue
            intended = t0 + rel
            if intended >= end:
                break
            now = time.monotonic()
            if intended > now:
                await asyncio.sleep(intended - now)
                now = time.monotonic()
            if len(tasks) >= cap:
                rec.record(rel, False, 0.0, reason=REASON_OVERLOADED)
            else:
                rec.send_lag.record_s(now - intended)
                task = asyncio.create_task(self._one(index, intended, t0))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            index += self.shares
            k += 1
        await self._finish(tasks, t0)

    async def _closed_loop(self, t0: float) -> None:
        spec = self.spec
        base, extra = divmod(spec.concurrency or 1, self.shares)
        n = base + (1 if self.share < extra else 0)
        end = t0 + spec.duration_s

        async def worker(k: int) -> None:
            index = self.share + k * self.shares
            while (start := time.monotonic()) < end:
                await self._one(index, start, t0)
                index += n * self.shares

        tasks = {asyncio.create_task(worker(k)) for k in range(n)}
        await self._finish(tasks, t0)

    async def _finish(self, tasks: set[asyncio.Task], t0: float) -> None:
        if not tasks:
            return
        _, pending = await asyncio.wait(set(tasks), timeout=self.spec.timeout_s + END_GRACE_S)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if pending:
            # A request the client's own timeout did not end: count it, never drop it.
            now = time.monotonic()
            for _ in pending:
                self.recorder.record(max(0.0, now - t0 - self.spec.timeout_s), False, 0.0,
                                     reason=REASON_UNFINISHED)


def _run_loop(coro_factory: Callable[[], Any]) -> Any:
    import uvloop

    return uvloop.run(coro_factory())


def _worker_main(spec: LoadSpec, share: int, shares: int, messages: mp.Queue, start_event: Any,
                 start_at: Any) -> None:
    """Entry point of a client process: set up, say ready, wait for the shared start, run,
    stream progress, hand back the recorder."""
    try:
        worker = _Worker(spec, share, shares)
    except Exception as exc:
        messages.put(("error", share, f"{type(exc).__name__}: {exc}"))
        return

    async def main() -> None:
        await worker.prepare()
        messages.put(("ready", share, None))
        if not await asyncio.to_thread(start_event.wait, WORKER_READY_TIMEOUT_S):
            raise RuntimeError("never told to start")

        async def progress() -> None:
            while True:
                await asyncio.sleep(PROGRESS_INTERVAL_S)
                messages.put(("progress", share, (*worker.recorder.counts(), worker.recorder.in_flight)))

        ticker = asyncio.create_task(progress())
        try:
            await worker.run(start_at.value)
        finally:
            ticker.cancel()

    try:
        _run_loop(main)
    except Exception as exc:
        messages.put(("error", share, f"{type(exc).__name__}: {exc}"))
        return
    messages.put(("done", share, worker.recorder.to_dict()))


# ---------------------------------------------------------------------------- the run


@dataclass
class LoadRun:
    """What `run_load` hands back: the merged recorder and when the load started."""

    spec: LoadSpec
    recorder: Recorder
    t0: float  # time.monotonic() of the start instant (same clock in every process on a host)
    wall_start: float  # time.time() at t0
    elapsed_s: float


class Progress:
    """The live progress line (rich). `update` takes totals over all processes."""

    def __init__(self, spec: LoadSpec, enabled: bool):
        self.spec = spec
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("[bold]{task.fields[mode]}"), BarColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields[stats]}"),
                                      console=Console(stderr=True), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("load", total=self.spec.duration_s, mode=self.spec.mode,
                                                 stats="starting")
        return self

    def update(self, elapsed_s: float, sent: int, ok: int, failed: int, in_flight: int) -> None:
        if self._progress is None:
            return
        rate = ok / elapsed_s if elapsed_s > 0 else 0.0
        self._progress.update(self._task, completed=min(elapsed_s, self.spec.duration_s),
                              stats=f"sent {sent}  ok {ok}  failed {failed}  in-flight {in_flight}  "
                                    f"{rate:,.0f} ok/s")

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def run_load(spec: LoadSpec, *, progress: bool = False,
             on_start: Callable[[float], None] | None = None) -> LoadRun:
    """Run `spec` to completion (blocking; call from a thread without a running event loop).

    `on_start(t0)` is called once every client process is ready, with the monotonic instant
    the load will start at (scenarios time their faults from it)."""
    spec.validate()
    if spec.processes == 1:
        return _run_in_process(spec, progress, on_start)
    return _run_multiprocess(spec, progress, on_start)


def _run_in_process(spec: LoadSpec, progress: bool, on_start: Callable[[float], None] | None) -> LoadRun:
    worker = _Worker(spec, 0, 1)
    t0 = wall_start = 0.0

    async def main() -> None:
        nonlocal t0, wall_start
        await worker.prepare()
        t0 = time.monotonic() + START_DELAY_S
        wall_start = time.time() + START_DELAY_S
        if on_start is not None:
            on_start(t0)
        with Progress(spec, progress) as bar:
            async def ticker() -> None:
                while True:
                    await asyncio.sleep(PROGRESS_INTERVAL_S)
                    bar.update(time.monotonic() - t0, *worker.recorder.counts(), worker.recorder.in_flight)

            tick = asyncio.create_task(ticker())
            try:
                await worker.run(t0)
            finally:
                tick.cancel()
                bar.update(time.monotonic() - t0, *worker.recorder.counts(), 0)

    _run_loop(main)
    return LoadRun(spec, worker.recorder, t0, wall_start, time.monotonic() - t0)


async def run_load_async(spec: LoadSpec, *, on_start: Callable[[float], None] | None = None) -> LoadRun:
    """`run_load` inside an already running event loop (one process only: the caller's loop)."""
    spec.validate()
    if spec.processes != 1:
        raise SpecError("run_load_async runs in the caller's event loop: processes must be 1 (use run_load)")
    worker = _Worker(spec, 0, 1)
    await worker.prepare()
    t0 = time.monotonic() + START_DELAY_S
    wall_start = time.time() + START_DELAY_S
    if on_start is not None:
        on_start(t0)
    await worker.run(t0)
    return LoadRun(spec, worker.recorder, t0, wall_start, time.monotonic() - t0)


def _run_multiprocess(spec: LoadSpec, progress: bool, on_start: Callable[[float], None] | None) -> LoadRun:
    ctx = mp.get_context("spawn")  # a fresh interpreter per process: no inherited event loop or grpc state
    messages: mp.Queue = ctx.Queue()
    start_event = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_worker_main, args=(spec, i, spec.processes, messages, start_event, start_at),
                         name=f"loadgen-{i}", daemon=True)
             for i in range(spec.processes)]
    for p in procs:
        p.start()
    merged = Recorder(trace=spec.trace)
    try:
        ready: set[int] = set()
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while len(ready) < spec.processes:
            kind, share, payload = _get(messages, deadline, procs, "ready")
            if kind == "error":
                raise RuntimeError(f"load process {share} failed to start: {payload}")
            if kind == "ready":
                ready.add(share)
        t0 = time.monotonic() + START_DELAY_S
        wall_start = time.time() + START_DELAY_S
        start_at.value = t0
        if on_start is not None:
            on_start(t0)
        start_event.set()
        live: dict[int, tuple[int, int, int, int]] = {}
        done: set[int] = set()
        # Workers end by themselves (duration + timeout + grace); this bound only catches a hang.
        deadline = t0 + spec.duration_s + spec.timeout_s + END_GRACE_S + 30.0
        with Progress(spec, progress) as bar:
            while len(done) < spec.processes:
                kind, share, payload = _get(messages, deadline, procs, "done")
                if kind == "error":
                    raise RuntimeError(f"load process {share} failed: {payload}")
                if kind == "progress":
                    live[share] = payload
                    totals = [sum(v[i] for v in live.values()) for i in range(4)]
                    bar.update(time.monotonic() - t0, *totals)
                elif kind == "done":
                    merged.merge_dict(payload)
                    done.add(share)
            bar.update(time.monotonic() - t0, *merged.counts(), 0)
        return LoadRun(spec, merged, t0, wall_start, time.monotonic() - t0)
    finally:
        start_event.set()  # release anyone still waiting so they can exit
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def _get(messages: mp.Queue, deadline: float, procs: list, waiting_for: str) -> tuple[str, int, Any]:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"load processes did not report {waiting_for!r} in time")
        try:
            return messages.get(timeout=min(left, 1.0))
        except queue_mod.Empty:
            dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                raise RuntimeError(f"load process {dead[0].name} died (exit code {dead[0].exitcode})") from None


def default_processes() -> int:
    """One client process per core, leaving one for the system under test when there are few."""
    return max(1, (os.cpu_count() or 1) - 1)
