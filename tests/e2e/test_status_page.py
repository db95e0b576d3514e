"""The operators' status page, served by a real aiohttp process (tests/status_page_harness.py)
whose region summaries come from a JSON file the test rewrites; checked over HTTP and in a
real headless Chromium (Playwright driving Debian's /usr/bin/chromium)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from gateway.admin.status_page import EVENT_SAMPLE_INTERVAL_S
from tests.status_page_harness import eu_west_down, healthy_world, launch, write_data

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-gpu"]
UI_TIMEOUT_MS = 20_000  # generous: a loaded 2-core machine


def is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def harness(tmp_path):
    h = launch(str(tmp_path), healthy_world(time.time()))
    yield h
    h.proc.stop()


def test_world_aggregates_every_region_with_health_verdicts(harness):
    status, world = get_json(f"{harness.admin_url('eu-west')}/geogate/v1/world")
    assert status == 200
    assert world["served_by"] == "eu-west"
    assert world["deployment"] == "status-test"
    regions = {r["name"]: r for r in world["regions"]}
    assert list(regions) == ["eu-west", "us-east", "ap-south"]  # config order
    assert regions["eu-west"]["health"] == "healthy" and regions["eu-west"]["local"]
    # us-east is fetched from its own (peer) admin listener; an ejected replica degrades it.
    assert regions["us-east"]["health"] == "degraded"
    assert "ejected" in regions["us-east"]["reason"]
    assert regions["us-east"]["via"] == harness.admin_url("us-east")
    assert regions["us-east"]["summary"]["replicas"] == {"healthy": 2, "total": 2}
    # ap-south has no listener at all: shown as down/unreachable, not an error for the page.
    assert regions["ap-south"]["health"] == "down" and not regions["ap-south"]["reachable"]
    assert "connection refused" in regions["ap-south"]["reason"]
    assert regions["ap-south"]["location"] == [19.08, 72.88]  # from the config when unreachable
    demo = world["models"]["demo"]
    assert demo["stable"] == "2" and demo["canary"] == {"version": "3", "weight": 0.1}
    assert demo["sites"]["eu-west"]["ready"] == ["2", "3"]
    assert demo["sites"]["us-east"]["ready"] == ["1", "2"]
    assert demo["sites"]["ap-south"] == {"ready": ["2"], "loading": ["3"], "failed": ["4"]}
    # Events from both reachable regions, newest first, tagged with their region.
    assert [(e["kind"], e["region"]) for e in world["events"]] == [("ejection", "us-east"), ("promotion", "eu-west")]

    # The same world from the other gateway: the roles of local and peer swap.
    _, other = get_json(f"{harness.admin_url('us-east')}/geogate/v1/world")
    assert other["served_by"] == "us-east"
    assert {r["name"]: r["health"] for r in other["regions"]} == {
        "eu-west": "healthy", "us-east": "degraded", "ap-south": "down"}


def test_static_assets_are_bundled_and_unknown_ones_are_404(harness):
    base = harness.admin_url("eu-west")
    with urllib.request.urlopen(f"{base}/ui", timeout=10) as r:
        html = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
    assert "/ui/static/app.js" in html and "/ui/static/style.css" in html
    # Nothing on the page may point off this host (works offline, no CDN, no web fonts).
    for asset in ("index.html", "app.js", "style.css"):
        with urllib.request.urlopen(f"{base}/ui/static/{asset}", timeout=10) as r:
            text = r.read().decode()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, asset
    status, coast = get_json(f"{base}/ui/static/coastline.json")
    assert status == 200 and len(coast["rings"]) > 50
    status, err = get_json(f"{base}/ui/static/build_coastline.py")
    assert status == 404 and "build_coastline.py" in err["error"]


def test_event_stream_sends_world_json(harness):
    with urllib.request.urlopen(f"{harness.admin_url('eu-west')}/geogate/v1/events", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        data = []
        while len(data) < 2:
            line = r.readline().decode()
            if line.startswith("data: "):
                data.append(json.loads(line[len("data: "):]))
    assert all(d["served_by"] == "eu-west" and len(d["regions"]) == 3 for d in data)


def test_page_in_a_real_browser_updates_live_without_reload(harness):
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("playwright is not installed: pip install playwright (the project's test extra)")
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} missing: run scripts/system-deps.sh (Debian package chromium)"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status_page.png"
    requested: list[str] = []
    page_errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.on("request", lambda req: requested.append(req.url))
            page = context.new_page()
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            page.goto(f"{harness.admin_url('eu-west')}/ui")
            wait = {"timeout": UI_TIMEOUT_MS}

            page.wait_for_selector('[data-region="eu-west"][data-health="healthy"]', **wait)
            page.wait_for_selector('[data-region="us-east"][data-health="degraded"]', **wait)
            page.wait_for_selector('[data-region="ap-south"][data-health="down"]', **wait)
            page.wait_for_selector('#conn[data-state="live"]', **wait)  # over Server-Sent Events
            page.wait_for_selector('[data-marker="ap-south"][data-health="down"]', **wait)
            assert "unreachable" in page.inner_text('[data-region="ap-south"]')
            assert page.inner_text('[data-region="eu-west"] .count') == "2/2 replicas"
            ejected = page.locator('[data-region="us-east"] tr[data-url="grpc://127.0.0.1:18302"]')
            assert ejected.get_attribute("data-state") == "ejected"
            assert "3 consecutive failures" in ejected.inner_text()
            # Model versions per site: stable, canary with weight, ready / loading / failed.
            demo = page.locator('tr[data-model="demo"]')
            assert demo.locator('[data-field="stable"]').inner_text() == "2"
            assert demo.locator('[data-field="canary"]').inner_text() == "3 @ 10%"
            assert demo.locator('td[data-site="eu-west"] [data-state="ready"]').all_inner_texts() == ["2", "3"]
            ap = demo.locator('td[data-site="ap-south"]')
            assert ap.locator('[data-state="loading"]').inner_text() == "3"
            assert ap.locator('[data-state="failed"]').inner_text() == "4"
            assert "promoted to stable" in page.inner_text("#events")

            # Break eu-west behind the page's back; it must notice without a reload.
            page.evaluate("window.__noReload = 'still here'")
            write_data(harness.data_path, {**eu_west_down(healthy_world(time.time()), time.time()), "wobble": True})
            page.wait_for_selector('[data-region="eu-west"][data-health="down"]', **wait)
            page.wait_for_selector('[data-marker="eu-west"][data-health="down"]', **wait)
            page.wait_for_selector('#events li[data-kind="failover"]', **wait)
            assert page.evaluate("window.__noReload") == "still here"
            card = page.inner_text('[data-region="eu-west"]')
            assert "all 2 replicas of pool 'eu-ort' are unhealthy" in card
            assert "probe timeout after 500 ms" in card and "0/2 replicas" in card
            page.wait_for_timeout(4000)  # let the sparklines gather a few points
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"status page screenshot: {shot}")
    assert not page_errors, page_errors
    hosts = {urllib.parse.urlsplit(u).hostname for u in requested if not u.startswith(("data:", "blob:"))}
    off_host = sorted(h for h in hosts if not is_loopback(h))
    assert hosts and not off_host, f"page requested non-loopback hosts: {off_host}"


def test_change_events_from_successive_summaries():
    from gateway.admin.status_page import ChangeEvents
    from tests.status_page_harness import replica, summary

    ev = ChangeEvents("eu-west")
    a, b = "grpc://127.0.0.1:1", "http://127.0.0.1:2"
    releases = {"demo": {"stable": "1", "canary": None}}
    ev.observe(summary("eu-west", [replica(a), replica(b)], pool="p"), releases, 100.0)
    assert not ev.events  # the first sample is the baseline
    ev.observe(summary("eu-west", [replica(a, healthy=False, reason="probe timeout after 500 ms"),
                                   replica(b, ejected=True, reason="3 consecutive failures")], pool="p",
                       ready=False, reason="no routable replica"),
               {"demo": {"stable": "2", "canary": {"version": "3", "weight": 0.25}}}, 101.0)
    got = [(e["kind"], e["message"]) for e in ev.events]
    assert ("unhealthy", f"replica {a} is unhealthy: probe timeout after 500 ms") in got
    assert ("ejection", f"replica {b} ejected for 4.2 s: 3 consecutive failures") in got
    assert ("failover", "region eu-west cannot serve (no routable replica); peers take its traffic") in got
    assert ("promotion", "demo: version 2 is now stable (was 1)") in got
    assert ("canary", "demo: canary version 3 takes 25% of traffic") in got
    assert all(e["time"] == 101.0 and e["region"] == "eu-west" for e in ev.events)
    ev.events.clear()
    ev.observe(summary("eu-west", [replica(a)], pool="p"), {"demo": {"stable": "2", "canary": None}}, 102.0)
    got = [(e["kind"], e["message"]) for e in ev.events]
    assert ("recovery", f"replica {a} is healthy again") in got
    assert ("failback", "region eu-west can serve again; it takes its traffic back") in got
    assert ("membership", f"replica {b} left (removed from config or discovery)") in got
    assert ("canary", "demo: canary 3 ended") in got


def test_mounted_on_a_real_gateway(procs, tmp_path):
    from tests.gateway_procs import GatewayProc, demo_repository, get_json, replica_urls, start_replicas

    repo = demo_repository(tmp_path, versions=(1, 2))
    (rep,) = start_replicas(procs, repo, 1, faults=False)
    gw = GatewayProc(tmp_path, replicas=replica_urls([rep]))
    procs.append(gw)
    gw.wait_ready()
    with urllib.request.urlopen(f"http://{gw.admin}/ui", timeout=10) as r:
        assert r.status == 200 and b"/ui/static/app.js" in r.read()
    deadline = time.monotonic() + 30  # ready means one routable replica; wait for both
    while True:
        world = get_json(f"http://{gw.admin}/geogate/v1/world")
        if world["regions"][0]["health"] == "healthy" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    (region,) = world["regions"]
    assert region["name"] == "r1" and region["local"] and region["health"] == "healthy", region
    assert region["summary"]["replicas"] == {"healthy": 2, "total": 2}
    assert world["models"]["demo"]["sites"]["r1"]["ready"] == ["1", "2"]

    # A few samples of the healthy state (the events are changes from it). Held on purpose: the
    # sampler's baseline is not observable from outside, only its interval is known.
    time.sleep(3 * EVENT_SAMPLE_INTERVAL_S)
    rep.kill()  # both of the region's replicas (HTTP and gRPC of one process) die
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        world = get_json(f"http://{gw.admin}/geogate/v1/world")
        kinds = {e["kind"] for e in world["events"]}
        if world["regions"][0]["health"] == "down" and {"unhealthy", "failover"} <= kinds:
            break
        time.sleep(0.3)
    assert world["regions"][0]["health"] == "down", world["regions"][0]
    assert {"unhealthy", "failover"} <= {e["kind"] for e in world["events"]}, world["events"]
    assert all(e["region"] == "r1" for e in world["events"])




def test_a_hung_region_shows_as_timed_out(tmp_path):
    from tests.procs import free_port

    ports = {name: {"http": free_port(), "grpc": free_port(), "admin": free_port()}
             for name in ("eu-west", "us-east", "ap-south")}
    hung = []
    try:
        # ap-south's listeners accept connections (the kernel does) but never answer.
        for kind in ("admin", "http"):
            s = socket.socket()
            s.bind(("127.0.0.1", ports["ap-south"][kind]))
            s.listen(16)
            hung.append(s)
        h = launch(str(tmp_path), healthy_world(time.time()), ports=ports)
        try:
            _, world = get_json(f"{h.admin_url('eu-west')}/geogate/v1/world")
        finally:
            h.proc.stop()
    finally:
        for s in hung:
            s.close()
    ap = next(r for r in world["regions"] if r["name"] == "ap-south")
    assert ap["health"] == "down" and not ap["reachable"]
    assert ap["reason"] == f"unreachable: 127.0.0.1:{ports['ap-south']['admin']} timed out after 1.5 s"
    assert {r["name"]: r["health"] for r in world["regions"]}["eu-west"] == "healthy"
