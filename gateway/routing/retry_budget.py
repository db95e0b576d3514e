"""Retry budget (Finagle's RetryBudget, Envoy's retry_budget): retries may add at most
`percent` of recent requests, plus a small floor per second so a quiet gateway can still
retry. Stops retry storms from multiplying load on a sick pool.

Counts live in one-second buckets over a sliding window; `record_request()` is called per
client request, `try_spend()` before each retry.
"""

from __future__ import annotations

import time

WINDOW_S = 10


class RetryBudget:
    def __init__(self, *, percent: float, min_per_s: float, window_s: int = WINDOW_S,
                 clock=time.monotonic) -> None:
        self.ratio = percent / 100.0
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._clock = clock
        self._requests = [0] * window_s
        self._retries = [0] * window_s
        self._stamps = [-1] * window_s

    def _slot(self) -> int:
        sec = int(self._clock())
        i = sec % self.window_s
        if self._stamps[i] != sec:
            self._stamps[i] = sec
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def _totals(self) -> tuple[int, int]:
        oldest = int(self._clock()) - self.window_s + 1
        req = ret = 0
        for i in range(self.window_s):
            if self._stamps[i] >= oldest:
                req += self._requests[i]
                ret += self._retries[i]
        return req, ret

    def record_request(self) -> None:
        self._requests[self._slot()] += 1

    def allowed(self) -> float:
        """Retries the window allows in total right now."""
        req, _ = self._totals()
        return self.min_per_s * self.window_s + self.ratio * req

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        i = self._slot()
        req, ret = self._totals()
        if ret + 1 > self.min_per_s * self.window_s + self.ratio * req:
            return False
        self._retries[i] += 1
        return True
