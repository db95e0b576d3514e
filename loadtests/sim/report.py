"""sim.png: the simulated day at a glance (matplotlib, Agg backend).

Panels, sharing the time axis (hours since the run's start, UTC on the labels): demand and
what happened to it (served, refused, failed), share served in the nearest healthy region,
latency p50/p99, utilization of the busiest regions as their gateways see it, and where the
lost region's home clients were served (a zoom on the region loss). Faults are vertical lines.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines

import matplotlib.pyplot as plt
import numpy as np

from loadtests.sim import faults as F
from loadtests.sim.metrics import TIMELINE_BIN_S, Metrics, weighted_quantiles

FIGURE_WIDTH_IN = 13
PANEL_HEIGHT_IN = 2.3
DPI = 100
TOP_REGIONS = 6
LOSS_BIN_S = 30.0
S_PER_HOUR = 3600.0
FAULT_COLORS = {F.REGION_DOWN: "tab:red", F.REGION_UP: "tab:green", F.PARTITION: "tab:purple",
                F.HEAL: "tab:purple", F.REPLICA_SLOW: "tab:orange", F.REPLICA_NORMAL: "tab:orange",
                F.REPLICA_DOWN: "tab:gray", F.REPLICA_UP: "tab:gray"}


def _bins(m: Metrics, bin_s: float, lo: float, hi: float):
    """Tick indices grouped into bins of `bin_s` over [lo, hi): (bin start times, list of index lists)."""
    n = max(1, math.ceil((hi - lo) / bin_s))
    groups: list[list[int]] = [[] for _ in range(n)]
    for i, (t, _) in enumerate(m.t_rows):
        if lo <= t < hi and i < len(m.t_total):
            groups[min(n - 1, int((t - lo) // bin_s))].append(i)
    return lo + np.arange(n) * bin_s, groups


def _nanmax(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def write_png(m: Metrics, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = 5 if m.lost else 4
    fig, axes = plt.subplots(panels, 1, figsize=(FIGURE_WIDTH_IN, PANEL_HEIGHT_IN * panels), dpi=DPI)
    starts, groups = _bins(m, TIMELINE_BIN_S, m.start_s, m.end_s)
    x = (starts - m.start_s) / S_PER_HOUR
    secs = np.array([sum(m.t_rows[i][1] for i in g) or math.nan for g in groups])

    ax = axes[0]
    total = np.array([sum(m.t_total[i] for i in g) for g in groups]) / secs
    ok = np.array([sum(m.t_ok[i] for i in g) for g in groups]) / secs
    refused = np.array([sum(m.t_refused[i] for i in g) for g in groups]) / secs
    ax.plot(x, total / 1000, label="demand", color="black", lw=1)
    ax.plot(x, ok / 1000, label="served", color="tab:blue", lw=1)
    ax.plot(x, refused / 1000, label="refused (429)", color="tab:red", lw=1)
    ax.plot(x, np.maximum(0, total - ok - refused) / 1000, label="failed / unreachable", color="tab:gray", lw=1)
    ax.set_ylabel("k requests/s")
    ax.set_title(f"simulated day: {len(m.regions)} regions, {m.planet.world.total_replicas} replicas "
                 f"(5-minute bins; hours since {int(m.start_s / S_PER_HOUR) % 24:02d}:00 UTC)")
    ax.legend(loc="upper left", fontsize=7, ncol=4)

    ax = axes[1]
    nearest = []
    for g in groups:
        okw = sum(m.t_ok[i] for i in g)
        nearest.append(sum(m.t_nearest[i] for i in g) / okw if okw else math.nan)
    ax.plot(x, nearest, color="tab:green", lw=1, label="served in the nearest healthy region (share of served)")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share")
    ax.legend(loc="lower left", fontsize=7)

    ax = axes[2]
    p50, p99 = [], []
    for g in groups:
        pairs = [p for i in g for p in m.t_lat[i]]
        if pairs:
            v = np.array([a for a, _ in pairs])
            w = np.array([b for _, b in pairs])
            q = weighted_quantiles(v, w, [0.5, 0.99])
            p50.append(q[0] * 1000)
            p99.append(q[1] * 1000)
        else:
            p50.append(math.nan)
            p99.append(math.nan)
    ax.plot(x, p50, label="p50", color="tab:blue", lw=1)
    ax.plot(x, p99, label="p99", color="tab:red", lw=1)
    ax.set_yscale("log")
    ax.set_ylabel("latency ms")
    ax.legend(loc="upper left", fontsize=7)

    ax = axes[3]
    peak = m.planet.world.peak_demand_per_s
    top = sorted(peak, key=lambda r: -peak[r])[:TOP_REGIONS]
    for r in top:
        j = m.ri[r]
        u = [_nanmax([m.t_util[i][j] for i in g]) for g in groups]
        ax.plot(x, u, lw=1, label=r)
    ax.axhline(1.0, color="black", lw=0.5, ls=":")
    ax.set_ylabel("utilization (max)")
    ax.legend(loc="upper left", fontsize=7, ncol=TOP_REGIONS)

    if m.lost:
        ax = axes[4]
        lo = max(m.start_s, m.loss_s - 600.0)
        hi = min(m.end_s, m.restore_s + 900.0)
        lstarts, lgroups = _bins(m, LOSS_BIN_S, lo, hi)
        keep = [k for k, g in enumerate(lgroups) if g]  # bins a tick started in (ticks are longer outside)
        lx = (lstarts[keep] - m.start_s) / S_PER_HOUR
        width = len(m.regions) + 2
        home = np.array([sum((m.t_home[i] for i in lgroups[k]), np.zeros(width)) for k in keep]).reshape(-1, width)
        totals = home.sum(axis=1)
        shares = np.divide(home, totals[:, None], out=np.zeros_like(home), where=totals[:, None] > 0)
        names = [*m.regions, "refused (429)", "failed / unreachable"]
        order = [j for j in np.argsort(-shares.sum(axis=0)) if shares[:, j].sum() > 0][:TOP_REGIONS + 2]
        ax.stackplot(lx, *(shares[:, j] for j in order), labels=[names[j] for j in order], step="post")
        ax.set_ylim(0, 1.0)
        ax.set_ylabel("share")
        ax.set_title(f"what happened to {m.lost}'s home clients' requests (lost {m.loss_s / S_PER_HOUR % 24:.1f}h "
                     f"UTC, restored {m.restore_s / S_PER_HOUR % 24:.1f}h; 30 s bins)", fontsize=9)
        ax.legend(loc="lower left", fontsize=7, ncol=4)

    for ax in axes:
        for f in m.faults:
            if f.kind in (F.REPLICA_DOWN, F.REPLICA_UP):
                continue
            xs = (f.t_s - m.start_s) / S_PER_HOUR
            lo_x, hi_x = ax.get_xlim()
            if lo_x <= xs <= hi_x:
                ax.axvline(xs, color=FAULT_COLORS.get(f.kind, "black"), lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("hours since the run's start")
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
