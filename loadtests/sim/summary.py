"""The text summary ``geogate bench sim`` prints: the decision-cost table, the day's figures,
the region loss, the checks."""

from __future__ import annotations


def cost_table_markdown(cost: dict) -> str:
    rows = ["| routing mode | replicas | regions | decisions | median us | p90 us | p99 us | mean us |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in cost.get("fleet_sizes", []):
        rows.append(f"| {r['mode']} | {r['replicas']:,} | {r['regions']} | {r['decisions']:,} | {r['median_us']} | "
                    f"{r['p90_us']} | {r['p99_us']} | {r['mean_us']} |")
    return "\n".join(rows)


def print_summary(result: dict) -> None:
    cost = result.get("decision_cost_us") or {}
    if cost:
        print("decision cost per request (product code: admission + region order + replica pick + outcome record)")
        print(cost_table_markdown(cost))
        for mode, r in cost.get("ratio_large_vs_small", {}).items():
            verdict = "goal met" if r["goal_met"] else "goal missed"
            print(f"  {mode}: {r['large_replicas']:,} vs {r['small_replicas']:,} replicas: x{r['ratio']} ({verdict})")
    w = result["world"]
    q = result["requests"]
    lat = result["latency_ms"]
    print(f"world: {len(w['regions'])} regions, {w['replicas']:,} replicas, {w['metros']} metros; "
          f"{result['options']['hours']:g} h simulated in {result['runtime']['day_s']} s")
    print(f"requests: {q['represented']:,} represented by {q['sampled']:,} samples; served {q['served_share']:.2%}; "
          f"refused {q['refused_by_priority']}; latency p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms")
    share = [s for s in result["nearest_region_share_by_hour"] if s is not None]
    if share:
        print(f"served in the nearest healthy region: {min(share):.1%} .. {max(share):.1%} by hour")
    loss = result.get("region_loss") or {}
    if loss:
        went = ", ".join(f"{r} {s:.0%}" for r, s in list(loss["traffic_went_to"].items())[:6])
        print(f"region loss: {loss['region']} at {loss['local_time']} local for {loss['duration_s'] / 60:.0f} min "
              f"(home demand {loss['demand_at_loss_per_s']:,}/s) -> {went}")
        sat = ", ".join(f"{s['region']} (util {s['max_utilization']})" for s in loss["saturated_regions"][:6]) or "none"
        print(f"  saturated: {sat}")
        print(f"  refused by priority: {loss['refused_by_priority']}; failed {loss['failed_requests']:,}; "
              f"steady after loss {loss['steady_after_loss_s']} s, after restore {loss['steady_after_restore_s']} s")
    for name, c in result["checks"].items():
        label = ("goal met" if c["ok"] else "goal missed") if name == "decision_cost_flat" else \
            ("ok" if c["ok"] else "FAIL")
        detail = {k: v for k, v in c.items() if k != "ok"}
        print(f"  [{label}] {name}: {detail}")
