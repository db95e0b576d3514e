"""deploy's Prometheus scrape config relabels the labels the alerts use."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]

SCRAPE = ROOT / "deploy" / "prometheus" / "scrape-config.yaml"


def test_scrape_config_relabels_the_labels_alerts_use():
    doc = yaml.safe_load(SCRAPE.read_text())
    (job,) = doc["scrape_configs"]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"__address__", "__metrics_path__", "job", "accelerator"} <= targets
    # The accelerator label matches the pod label the GPU/Triton components set.
    components = (ROOT / "deploy" / "k8s" / "components" / "gpu" / "kustomization.yaml").read_text()
    assert "geogate.example.com/accelerator: nvidia-gpu" in components
    assert any("geogate_example_com_accelerator" in s for r in job["relabel_configs"]
               for s in r.get("source_labels", []))
