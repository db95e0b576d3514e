"""Sub-second figures from a load run's per-request trace (`LoadSpec(trace=True)`, see
`Recorder.trace`): each entry is (t_s, ok, latency_ms, region, version, reason), t_s the
INTENDED send time since the load started.

"When did the first answer from another region arrive after the kill" needs single requests,
not per-second counts; these helpers answer such questions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

Entry = tuple[float, bool, float, str, str, str]
T, OK, LAT, REGION, VERSION, REASON = range(6)


def between(trace: Sequence[Entry], start_s: float, end_s: float = float("inf")) -> list[Entry]:
    return [e for e in trace if start_s <= e[T] < end_s]


def done_at(e: Entry) -> float:
    """When the answer arrived (intended send time + latency), seconds since the start."""
    return e[T] + e[LAT] / 1000.0


def first_answer(trace: Sequence[Entry], after_s: float, pred: Callable[[Entry], bool]) -> Entry | None:
    """The successful request sent at/after `after_s` matching `pred` that was answered first."""
    hits = [e for e in trace if e[T] >= after_s and e[OK] and pred(e)]
    return min(hits, key=done_at) if hits else None


def last_sent(trace: Sequence[Entry], after_s: float, pred: Callable[[Entry], bool]) -> Entry | None:
    """The last request sent at/after `after_s` matching `pred`."""
    hits = [e for e in trace if e[T] >= after_s and pred(e)]
    return max(hits, key=lambda e: e[T]) if hits else None


def percentile_ms(entries: Sequence[Entry], p: float) -> float:
    """Latency percentile of the successful entries (0.0 if none)."""
    lat = [e[LAT] for e in entries if e[OK]]
    return round(float(np.percentile(lat, p)), 3) if lat else 0.0


def failures(entries: Sequence[Entry]) -> dict[str, int]:
    return dict(Counter(e[REASON] or "unknown" for e in entries if not e[OK]).most_common())


def regions(entries: Sequence[Entry]) -> dict[str, int]:
    return dict(Counter(e[REGION] for e in entries if e[OK]).most_common())


def versions(entries: Sequence[Entry]) -> dict[str, int]:
    return dict(Counter(e[VERSION] for e in entries if e[OK]).most_common())
