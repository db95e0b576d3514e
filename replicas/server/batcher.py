"""Request scheduling for one model version: dynamic batching, or one run per request.

Dynamic batching (Triton's dynamic batcher, simplified): requests wait in one queue. Whenever
an instance is free, it takes the oldest request and every later queued request with the same
non-batch shapes, up to `max_batch_size` rows, and runs them as one ONNX Runtime call (inputs
concatenated along dim 0, outputs split back by rows as views). If that batch is not full and
the oldest request has waited less than `max_queue_delay_us`, the instance waits for more (until
the deadline, or until a new request arrives). While a batch runs the queue grows, so the next
batch is larger: batching adapts to load even with zero delay. Requests with different
non-batch shapes are never merged.

Without dynamic batching every request is its own run (still at most `slots` at once).

Threads: each instance (`slots` of them) is a worker thread that owns the loop "take a batch ->
concatenate -> run -> split -> hand the results to the event loop", so the next batch starts the
moment the previous one finishes, without waiting for the event loop to come round (at high
concurrency the loop is busy parsing requests, and every trip through it would leave the model
idle). The event loop only appends to the queue and resolves futures, once per batch
(`call_soon_threadsafe`). Workers start on demand and exit after `WORKER_IDLE_EXIT_S` idle.
A scheduler serves the event loop that submits to it (one loop per server).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from replicas.server.onnx_runner import OrtRunner

NS_PER_S = 1_000_000_000
WORKER_IDLE_EXIT_S = 30.0
UNLOADED_MESSAGE = "model version unloaded"


@dataclass(slots=True)
class BatchOutcome:
    """What one request gets back: its rows of every output, plus timings for statistics."""

    outputs: list[np.ndarray]
    queue_ns: int
    compute_ns: int
    batch_rows: int


@dataclass(slots=True)
class _Pending:
    feeds: dict[str, np.ndarray]
    rows: int
    key: tuple
    future: asyncio.Future
    enqueued_ns: int
    loop: asyncio.AbstractEventLoop


class Scheduler:
    """Queue (shared with the worker threads, under one lock) in front of an OrtRunner."""

    def __init__(self, runner: OrtRunner, *, batching: bool, max_batch_size: int,
                 max_queue_delay_us: int, slots: int,
                 on_batch: Callable[[int, int], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None):
        self._runner = runner
        # Models without a batch dimension (max_batch_size 0) are never merged.
        self.batching = batching and max_batch_size > 0
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue_delay_ns = max(0, max_queue_delay_us) * 1000
        self.slots = max(1, slots)
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._workers = 0  # alive worker threads (at most `slots`)
        self._waiting = 0  # workers blocked in cond.wait (idle, or inside a delay window)
        self._closed = False
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def submit(self, feeds: dict[str, np.ndarray], rows: int, key: tuple) -> BatchOutcome:
        loop = asyncio.get_running_loop()
        item = _Pending(feeds, rows, key, loop.create_future(), time.monotonic_ns(), loop)
        with self._cond:
            if self._closed:
                raise RuntimeError(UNLOADED_MESSAGE)
            self._queue.append(item)
            depth = len(self._queue)
            if self._waiting:
                self._cond.notify()
            elif self._workers < self.slots:
                self._workers += 1
                threading.Thread(target=self._work, name=f"batcher-{self._runner.label}", daemon=True).start()
        if self._on_queue_depth is not None:
            self._on_queue_depth(depth)
        return await item.future

    # ------------------------------------------------------------------ worker threads

    def _take_batch(self) -> tuple[list[_Pending] | None, float | None]:
        """Under the lock: (the batch to run now, None), or (None, seconds to wait for company), or
        (None, None) when nothing is queued."""
        queue = self._queue
        while queue and queue[0].future.done():  # the client went away (cancelled)
            queue.popleft()
        if not queue:
            return None, None
        if not self.batching:
            return [queue.popleft()], None
        head = queue[0]
        rows = head.rows
        taken = [head]
        rest: list[_Pending] = []  # looked at, not taken: stays queued, in order
        seen = 1
        max_rows = self.max_batch_size
        for item in itertools.islice(queue, 1, None):
            if rows >= max_rows:
                break
            seen += 1
            if item.future.done():
                continue  # cancelled: dropped
            if item.key == head.key and rows + item.rows <= max_rows:
                taken.append(item)
                rows += item.rows
            else:
                rest.append(item)
        if rows < max_rows and self.max_queue_delay_ns:
            waited_ns = time.monotonic_ns() - head.enqueued_ns
            if waited_ns < self.max_queue_delay_ns:
                # Not full and still inside the delay window: leave the queue as it is, wait.
                return None, (self.max_queue_delay_ns - waited_ns) / NS_PER_S
        if seen == len(queue) and not rest:
            queue.clear()
        else:
            for _ in range(seen):
                queue.popleft()
            queue.extendleft(reversed(rest))
        return taken, None

    def _next_batch(self) -> list[_Pending] | None:
        """Blocks until there is a batch to run; None when this worker should exit."""
        cond = self._cond
        with cond:
            while True:
                if self._closed:
                    self._workers -= 1
                    return None
                batch, wait_s = self._take_batch()
                if batch is not None:
                    depth = len(self._queue)
                    break
                self._waiting += 1
                try:
                    woken = cond.wait(WORKER_IDLE_EXIT_S if wait_s is None else wait_s)
                finally:
                    self._waiting -= 1
                if not woken and wait_s is None and not self._queue:
                    self._workers -= 1  # idle for long: a later submit starts a new worker
                    return None
        if self._on_queue_depth is not None:
            self._on_queue_depth(depth)
        return batch

    def _work(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return  # counted out by _next_batch
                try:
                    self._run(batch)
                except BaseException as exc:  # never leave a batch's requests waiting forever
                    self._post(batch[0].loop, self._fail, batch, exc)
                    raise
        except BaseException:
            with self._cond:
                self._workers -= 1  # a later submit starts a replacement
            raise

    def _run(self, batch: list[_Pending]) -> None:
        """Runs on a worker thread; results reach the event loop in one callback per batch."""
        started_ns = time.monotonic_ns()
        try:
            outputs, compute_ns = self._runner.run_batch([p.feeds for p in batch])
        except Exception as exc:  # ORT refused the run: every request of the batch gets the error
            self._post(batch[0].loop, self._fail, batch, exc)
            return
        if len(batch) == 1:
            p = batch[0]
            outcomes = [BatchOutcome(outputs, started_ns - p.enqueued_ns, compute_ns, p.rows)]
            total_rows = p.rows
        else:
            total_rows = sum(p.rows for p in batch)
            outcomes = []
            offset = 0
            for p in batch:
                end = offset + p.rows
                outcomes.append(BatchOutcome([o[offset:end] for o in outputs], started_ns - p.enqueued_ns,
                                             compute_ns, total_rows))
                offset = end
        self._post(batch[0].loop, self._deliver, batch, outcomes, total_rows, compute_ns)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, callback: Callable, *args) -> None:
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody waits for these results any more
            pass

    # ------------------------------------------------------------------ on the event loop

    def _deliver(self, batch: list[_Pending], outcomes: list[BatchOutcome], total_rows: int,
                 compute_ns: int) -> None:
        if self._on_batch is not None:
            self._on_batch(total_rows, compute_ns)
        for p, outcome in zip(batch, outcomes, strict=True):
            if not p.future.done():
                p.future.set_result(outcome)

    @staticmethod
    def _fail(batch: list[_Pending], exc: BaseException) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)

    def close(self) -> None:
        """Refuse new requests, fail the queued ones; batches already running finish."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for p in pending:
            if not p.future.done():
                p.future.set_exception(RuntimeError(UNLOADED_MESSAGE))
        if self._on_queue_depth is not None:
            self._on_queue_depth(0)
