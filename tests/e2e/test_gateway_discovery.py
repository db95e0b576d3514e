"""DNS SRV discovery end to end: a real unbound on loopback answers `_grpc._tcp.eu.example.`;
adding a record adds a replica to the gateway's pool (after it passes health checks) and
removing one drains it, with zero failed requests while a replica leaves and then stops."""

from __future__ import annotations

import time

from tests.dns_fixtures import UnboundServer, srv_records
from tests.gateway_load import Stream
from tests.gateway_procs import GatewayProc, demo_repository, start_replicas

SERVICE = "_grpc._tcp.eu.example."


def _records(replicas) -> list[str]:
    return srv_records(SERVICE, [(f"r{i}.eu.example.", "127.0.0.1", r.grpc_port, 10)
                                 for i, r in enumerate(replicas)])


def _wait(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _members(gw: GatewayProc) -> dict[str, dict]:
    return {r["address"]: r for p in gw.region()["pools"] for r in p["replicas"]}


def _served(results, replica) -> int:
    return sum(n for url, n in results.replicas.items() if url.endswith(replica.grpc_url))


def test_srv_records_change_the_pool(tmp_path, procs):
    reps = start_replicas(procs, demo_repository(tmp_path), 3, faults=False)
    dns = UnboundServer(tmp_path, zones=["eu.example."])
    dns.start(_records(reps[:2]))
    try:
        gw = GatewayProc(tmp_path, discover=f"dns+srv://{SERVICE}", discover_resolver=dns.address,
                         gateway_extra="discovery_interval_ms = 300")
        procs.append(gw)
        gw.wait_ready()
        _wait(lambda: set(_members(gw)) == {reps[0].grpc_url, reps[1].grpc_url}, 20, "the first two replicas")

        with Stream(gw, http_threads=2, grpc_threads=2) as stream:
            stream.wait_for(50)
            # a replica joins: it takes traffic once healthy
            dns.set_records(_records(reps))
            _wait(lambda: reps[2].grpc_url in _members(gw) and _members(gw)[reps[2].grpc_url]["routable"], 20,
                  "the added replica to be routable")
            _wait(lambda: _served(stream.results, reps[2]) > 5, 30, "the added replica to receive traffic")

            # a replica leaves: removed from DNS, it drains, then it stops for good
            leaving = reps[0]
            dns.set_records(_records(reps[1:]))
            _wait(lambda: leaving.grpc_url not in _members(gw), 20, "the removed replica to leave the pool")
            served_then = _served(stream.results, leaving)
            start = stream.results.total
            stream.wait_for(start + 100)
            assert _served(stream.results, leaving) == served_then  # no new requests went there
            leaving.stop()
            stream.wait_for(stream.results.total + 100)
            results = stream.stop()
        assert results.failures == [], results.failures[:5]
        assert {gw_url.split("//")[1] for gw_url in results.replicas} >= {reps[1].grpc_url, reps[2].grpc_url}
        summary = gw.region()
        assert summary["replicas"] == {"healthy": 2, "total": 2}, summary["replicas"]
    finally:
        dns.stop()
