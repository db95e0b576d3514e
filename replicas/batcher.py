"""Request scheduling for one model version: dynamic batching, or one run per request.

Dynamic batching (Triton's dynamic batcher, simplified): requests wait in one queue. Whenever
an instance is free, the scheduler takes the oldest request and every later queued request with
the same non-batch shapes, up to `max_batch_size` rows, and runs them as one ONNX Runtime call
(inputs concatenated along dim 0, outputs split back by rows). If that batch is not full and
the oldest request has waited less than `max_queue_delay_us`, it waits for more (a timer fires
at the deadline). Up to `slots` (the instance count) batches run at once, so while they run the
queue grows and the next batch is larger: batching adapts to load even with zero delay.
Requests with different non-batch shapes are never merged.

Without dynamic batching every request is its own run (still at most `slots` at once).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from replicas.onnx_runner import OrtRunner

NS_PER_S = 1_000_000_000


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


class Scheduler:
    """Queue + dispatcher in front of an OrtRunner (all methods run on the event loop)."""

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
        self._busy = 0
        self._queue: deque[_Pending] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def submit(self, feeds: dict[str, np.ndarray], rows: int, key: tuple) -> BatchOutcome:
        loop = asyncio.get_running_loop()
        item = _Pending(feeds, rows, key, loop.create_future(), time.monotonic_ns())
        self._queue.append(item)
        self._dispatch()
        self._report_depth()
        return await item.future

    def _report_depth(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(len(self._queue))

    def _take_batch(self) -> list[_Pending] | None:
        """The next batch to run now, or None if the oldest request should wait for company."""
        queue = self._queue
        while queue and queue[0].future.done():  # the client went away (cancelled)
            queue.popleft()
        if not queue:
            return None
        head = queue[0]
        if not self.batching:
            return [queue.popleft()]
        taken = [head]
        rows = head.rows
        rest: deque[_Pending] = deque()
        queue.popleft()
        while queue and rows < self.max_batch_size:
            item = queue.popleft()
            if item.future.done():
                continue
            if item.key == head.key and rows + item.rows <= self.max_batch_size:
                taken.append(item)
                rows += item.rows
            else:
                rest.append(item)
        if rows < self.max_batch_size and self.max_queue_delay_ns:
            waited_ns = time.monotonic_ns() - head.enqueued_ns
            if waited_ns < self.max_queue_delay_ns:
                # Not full and still inside the delay window: put everything back, wake later.
                rest.extendleft(reversed(taken))
                rest.extend(queue)
                self._queue = rest
                self._arm_timer((self.max_queue_delay_ns - waited_ns) / NS_PER_S)
                return None
        rest.extend(queue)
        self._queue = rest
        return taken

    def _arm_timer(self, delay_s: float) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()
        self._report_depth()

    def _dispatch(self) -> None:
        loop = None
        while self._busy < self.slots and self._queue:
            batch = self._take_batch()
            if batch is None:
                return
            self._busy += 1
            loop = loop or asyncio.get_running_loop()
            # A done-callback, not a task per batch: one less scheduling round trip on the hot path.
            future = self._runner.submit(loop, [p.feeds for p in batch])
            future.add_done_callback(functools.partial(self._finished, batch, time.monotonic_ns()))

    def _finished(self, batch: list[_Pending], started_ns: int, future: asyncio.Future) -> None:
        try:
            exc = future.exception()
            if exc is not None:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            outputs, compute_ns = future.result()
            total_rows = sum(p.rows for p in batch)
            if self._on_batch is not None:
                self._on_batch(total_rows, compute_ns)
            if len(batch) == 1:
                p = batch[0]
                if not p.future.done():
                    p.future.set_result(BatchOutcome(outputs, started_ns - p.enqueued_ns, compute_ns, total_rows))
                return
            offset = 0
            for p in batch:
                if not p.future.done():
                    mine = [o[offset:offset + p.rows] for o in outputs]
                    p.future.set_result(BatchOutcome(mine, started_ns - p.enqueued_ns, compute_ns, total_rows))
                offset += p.rows
        finally:
            self._busy -= 1
            self._dispatch()
            self._report_depth()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(RuntimeError("model version unloaded"))
        self._queue.clear()
