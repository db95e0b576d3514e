"""gateway.admin.status_page in-process: events merged over regions. The page over real gateways is
in tests/e2e/test_status_page.py."""

from __future__ import annotations


def test_same_event_from_several_regions_is_listed_once():
    from gateway.admin.status_page import merge_events

    promo = "demo: version 2 is now stable (was 1)"
    merged = merge_events([
        {"time": 10.0, "kind": "promotion", "message": promo, "region": "eu-west"},
        {"time": 10.4, "kind": "promotion", "message": promo, "region": "us-east"},
        {"time": 12.0, "kind": "failover", "message": "region ap-south cannot serve", "region": "ap-south"},
        {"time": 99.0, "kind": "promotion", "message": promo, "region": "ap-south"},  # much later: its own
    ])
    assert [(e["kind"], e["region"]) for e in merged] == [
        ("promotion", "ap-south"), ("failover", "ap-south"), ("promotion", "eu-west, us-east")]
