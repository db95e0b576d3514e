"""`kill -9` one of three replicas while a steady stream of requests (HTTP and gRPC, several
threads) flows through the gateway: no request fails, the dead replica is marked unhealthy,
and once restarted on the same ports it passes its health checks and takes traffic again."""

from __future__ import annotations

from tests.gateway_load import Stream
from tests.gateway_procs import GatewayProc, demo_repository, replica_urls, start_replicas
from tests.procs import ReplicaProc, wait_until


def _replica_view(gw: GatewayProc, address: str) -> list[dict]:
    return [r for p in gw.region()["pools"] for r in p["replicas"] if r["address"] in address]


def test_kill_minus_9_then_rejoin(tmp_path, procs):
    repo = demo_repository(tmp_path)
    reps = start_replicas(procs, repo, 3, faults=False)
    gw = GatewayProc(tmp_path, replicas=replica_urls(reps))
    procs.append(gw)
    gw.wait_ready()
    victim = reps[0]
    victim_addrs = (victim.http_url, victim.grpc_url)

    with Stream(gw, http_threads=3, grpc_threads=1) as stream:
        stream.wait_for(100)
        victim.kill()  # SIGKILL: connections die mid-request, nothing is drained
        killed_at = stream.results.total
        stream.wait_for(killed_at + 300)
        # the dead replica is out: unhealthy (active checks) and/or ejected (passive)
        wait_until(lambda: all(not r["routable"] for a in victim_addrs for r in _replica_view(gw, a)), 20,
              "the killed replica to be marked unroutable")
        views = [r for a in victim_addrs for r in _replica_view(gw, a)]
        assert all((not r["healthy"]) or r["ejected"] for r in views), views
        assert 'geogate_replica_healthy{pool="p1",region="r1",replica="http://' + victim.http_url + '"} 0.0' \
            in gw.metrics()

        # restart it on the same ports: it rejoins after passing health checks
        back = ReplicaProc(repo, http_port=victim.http_port, grpc_port=victim.grpc_port,
                           metrics_port=victim.metrics_port)
        procs.append(back)
        back.wait_ready()
        wait_until(lambda: all(r["routable"] for a in victim_addrs for r in _replica_view(gw, a)), 30,
              "the restarted replica to be routable again")
        before = sum(n for rep, n in stream.results.replicas.items() if any(a in rep for a in victim_addrs))
        wait_until(lambda: sum(n for rep, n in stream.results.replicas.items()
                          if any(a in rep for a in victim_addrs)) > before + 10, 30,
              "the restarted replica to receive traffic")
        results = stream.stop()

    assert results.failures == [], results.failures[:5]
    assert results.ok >= 400
    assert sum(n for a, n in results.attempts.items() if a not in ("1", "?")) >= 1  # some were retried
