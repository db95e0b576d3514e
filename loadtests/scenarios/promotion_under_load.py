"""promotion-under-load: `geogate models promote demo 2` while traffic flows.

Two sites (eu-west: two replicas, us-east: one; quick: one each), each with an EMPTY model
repository that its sync agent fills from the store (a local directory store); version 1 is
pushed and promoted before the load, version 2 pushed but not promoted. Load goes through
eu-west's gateway without naming a version. A third into the run the operator promotes
version 2 with the CLI; the sync agents install it and the replicas load it; with global
cutover the gateway moves unversioned traffic to version 2 only once every site reports it
ready.

Checks: no failed request (no request may fail because a version is still loading), every
answer equals what the version named in its response computes, only versions 1 and 2 answer,
version 1 only before the promotion, version 2 alone at the end. Figures: promote -> first
version-2 answer, promote -> last version-1 answer, version-1 answers after the first
version-2 answer (a clean switch has none but requests already in flight).
"""

from __future__ import annotations

import time
from typing import Any

from loadtests.loadgen import LoadSpec
from loadtests.release_world import MODEL, ReleaseWorld
from loadtests.scenario import (
    Check,
    FaultAction,
    Scenario,
    ScenarioContext,
    check_no_wrong_answers,
    check_success_ratio,
    phase_summary,
)
from loadtests.trace import OK, VERSION, between, first_answer, last_sent, versions

HOME = "eu-west"
TAIL_S = 2


def switch_figures(trace: list, promote_s: float, old: str, new: str) -> dict[str, Any]:
    """How traffic moved from version `old` to `new` after the promotion at `promote_s`."""
    first_new = first_answer(trace, 0.0, lambda e: e[VERSION] == new)
    last_old = last_sent(trace, 0.0, lambda e: e[OK] and e[VERSION] == old)
    after_first = between(trace, first_new[0]) if first_new else []
    return {"promoted_at_s": promote_s,
            "first_new_sent_s": first_new[0] if first_new else None,
            "promote_to_first_new_s": round(first_new[0] - promote_s, 3) if first_new else None,
            "last_old_sent_s": last_old[0] if last_old else None,
            "promote_to_last_old_s": round(last_old[0] - promote_s, 3) if last_old else None,
            "old_after_first_new": sum(1 for e in after_first if e[OK] and e[VERSION] == old)}


class PromotionUnderLoad(Scenario):
    name = "promotion-under-load"
    description = "promote version 2 with the models CLI under load: no failure, clean switch from v1 to v2"
    s3 = False

    def sites(self, quick: bool) -> dict[str, int]:
        return {HOME: 1, "us-east": 1} if quick else {HOME: 2, "us-east": 1}

    def setup(self, ctx: ScenarioContext) -> LoadSpec:
        self.duration_s = 10.0 if ctx.quick else 30.0
        self.promote_s = round(self.duration_s / 4 if ctx.quick else self.duration_s / 3, 1)
        self.world = ReleaseWorld(ctx, self.sites(ctx.quick), s3=self.s3)
        self.world.start(gateways=[HOME])
        gw = ctx.gateways[HOME]
        ctx.notes["setup"] = {"sites": self.world.sites, "store": "s3 (moto)" if self.s3 else "file",
                              "duration_s": self.duration_s}
        return LoadSpec(url=f"http://{gw.http_address}", protocol="http-binary", model=MODEL,
                        rate=30.0 if ctx.quick else 100.0, duration_s=self.duration_s, timeout_s=5.0, trace=True)

    def _promote(self) -> FaultAction:
        def run() -> str:
            t0 = time.monotonic()
            self.world.models("promote", MODEL, "2")
            return f"geogate models promote {MODEL} 2 (took {time.monotonic() - t0:.2f} s)"
        return FaultAction(self.promote_s, "promote", f"{MODEL} v2", run)

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        return [self._promote()]

    def version_checks(self, results: dict[str, Any], ctx: ScenarioContext) -> tuple[list[Check], dict[str, Any]]:
        trace = ctx.recorder.trace or []
        checks = [check_success_ratio(results, 1.0, name="no failed requests"), check_no_wrong_answers(results)]
        promote = next((e for e in results["events"] if e["kind"] == "promote"), None)
        seen = versions(trace)
        checks.append(Check("only versions 1 and 2 answer", bool(seen) and set(seen) <= {"1", "2"}, f"{seen}"))
        if promote is None:
            return [*checks, Check("promotion happened", False, f"events: {results['events']}")], {}
        # the event is stamped when the CLI returned; the write happened just before
        figs = switch_figures(trace, promote["t_s"], "1", "2")
        before = versions(between(trace, 0.0, promote["t_s"] - self._cli_s()))
        checks.append(Check("version 1 before the promotion", set(before) == {"1"}, f"{before}"))
        checks.append(self.version_tail_check(results, ctx))
        checks.append(Check("switch figures", True,
                            f"promote -> first v2 answer {figs['promote_to_first_new_s']} s, -> last v1 answer "
                            f"{figs['promote_to_last_old_s']} s; v1 answers after the first v2: "
                            f"{figs['old_after_first_new']}"))
        return checks, figs

    def version_tail_check(self, results: dict[str, Any], ctx: ScenarioContext) -> Check:
        tail = versions(between(ctx.recorder.trace or [], self.duration_s - TAIL_S, self.duration_s))
        return Check("version 2 alone at the end", set(tail) == {"2"}, f"answers sent in the last {TAIL_S} s: {tail}")

    def _cli_s(self) -> float:
        return next((c["s"] for c in reversed(self.world.cli_log) if c["args"][:1] == ["promote"]), 0.0)

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        checks, figs = self.version_checks(results, ctx)
        ctx.notes["promotion"] = {**figs, "versions": results["totals"]["versions"],
                                  "totals": phase_summary(results), "cli": self.world.cli_log}
        return checks


SCENARIO = PromotionUnderLoad
