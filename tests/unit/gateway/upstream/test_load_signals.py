"""gateway.upstream.load_signals in-process: parsing a replica's /metrics text, and the balancer scoring
only a fresh queue reading. The scrapes of real replicas and Triton are in tests/e2e/test_load_signals.py."""

from __future__ import annotations

import random

from gateway.routing.balancer import pick_p2c
from gateway.upstream.load_signals import (
    ReplicaLoad,
    parse_metrics,
)
from gateway.upstream.load_stats import LoadStats


def test_parse_metrics_sums_models_and_rejects_garbage():
    page = ('nv_inference_pending_request_count{model="a",version="1"} 2\n'
            'nv_inference_pending_request_count{model="b",version="3"} 5\n'
            'nv_inference_queue_duration_us{model="a",version="1"} 1000\n')
    s = parse_metrics(page)
    assert s.pending == 7 and s.queue_us_total == 1000 and s.inflight is None
    load = ReplicaLoad("grpc://h:1", "http://h:2/metrics", "triton")
    load.record(s, 100.0)
    load.record(parse_metrics(page.replace(" 1000", " 501000")), 100.5)  # 0.5 s queued per 0.5 s
    assert abs(load.queue_avg - 1.0) < 1e-9 and load.queue_depth == 7
    try:
        parse_metrics("this is { not prometheus")
    except ValueError:
        pass
    else:
        raise AssertionError("garbage parsed")


class _Up:
    """What pick_p2c reads of a gateway.upstream.pool.Upstream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.load = LoadStats()
        self.state = type("S", (), {"weight": 1})()


def test_balancer_counts_a_fresh_queue_reading_only():
    a, b = _Up("a"), _Up("b")
    for up in (a, b):
        up.load.observe(0.010, 100.0)
    assert a.load.cost(100.0, 1) == b.load.cost(100.0, 1)
    # Queue depth 3, valid until t=101: a costs like 3 more outstanding requests.
    a.load.set_queue_depth(3.0, 101.0)
    assert a.load.cost(100.5, 1) == 4 * b.load.cost(100.5, 1)
    rng = random.Random(3)
    assert {pick_p2c([a, b], 100.5, rng).name for _ in range(50)} == {"b"}
    # Stale: ignored, outstanding requests alone decide again (b is busier).
    b.load.outstanding = 1
    assert a.load.cost(101.0, 1) < b.load.cost(101.0, 1)
    assert {pick_p2c([a, b], 101.0, rng).name for _ in range(50)} == {"a"}
    # A failed scrape drops the reading at once (valid_until 0); no latency sample yet: the
    # queue still counts, with the no-data penalty per request.
    fresh = LoadStats()
    fresh.set_queue_depth(2.0, 200.0)
    assert fresh.cost(150.0, 1) > 0.0
    fresh.set_queue_depth(2.0, 0.0)
    assert fresh.cost(150.0, 1) == 0.0
