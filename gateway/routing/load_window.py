"""Recent load of this gateway worker: request rate and latency percentiles over the last
few seconds, for the region summary (peers, DNS, status page) and for hedging."""

from __future__ import annotations

import time
from collections import deque

WINDOW_S = 10.0
MAX_SAMPLES = 4096
PERCENTILE_CACHE_S = 1.0


class LoadWindow:
    def __init__(self, *, window_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (end_s, latency_s)
        self.in_flight = 0
        self._cache: dict[float, tuple[float, float]] = {}  # percentile -> (computed_at_s, value_s)

    def record(self, latency_s: float, now_s: float) -> None:
        self._samples.append((now_s, latency_s))

    def _recent(self, now_s: float) -> list[float]:
        start = now_s - self.window_s
        return [lat for end, lat in self._samples if end >= start]

    def percentile_s(self, p: float, now_s: float | None = None) -> float:
        now = time.monotonic() if now_s is None else now_s
        hit = self._cache.get(p)
        if hit is not None and now - hit[0] < PERCENTILE_CACHE_S:
            return hit[1]
        lat = sorted(self._recent(now))
        value = lat[min(len(lat) - 1, int(len(lat) * p / 100.0))] if lat else 0.0
        self._cache[p] = (now, value)
        return value

    def sample_count(self, now_s: float) -> int:
        return len(self._recent(now_s))

    def summary(self) -> dict:
        now = time.monotonic()
        recent = self._recent(now)
        if self._samples and len(self._samples) == self._samples.maxlen:
            span_s = max(1e-3, min(self.window_s, now - self._samples[0][0]))
        else:
            span_s = self.window_s
        lat = sorted(recent)
        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(len(lat) * p))] * 1000.0, 3) if lat else 0.0
        return {"in_flight": self.in_flight, "requests_per_s": round(len(recent) / span_s, 2),
                "p50_ms": pct(0.50), "p99_ms": pct(0.99)}
