"""PNG report of a load run (matplotlib, Agg backend: no display needed).

Panels, sharing the time axis (seconds since the load started): throughput (sent, ok,
failed per second), latency (p50 and p99 of successful requests), failures per second by
reason, and the shares of successful answers per region and per replica. Fault events from
the results are drawn as vertical lines on every panel and labelled on the first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines, worker threads

import matplotlib.pyplot as plt

FIGURE_WIDTH_IN = 12
PANEL_HEIGHT_IN = 2.4
DPI = 100
MAX_SERIES = 8  # more reasons/replicas than this are folded into "other"
EVENT_COLOR = "tab:red"


def _series(timeline: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """{name: per-second counts} for a per-second dict field, biggest names first, the tail folded."""
    totals: dict[str, int] = {}
    for row in timeline:
        for name, n in row[key].items():
            totals[name] = totals.get(name, 0) + n
    names = sorted(totals, key=lambda k: (-totals[k], k))
    keep, fold = names[:MAX_SERIES], names[MAX_SERIES:]
    out = {name: [float(row[key].get(name, 0)) for row in timeline] for name in keep}
    if fold:
        out["other"] = [float(sum(row[key].get(n, 0) for n in fold)) for row in timeline]
    return out


def _shares(series: dict[str, list[float]], n: int) -> dict[str, list[float]]:
    totals = [sum(v[i] for v in series.values()) for i in range(n)]
    return {name: [v[i] / totals[i] if totals[i] else 0.0 for i in range(n)] for name, v in series.items()}


def _mark_events(axes: list, events: list[dict[str, Any]]) -> None:
    for ev in events:
        for ax in axes:
            ax.axvline(ev["t_s"], color=EVENT_COLOR, linestyle="--", linewidth=1, alpha=0.8)
        label = f"{ev['kind']} {ev['target']}".strip()
        axes[0].annotate(label, xy=(ev["t_s"], 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                         textcoords="offset points", rotation=90, va="top", ha="left", fontsize=7,
                         color=EVENT_COLOR, bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})


def write_report(results: dict[str, Any], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Draw the report of `results` (a results document, see loadtests.results) into a PNG."""
    timeline = results["timeline"]
    t = [row["t_s"] + 0.5 for row in timeline]  # a bucket's counts belong to its middle
    n = len(timeline)
    fig, axes = plt.subplots(5, 1, figsize=(FIGURE_WIDTH_IN, PANEL_HEIGHT_IN * 5), sharex=True,
                             constrained_layout=True)
    ax_tp, ax_lat, ax_err, ax_reg, ax_rep = axes

    ax_tp.plot(t, [r["sent"] for r in timeline], label="sent", color="tab:gray")
    ax_tp.plot(t, [r["ok"] for r in timeline], label="ok", color="tab:green")
    ax_tp.plot(t, [r["failed"] for r in timeline], label="failed", color="tab:red")
    ax_tp.set_ylabel("requests/s")
    ax_tp.set_ylim(bottom=0)

    ax_lat.plot(t, [r["p50_ms"] for r in timeline], label="p50", color="tab:blue")
    ax_lat.plot(t, [r["p99_ms"] for r in timeline], label="p99", color="tab:orange")
    ax_lat.set_ylabel("latency ms")
    if any(r["p99_ms"] > 0 for r in timeline):
        ax_lat.set_yscale("log")

    errors = _series(timeline, "failed_by_reason")
    bottom = [0.0] * n
    for name, values in errors.items():
        ax_err.bar(t, values, width=0.9, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax_err.set_ylabel("failed/s")
    if not errors:
        ax_err.text(0.5, 0.5, "no failures", transform=ax_err.transAxes, ha="center", va="center",
                    color="tab:gray")

    names = (results.get("scenario") or {}).get("notes", {}).get("replica_names", {})
    for ax, key, ylabel in ((ax_reg, "regions", "region share"), (ax_rep, "replicas", "replica share")):
        shares = _shares(_series(timeline, key), n)
        if shares:
            labels = [f"{names[k]} ({k})" if k in names else k for k in shares]
            ax.stackplot(t, *shares.values(), labels=labels, alpha=0.8)
        else:
            ax.text(0.5, 0.5, f"no {key} reported", transform=ax.transAxes, ha="center", va="center",
                    color="tab:gray")
        ax.set_ylim(0, 1)
        ax.set_ylabel(ylabel)

    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax_rep.set_xlabel("seconds since start")
    ax_rep.set_xlim(0, max(n, 1))
    _mark_events(list(axes), results.get("events", []))

    totals = results["totals"]
    lat = totals["latency_ms"]
    spec = results.get("spec", {})
    heading = title or f"{spec.get('protocol', '')} {spec.get('mode', '')} -> {spec.get('url', '')}"
    fig.suptitle(f"{heading}\nsent {totals['sent']}, ok {totals['ok']} ({totals['success_ratio']:.2%}), "
                 f"{totals['ok_per_s']:.0f} ok/s, p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms",
                 fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
