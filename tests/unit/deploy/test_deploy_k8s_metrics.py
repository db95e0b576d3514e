"""deploy/k8s: the admin token and the credential-free /metrics scrape agree."""

from __future__ import annotations

from pathlib import Path

from core.config import load_config

ROOT = Path(__file__).resolve().parents[3]


def test_k8s_config_opens_metrics_for_its_credential_free_scrape():
    """deploy/k8s sets an admin token and scrapes the admin port by pod annotation (no
    credentials): its config must open /metrics."""
    cfg = load_config(str(ROOT / "deploy" / "k8s" / "base" / "geogate.toml"))
    assert cfg.admin.token_env and cfg.admin.open_metrics is True
    gateway_yaml = (ROOT / "deploy" / "k8s" / "base" / "gateway.yaml").read_text()
    assert 'prometheus.io/port: "8002"' in gateway_yaml and "prometheus.io/path: /metrics" in gateway_yaml
