"""deploy/route53 and deploy/cloudflare: the Terraform parses as HCL2 (python-hcl2; no provider
downloads here, so no `terraform validate`), health checks follow each region gateway's
/v2/health/ready on its client HTTP port, and every region of the world config appears with
its config address (and location)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hcl2
import pytest

from core.config import load_config

ROOT = Path(__file__).resolve().parents[3]
WORLD = ROOT / "deploy" / "k8s" / "base" / "geogate.toml"
READY_PATH = "/v2/health/ready"


def _unquote(value: Any) -> Any:
    """python-hcl2 keeps string quotes (keys and values); strip them recursively."""
    if isinstance(value, str):
        return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if k != "__is_block__"}
    return value


def _load(provider: str) -> dict[str, list]:
    merged: dict[str, list] = {}
    files = sorted((ROOT / "deploy" / provider).glob("*.tf"))
    assert files, provider
    for path in files:
        with path.open() as fh:
            doc = _unquote(hcl2.load(fh))  # raises on any HCL syntax error
        for key, blocks in doc.items():
            if key != "__comments__":
                merged.setdefault(key, []).extend(blocks)
    return merged


def _variables(doc: dict) -> dict[str, dict]:
    return {name: body for block in doc["variable"] for name, body in block.items()}


def _resources(doc: dict, rtype: str) -> dict[str, dict]:
    return {name: body for block in doc["resource"] for t, named in block.items() if t == rtype
            for name, body in named.items()}


@pytest.fixture(scope="module")
def world():
    return load_config(WORLD)


def _http_port(world) -> int:
    ports = {int(r.http.rpartition(":")[2]) for r in world.regions}
    assert len(ports) == 1, "one client HTTP port for every region gateway"
    return ports.pop()


def test_route53_covers_every_region_with_ready_health_checks(world):
    doc = _load("route53")
    variables = _variables(doc)
    regions = variables["regions"]["default"]
    assert set(regions) == {r.name for r in world.regions}
    for r in world.regions:
        assert regions[r.name]["address"] in r.addresses, r.name
    assert variables["http_port"]["default"] == _http_port(world)
    (check,) = _resources(doc, "aws_route53_health_check").values()
    assert check["resource_path"] == READY_PATH and check["type"] == "HTTP"
    assert check["port"] == "${var.http_port}" and check["for_each"] == "${var.regions}"
    records = _resources(doc, "aws_route53_record")
    assert "latency_routing_policy" in records["latency"]
    assert records["latency"]["health_check_id"].startswith("${aws_route53_health_check.region[")
    policies = {records[n]["failover_routing_policy"][0]["type"] for n in ("failover_primary", "failover_secondary")}
    assert policies == {"PRIMARY", "SECONDARY"}
    assert {variables["failover_primary"]["default"], variables["failover_secondary"]["default"]} <= set(regions)


def test_cloudflare_covers_every_region_with_ready_monitor_and_geo_steering(world):
    doc = _load("cloudflare")
    variables = _variables(doc)
    regions = variables["regions"]["default"]
    assert set(regions) == {r.name for r in world.regions}
    for r in world.regions:
        assert regions[r.name]["address"] in r.addresses, r.name
        assert regions[r.name]["location"] == pytest.approx(r.location), r.name
    assert variables["http_port"]["default"] == _http_port(world)
    (monitor,) = _resources(doc, "cloudflare_load_balancer_monitor").values()
    assert monitor["path"] == READY_PATH and monitor["expected_codes"] == "200"
    (pool,) = _resources(doc, "cloudflare_load_balancer_pool").values()
    assert pool["for_each"] == "${var.regions}"
    (lb,) = _resources(doc, "cloudflare_load_balancer").values()
    assert lb["steering_policy"] == "geo" and lb["proxied"] is False
    steering = variables["geo_steering"]["default"]
    for code, order in steering.items():
        assert sorted(order) == sorted(regions), f"{code}: every region, each once, in preference order"
    assert sorted(variables["default_order"]["default"]) == sorted(regions)


def test_hcl_parser_rejects_broken_syntax(tmp_path):
    """python-hcl2 is a real parser: the checks above would notice a syntax error."""
    bad = tmp_path / "bad.tf"
    bad.write_text('resource "x" "y" {\n  a = "unterminated\n}\n')
    with bad.open() as fh, pytest.raises(Exception):  # noqa: B017 - lark raises several types
        hcl2.load(fh)
