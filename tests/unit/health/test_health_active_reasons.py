"""health.active in-process: a probe that raises is a failed probe with a reason. Probes of real
replicas are in tests/e2e/test_health_active_reasons.py."""

from core.config import HealthSection
from health.active import ActiveHealthChecker
from health.replica_state import ReplicaState

SETTINGS = HealthSection(interval_ms=100, timeout_ms=300, rise=2, fall=2)


async def test_a_probe_that_raises_counts_as_a_failed_probe():
    class BrokenProber:
        async def probe(self):
            raise RuntimeError("boom")

    checker = ActiveHealthChecker(SETTINGS)
    state = ReplicaState("http://127.0.0.1:1")
    result = await checker.probe(BrokenProber(), state)
    assert not result.ok and result.reason == "probe error: RuntimeError: boom"
