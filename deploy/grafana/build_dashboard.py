"""Build deploy/grafana/geogate-dashboard.json (Grafana dashboard, schema 39).

    python deploy/grafana/build_dashboard.py          # rewrite the JSON beside this file
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is out of date

Edit the panels here, not in the JSON: tests/e2e/test_deploy_observability.py checks that the JSON
is this script's output, that every PromQL expression parses, and that every metric it names
exists in geogate's code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "geogate-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
REGION = 'region=~"$region"'
PANEL_W, PANEL_H = 12, 8


def _target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def _timeseries(title: str, unit: str, targets: list[tuple[str, str]], description: str = "") -> dict:
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10}}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [_target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(targets)],
    }


def _stat(title: str, unit: str, expr: str, legend: str, description: str = "") -> dict:
    return {
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": [
            {"color": "red", "value": None}, {"color": "green", "value": 1}]}}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "none", "textMode": "value_and_name"},
        "targets": [_target(expr, legend, "A")],
    }


def _row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def panels() -> list[dict]:
    return [
        _row("Regions"),
        _stat("Healthy replicas per region", "none",
              f"sum by (region) (geogate_replica_healthy{{{REGION}}})", "{{region}}",
              "Replicas passing active health checks, as each region's gateway sees them. 0 = region down "
              "(its /v2/health/ready answers 503; DNS/anycast steer clients away)."),
        _timeseries("Healthy fraction per region", "percentunit", [
            (f"sum by (region) (geogate_replica_healthy{{{REGION}}}) / count by (region) "
             f"(geogate_replica_healthy{{{REGION}}})", "{{region}}"),
        ], "Below 71% (1/1.4) a region spills part of its traffic to the next region (failover)."),
        _row("Traffic (gateways)"),
        _timeseries("Requests/s by region and outcome", "reqps", [
            (f"sum by (region, outcome) (rate(geogate_requests_total{{{REGION}}}[{RATE}]))", "{{region}} {{outcome}}"),
        ]),
        _timeseries("Error ratio by region", "percentunit", [
            (f'sum by (region) (rate(geogate_requests_total{{{REGION}, outcome!~"success|client_error"}}[{RATE}])) '
             f"/ sum by (region) (rate(geogate_requests_total{{{REGION}}}[{RATE}]))", "{{region}}"),
        ], "Final outcomes after retries and failover, client errors (4xx) excluded."),
        _timeseries("Latency through the gateway (p50, p99)", "s", [
            (f"histogram_quantile(0.5, sum by (le, region) (rate(geogate_request_duration_seconds_bucket"
             f"{{{REGION}}}[{RATE}])))", "p50 {{region}}"),
            (f"histogram_quantile(0.99, sum by (le, region) (rate(geogate_request_duration_seconds_bucket"
             f"{{{REGION}}}[{RATE}])))", "p99 {{region}}"),
        ]),
        _timeseries("In-flight requests", "none", [
            (f"sum by (region, protocol) (geogate_in_flight_requests{{{REGION}}})", "{{region}} {{protocol}}"),
        ]),
        _timeseries("Upstream attempts by outcome", "reqps", [
            (f"sum by (region, outcome) (rate(geogate_upstream_attempts_total{{{REGION}}}[{RATE}]))",
             "{{region}} {{outcome}}"),
        ], "Every attempt sent to a replica or a peer region, retries and hedges included."),
        _timeseries("Retries, budget exhaustion, rejections", "reqps", [
            (f"sum by (region, reason) (rate(geogate_retries_total{{{REGION}}}[{RATE}]))",
             "retry {{region}} {{reason}}"),
            (f"sum by (region) (rate(geogate_retry_budget_exhausted_total{{{REGION}}}[{RATE}]))",
             "budget exhausted {{region}}"),
            (f"sum by (region, status) (rate(geogate_rejected_requests_total{{{REGION}}}[{RATE}]))",
             "rejected {{region}} {{status}}"),
        ]),
        _row("Replica health (gateways' view)"),
        _timeseries("Replica health checks", "none", [
            (f"max by (region, pool, replica) (geogate_replica_healthy{{{REGION}}})", "{{region}} {{replica}}"),
        ], "1 = passes active health checks (readiness + repository index)."),
        _timeseries("Outlier ejections", "none", [
            (f"sum by (region, replica) (increase(geogate_ejections_total{{{REGION}}}[{RATE}]))",
             "{{region}} {{replica}}"),
        ], "Passive outlier detection: consecutive failures eject a replica for a growing time."),
        _row("Replicas"),
        _timeseries("Replica inferences/s by model, version, outcome", "reqps", [
            (f"sum by (model, version, outcome) (rate(geogate_replica_requests_total[{RATE}]))",
             "{{model}} v{{version}} {{outcome}}"),
        ]),
        _timeseries("Replica latency p99 by model", "s", [
            (f"histogram_quantile(0.99, sum by (le, model, version) "
             f"(rate(geogate_replica_request_duration_seconds_bucket[{RATE}])))", "{{model}} v{{version}}"),
        ]),
        _timeseries("Mean batch size and queue depth", "none", [
            (f"sum by (model) (rate(geogate_replica_batch_size_sum[{RATE}])) / "
             f"sum by (model) (rate(geogate_replica_batch_size_count[{RATE}]))", "batch {{model}}"),
            ("sum by (model) (geogate_replica_queue_depth)", "queued {{model}}"),
            ("sum by (model) (geogate_replica_inflight_requests)", "in flight {{model}}"),
        ], "Dynamic batching: rows per ONNX Runtime run, requests waiting for a batch."),
        _timeseries("Model versions ready (replicas)", "none", [
            ("sum by (model, version) (geogate_replica_model_ready)", "{{model}} v{{version}}"),
        ], "How many replicas have each version ready: a promotion completes when every site has it."),
        _timeseries("Execution providers and load failures", "none", [
            ("count by (provider) (geogate_replica_execution_provider_info == 1)", "{{provider}}"),
            (f"sum by (model) (increase(geogate_replica_model_load_failures_total[{RATE}]))",
             "load failures {{model}}"),
            ("count(geogate_replica_ready == 0) or vector(0)", "replicas not ready"),
        ], "Sessions per execution provider (CUDA vs CPU fallback) and failed version loads."),
        _row("Model sync (per site)"),
        _timeseries("Versions per site by state", "none", [
            ("sum by (site, state) (geogate_sync_versions)", "{{site}} {{state}}"),
        ], "ready / loading / failed / serving versions at each site, as its sync agent publishes them."),
        _timeseries("Sync agents: store reachable, status age", "s", [
            ("time() - max by (site) (geogate_sync_heartbeat_timestamp_seconds)", "status age {{site}}"),
            ("min by (site) (geogate_sync_store_up)", "store up {{site}}"),
        ], "Seconds since each site last published its status (every poll); store up is 1 or 0."),
        _timeseries("Installs, replica loads, downloads", "none", [
            (f"sum by (site, outcome) (increase(geogate_sync_installs_total[{RATE}]))", "install {{site}} {{outcome}}"),
            (f"sum by (site, outcome) (increase(geogate_sync_replica_loads_total[{RATE}]))",
             "load {{site}} {{outcome}}"),
            (f"sum by (site) (rate(geogate_sync_downloaded_bytes_total[{RATE}]))", "bytes/s {{site}}"),
        ]),
        _row("GeoDNS"),
        _timeseries("Regions answered by GeoDNS", "none", [
            ("min by (region) (geogate_dns_region_healthy)", "healthy {{region}}"),
            ("max(geogate_dns_fail_open)", "fail open"),
        ], "1 while the responders see the region's /v2/health/ready pass; fail open = no region healthy."),
        _timeseries("GeoDNS answers by region, responses by rcode", "reqps", [
            (f"sum by (region) (rate(geogate_dns_service_answers_total[{RATE}]))", "answer {{region}}"),
            (f"sum by (rcode) (rate(geogate_dns_responses_total[{RATE}]))", "{{rcode}}"),
        ]),
    ]


def layout(items: list[dict]) -> list[dict]:
    """Grid positions: rows span the width, panels two per line."""
    y, x = 0, 0
    for i, p in enumerate(items, start=1):
        p["id"] = i
        if p["type"] == "row":
            if x:
                y, x = y + PANEL_H, 0
            p["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            y += 1
            continue
        p["gridPos"] = {"h": PANEL_H, "w": PANEL_W, "x": x, "y": y}
        x += PANEL_W
        if x >= 24:
            y, x = y + PANEL_H, 0
    return items


def dashboard() -> dict:
    return {
        "title": "geogate",
        "uid": "geogate-overview",
        "description": "geogate: regions, failover, gateways and replicas (metrics geogate_* and geogate_replica_*)",
        "tags": ["geogate", "inference"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-3h", "to": "now"},
        "refresh": "30s",
        "timezone": "utc",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            {"name": "region", "label": "Region", "type": "query", "datasource": DS,
             "query": {"query": "label_values(geogate_requests_total, region)", "refId": "region"},
             "definition": "label_values(geogate_requests_total, region)",
             "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
        ]},
        "annotations": {"list": []},
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON differs from this script's output")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
