"""The dynamic batcher in-process, on a real ONNX Runtime session of the demo model: merging up to
max_batch_size rows, the queue delay, one run per request without batching, and failures
reaching every request of a batch."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from replicas.demo.onnx_model import reference_outputs, write_repository_entry
from replicas.server.batcher import Scheduler
from replicas.server.onnx_runner import OrtRunner


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    model_dir = write_repository_entry(tmp_path_factory.mktemp("repo"), 1)
    r = OrtRunner(model_dir / "1" / "model.onnx", count=1, want_gpu=False, label="demo/1")
    yield r
    r.close()


def _scheduler(runner, *, batching=True, max_batch_size=8, delay_us=0, runs=None) -> Scheduler:
    return Scheduler(runner, batching=batching, max_batch_size=max_batch_size, max_queue_delay_us=delay_us,
                     slots=1, on_batch=(lambda rows, ns: runs.append(rows)) if runs is not None else None)


def _x(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


async def test_merges_up_to_max_batch_size_and_splits_back(runner):
    runs: list[int] = []
    s = _scheduler(runner, max_batch_size=8, runs=runs)
    xs = [_x(1 + i % 3, i) for i in range(20)]
    outs = await asyncio.gather(*(s.submit({"INPUT0": x}, x.shape[0], ((), (16,))) for x in xs))
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out.outputs[0], reference_outputs("tiny", 1, x), atol=1e-4)
        assert out.batch_rows <= 8
    assert sum(runs) == sum(x.shape[0] for x in xs)
    assert max(runs) <= 8 and max(runs) > 3  # merged, never beyond the limit


async def test_queue_delay_waits_for_company(runner):
    runs: list[int] = []
    s = _scheduler(runner, max_batch_size=8, delay_us=200_000, runs=runs)
    first = asyncio.ensure_future(s.submit({"INPUT0": _x(1, 1)}, 1, "k"))
    await asyncio.sleep(0.05)
    assert not first.done() and s.queue_depth == 1  # still waiting inside the delay window
    second = asyncio.ensure_future(s.submit({"INPUT0": _x(2, 2)}, 2, "k"))
    await asyncio.gather(first, second)
    assert runs == [3]


async def test_full_batch_does_not_wait_for_delay(runner):
    runs: list[int] = []
    s = _scheduler(runner, max_batch_size=4, delay_us=10_000_000, runs=runs)
    out = await asyncio.wait_for(s.submit({"INPUT0": _x(4, 3)}, 4, "k"), 5)
    assert out.batch_rows == 4 and runs == [4]


async def test_different_keys_are_not_merged(runner):
    runs: list[int] = []
    s = _scheduler(runner, max_batch_size=8, delay_us=50_000, runs=runs)
    await asyncio.gather(s.submit({"INPUT0": _x(1, 4)}, 1, "a"), s.submit({"INPUT0": _x(1, 5)}, 1, "b"))
    assert sorted(runs) == [1, 1]


async def test_without_batching_every_request_runs_alone(runner):
    runs: list[int] = []
    s = _scheduler(runner, batching=False, runs=runs)
    await asyncio.gather(*(s.submit({"INPUT0": _x(2, i)}, 2, "k") for i in range(6)))
    assert runs == [2] * 6


async def test_a_failing_run_fails_every_request_of_the_batch(runner):
    s = _scheduler(runner, max_batch_size=8)
    bad = {"INPUT0": np.zeros((1, 16), np.float64)}  # wrong dtype: ORT refuses the run
    results = await asyncio.gather(s.submit(bad, 1, "k"), s.submit(bad, 1, "k"), return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results)
    out = await s.submit({"INPUT0": _x(1, 9)}, 1, "k")  # and it keeps working afterwards
    assert out.outputs[0].shape == (1, 8)
