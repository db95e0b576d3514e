"""deploy/autoscaling, offline: the HPA and the prometheus-adapter ConfigMap validate against
the Kubernetes schemas (strict), the KEDA ScaledObject's structure is checked by hand (its
CRD is not in kubernetes-validate; its HPA behavior goes through the HPA schema), and every
metric and label they query is one the gateway really exports (gateway.routing.capacity)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.config import CapacitySection, load_config
from gateway.routing.capacity import CapacityTracker

ROOT = Path(__file__).resolve().parents[3]
AUTOSCALING = ROOT / "deploy" / "autoscaling"
BASE = ROOT / "deploy" / "k8s" / "base"
K8S_VERSION = "1.35"
METRIC = "geogate_pool_desired_replicas"
SCALEDOBJECT_SPEC_KEYS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                          "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
                          "triggers"}
TRIGGER_KEYS = {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}
PROMETHEUS_METADATA_KEYS = {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                            "ignoreNullValues", "unsafeSsl", "customHeaders", "queryParameters", "timeout"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path) -> dict:
    docs = _docs(path)
    assert len(docs) == 1, f"{path.name}: expected one document, found {len(docs)}"
    return docs[0]


def _validate(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {'/'.join(map(str, exc.path))}")


def _statefulset() -> dict:
    return next(d for d in _docs(BASE / "replica.yaml") if d["kind"] == "StatefulSet")


def _base_namespace() -> str:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())["namespace"]


def _exported_series() -> dict[str, set[str]]:
    """Metric name -> label names, as a real CapacityTracker exports them."""
    reg = CollectorRegistry()
    t = CapacityTracker(CapacitySection(), region="eu-west", registry=reg)
    t.sample([("eu-west-replicas", {"grpc://127.0.0.1:1": 3}, ["grpc://127.0.0.1:1"], 1)], now_s=0.0)
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def _selector_labels(promql: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', promql))


def test_hpa_validates_and_targets_the_replica_statefulset():
    hpa = _one(AUTOSCALING / "hpa.yaml")
    _validate(hpa)
    sts = _statefulset()
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (sts["apiVersion"], sts["kind"], sts["metadata"]["name"])
    assert hpa["metadata"]["namespace"] == _base_namespace()
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_hpa_follows_the_gateways_desired_count():
    hpa = _one(AUTOSCALING / "hpa.yaml")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    ext = metric["external"]
    assert ext["metric"]["name"] == METRIC
    # desired = ceil(metric / averageValue): with 1, exactly the gateway's count
    assert ext["target"] == {"type": "AverageValue", "averageValue": "1"}
    labels = ext["metric"]["selector"]["matchLabels"]
    exported = _exported_series()
    assert set(labels) <= exported[METRIC], f"selector labels {set(labels)} not exported: {exported[METRIC]}"
    cfg = load_config(BASE / "geogate.toml")
    region = cfg.region(labels["region"])
    assert labels["pool"] in [p.name for p in region.pools]


def test_prometheus_adapter_rules_serve_the_metric():
    cm = _one(AUTOSCALING / "prometheus-adapter.yaml")
    _validate(cm)
    rules = yaml.safe_load(cm["data"]["config.yaml"])
    assert set(rules) == {"externalRules"}
    exported = _exported_series()
    names = set()
    for rule in rules["externalRules"]:
        assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
        series = re.match(r"'?(\w+)\{", rule["seriesQuery"]).group(1)
        assert series in exported, f"adapter queries {series}, which the gateway does not export"
        assert set(_selector_labels(rule["seriesQuery"].replace("!=", "="))) <= exported[series]
        matcher = re.compile(rule["name"]["matches"])
        assert matcher.search(series)
        names.add(matcher.sub(rule["name"]["as"], series))
        # several gateway pods/workers export the same desired count: max, never sum
        assert rule["metricsQuery"].startswith("max(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)")
    hpa = _one(AUTOSCALING / "hpa.yaml")
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] in names


def test_keda_scaledobject_structure():
    so = _one(AUTOSCALING / "keda-scaledobject.yaml")
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", so["metadata"]["name"])
    assert so["metadata"]["namespace"] == _base_namespace()
    spec = so["spec"]
    assert set(spec) <= SCALEDOBJECT_SPEC_KEYS, f"unknown ScaledObject fields: {set(spec) - SCALEDOBJECT_SPEC_KEYS}"
    sts = _statefulset()
    ref = spec["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (sts["apiVersion"], sts["kind"], sts["metadata"]["name"])
    for key in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[key], int) and spec[key] >= 0, key
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert set(trigger) <= TRIGGER_KEYS
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    md = trigger["metadata"]
    unknown = set(md) - PROMETHEUS_METADATA_KEYS
    assert not unknown, f"unknown prometheus trigger fields: {unknown}"
    assert all(isinstance(v, str) for v in md.values()), "KEDA trigger metadata values must be strings"
    assert re.fullmatch(r"https?://[\w.-]+(:\d+)?/?", md["serverAddress"])
    assert md["threshold"] == "1"
    query = md["query"]
    assert query.startswith(f"max({METRIC}{{")
    exported = _exported_series()
    labels = _selector_labels(query)
    assert set(labels) <= exported[METRIC]
    cfg = load_config(BASE / "geogate.toml")
    assert labels["pool"] in [p.name for p in cfg.region(labels["region"]).pools]


def test_keda_hpa_behavior_is_a_valid_hpa_behavior():
    """KEDA copies advanced.horizontalPodAutoscalerConfig.behavior into the HPA it creates:
    validate it there, with the HPA schema."""
    so = _one(AUTOSCALING / "keda-scaledobject.yaml")
    hpa_cfg = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    hpa = copy.deepcopy(_one(AUTOSCALING / "hpa.yaml"))
    hpa["metadata"]["name"] = hpa_cfg["name"]
    hpa["spec"]["behavior"] = hpa_cfg["behavior"]
    _validate(hpa)


def test_strict_validation_catches_a_misspelt_field():
    hpa = _one(AUTOSCALING / "hpa.yaml")
    hpa["spec"]["behavior"]["scaleDown"]["stabilisationWindowSeconds"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
