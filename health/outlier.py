"""Passive outlier detection: eject a replica that keeps failing real requests (Envoy's
``outlier_detection`` consecutive-5xx mode, in spirit).

Algorithm (per replica, driven by ``record()`` after every upstream attempt):
- A failure (``Outcome.is_failure``: connect failure, reset, timeout, 503/UNAVAILABLE, other
  5xx) increments ``consecutive_failures``; a success or a client error (the replica answered
  properly) resets it to 0; a client's own deadline or a cancelled attempt
  (``Outcome.no_verdict``: no answer, not the replica's fault) leaves it as it was.
- At ``consecutive_failures`` failures in a row the replica is ejected for
  ``base_ejection_ms * ejection_count`` (the count includes this ejection), capped at
  ``max_ejection_ms``: a replica that keeps coming back broken stays out longer each time.
- ``ejection_count`` decays like Envoy's: after each full ``max_ejection_ms`` without a new
  ejection (counted from the end of the last one), it drops by one.
- The ejected fraction of the pool (replicas not draining) is capped at
  ``max_ejection_percent``; an ejection that would exceed it is skipped, with a log line saying
  why. As in Envoy, one replica may always be ejected when none is, so a small pool with a
  low cap still loses its one bad replica; ``max_ejection_percent = 0`` turns ejection off.
- An ejection ends by itself (``ejected_until_s`` passes; no timer needed): the next
  ``record()`` for that replica notices and resets its failure count, like Envoy's unejection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from core.config import HealthSection
from health.outcomes import Outcome
from health.replica_state import ReplicaState

log = logging.getLogger("geogate.health.outlier")

MS_PER_S = 1000.0


class OutlierDetector:
    def __init__(self, settings: HealthSection, *, on_eject: Callable[[ReplicaState], None] | None = None):
        self.settings = settings
        self._on_eject = on_eject
        self.skipped_ejections = 0  # ejections refused by the max_ejection_percent cap

    # ------------------------------------------------------------------ public

    def record(self, state: ReplicaState, outcome: Outcome, pool: Sequence[ReplicaState], now_s: float) -> None:
        """Account one upstream attempt's outcome; may eject `state` (never more than the cap)."""
        self._expire(state, now_s)
        self._decay(state, now_s)
        if outcome.no_verdict:
            return
        if not outcome.is_failure:
            state.consecutive_failures = 0
            return
        state.consecutive_failures += 1
        if state.ejected(now_s):
            return  # already out (traffic reached it in panic mode): nothing more to do
        if state.consecutive_failures >= self.settings.consecutive_failures:
            self._try_eject(state, outcome, pool, now_s)

    def ejection_duration_s(self, ejection_count: int) -> float:
        """How long the `ejection_count`-th ejection lasts."""
        ms = min(self.settings.base_ejection_ms * max(1, ejection_count), self.settings.max_ejection_ms)
        return ms / MS_PER_S

    # ------------------------------------------------------------------ internals

    def _try_eject(self, state: ReplicaState, outcome: Outcome, pool: Sequence[ReplicaState],
                   now_s: float) -> None:
        members = [r for r in pool if not r.draining] or [state]
        if state not in members:
            members.append(state)
        already = sum(1 for r in members if r is not state and r.ejected(now_s))
        cap_percent = self.settings.max_ejection_percent
        after_percent = 100.0 * (already + 1) / len(members)
        if cap_percent <= 0 or (after_percent > cap_percent and already > 0):
            self.skipped_ejections += 1
            log.warning(
                "not ejecting %s after %d consecutive failures (last: %s): %d of %d replicas of pool %r "
                "are already ejected and ejecting one more (%.0f%%) would exceed max_ejection_percent=%d",
                state.url, state.consecutive_failures, outcome.value, already, len(members),
                state.pool, after_percent, cap_percent,
            )
            return
        state.ejection_count += 1
        state.ejections_total += 1
        duration_s = self.ejection_duration_s(state.ejection_count)
        state.ejected_until_s = now_s + duration_s
        state.last_ejection_s = now_s
        state.ejection_decay_from_s = state.ejected_until_s
        state.eject_reason = (f"{state.consecutive_failures} consecutive failures (last: "
                              f"{outcome.value.replace('_', ' ')}); ejected for {duration_s * MS_PER_S:.0f} ms "
                              f"(ejection #{state.ejection_count})")
        log.warning("ejecting %s from pool %r: %s", state.url, state.pool, state.eject_reason)
        if self._on_eject is not None:
            try:
                self._on_eject(state)
            except Exception:  # a metrics hook must never break routing
                log.exception("on_eject hook failed for %s", state.url)

    @staticmethod
    def _expire(state: ReplicaState, now_s: float) -> None:
        """Close an ejection whose time has passed: the replica starts over with a clean count."""
        if state.ejected_until_s and now_s >= state.ejected_until_s:
            state.ejected_until_s = 0.0
            state.consecutive_failures = 0
            state.eject_reason = ""

    def _decay(self, state: ReplicaState, now_s: float) -> None:
        if state.ejection_count <= 0 or state.ejected(now_s):
            return
        period_s = self.settings.max_ejection_ms / MS_PER_S
        quiet_s = now_s - state.ejection_decay_from_s
        if quiet_s < period_s:
            return
        periods = int(quiet_s // period_s)
        state.ejection_count = max(0, state.ejection_count - periods)
        state.ejection_decay_from_s += periods * period_s
