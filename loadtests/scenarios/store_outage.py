"""store-outage: the object store becomes unreachable in the middle of a promotion.

The world of promotion-under-load, with an S3 store (moto_server, a real S3-protocol server)
that every process reaches through a TCP proxy. Right after `geogate models promote demo 2`
returns, the proxy is killed: the store refuses connections for the sync agents (which have
not installed version 2 yet) and for the gateway's version resolver. 10 s later (quick: 3 s)
the proxy comes back on the same port, with the store's content intact.

Expected: serving continues throughout (no failed request, every answer verified) on what was
ready (version 1; a half-done promotion never reaches clients); once the store is back the
promotion completes (seen in the load, or, if the sync agents' retry backoff outlasts the
run, by probing the gateway after it, within `COMPLETE_TIMEOUT_S`). Figures: answers by
version during the outage, promote -> first version-2 answer, store back -> first version-2
answer.
"""

from __future__ import annotations

import time
from typing import Any

from core.kserve import MODEL_VERSION_HEADER
from loadtests.procs import infer_headers
from loadtests.release_world import MODEL
from loadtests.scenario import Check, FaultAction, ScenarioContext, phase_summary
from loadtests.scenarios.promotion_under_load import PromotionUnderLoad
from loadtests.trace import VERSION, between, first_answer, versions

COMPLETE_TIMEOUT_S = 30.0


class StoreOutage(PromotionUnderLoad):
    name = "store-outage"
    description = "object store (S3) unreachable right after a promotion: serving continues, promotion resumes"
    s3 = True

    def setup(self, ctx: ScenarioContext):
        spec = super().setup(ctx)
        self.duration_s = spec.duration_s = 14.0 if ctx.quick else 30.0
        self.promote_s = 2.5 if ctx.quick else 8.0
        self.outage_s = 3.0 if ctx.quick else 10.0
        return spec

    def actions(self, ctx: ScenarioContext) -> list[FaultAction]:
        cut_at: list[float] = []

        def promote_and_cut() -> str:
            t0 = time.monotonic()
            self.world.models("promote", MODEL, "2")
            took = time.monotonic() - t0
            detail = self.world.cut_store()
            cut_at.append(time.monotonic())
            return f"geogate models promote {MODEL} 2 (took {took:.2f} s), then {detail}"

        def restore() -> str:
            # the outage lasts outage_s from the cut, however long the CLI took on a busy machine
            time.sleep(max(0.0, cut_at[0] + self.outage_s - time.monotonic()) if cut_at else 0.0)
            return self.world.restore_store()

        return [FaultAction(self.promote_s, "promote", f"{MODEL} v2 + store cut", promote_and_cut),
                FaultAction(self.promote_s, "store-back", "s3", restore)]

    def version_tail_check(self, results: dict[str, Any], ctx: ScenarioContext) -> Check:
        """Version 2 serves once the store is back: in the load's last seconds, or by probing."""
        check = super().version_tail_check(results, ctx)
        if check.ok:
            return check
        gw = ctx.gateways["eu-west"]
        t0 = time.monotonic()
        while time.monotonic() - t0 < COMPLETE_TIMEOUT_S:
            if infer_headers(gw.http_address).get(MODEL_VERSION_HEADER) == "2":
                return Check("version 2 serves after the store came back", True,
                             f"{check.detail}; after the load, probes got version 2 within "
                             f"{time.monotonic() - t0:.1f} s")
            time.sleep(0.2)
        return Check("version 2 serves after the store came back", False,
                     f"{check.detail}; probes after the load still not on version 2 after {COMPLETE_TIMEOUT_S:g} s")

    def checks(self, results: dict[str, Any], ctx: ScenarioContext) -> list[Check]:
        checks, figs = self.version_checks(results, ctx)
        trace = ctx.recorder.trace or []
        back = next((e["t_s"] for e in results["events"] if e["kind"] == "store-back"), None)
        cut = next((e["t_s"] for e in results["events"] if e["kind"] == "promote"), None)
        outage: dict[str, Any] = {}
        if back is None or cut is None:
            checks.append(Check("store outage happened", False, f"events: {results['events']}"))
        else:
            during = between(trace, cut, back)
            first_new = first_answer(trace, back, lambda e: e[VERSION] == "2")
            outage = {"from_s": cut, "to_s": back, "sent": len(during), "versions": versions(during),
                      "failed": sum(1 for e in during if not e[1]),
                      "restore_to_first_new_s": round(first_new[0] - back, 3) if first_new else None}
            checks.append(Check("served throughout the outage", bool(during) and outage["failed"] == 0,
                                f"{len(during)} requests sent while the store was unreachable, {outage['failed']} "
                                f"failed; versions {outage['versions']}"))
            checks.append(Check("outage figures", True,
                                f"store unreachable {cut:.1f}-{back:.1f} s; versions answering then: "
                                f"{outage['versions']}; store back -> first v2 answer "
                                f"{outage['restore_to_first_new_s']} s"))
        ctx.notes["store_outage"] = {**figs, "outage": outage, "versions": results["totals"]["versions"],
                                     "totals": phase_summary(results), "cli": self.world.cli_log}
        return checks


SCENARIO = StoreOutage
