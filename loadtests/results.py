"""What a load run measured: the per-second recorder (mergeable across processes) and the
results JSON built from it.

Requests are attributed to the second of their INTENDED send time, so a fault at t=10 s shows
its failures (even ones that time out later) at t=10 s, next to the fault event. Latency
percentiles count successful requests only; failures are counted by reason.

Results JSON (``SCHEMA``)::

    {"schema": "geogate-loadtest/1", "spec": {...}, "started_at": ISO-8601, "started_at_unix_s": float,
     "duration_s": float,
     "totals": {"sent", "ok", "failed", "failed_by_reason": {reason: n}, "success_ratio",
                "ok_per_s", "latency_ms": {count, p50, p90, p99, p999, max, mean},
                "send_lag_ms": {...}, "regions": {r: n}, "versions": {v: n}, "replicas": {r: n}},
     "timeline": [{"t_s": 0, "sent", "ok", "failed", "failed_by_reason", "p50_ms", "p99_ms",
                   "regions", "versions", "replicas"}, ...],
     "events": [{"t_s", "kind", "target", "detail"}, ...]}
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from loadtests.histogram import LatencyHistogram

SCHEMA = "geogate-loadtest/1"


@dataclass
class FaultEvent:
    """Something the scenario did to the system, at `t_s` seconds after the load started."""

    t_s: float
    kind: str  # "kill", "stop", "cont", "fault", "start", ...
    target: str
    detail: str = ""


class _Second:
    __slots__ = ("failed", "hist", "ok", "regions", "replicas", "sent", "versions")

    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self.hist = LatencyHistogram()
        self.regions: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.replicas: Counter[str] = Counter()


class Recorder:
    """Counts outcomes per second of intended send time; one per process, merged at the end.

    `trace=True` also keeps every request as (t_s, ok, latency_ms, region, version, reason), for
    figures finer than a second ("first success served by another region after the kill")."""

    def __init__(self, *, trace: bool = False) -> None:
        self.seconds: dict[int, _Second] = {}
        self.send_lag = LatencyHistogram()  # actual send - intended send: the generator's own lateness
        self.in_flight = 0
        self.trace: list[tuple[float, bool, float, str, str, str]] | None = [] if trace else None

    def _bucket(self, t_s: float) -> _Second:
        sec = max(0, int(t_s))
        b = self.seconds.get(sec)
        if b is None:
            b = self.seconds[sec] = _Second()
        return b

    def record(self, t_s: float, ok: bool, latency_s: float, *, region: str = "", replica: str = "",
               version: str = "", reason: str = "") -> None:
        b = self._bucket(t_s)
        b.sent += 1
        if self.trace is not None:
            self.trace.append((round(t_s, 4), ok, round(latency_s * 1000.0, 3), region, version, reason))
        if ok:
            b.ok += 1
            b.hist.record_s(latency_s)
            if region:
                b.regions[region] += 1
            if version:
                b.versions[version] += 1
            if replica:
                b.replicas[replica] += 1
        else:
            b.failed[reason or "unknown"] += 1

    # -------------------------------------------------------------- live counters (progress line)

    def counts(self) -> tuple[int, int, int]:
        """sent, ok, failed so far."""
        sent = ok = 0
        for b in self.seconds.values():
            sent += b.sent
            ok += b.ok
        return sent, ok, sent - ok

    # -------------------------------------------------------------- crossing processes

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": {sec: {"sent": b.sent, "ok": b.ok, "failed": dict(b.failed), "hist": b.hist.encode(),
                              "regions": dict(b.regions), "versions": dict(b.versions),
                              "replicas": dict(b.replicas)}
                        for sec, b in self.seconds.items()},
            "send_lag": self.send_lag.encode(),
            "trace": self.trace,
        }

    def merge_dict(self, d: dict[str, Any]) -> None:
        for sec, src in d["seconds"].items():
            b = self._bucket(int(sec))
            b.sent += src["sent"]
            b.ok += src["ok"]
            b.failed.update(src["failed"])
            b.hist.merge(LatencyHistogram.decode(src["hist"]))
            b.regions.update(src["regions"])
            b.versions.update(src["versions"])
            b.replicas.update(src["replicas"])
        self.send_lag.merge(LatencyHistogram.decode(d["send_lag"]))
        if d.get("trace") is not None:
            self.trace = [*(self.trace or []), *map(tuple, d["trace"])]
            self.trace.sort(key=lambda r: r[0])

    def window_latency(self, start_s: float, end_s: float) -> dict[str, float | int]:
        """Latency summary (ms) of the successful requests whose intended send second is in
        [start_s, end_s): exact percentiles over the window, not an average of seconds."""
        h = LatencyHistogram()
        for sec, b in self.seconds.items():
            if start_s <= sec < end_s:
                h.merge(b.hist)
        return h.summary()


def _sorted(c: Counter[str]) -> dict[str, int]:
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def build_results(recorder: Recorder, *, spec: dict[str, Any], duration_s: float,
                  events: list[FaultEvent] | None = None, started_at_unix_s: float | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results document (see the module docstring) from a merged recorder.
    `started_at_unix_s`: wall-clock time of t=0 (LoadRun.wall_start), to line events up with logs."""
    total_hist = LatencyHistogram()
    failed: Counter[str] = Counter()
    regions: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    replicas: Counter[str] = Counter()
    timeline = []
    last = max(recorder.seconds, default=-1)
    last = max(last, int(duration_s + 0.999) - 1)
    sent = ok = 0
    for sec in range(last + 1):
        b = recorder.seconds.get(sec) or _Second()
        total_hist.merge(b.hist)
        failed.update(b.failed)
        regions.update(b.regions)
        versions.update(b.versions)
        replicas.update(b.replicas)
        sent += b.sent
        ok += b.ok
        timeline.append({
            "t_s": sec, "sent": b.sent, "ok": b.ok, "failed": b.sent - b.ok,
            "failed_by_reason": _sorted(b.failed),
            "p50_ms": round(b.hist.percentile_ms(50), 3), "p99_ms": round(b.hist.percentile_ms(99), 3),
            "regions": _sorted(b.regions), "versions": _sorted(b.versions), "replicas": _sorted(b.replicas),
        })
    started_at_unix_s = time.time() - duration_s if started_at_unix_s is None else started_at_unix_s
    started_at = dt.datetime.fromtimestamp(started_at_unix_s, dt.UTC)
    doc = {
        "schema": SCHEMA,
        "spec": spec,
        "started_at": started_at.isoformat(timespec="milliseconds"),
        "started_at_unix_s": round(started_at_unix_s, 3),
        "duration_s": duration_s,
        "totals": {
            "sent": sent, "ok": ok, "failed": sent - ok, "failed_by_reason": _sorted(failed),
            "success_ratio": round(ok / sent, 6) if sent else 0.0,
            "ok_per_s": round(ok / duration_s, 3) if duration_s > 0 else 0.0,
            "latency_ms": total_hist.summary(),
            "send_lag_ms": recorder.send_lag.summary(),
            "regions": _sorted(regions), "versions": _sorted(versions), "replicas": _sorted(replicas),
        },
        "timeline": timeline,
        "events": [asdict(e) for e in sorted(events or [], key=lambda e: e.t_s)],
    }
    if extra:
        doc.update(extra)
    return doc


def write_results(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the results JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    tmp.replace(path)
    return path


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    return orjson.loads(Path(path).read_bytes())


def window_totals(results: dict[str, Any], start_s: float, end_s: float) -> dict[str, Any]:
    """Sums over the timeline seconds in [start_s, end_s): sent, ok, failed, replicas, regions,
    versions, failed_by_reason. For scenario checks ("after the kill, ...")."""
    out: dict[str, Any] = {"sent": 0, "ok": 0, "failed": 0}
    counters = {k: Counter() for k in ("replicas", "regions", "versions", "failed_by_reason")}
    for row in results["timeline"]:
        if start_s <= row["t_s"] < end_s:
            out["sent"] += row["sent"]
            out["ok"] += row["ok"]
            out["failed"] += row["failed"]
            for k, c in counters.items():
                c.update(row[k])
    for k, c in counters.items():
        out[k] = _sorted(c)
    return out
