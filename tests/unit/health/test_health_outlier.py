"""Passive outlier detection: pure logic on ReplicaState objects (no sockets needed)."""

import logging

from core.config import HealthSection
from health.outcomes import Outcome
from health.outlier import OutlierDetector
from health.replica_state import REASON_EJECTED, ReplicaState

SETTINGS = HealthSection(consecutive_failures=3, base_ejection_ms=1000, max_ejection_ms=5000,
                         max_ejection_percent=50)


def make_pool(n: int, pool: str = "eu-ort") -> list[ReplicaState]:
    states = [ReplicaState(f"grpc://127.0.0.1:{18100 + i}", pool=pool) for i in range(n)]
    for s in states:
        s.healthy = True
    return states


def fail(det, state, pool, now, times=1, outcome=Outcome.UNAVAILABLE):
    for _ in range(times):
        det.record(state, outcome, pool, now)


def test_consecutive_failures_eject_and_success_resets():
    pool = make_pool(4)
    det = OutlierDetector(SETTINGS)
    r = pool[0]
    fail(det, r, pool, 100.0, 2)
    det.record(r, Outcome.SUCCESS, pool, 100.0)
    assert r.consecutive_failures == 0
    fail(det, r, pool, 100.0, 2)
    assert not r.ejected(100.0)
    fail(det, r, pool, 100.0, 1, Outcome.CONNECT_FAILURE)
    assert r.ejected(100.0)
    assert r.routable(100.5) == (False, REASON_EJECTED)
    assert "3 consecutive failures" in r.eject_reason and "connect failure" in r.eject_reason
    assert r.ejected_until_s == 101.0  # base_ejection_ms * 1
    assert r.routable(101.0) == (True, "")


def test_client_errors_never_count():
    pool = make_pool(2)
    det = OutlierDetector(SETTINGS)
    for _ in range(10):
        det.record(pool[0], Outcome.CLIENT_ERROR, pool, 1.0)
    assert pool[0].consecutive_failures == 0 and not pool[0].ejected(1.0)


def test_ejection_time_grows_and_is_capped():
    pool = make_pool(2)
    det = OutlierDetector(SETTINGS)
    r = pool[0]
    now = 10.0
    durations = []
    for _ in range(7):
        fail(det, r, pool, now, 3)
        assert r.ejected(now)
        durations.append(round(r.ejected_until_s - now, 3))
        now = r.ejected_until_s + 0.01  # comes back and fails again right away
    assert durations == [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0]


def test_ejection_count_decays_after_quiet_periods():
    pool = make_pool(2)
    det = OutlierDetector(SETTINGS)
    r = pool[0]
    fail(det, r, pool, 0.0, 3)       # ejection 1: until 1.0
    fail(det, r, pool, 1.0, 3)       # ejection 2: until 3.0
    assert r.ejection_count == 2
    # 5 s (max_ejection_ms) after the last ejection ended the count drops by one ...
    det.record(r, Outcome.SUCCESS, pool, 3.0 + 5.0)
    assert r.ejection_count == 1
    # ... so the next ejection is shorter than it would have been.
    fail(det, r, pool, 8.5, 3)
    assert r.ejection_count == 2 and r.ejected_until_s == 8.5 + 2.0
    # Two more full quiet periods bring it back to zero.
    det.record(r, Outcome.SUCCESS, pool, 10.5 + 10.0)
    assert r.ejection_count == 0


def test_max_ejection_percent_is_enforced(caplog):
    pool = make_pool(4)  # 50% cap: at most 2 of 4
    det = OutlierDetector(SETTINGS)
    fail(det, pool[0], pool, 1.0, 3)
    fail(det, pool[1], pool, 1.0, 3)
    with caplog.at_level(logging.WARNING, logger="geogate.health.outlier"):
        fail(det, pool[2], pool, 1.0, 3)
    assert [r.ejected(1.0) for r in pool] == [True, True, False, False]
    assert det.skipped_ejections == 1
    assert "max_ejection_percent=50" in caplog.text and pool[2].url in caplog.text
    # Once an ejection ends, another replica may be ejected.
    fail(det, pool[2], pool, 2.5, 1)
    assert pool[2].ejected(2.5)


def test_one_replica_may_always_be_ejected():
    # Envoy: with nothing ejected, one host may be ejected even above the cap (1 of 2 = 50% > 10%).
    pool = make_pool(2)
    det = OutlierDetector(HealthSection(consecutive_failures=2, max_ejection_percent=10))
    fail(det, pool[0], pool, 1.0, 2)
    assert pool[0].ejected(1.0)
    fail(det, pool[1], pool, 1.0, 2)
    assert not pool[1].ejected(1.0)


def test_zero_percent_disables_ejection():
    pool = make_pool(3)
    det = OutlierDetector(HealthSection(consecutive_failures=1, max_ejection_percent=0))
    fail(det, pool[0], pool, 1.0, 5)
    assert not pool[0].ejected(1.0)


def test_draining_replicas_do_not_count_in_the_pool():
    pool = make_pool(4)
    pool[2].draining = pool[3].draining = True  # 2 members: 50% cap = 1
    det = OutlierDetector(SETTINGS)
    fail(det, pool[0], pool, 1.0, 3)
    fail(det, pool[1], pool, 1.0, 3)
    assert pool[0].ejected(1.0) and not pool[1].ejected(1.0)


def test_on_eject_hook_and_unejection_resets_failures():
    seen = []
    pool = make_pool(2)
    det = OutlierDetector(SETTINGS, on_eject=seen.append)
    fail(det, pool[0], pool, 1.0, 3)
    assert seen == [pool[0]]
    fail(det, pool[0], pool, 1.5, 2)  # failures while ejected (panic traffic) do not re-eject
    assert pool[0].ejection_count == 1
    det.record(pool[0], Outcome.TIMEOUT, pool, 2.0)  # ejection over: count starts again
    assert pool[0].consecutive_failures == 1 and not pool[0].ejected(2.0)


def test_client_caused_outcomes_neither_count_nor_reset():
    """A client's own deadline or a cancelled attempt says nothing about the replica: it never
    ejects (however many) and it does not wipe a real failure streak either."""
    pool = make_pool(2)
    det = OutlierDetector(SETTINGS)
    r = pool[0]
    for outcome in (Outcome.DEADLINE_CLIENT, Outcome.CANCELLED):
        fail(det, r, pool, 100.0, 50, outcome)
    assert r.consecutive_failures == 0 and not r.ejected(100.0)
    fail(det, r, pool, 100.0, 2, Outcome.TIMEOUT)
    fail(det, r, pool, 100.0, 5, Outcome.DEADLINE_CLIENT)
    assert r.consecutive_failures == 2
    fail(det, r, pool, 100.0, 1, Outcome.TIMEOUT)
    assert r.ejected(100.0)
