"""The load-signal scraper (gateway.upstream.load_signals) against a real Triton's and a real geogate
replica's Prometheus /metrics: queue depth is seen while requests really queue, goes back to
0, and is ignored once stale or when the scrape fails. And `geogate gateway` with
``metrics_scrape = true``: its region summary shows each Triton's queue, and its replica choice
avoids a Triton whose queue only /metrics reveals (another client's load)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from core.config import parse_config
from gateway.upstream.load_signals import (
    DEFAULT_METRICS_PORT,
    LoadSignals,
    ScrapeTarget,
    metrics_url_for,
    score,
)
from replicas.demo.onnx_model import reference_outputs, write_repository_entry
from replicas.demo.python_backend import write_python_backend_entry
from tests.e2e.test_triton_gateway import TritonGatewayProc, wait_for
from tests.gateway_procs import http_call
from tests.procs import ReplicaProc, TritonProc, async_wait_until, http_ok

SLOW_EXECUTE_S = 0.25
CONCURRENT = 6
WAIT_S = 30.0
GATEWAY_SCRAPE_MS = 250  # the scrape timeout is 80% of it: room for a busy 2-core host
ROUTED_REQUESTS = 8


def slow_triton_repository(root: Path) -> str:
    """The python-backend demo, one request per execute, each taking SLOW_EXECUTE_S: requests
    queue in Triton's scheduler (nv_inference_pending_request_count)."""
    write_python_backend_entry(root, 1, execute_delay_s=SLOW_EXECUTE_S, max_batch_size=1)
    return str(root)


def waiting_geogate_repository(root: Path) -> str:
    """The ONNX demo whose batcher holds a lone request up to 1.5 s waiting for company: requests
    sit in the queue (geogate_replica_queue_depth)."""
    model_dir = write_repository_entry(root, 1)
    cfg = model_dir / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("max_queue_delay_microseconds: 0",
                                           "max_queue_delay_microseconds: 1500000"))
    return str(root)


def fire(address: str, n: int, errors: list[str]) -> list[threading.Thread]:
    """`n` concurrent HTTP inferences on `address`, each checked against the reference outputs."""
    x = np.ones((1, 16), dtype=np.float32)

    def one() -> None:
        client = httpclient.InferenceServerClient(address, network_timeout=60)
        try:
            inp = httpclient.InferInput("INPUT0", [1, 16], "FP32")
            inp.set_data_from_numpy(x)
            out = client.infer("demo", [inp], model_version="1").as_numpy("OUTPUT0")
            if not np.allclose(out, reference_outputs("tiny", 1, x), atol=1e-4):
                errors.append("wrong outputs")
        except Exception as exc:  # collected: the test asserts there were none
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


async def max_queue_seen(signals: LoadSignals, url: str, threads: list[threading.Thread]) -> float:
    """Scrape until the requests are done; the largest queue depth seen."""
    seen = 0.0
    deadline = time.monotonic() + WAIT_S
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        await signals.scrape_once()
        load = signals.load_of(url)
        assert load is not None and not load.error, load
        seen = max(seen, load.queue_depth)
        await asyncio.sleep(0.05)
    return seen


def test_triton_queue_depth_from_metrics(tmp_path, procs):
    triton = TritonProc(slow_triton_repository(tmp_path / "repo"), load=("demo",))
    procs.append(triton)
    triton.wait_ready()
    url = f"http://{triton.http_url}"
    target = ScrapeTarget(url, "triton", metrics_url_for(url, "triton",
                                                         metrics_ports={url: triton.metrics_port}))
    assert target.metrics_url == f"http://127.0.0.1:{triton.metrics_port}/metrics"
    # Triton can report ready on HTTP a moment before its metrics listener is up.
    triton.wait_until(lambda: http_ok(target.metrics_url), what="serving /metrics")

    async def scenario() -> None:
        signals = LoadSignals([target], interval_s=0.2, stale_after_s=1.0)
        try:
            await signals.scrape_once()
            idle = signals.load_of(url)
            assert idle is not None and idle.error == "" and idle.queue_depth == 0.0
            assert idle.kind == "triton"
            errors: list[str] = []
            threads = fire(triton.http_url, CONCURRENT, errors)
            seen = await max_queue_seen(signals, url, threads)
            for t in threads:
                t.join(WAIT_S)
            assert errors == []
            # One request executes at a time: the others wait in Triton's queue.
            assert seen >= 2, f"queue depth never above {seen}"
            await signals.scrape_once()
            done = signals.load_of(url)
            assert done.pending == 0.0
            now = time.monotonic()
            assert score(3, done, now, signals.stale_after_s) == 3 + done.queue_depth
            # Stale data is ignored: only the live outstanding count remains.
            assert score(3, done, now + 10.0, signals.stale_after_s) == 3
            # The scrape fails once Triton is gone: the signal is dropped, with the reason.
            triton.kill()
            await signals.scrape_once()
            gone = signals.load_of(url)
            assert gone.error and str(triton.metrics_port) in gone.error
            assert signals.queue_depth(url, time.monotonic()) == 0.0
        finally:
            await signals.close()

    asyncio.run(scenario())


def test_geogate_replica_queue_depth_from_metrics(tmp_path, procs):
    replica = ReplicaProc(waiting_geogate_repository(tmp_path / "repo"))
    procs.append(replica)
    replica.wait_ready()
    http_url = f"http://{replica.http_url}"
    grpc_url = f"grpc://{replica.grpc_url}"
    # Over HTTP the replica's own port serves /metrics; over gRPC the config names the port.
    targets = [
        ScrapeTarget(http_url, "geogate", metrics_url_for(http_url, "geogate")),
        ScrapeTarget(grpc_url, "geogate", metrics_url_for(grpc_url, "geogate",
                                                          metrics_ports={grpc_url: replica.metrics_port})),
    ]

    async def scenario() -> None:
        signals = LoadSignals(targets, interval_s=0.1)
        await signals.start()
        try:
            errors: list[str] = []
            threads = fire(replica.http_url, 3, errors)
            deadline = time.monotonic() + WAIT_S
            seen: dict[str, float] = {http_url: 0.0, grpc_url: 0.0}
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                for u in seen:
                    load = signals.load_of(u)
                    if load is not None:
                        assert load.error == "", load
                        seen[u] = max(seen[u], load.queue_depth_at(time.monotonic(), signals.stale_after_s))
                await asyncio.sleep(0.02)
            for t in threads:
                t.join(WAIT_S)
            assert errors == []
            # Three requests wait together in the batcher's delay window.
            assert seen[http_url] >= 1 and seen[grpc_url] >= 1, seen
            # the scrapes after the requests finished read an empty queue and nothing in flight
            await async_wait_until(lambda: all(
                (ld := signals.load_of(u)).queue_depth == 0.0 and ld.inflight == 0.0 and ld.scrapes >= 2
                for u in seen), WAIT_S, "idle replica read back")
            snap = {s["url"]: s for s in signals.snapshot()}
            assert snap[grpc_url]["fresh"]
            assert snap[grpc_url]["metrics_url"].endswith(f":{replica.metrics_port}/metrics")
        finally:
            await signals.close()
        assert not signals.active

    asyncio.run(scenario())


def test_metrics_address_rules_and_config():
    assert metrics_url_for("grpc://10.0.0.5:8001", "triton") == f"http://10.0.0.5:{DEFAULT_METRICS_PORT}/metrics"
    assert metrics_url_for("http://10.0.0.5:8000", "triton", metrics_port=9100) == "http://10.0.0.5:9100/metrics"
    assert metrics_url_for("http://10.0.0.5:8000", "geogate") == "http://10.0.0.5:8000/metrics"
    cfg = parse_config("""
[[regions]]
name = "r1"
  [[regions.pools]]
  name = "tri"
  kind = "triton"
  replicas = ["grpc://127.0.0.1:9001", "grpc://127.0.0.1:9011"]
  metrics_scrape = true
  metrics_ports = { "grpc://127.0.0.1:9011" = 9012 }
  metrics_port = 9002
  metrics_interval_ms = 250
""")
    pool = cfg.regions[0].pools[0]
    assert [metrics_url_for(u, pool.kind, metrics_port=pool.metrics_port, metrics_ports=pool.metrics_ports)
            for u in pool.replicas] == ["http://127.0.0.1:9002/metrics", "http://127.0.0.1:9012/metrics"]
    try:
        parse_config('[[regions]]\nname = "r"\n  [[regions.pools]]\n  name = "p"\n'
                     '  replicas = ["grpc://127.0.0.1:1"]\n  metrics_ports = { "grpc://127.0.0.1:1" = 0 }\n')
    except ValueError as exc:
        assert "metrics_ports" in str(exc)
    else:
        raise AssertionError("a metrics port of 0 was accepted")








def hidden_load(address: str, n: int, stop: threading.Event, errors: list[str]) -> list[threading.Thread]:
    """`n` closed loops of inferences straight to one Triton (not through the gateway) until
    `stop`: a client the gateway cannot see, keeping about n - 1 requests in Triton's queue."""
    x = np.ones((1, 16), dtype=np.float32)

    def loop() -> None:
        client = httpclient.InferenceServerClient(address, network_timeout=60)
        try:
            inp = httpclient.InferInput("INPUT0", [1, 16], "FP32")
            inp.set_data_from_numpy(x)
            while not stop.is_set():
                client.infer("demo", [inp])
        except Exception as exc:  # collected: the test asserts there were none
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def replica_view(gw: TritonGatewayProc, triton: TritonProc) -> dict:
    """The gateway's region-summary entry for `triton`."""
    for pool in gw.region()["pools"]:
        for rep in pool["replicas"]:
            if rep["url"] == f"http://{triton.http_url}":
                return rep
    raise AssertionError(f"{triton.http_url} not in the region summary")


def test_gateway_scores_replicas_by_scraped_queue_depth(tmp_path, procs):
    repo = slow_triton_repository(tmp_path / "repo")
    busy, idle = tritons = [TritonProc(repo, load=("demo",)) for _ in range(2)]
    procs.extend(tritons)
    for t in tritons:
        t.wait_ready()
        t.wait_until(lambda t=t: http_ok(f"http://127.0.0.1:{t.metrics_port}/metrics"), what="serving /metrics")
    ports = ", ".join(f'"http://{t.http_url}" = {t.metrics_port}' for t in tritons)
    gw = TritonGatewayProc(tmp_path, [f"http://{t.http_url}" for t in tritons], pool_extra=(
        f"  metrics_scrape = true\n  metrics_interval_ms = {GATEWAY_SCRAPE_MS}\n  metrics_ports = {{ {ports} }}\n"))
    procs.append(gw)
    gw.wait_ready()
    wait_for(lambda: gw.region()["replicas"]["healthy"] == 2, "both Tritons healthy", procs=[gw])
    # Idle: both scraped, both queues empty.
    wait_for(lambda: all(replica_view(gw, t).get("queue_depth") == 0.0 for t in tritons),
             "the gateway to show both queues empty", procs=[gw])
    assert replica_view(gw, busy)["load_signal"]["metrics_url"] == f"http://127.0.0.1:{busy.metrics_port}/metrics"

    stop = threading.Event()
    errors: list[str] = []
    loops = hidden_load(busy.http_url, CONCURRENT, stop, errors)
    try:
        # The other client's requests queue in `busy`: the gateway sees it only in /metrics.
        wait_for(lambda: (replica_view(gw, busy).get("queue_depth") or 0.0) >= 2,
                 "the gateway to show the busy Triton's queue", procs=[gw, busy])
        assert replica_view(gw, idle)["queue_depth"] == 0.0
        # Neither has answered this gateway yet (no latency sample): without the queue, P2C
        # tries whichever is still unmeasured, so `busy` gets at least one of these; with it, none.
        x = np.ones((1, 16), dtype=np.float32)
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                       "data": x.flatten().tolist()}]}).encode()
        served: Counter = Counter()
        for _ in range(ROUTED_REQUESTS):
            status, headers, answer = http_call(f"http://{gw.http}/v2/models/demo/infer", body,
                                                {"Content-Type": "application/json"})
            assert status == 200, answer
            out = np.array(json.loads(answer)["outputs"][0]["data"], dtype=np.float32).reshape(1, 8)
            np.testing.assert_allclose(out, reference_outputs("tiny", 1, x), rtol=1e-5, atol=1e-6)
            served[{k.lower(): v for k, v in headers.items()}["geogate-replica"]] += 1
        assert all(idle.http_url in r for r in served), served
    finally:
        stop.set()
        for t in loops:
            t.join(WAIT_S)
    assert errors == []
    # The queue drains: the gateway shows it.
    wait_for(lambda: replica_view(gw, busy).get("queue_depth") == 0.0, "the busy queue to drain", procs=[gw])
    # A replica whose /metrics stops answering: no queue depth to score with, and the reason.
    busy.kill()
    wait_for(lambda: replica_view(gw, busy)["load_signal"]["error"] != "", "the failed scrape to show", procs=[gw])
    view = replica_view(gw, busy)
    assert view["queue_depth"] is None and str(busy.metrics_port) in view["load_signal"]["error"]
    gw.stop()
    idle.kill()  # nothing to drain or save: skip Triton's exit timeout
