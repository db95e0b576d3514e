"""Cross-region routing with real processes: three regions (two ONNX Runtime replicas and a
gateway each) on one machine, one config.

- local replicas killed under a steady HTTP+gRPC stream: zero failures, served by a peer
  (geogate-region says which); replicas back: traffic returns home only after the hold-down;
- a whole region (gateway and replicas) killed while another region's gateway sends its
  traffic there: zero failures, the third region takes over;
- half of a region's replicas down: the share it keeps matches Envoy's spill rule
  min(1, 1.4 h) within a few percent;
- a request forwarded once (geogate-hops: 1) is never forwarded again;
- nearest-to-client: the CIDR table and X-Forwarded-For from a trusted proxy steer clients,
  an untrusted proxy's X-Forwarded-For is ignored.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from replicas.demo.onnx_model import reference_outputs
from tests.gateway_load import Stream
from tests.gateway_procs import demo_repository, http_call
from tests.multi_region_world import World

X = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(1, 16)
HOLD_MS = 1500


def infer_body() -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                   "data": X.ravel().tolist()}]}).encode()


def infer_from(address: str, headers: dict | None = None, source: str | None = None) -> tuple[int, dict, bytes]:
    """One JSON inference over HTTP, optionally from a given loopback source address."""
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("POST", "/v2/models/demo/infer", body=infer_body(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_local_outage_fails_over_with_zero_failures_and_returns_after_hold(tmp_path, procs):
    world = World(tmp_path, demo_repository(tmp_path), procs, hold_ms=HOLD_MS).start()
    eu = world.regions["eu-west"]

    # tritonclient through eu-west's gateway: same answer as the model computes, served at home
    want = reference_outputs("tiny", 1, X)
    hc = httpclient.InferenceServerClient(eu.http)
    inp = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(X)
    np.testing.assert_allclose(hc.infer("demo", [inp]).as_numpy("OUTPUT0"), want, rtol=1e-5)

    with Stream(eu, http_threads=3, grpc_threads=1) as stream:
        stream.wait_for(200)
        assert set(stream.results.regions) == {"eu-west"}, stream.results.regions
        world.kill_replicas("eu-west")
        killed_at = time.monotonic()
        world.wait(lambda: world.healthy_replicas("eu-west") == 0, 10, "eu-west replicas marked down")
        time.sleep(max(0.0, killed_at + 2.0 - time.monotonic()))  # the timeline after +2 s is what is judged
        stream.wait_for(stream.results.total + 300)
        remote = {r for t, r in stream.results.timeline if t > killed_at + 2.0}
        assert remote and "eu-west" not in remote, remote

        # tritonclient (HTTP and gRPC) sees the same answers from the peer
        np.testing.assert_allclose(hc.infer("demo", [inp]).as_numpy("OUTPUT0"), want, rtol=1e-5)
        gc = grpcclient.InferenceServerClient(eu.grpc)
        ginp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        ginp.set_data_from_numpy(X)
        np.testing.assert_allclose(gc.infer("demo", [ginp]).as_numpy("OUTPUT0"), want, rtol=1e-5)
        status, headers, _ = infer_from(eu.http)
        assert status == 200 and headers["geogate-region"] != "eu-west"
        assert headers["geogate-replica"].startswith("http://127.0.0.1:")  # the peer's replica

        # replicas back: home again, but only after they were healthy for the hold-down
        world.start_replica("eu-west", 0)
        world.wait(lambda: world.healthy_replicas("eu-west") >= 1, 15, "an eu-west replica healthy again")
        healthy_at = time.monotonic()  # the hold-down starts with the first healthy replica
        world.start_replica("eu-west", 1)
        world.wait(lambda: any(r == "eu-west" and t > healthy_at for t, r in stream.results.timeline[-50:]),
                   20, "traffic back in eu-west")
        # (answers finishing right after the kill were still eu-west's: look after failover)
        first_home = min(t for t, r in stream.results.timeline if r == "eu-west" and t > killed_at + 2.0)
        # health-check cadence (300 ms) can put 'healthy' up to one interval before we saw it
        assert first_home - healthy_at >= HOLD_MS / 1000.0 - 0.5, (first_home - healthy_at)
        stream.wait_for(stream.results.total + 200)
        results = stream.stop()
    assert results.failures == [], results.failures[:5]
    metrics = http_call(f"http://{eu.admin}/metrics")[2].decode()
    sent = [line for line in metrics.splitlines() if line.startswith("geogate_cross_region_requests_total{")
            and 'outcome="success"' in line and 'region="eu-west"' in line
            and re.search(r'to_region="(us-east|ap-south)"', line)]
    assert sent and float(sent[0].rsplit(" ", 1)[1]) > 0, metrics[-2000:]


def test_whole_region_outage_while_peer_forwards_to_it(tmp_path, procs):
    world = World(tmp_path, demo_repository(tmp_path), procs, hold_ms=HOLD_MS).start()
    us = world.regions["us-east"]
    world.kill_replicas("us-east")  # us-east's gateway now sends everything to a peer
    world.wait(lambda: world.healthy_replicas("us-east") == 0, 10, "us-east replicas marked down")
    with Stream(us, http_threads=3, grpc_threads=1) as stream:
        stream.wait_for(300)
        served = stream.results.regions.most_common(1)[0][0]
        assert served in ("eu-west", "ap-south"), stream.results.regions
        other = "ap-south" if served == "eu-west" else "eu-west"
        # the region taking the traffic dies whole: gateway and replicas
        world.regions[served].gateway.kill()
        world.kill_replicas(served)
        died_at = time.monotonic()
        time.sleep(2.0)  # held on purpose: the outage lasts, traffic keeps flowing through it
        stream.wait_for(stream.results.total + 400)
        results = stream.stop()
    assert results.failures == [], results.failures[:5]
    after = {r for t, r in results.timeline if t > died_at + 2.0}
    assert after == {other}, after


def test_partial_degradation_spills_in_proportion(tmp_path, procs):
    world = World(tmp_path, demo_repository(tmp_path), procs, hold_ms=HOLD_MS).start()
    eu = world.regions["eu-west"]
    eu.replicas[0].kill()
    world.wait(lambda: world.healthy_replicas("eu-west") == 1, 10, "one eu-west replica marked down")
    with Stream(eu, http_threads=4, grpc_threads=0) as stream:
        stream.wait_for(3000, timeout_s=120)
        results = stream.stop()
    assert results.failures == [], results.failures[:5]
    local_share = results.regions["eu-west"] / results.ok
    # healthy fraction 0.5: eu-west keeps min(1, 1.4 * 0.5) = 0.7, spills 0.3
    assert abs(local_share - 0.7) < 0.04, (local_share, results.regions)
    routing = eu.summary()["routing"]
    assert abs(routing["shares"]["eu-west"] - 0.7) < 1e-6, routing


def test_forwarded_request_is_never_forwarded_again(tmp_path, procs):
    world = World(tmp_path, demo_repository(tmp_path), procs, hold_ms=HOLD_MS).start()
    eu = world.regions["eu-west"]
    world.kill_replicas("eu-west")
    world.wait(lambda: world.healthy_replicas("eu-west") == 0, 10, "eu-west replicas marked down")
    status, headers, body = infer_from(eu.http, {"geogate-hops": "1"})
    # served (or refused) by eu-west itself: its dead replicas are tried once (panic), then 503
    assert status == 503 and headers["geogate-region"] == "eu-west", (status, headers, body)
    assert "eu-west-ort" in json.loads(body)["error"]
    status, headers, _ = infer_from(eu.http)
    assert status == 200 and headers["geogate-region"] in ("us-east", "ap-south")


def test_nearest_to_client_cidr_and_forwarded_for(tmp_path, procs):
    routing = 'mode = "nearest-to-client"\ntrusted_proxies = ["127.0.0.2/32"]\n'
    cidrs = {"ap-south": ["203.0.113.0/24", "127.0.0.4/32"], "eu-west": ["198.51.100.0/24"]}
    world = World(tmp_path, demo_repository(tmp_path), procs, routing=routing, cidrs=cidrs,
                  hold_ms=HOLD_MS).start()
    us = world.regions["us-east"]
    # a client the CIDR table places near ap-south, calling us-east's gateway directly
    assert infer_from(us.http, source="127.0.0.4")[1]["geogate-region"] == "ap-south"
    # behind a trusted proxy: X-Forwarded-For decides
    xff = {"X-Forwarded-For": "198.51.100.7"}
    assert infer_from(us.http, xff, source="127.0.0.2")[1]["geogate-region"] == "eu-west"
    assert infer_from(us.http, {"X-Forwarded-For": "203.0.113.9"}, source="127.0.0.2")[1]["geogate-region"] \
        == "ap-south"
    # the same header from an untrusted address is ignored: unknown client, served locally
    assert infer_from(us.http, xff, source="127.0.0.3")[1]["geogate-region"] == "us-east"
    assert infer_from(us.http, source="127.0.0.3")[1]["geogate-region"] == "us-east"


def test_frozen_peer_requests_in_flight_move_to_the_next_region(tmp_path, procs):
    """A peer that stops answering without closing anything (SIGSTOP: like a blackholed
    network, connections stay open and probes time out): once the health checks mark it down,
    requests waiting on it move to the next region instead of waiting out their deadline."""
    world = World(tmp_path, demo_repository(tmp_path), procs, hold_ms=HOLD_MS).start()
    us = world.regions["us-east"]
    world.kill_replicas("us-east")
    world.wait(lambda: world.healthy_replicas("us-east") == 0, 10, "us-east replicas marked down")
    with Stream(us, http_threads=3, grpc_threads=1) as stream:
        stream.wait_for(300)
        served = stream.results.regions.most_common(1)[0][0]
        other = "ap-south" if served == "eu-west" else "eu-west"
        frozen = world.regions[served].gateway
        frozen.kill(signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            time.sleep(3.0)  # held on purpose: the region stays frozen while traffic flows
            stream.wait_for(stream.results.total + 300)
            results = stream.stop()
        finally:
            frozen.kill(signal.SIGCONT)
    assert results.failures == [], results.failures[:5]
    after = {r for t, r in results.timeline if t > stopped_at + 2.5}
    assert after == {other}, after
