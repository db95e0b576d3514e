"""The gateway's version resolver, against a real file store with release records written by
the real release operations and fabricated site status files (heartbeats set by the test)."""

from __future__ import annotations

import random
import time

import pytest

from replicas.releases.models_cli import push_version
from replicas.releases.records import Releases
from replicas.releases.resolver import REASON_EXPLICIT, REASON_NO_RECORD, Resolution, VersionResolver
from replicas.releases.site_status import ModelStatus, SiteStatus, publish
from replicas.store import open_store


@pytest.fixture
async def store(tmp_path):
    s = open_store(f"file://{tmp_path / 'store'}")
    for v in (1, 2, 3):
        d = tmp_path / "src" / str(v)
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(f"fake model {v}".encode())
        await push_version(s, "demo", d, who="t")
    yield s
    await s.close()


async def site(store, name: str, ready: list[str], *, age_s: float = 0.0) -> None:
    await publish(store, SiteStatus(site=name, heartbeat_s=time.time() - age_s,
                                    models={"demo": ModelStatus(ready=ready, serving=ready)}))


def picks(resolver: VersionResolver, site_name: str, n: int = 200) -> set[str | None]:
    return {resolver.resolve("demo", None, site_name).version for _ in range(n)}


async def test_explicit_and_unknown(store):
    r = VersionResolver(store)
    await r.refresh()
    assert r.resolve("demo", "7", "eu") == Resolution("7", REASON_EXPLICIT)
    assert r.resolve("demo", None, "eu").version is None  # pushed, never promoted: no record
    assert r.resolve("other", None, "eu").reason == REASON_NO_RECORD


async def test_global_cutover_waits_for_every_healthy_site(store):
    rel = Releases(store)
    await rel.promote("demo", "1", who="t")
    await rel.promote("demo", "2", who="t")
    await site(store, "eu", ["1", "2"])
    await site(store, "us", ["1"])  # still loading 2
    await site(store, "ap", ["1"], age_s=120)  # stale heartbeat: down, does not count
    r = VersionResolver(store, cutover="global", stale_after_s=10)
    await r.refresh()
    res = r.resolve("demo", None, "eu")
    assert res.version == "1" and "not ready yet on us" in res.reason
    await site(store, "us", ["1", "2"])
    await r.refresh()
    assert picks(r, "eu") == {"2"} and picks(r, "us") == {"2"}
    # Per-site cutover with the same facts earlier: eu switches, us does not.
    await site(store, "us", ["1"])
    per = VersionResolver(store, cutover="per-site", stale_after_s=10)
    await per.refresh()
    assert picks(per, "eu") == {"2"} and picks(per, "us") == {"1"}
    # A site with no fresh status at all (per-site): the stable, nothing to wait for.
    assert picks(per, "ap") == {"2"}


async def test_gateway_keeps_previous_stable_until_its_replicas_have_the_new_one(store):
    rel = Releases(store)
    await rel.promote("demo", "1", who="t")
    await rel.promote("demo", "2", who="t")
    await site(store, "eu", ["1", "2"])  # the site says 2 is ready ...
    r = VersionResolver(store, cutover="global", stale_after_s=10)
    await r.refresh()
    seen_here = {"1"}  # ... but this gateway's health checks have only seen 1 so far

    def ready_here(model, version):
        return version in seen_here

    res = r.resolve("demo", None, "eu", ready_here)
    assert res.version == "1" and "not seen ready on this region's replicas" in res.reason
    seen_here.add("2")
    assert r.resolve("demo", None, "eu", ready_here).version == "2"
    # nothing ready here at all (the region fails over to a peer): the site-wide answer stands
    assert r.resolve("demo", None, "eu", lambda m, v: False).version == "2"


async def test_rollback_visible_within_one_poll(store):
    rel = Releases(store)
    await rel.promote("demo", "1", who="t")
    await rel.promote("demo", "2", who="t")
    await site(store, "eu", ["1", "2"])
    r = VersionResolver(store, poll_interval_s=0.2)
    await r.start()
    try:
        assert picks(r, "eu") == {"2"}
        await rel.rollback("demo", who="t")
        t0 = time.monotonic()
        while picks(r, "eu", 5) != {"1"}:
            assert time.monotonic() - t0 < 0.2 * 3 + 1.0, "rollback not visible after a poll interval"
            await __import__("asyncio").sleep(0.02)
    finally:
        await r.close()


async def test_canary_share_within_two_percent(store):
    rel = Releases(store)
    await rel.promote("demo", "1", who="t")
    await rel.set_canary("demo", "3", 0.1, who="t")
    await site(store, "eu", ["1"])
    r = VersionResolver(store, rng=random.Random(1234))
    await r.refresh()
    # Canary not ready anywhere yet: it gets nothing.
    assert picks(r, "eu", 1000) == {"1"}
    await site(store, "eu", ["1", "3"])
    await r.refresh()
    n = 10_000
    canary = sum(r.resolve("demo", None, "eu").version == "3" for _ in range(n))
    assert abs(canary / n - 0.1) <= 0.02, canary
    await rel.set_canary("demo", "3", 0.5, who="t")
    await r.refresh()
    canary = sum(r.resolve("demo", None, "eu").version == "3" for _ in range(n))
    assert abs(canary / n - 0.5) <= 0.02, canary
    await rel.rollback("demo", who="t")  # clears the canary
    await r.refresh()
    assert picks(r, "eu", 1000) == {"1"}


async def test_store_errors_keep_last_view(store, tmp_path):
    rel = Releases(store)
    await rel.promote("demo", "1", who="t")
    r = VersionResolver(store)
    await r.refresh()
    (tmp_path / "store").rename(tmp_path / "store-away")
    await r.refresh()
    assert r.last_error and picks(r, "eu") == {"1"}


async def test_resolver_for_gateway_from_config(tmp_path, store):
    from core.config import parse_config
    from replicas.releases.resolver import resolver_for_gateway

    await Releases(store).promote("demo", "2", who="t")
    await site(store, "eu", ["1"])  # per-site: eu's own readiness decides
    cfg = parse_config('[store]\nurl = "file://store"\n[routing]\ncutover = "per-site"\n'
                       '[sync]\nresolver_poll_interval_ms = 100\n[[regions]]\nname = "eu"\n',
                       base_dir=str(tmp_path))
    r = resolver_for_gateway(cfg, "eu")
    await r.start()
    try:
        assert r.cutover == "per-site" and r.poll_interval_s == 0.1
        assert r.resolve("demo", None, "eu").version == "2"  # nothing earlier is ready: the stable
        assert r.snapshot()["models"]["demo"]["effective"] == "2"
    finally:
        await r.close()
    missing = parse_config('[store]\nurl = "file://nowhere"\n[[regions]]\nname = "eu"\n', base_dir=str(tmp_path))
    r = resolver_for_gateway(missing, "eu")
    await r.start()
    assert r.last_error and r.resolve("demo", None, "eu").version is None
    await r.close()
    assert not (tmp_path / "nowhere").exists()
