"""The figures table of scenario runs (Markdown), from their results.json files:

    geogate bench table loadtests/results          # every DIR/*/results.json of a scenario

One row per scenario (verdict, the command that reproduces it, key figures, report PNG), then
the overhead table (direct / geogate / HAProxy) and the slow-replica comparison when those
scenarios are among the results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtests.results import load_results


def _f(v: Any, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _command(doc: dict[str, Any], out_dir: Path) -> str:
    sc = doc["scenario"]
    cmd = f"geogate bench scenario {sc['name']}"
    if sc.get("quick"):
        cmd += " --quick"
    if sc["name"] == "soak":
        cmd += f" --duration {doc['duration_s']:g}"
    return f"{cmd} --out {out_dir}"


def _transition(t: dict[str, Any] | None) -> str:
    if not t:
        return "n/a"
    reasons = f" {t['failed_by_reason']}" if t["failed_by_reason"] else ""
    return (f"{t['failed']} failed{reasons}, first success elsewhere {_f(t['first_remote_success_ms'], ' ms', 0)}, "
            f"p99 next 3 s {_f(t['transition_p99_ms'], ' ms', 1)}")


def key_figures(doc: dict[str, Any]) -> str:
    """The one-cell summary of a scenario's figures."""
    sc, n, t = doc["scenario"], doc["scenario"]["notes"], doc["totals"]
    name = sc["name"]
    base = f"{t['sent']} sent, {t['failed']} failed"
    if name == "overhead" and "overhead" in n:
        o = n["overhead"]
        p = o["paths"]
        return (f"added p50/p99 vs direct: geogate-1w {p['geogate-1w']['added_p50_ms']:+.2f}/"
                f"{p['geogate-1w']['added_p99_ms']:+.2f} ms, haproxy {p['haproxy']['added_p50_ms']:+.2f}/"
                f"{p['haproxy']['added_p99_ms']:+.2f} ms; throughput geogate-{o['gateway_workers']}w/haproxy "
                f"{o['ratio_geogate_nw_vs_haproxy']:.2f}x (see overhead table)")
    if name == "slow-replica" and "slow_replica" in n:
        s = n["slow_replica"]
        g, h = s["geogate"], s["haproxy"]
        return (f"+{s['delay_ms']} ms on 1 of 4 replicas: p99 geogate {g['healthy_p99_ms']:.2f}->"
                f"{g['slow_p99_ms']:.2f} ms ({g['p99_ratio']:.2f}x), haproxy {h['healthy_p99_ms']:.2f}->"
                f"{h['slow_p99_ms']:.2f} ms "
                f"({h['p99_ratio']:.2f}x); slow replica's share {g['slow_replica_share_slow']:.1%} (geogate); "
                f"failed geogate {g['totals']['failed']}, haproxy {h['totals']['failed']}")
    if name in ("replica-kill", "flapping-replica") and "side_by_side" in n:
        g, h = n["side_by_side"]["geogate"], n["side_by_side"]["haproxy"]
        return (f"failed geogate {g['failed']}/{g['sent']} vs haproxy {h['failed']}/{h['sent']}; p99 geogate "
                f"{g['p99_ms']:.1f} vs haproxy {h['p99_ms']:.1f} ms; p99 in 3 s after fault geogate "
                f"{_f(g.get('transition_p99_ms'), ' ms', 1)} vs haproxy {_f(h.get('transition_p99_ms'), ' ms', 1)}")
    if name == "region-outage" and "region_outage" in n:
        k, b = n["region_outage"]["kill"], n["region_outage"].get("blackhole") or {}
        kr = k.get("kill-region") or {}
        parts = [base, f"home replicas killed: {_transition(k.get('kill-home'))}",
                 f"region {kr.get('region', '?')} killed: {_transition(kr)}",
                 f"back home {_f((k.get('restore') or {}).get('back_home_s'), ' s')} after restore"]
        if b.get("run"):
            bh = b.get("blackhole") or {}
            parts.append(f"blackhole {bh.get('region', '?')} (netns link down): {_transition(bh)}")
        elif b:
            parts.append(f"blackhole not run: {b.get('why_not')}")
        return "; ".join(parts)
    if name in ("promotion-under-load", "store-outage"):
        p = n.get("promotion") or n.get("store_outage") or {}
        s = (f"{base}; versions {t['versions']}; promote -> first v2 {_f(p.get('promote_to_first_new_s'), ' s')}, "
             f"-> last v1 {_f(p.get('promote_to_last_old_s'), ' s')}; "
             f"v1 after first v2: {p.get('old_after_first_new')}")
        if name == "store-outage" and p.get("outage"):
            o = p["outage"]
            s += (f"; store down {o['from_s']:.1f}-{o['to_s']:.1f} s: {o['sent']} sent, {o['failed']} failed, "
                  f"versions {o['versions']}; store back -> first v2 {_f(o['restore_to_first_new_s'], ' s')}")
        return s
    if name == "gateway-restart" and "rolling_restart" in n:
        r = n["rolling_restart"]
        return (f"{base}; 2 units x {r['workers_per_unit']} workers restarted one by one: drain "
                f"{', '.join(_f(x['drain_s'], ' s') for x in r['restarts'])}; "
                f"requests cut off {sum(r['cut_off_per_worker'])}")
    if name == "soak" and "growth" in n:
        g = n["growth"]
        rss = max(g.values(), key=lambda x: x.get("rss_growth_mb", 0)) if g else {}
        worst = max(g, key=lambda k: g[k].get("rss_growth_mb", 0)) if g else "?"
        fds = max((x.get("fds_growth", 0) for x in g.values()), default=0)
        return (f"{base} over {doc['duration_s']:g} s; {len(g)} processes; largest RSS growth {worst} "
                f"{_f(rss.get('rss_growth_mb'), ' MB', 1)}; largest fd growth {fds:+g}")
    lat = t["latency_ms"]
    return f"{base}; p50 {lat['p50']} ms, p99 {lat['p99']} ms"


def overhead_table(doc: dict[str, Any]) -> list[str]:
    o = doc["scenario"]["notes"]["overhead"]
    p = o["paths"]
    lines = [f"Overhead ({o['replicas']} replicas, {o['protocol']}, latency: open loop {o['latency_rate_per_s']:g}/s; "
             f"throughput: closed loop, concurrency {o['throughput_concurrency']}, {o['client_processes']} client "
             f"processes; {o['phase_s']:g} s per phase; gateway workers / HAProxy threads for -Nw: "
             f"{o['gateway_workers']}; {o['cores']} cores shared by everything)", "",
             "| path | latency p50 ms | latency p99 ms | added p50 ms | added p99 ms | throughput ok/s "
             "| throughput p50 ms | throughput p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in p.items():
        lines.append(f"| {name} | {r['latency_p50_ms']:.3f} | {r['latency_p99_ms']:.3f} | {r['added_p50_ms']:+.3f} "
                     f"| {r['added_p99_ms']:+.3f} | {r['throughput_ok_per_s']:.0f} | {r['throughput_p50_ms']:.3f} "
                     f"| {r['throughput_p99_ms']:.3f} |")
    lines += ["", f"Ratios (throughput): geogate-Nw/haproxy {o['ratio_geogate_nw_vs_haproxy']:.2f}, geogate-1w/haproxy "
              f"{o['ratio_geogate_1w_vs_haproxy']:.2f}, geogate-Nw/direct {o['ratio_geogate_nw_vs_direct']:.2f}, "
              f"geogate-1w/direct {o['ratio_geogate_1w_vs_direct']:.2f}, haproxy/direct "
              f"{o['ratio_haproxy_vs_direct']:.2f}."]
    return lines


def slow_table(doc: dict[str, Any]) -> list[str]:
    s = doc["scenario"]["notes"]["slow_replica"]
    factor = s["delay_ms"] / s["direct_p50_ms"] + 1
    lines = [f"Slow replica (1 of 4 replicas +{s['delay_ms']} ms per inference = {factor:.0f}x the direct p50 of "
             f"{s['direct_p50_ms']:.2f} ms; open loop {s['rate_per_s']:g}/s, {s['duration_s']:g} s per path, slow "
             f"from t={s['fault_at_s']:g} s)", "",
             "| path | all-healthy p50 ms | all-healthy p99 ms | one slow p50 ms | one slow p99 ms | p99 ratio "
             "| slow replica's share | failed |", "|---|---|---|---|---|---|---|---|"]
    for name in ("geogate", "haproxy"):
        r = s[name]
        share = r.get("slow_replica_share_slow")
        share_text = "n/a (round-robin: 25%)" if share is None else f"{share:.1%}"
        lines.append(f"| {name} | {r['healthy_p50_ms']:.2f} | {r['healthy_p99_ms']:.2f} | {r['slow_p50_ms']:.2f} | "
                     f"{r['slow_p99_ms']:.2f} | {r['p99_ratio']:.2f}x | {share_text} | {r['totals']['failed']} |")
    return lines


def build_table(dirs: list[Path]) -> str:
    docs = []
    for d in dirs:
        for path in sorted([d / "results.json"] if (d / "results.json").exists() else d.glob("*/results.json")):
            doc = load_results(path)
            if "scenario" in doc:
                docs.append((path.parent, doc))
    lines = ["| scenario | verdict | command | key figures | load avg (start/end) | report |",
             "|---|---|---|---|---|---|"]
    for out_dir, doc in docs:
        sc = doc["scenario"]
        extra = f"<br>{sc['notes']['soak_png']}" if sc["name"] == "soak" and "soak_png" in sc["notes"] else ""
        m = sc.get("machine") or {}
        load = f"{m.get('loadavg_1m_start', '?')}/{m.get('loadavg_1m_end', '?')} on {m.get('cores', '?')} cores"
        lines.append(f"| {sc['name']} | {'passed' if sc['passed'] else 'FAILED'} | `{_command(doc, out_dir)}` | "
                     f"{key_figures(doc)} | {load} | {out_dir / 'report.png'}{extra} |")
    for _, doc in docs:
        if doc["scenario"]["name"] == "overhead" and "overhead" in doc["scenario"]["notes"]:
            lines += ["", *overhead_table(doc)]
        if doc["scenario"]["name"] == "slow-replica" and "slow_replica" in doc["scenario"]["notes"]:
            lines += ["", *slow_table(doc)]
    return "\n".join(lines)
