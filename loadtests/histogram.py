"""Latency percentiles from HDR histograms (the `hdrhistogram` package), mergeable across processes.

Values are recorded in microseconds: 1 us .. 10 min at 3 significant digits, so a percentile is
within 0.1% of the true value whatever the spread. A histogram crosses a process boundary as
the library's compressed base64 encoding (a short `str`), and merging is the library's `add`.
"""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 600 * 1_000_000  # anything slower is clamped: a load run never waits that long
SIGNIFICANT_DIGITS = 3
SUMMARY_PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class LatencyHistogram:
    """Records latencies in seconds; answers percentiles in milliseconds."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)

    def record_s(self, latency_s: float) -> None:
        us = int(latency_s * 1_000_000)
        self._h.record_value(min(max(us, LOWEST_US), HIGHEST_US))

    @property
    def count(self) -> int:
        return self._h.get_total_count()

    def percentile_ms(self, percentile: float) -> float:
        if not self.count:
            return 0.0
        return self._h.get_value_at_percentile(percentile) / 1000.0

    def max_ms(self) -> float:
        return self._h.get_max_value() / 1000.0 if self.count else 0.0

    def mean_ms(self) -> float:
        return self._h.get_mean_value() / 1000.0 if self.count else 0.0

    def merge(self, other: LatencyHistogram) -> None:
        if other.count:
            self._h.add(other._h)

    def encode(self) -> str:
        """Compact text form (HdrHistogram's compressed V2 encoding, base64) for another process."""
        return self._h.encode().decode("ascii")

    @classmethod
    def decode(cls, encoded: str) -> LatencyHistogram:
        h = cls()
        if encoded:
            h._h.decode_and_add(encoded.encode("ascii") if isinstance(encoded, str) else encoded)
        return h

    def summary(self) -> dict[str, float | int]:
        """count, p50/p90/p99/p99.9, max and mean, in milliseconds."""
        out: dict[str, float | int] = {"count": self.count}
        for p in SUMMARY_PERCENTILES:
            out[f"p{p:g}".replace(".", "")] = round(self.percentile_ms(p), 3)
        out["max"] = round(self.max_ms(), 3)
        out["mean"] = round(self.mean_ms(), 3)
        return out
