"""Chaos scenarios for `geogate bench scenario NAME`: each module defines one `Scenario` subclass
named `SCENARIO`. Names on the command line use dashes (replica-kill) or underscores."""

from __future__ import annotations

import importlib

from loadtests.scenario import Scenario

# name -> module (imported only when chosen)
SCENARIOS: dict[str, str] = {
    "replica-kill": "loadtests.scenarios.replica_kill",
    "slow-replica": "loadtests.scenarios.slow_replica",
    "flapping-replica": "loadtests.scenarios.flapping_replica",
    "overhead": "loadtests.scenarios.overhead",
    "region-outage": "loadtests.scenarios.region_outage",
    "promotion-under-load": "loadtests.scenarios.promotion_under_load",
    "gateway-restart": "loadtests.scenarios.gateway_restart",
    "store-outage": "loadtests.scenarios.store_outage",
    "soak": "loadtests.scenarios.soak",
}


def get(name: str) -> Scenario:
    """A fresh instance of scenario `name`; KeyError names the known scenarios."""
    key = name.replace("_", "-")
    if key not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return importlib.import_module(SCENARIOS[key]).SCENARIO()
