"""Which replicas of a pool may take a request for (model, version) right now.

- Normal: the routable replicas (healthy, not ejected, not draining) that have the version
  READY. The load balancer (power of two choices) picks among them.
- Panic (Envoy's panic routing): when the healthy fraction of the pool (routable replicas
  among those not draining) is below ``panic_threshold``, health is probably what is broken
  (a bad health check, a partition between gateway and replicas), so every non-draining
  replica that has the model is eligible, healthy or not, ejected or not. Draining replicas
  are never eligible: they were removed on purpose.
- Nothing eligible: ``reason`` names the cause with counts per cause, for the client's error
  message, logs and the status page.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from health.replica_state import ReplicaState


@dataclass
class Eligibility:
    replicas: list[ReplicaState] = field(default_factory=list)
    panic: bool = False
    reason: str = ""  # set when `replicas` is empty: why nothing can serve
    detail: str = ""  # set in panic mode: why panic routing is on


def healthy_fraction(pool: Sequence[ReplicaState], now_s: float | None = None) -> float:
    """Routable replicas / replicas not draining (0.0 for a pool with none)."""
    now = time.monotonic() if now_s is None else now_s
    members = [r for r in pool if not r.draining]
    if not members:
        return 0.0
    return sum(1 for r in members if r.routable(now)[0]) / len(members)


def eligible(pool: Sequence[ReplicaState], model: str, version: str | None, now_s: float,
             panic_threshold: float) -> Eligibility:
    """The replicas of `pool` that may serve `version` (None: any) of `model` (see module doc)."""
    version = None if version in (None, "") else str(version)
    members = [r for r in pool if not r.draining]
    draining = len(pool) - len(members)
    where = _pool_name(pool)
    if not members:
        if not pool:
            return Eligibility(reason=f"{where} has no replicas")
        return Eligibility(reason=f"all {len(pool)} replicas of {where} are draining")

    with_model = [r for r in members if r.has_model(model, version)]
    routable = [r for r in with_model if r.routable(now_s)[0]]
    fraction = healthy_fraction(members, now_s)
    if fraction < panic_threshold and with_model:
        healthy_count = sum(1 for r in members if r.routable(now_s)[0])
        return Eligibility(
            replicas=with_model, panic=True,
            detail=(f"panic routing: only {healthy_count} of {len(members)} replicas of {where} are "
                    f"healthy ({fraction:.0%} < panic_threshold {panic_threshold:.0%}); "
                    f"using all {len(with_model)} that have {_what(model, version)}"),
        )
    if routable:
        return Eligibility(replicas=routable)

    drain_note = f"; {draining} draining" if draining else ""
    if not with_model:
        ready = sorted({v for r in members for v in r.ready_versions.get(model, ())}, key=_version_key)
        if version is not None and ready:
            return Eligibility(reason=f"{_what(model, version)} is not ready on any replica of {where} "
                                      f"(ready: {', '.join(ready)}){drain_note}")
        return Eligibility(reason=f"{_what(model, version)} is not ready on any replica of {where}{drain_note}")

    causes = _count_causes(with_model, now_s)
    n = len(with_model)
    if n == len(members):
        subject = f"the only replica of {where} is" if n == 1 else f"all {n} replicas of {where} are"
    elif n == 1:
        subject = f"the only replica of {where} that has {_what(model, version)} is"
    else:
        subject = f"the {n} replicas of {where} that have {_what(model, version)} are"
    return Eligibility(reason=f"{subject} unhealthy ({causes}){drain_note}")


# ---------------------------------------------------------------------- helpers


def _what(model: str, version: str | None) -> str:
    return f"version {version} of {model!r}" if version is not None else f"model {model!r}"


def _pool_name(pool: Sequence[ReplicaState]) -> str:
    names = sorted({r.pool for r in pool if r.pool})
    if len(names) == 1:
        return f"pool {names[0]!r}"
    if names:
        return "pools " + ", ".join(repr(n) for n in names)
    return "the pool"


def _count_causes(replicas: Sequence[ReplicaState], now_s: float) -> str:
    counts = Counter(r.unroutable_detail(now_s) or "unknown" for r in replicas)
    return ", ".join(f"{n} {cause}" for cause, n in counts.most_common())


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)
