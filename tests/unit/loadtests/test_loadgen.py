"""loadtests' load generator in-process: schedules, spec validation, histogram merging, the answer
verifier and the trace helpers. Runs against real replicas are in tests/e2e/test_loadgen.py."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.clients import TargetError, parse_target
from loadtests.histogram import LatencyHistogram
from loadtests.loadgen import LoadSpec, SpecError, parse_schedule, rate_at
from loadtests.verify import Verifier
from replicas.demo.onnx_model import reference_outputs


def test_schedule_parsing_and_rate_lookup():
    s = parse_schedule("0:100, 10:500,20:100")
    assert s == [(0.0, 100.0), (10.0, 500.0), (20.0, 100.0)]
    assert rate_at(s, 9.99) == (100.0, 10.0)
    assert rate_at(s, 10.0) == (500.0, 20.0)
    assert rate_at(s, 25.0) == (100.0, float("inf"))
    assert parse_schedule("5:10")[0] == (0.0, 0.0)  # silent until the first step
    for bad in ("", "abc", "0:10,0:20", "0:-1"):
        with pytest.raises(SpecError):
            parse_schedule(bad)


def test_spec_validation_names_the_problem():
    with pytest.raises(SpecError, match="loopback"):
        LoadSpec(url="http://192.0.2.1:8000", rate=1).validate()
    with pytest.raises(SpecError, match="either a rate"):
        LoadSpec(url="http://127.0.0.1:8000", rate=5, concurrency=2).validate()
    with pytest.raises(SpecError, match="duration"):
        LoadSpec(url="http://127.0.0.1:8000", rate=5, duration_s=0).validate()
    with pytest.raises(ValueError, match="not a demo model"):
        LoadSpec(url="http://127.0.0.1:8000", rate=5, model="resnet").validate()
    assert parse_target("grpc://localhost:9", "grpc") == ("127.0.0.1", 9)
    with pytest.raises(TargetError):
        parse_target("http://example.com:80", "http")


def test_histograms_merge_across_an_encoding():
    a, b = LatencyHistogram(), LatencyHistogram()
    for ms in range(1, 1001):
        (a if ms % 2 else b).record_s(ms / 1000)
    merged = LatencyHistogram.decode(a.encode())
    merged.merge(LatencyHistogram.decode(b.encode()))
    assert merged.count == 1000
    assert merged.percentile_ms(50) == pytest.approx(500, rel=0.002)
    assert merged.percentile_ms(99) == pytest.approx(990, rel=0.002)
    assert merged.max_ms() == pytest.approx(1000, rel=0.002)


def test_verifier_accepts_the_right_version_and_rejects_another():
    v = Verifier("demo")
    out1 = reference_outputs("tiny", 1, v.inputs[3])
    assert v.check(3, "1", out1) == ""
    assert v.check(3, "2", out1).startswith("wrong answer")
    assert v.check(4, "1", out1).startswith("wrong answer")  # another input's answer
    assert v.check(3, "", out1) == "no model version in response"
    assert v.check(3, "1", np.zeros(3, np.float32)) == "malformed output"


def test_trace_helpers_find_the_transition():
    from loadtests import trace as tr

    # (t_s, ok, latency_ms, region, version, reason)
    t = [(0.0, True, 2.0, "a", "1", ""), (1.0, True, 2.0, "a", "1", ""), (2.0, False, 50.0, "", "", "http 503"),
         (2.1, True, 30.0, "b", "1", ""), (2.05, True, 90.0, "b", "1", ""), (3.0, True, 3.0, "a", "2", "")]
    first = tr.first_answer(t, 2.0, lambda e: e[tr.REGION] != "a")
    assert first[0] == 2.1 and tr.done_at(first) == pytest.approx(2.13)  # answered before the 2.05 one
    assert tr.last_sent(t, 0.0, lambda e: e[tr.REGION] == "b")[0] == 2.1
    assert tr.failures(tr.between(t, 2.0, 3.0)) == {"http 503": 1}
    assert tr.regions(t) == {"a": 3, "b": 2} and tr.versions(tr.between(t, 3.0)) == {"2": 1}
    assert tr.percentile_ms(tr.between(t, 2.0, 2.2), 50) == pytest.approx(60.0)
