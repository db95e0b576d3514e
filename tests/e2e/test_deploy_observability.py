"""deploy/grafana and deploy/prometheus are built on metric names that really exist.

Metric names are collected from geogate's code by importing its metric modules and building
their metric sets (prometheus-client registries), then expanded to the sample names PromQL
uses (counter -> name_total, histogram -> name_bucket/_sum/_count, ...). Every `geogate_*`
name in the dashboard and the alert rules must be one of them, and every expression must
parse as PromQL (promql-parser).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import prometheus_client
import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_procs import demo_repository
from tests.procs import ReplicaProc, free_port, geogate, http_ok

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "geogate-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
# Modules whose metrics may appear in dashboards; those that do not exist are simply absent.
METRIC_MODULES = ("gateway.server.metrics", "replicas.server.metrics", "replicas.sync.metrics", "geo.dns_metrics",
                  "geo.dns_server", "geo.region_health", "health.active", "health.outlier")
METRIC_NAME = re.compile(r"\bgeogate_[a-z0-9_]+\b")
# Grafana's variables, replaced by something PromQL accepts before parsing.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$region": ".*"}


# Sample names Prometheus stores for each family type (text exposition format 0.0.4).
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "stateset": ("",), "unknown": ("",),
            "gaugehistogram": ("_bucket", "_gsum", "_gcount")}


def _registry_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry's families expose (families with no labelled child yet
    are described all the same)."""
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def _metrics_classes(module) -> list[type]:
    return [obj for _, obj in inspect.getmembers(module, inspect.isclass)
            if obj.__module__ == module.__name__ and obj.__name__.endswith("Metrics")]


def _instantiate(cls: type):
    """Build a *Metrics class with placeholder strings for its required arguments."""
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return cls(*["test" for _ in params])


@pytest.fixture(scope="module")
def exported_names() -> set[str]:
    names = set()
    imported = 0
    for module_name in METRIC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        imported += 1
        for cls in _metrics_classes(module):
            obj = _instantiate(cls)
            registry = getattr(obj, "registry", None)
            if isinstance(registry, CollectorRegistry):
                names |= _registry_names(registry)
    names |= _registry_names(prometheus_client.REGISTRY)  # module-level metrics, if any
    assert imported >= 2, "the gateway and replica metric modules must exist"
    return {n for n in names if n.startswith("geogate_")}


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def _alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_metric_collection_sees_the_known_families(exported_names):
    # The collector works: it expands families to sample names.
    assert {"geogate_requests_total", "geogate_request_duration_seconds_bucket",
            "geogate_replica_requests_total", "geogate_replica_ready"} <= exported_names, sorted(exported_names)


def test_dashboard_is_the_generator_output():
    done = subprocess.run([sys.executable, str(ROOT / "deploy" / "grafana" / "build_dashboard.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_dashboard_metrics_exist_and_queries_parse(exported_names):
    exprs = _dashboard_exprs()
    assert len(exprs) >= 15
    referenced = set()
    for expr in exprs:
        referenced |= set(METRIC_NAME.findall(expr))
        if expr.startswith("label_values("):
            continue
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
        promql_parser.parse(expr)
    missing = referenced - exported_names
    assert not missing, f"dashboard uses metrics geogate does not export: {sorted(missing)}"
    # It covers both sides: gateways and replicas.
    assert any(n.startswith("geogate_replica_") and n != "geogate_replica_healthy" for n in referenced)
    assert "geogate_requests_total" in referenced


def test_alert_rules_metrics_exist_and_rules_are_well_formed(exported_names):
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    referenced = set()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        promql_parser.parse(rule["expr"])
        referenced |= set(METRIC_NAME.findall(rule["expr"]))
    missing = referenced - exported_names
    assert not missing, f"alerts use metrics geogate does not export: {sorted(missing)}"
    # The situations operators must hear about.
    for wanted in ("GeogateRegionDown", "GeogateFailoverActive", "GeogateReplicaEjections", "GeogateSyncStalled",
                   "GeogateModelSyncFailing", "GeogateHighP99Latency", "GeogateHighErrorRate", "GeogateDnsFailOpen"):
        assert wanted in names


def test_a_misspelt_metric_would_be_caught(exported_names):
    """The check above is not vacuous: a near-miss name is not in the exported set."""
    assert "geogate_request_total" not in exported_names
    assert "geogate_requests" not in exported_names  # the family name; PromQL needs _total


def _referenced_names() -> set[str]:
    names = set()
    for expr in [*_dashboard_exprs(), *(r["expr"] for r in _alert_rules())]:
        names |= set(METRIC_NAME.findall(expr))
    return names


def test_real_processes_expose_every_referenced_metric(procs, tmp_path):
    """Start a real replica, gateway, sync agent and GeoDNS responder on loopback and scrape
    each one's /metrics (the endpoints the manifests' scrape annotations point at): every
    metric name the dashboard and the alerts use is exposed by one of them."""
    replica = ReplicaProc(demo_repository(tmp_path))
    procs.append(replica)
    http, grpc, admin, dns_port, dns_metrics, sync_metrics = (free_port() for _ in range(6))
    (tmp_path / "store").mkdir()
    config = tmp_path / "world.toml"
    config.write_text(f"""
[store]
url = "file://{tmp_path / 'store'}"
[health]
interval_ms = 300
timeout_ms = 250
rise = 1
fall = 1
[dns]
listen = "127.0.0.1:{dns_port}"
metrics = "127.0.0.1:{dns_metrics}"
check_interval_ms = 300
[[regions]]
name = "r1"
http = "127.0.0.1:{http}"
grpc = "127.0.0.1:{grpc}"
admin = "127.0.0.1:{admin}"
addresses = ["192.0.2.10"]
  [[regions.pools]]
  name = "p1"
  replicas = ["grpc://{replica.grpc_url}"]
  repository = "{tmp_path / 'site-repo'}"
""")
    replica.wait_ready()
    gateway = geogate("gateway", "--config", str(config), "--region", "r1", name="gateway")
    sync = geogate("sync", "--config", str(config), "--site", "r1", "--metrics", f"127.0.0.1:{sync_metrics}",
                   name="sync")
    dns = geogate("dns", "--config", str(config), name="dns")
    procs.extend([gateway, sync, dns])
    endpoints = {"replica": f"http://127.0.0.1:{replica.metrics_port}/metrics",
                 "gateway": f"http://127.0.0.1:{admin}/metrics",
                 "sync": f"http://127.0.0.1:{sync_metrics}/metrics",
                 "dns": f"http://127.0.0.1:{dns_metrics}/metrics"}
    gateway.wait_until(lambda: http_ok(f"http://127.0.0.1:{http}/v2/health/ready"), 90)
    sync.wait_until(lambda: http_ok(endpoints["sync"]), 60)
    dns.wait_until(lambda: http_ok(endpoints["dns"]), 60)
    scraped = set()
    for what, url in endpoints.items():
        with urllib.request.urlopen(url, timeout=10) as r:
            families = list(text_string_to_metric_families(r.read().decode()))
        assert families, f"{what}: empty /metrics"
        for family in families:
            scraped |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    missing = _referenced_names() - scraped
    assert not missing, f"referenced but not exposed by the running processes: {sorted(missing)}"


