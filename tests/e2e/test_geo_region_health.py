"""The region health monitor against real stand-in gateway processes: readiness 503, a killed
gateway (connection refused), a blackholed one (SIGSTOP: connects hang), one lost probe that
must not flip anything, and rise counting on recovery."""

from __future__ import annotations

import asyncio
import signal
import time
from types import SimpleNamespace

import pytest

from geo.region_health import RegionHealthMonitor
from loadtests.geo_standin import StandinGateway

INTERVAL_MS = 200
# Longer than the interval on purpose: a slow probe on a loaded machine must not count as lost.
TIMEOUT_MS = 1000
FALL = 2
RISE = 3
WAIT_S = 20.0  # generous: a loaded 2-core machine


@pytest.fixture
def gateway(tmp_path):
    gw = StandinGateway("eu-west", (53.35, -6.26), str(tmp_path)).wait_ready()
    yield gw
    gw.stop()


async def _until(cond, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not {what} after {timeout_s}s")


def _monitor(gw: StandinGateway, changes: list[tuple[str, bool, int, str]]) -> RegionHealthMonitor:
    region = SimpleNamespace(name=gw.region, http=gw.address)
    return RegionHealthMonitor([region], interval_ms=INTERVAL_MS, timeout_ms=TIMEOUT_MS, fall=FALL, rise=RISE,
                               on_change=lambda s: changes.append(
                                   (s.name, s.healthy, s.consecutive_successes, s.reason)))


async def test_healthy_then_503_then_rise(gateway):
    changes: list = []
    mon = _monitor(gateway, changes)
    await mon.start()
    try:
        await mon.wait_first_round()
        state = mon.states["eu-west"]
        await _until(lambda: state.healthy, "healthy")
        assert changes[0][:3] == ("eu-west", True, 1)  # never-seen region: first success counts
        await _until(lambda: state.summary is not None, "summary fetched")
        assert state.summary["region"] == "eu-west" and state.healthy_fraction() == 1.0
        assert mon.rtt_s()["eu-west"] > 0
        gateway.set_state("down")
        await _until(lambda: not state.healthy, "withdrawn after readiness 503")
        assert "readiness 503" in state.reason and "draining (stand-in)" in state.reason
        assert state.consecutive_failures >= FALL and mon.healthy_names() == []
        assert mon.healthy_fraction() == {"eu-west": 0.0}
        gateway.set_state("ok")
        await _until(lambda: state.healthy, "back after rise successes")
        assert changes[-1][:3] == ("eu-west", True, RISE)  # came back on the RISE-th success, not before
    finally:
        await mon.close()


class RecordingMonitor(RegionHealthMonitor):
    """Keeps every probe's outcome, and the state right after it, for the assertions."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.history: list[tuple[bool, bool, str]] = []  # (probe ok, region healthy, reason)

    def _record(self, state, ok, reason, rtt_s):
        super()._record(state, ok, reason, rtt_s)
        self.history.append((ok, state.healthy, state.reason))


async def test_single_lost_probe_never_flips(gateway):
    changes: list = []
    mon = RecordingMonitor([SimpleNamespace(name=gateway.region, http=gateway.address)], interval_ms=INTERVAL_MS,
                           timeout_ms=TIMEOUT_MS, fall=FALL, rise=RISE,
                           on_change=lambda s: changes.append((s.name, s.healthy)))
    await mon.start()
    try:
        state = mon.states["eu-west"]
        await _until(lambda: state.healthy, "healthy")
        for _ in range(3):
            seen = len(mon.history)
            gateway.set_state("drop-next")  # the next readiness probe hangs past its timeout
            await _until(lambda s=seen: any(not ok for ok, _, _ in mon.history[s:]), "one probe lost")
            await _until(lambda s=seen: mon.history[-1][0] and len(mon.history) > s + 1, "a success after it")
        assert changes == [("eu-west", True)]  # healthy once, never flipped
        lost = [(healthy, reason) for ok, healthy, reason in mon.history if not ok]
        assert len(lost) == 3, mon.history
        assert all(healthy and "1/2 failed probes" in reason for healthy, reason in lost), lost
    finally:
        await mon.close()


async def test_killed_gateway_withdrawn_then_needs_rise(gateway):
    changes: list = []
    mon = _monitor(gateway, changes)
    await mon.start()
    try:
        state = mon.states["eu-west"]
        await _until(lambda: state.healthy, "healthy")
        gateway.proc.kill()  # SIGKILL: connection refused from now on
        await _until(lambda: not state.healthy, "withdrawn after kill")
        assert "connect failed" in state.reason and "refused" in state.reason.lower()
        gateway.start().wait_ready()
        recovering: set[str] = set()

        def back() -> bool:
            # Until it is back, fewer than RISE successes: one success is not enough.
            if not state.healthy:
                assert state.consecutive_successes < RISE
                if state.consecutive_successes:
                    recovering.add(state.reason.partition(":")[0])
            return state.healthy

        await _until(back, "back after rise successes")
        assert recovering == {"recovering"}
        assert changes[-1][:3] == ("eu-west", True, RISE)
    finally:
        await mon.close()


async def test_blackholed_gateway_times_out(gateway):
    mon = _monitor(gateway, [])
    await mon.start()
    try:
        state = mon.states["eu-west"]
        await _until(lambda: state.healthy, "healthy")
        gateway.proc.signal(signal.SIGSTOP)  # connects complete in the kernel, nothing answers
        await _until(lambda: not state.healthy, "withdrawn while blackholed")
        assert state.reason == f"probe timeout after {TIMEOUT_MS} ms"
        gateway.proc.signal(signal.SIGCONT)
        await _until(lambda: state.healthy, "back after SIGCONT")
    finally:
        gateway.proc.signal(signal.SIGCONT)
        await mon.close()
