"""Property-based fuzzing (hypothesis, in the style of test_fuzz_parsers.py) of what the gateway
reads from a client besides the body: deadlines (``geogate-timeout-ms``, Triton's ``timeout``
parameter over HTTP and gRPC, gRPC's own deadline), ``Inference-Header-Content-Length``,
``Accept-Encoding`` / ``Content-Encoding`` and ``geogate-hops``; and the HTTP -> gRPC
translation of requests that passed the gateway's checks.

Properties: each parser returns a valid value or raises its typed error (DeadlineError,
RequestError, TranslateError), never anything else; every accepted value is usable downstream
(a finite deadline no later than the gateway's default, an ASCII value HTTP/1.1 can forward, an
integer in range); text in other scripts' digits is never accepted as a number; translation
builds a bounded multiple of what was received.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.front import deadline as dl
from gateway.front.request_checks import (
    MAX_HOPS,
    ModelSpecs,
    RequestError,
    check_coding,
    check_http,
    parse_hops,
    parse_http_header,
)
from gateway.upstream.translate import TranslateError, http_request_to_grpc, parse_header_length
from tests.fuzzing import fuzz

RUNS: Counter[str] = Counter()
DEFAULT_MS = 30000
NOW_S = 1000.0


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            tr.write_line("")
            tr.write_line("fuzz examples run: " + ", ".join(f"{k}={v}" for k, v in sorted(RUNS.items())))


# Header-like text: numbers in every shape, digits of other scripts (category Nd), signs,
# exponents, NaN/inf spellings, whitespace and control characters, latin-1 bytes as aiohttp
# decodes them (surrogate escapes).
numberish = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**30), 10**30).map(str),
    st.text(alphabet="0123456789.eE+-_ xXabcdfinNI\t", max_size=24),
    st.text(alphabet=st.characters(categories=["Nd"]), min_size=1, max_size=6),
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-inf", "Infinity", "1e400", "0.15", "", "\udce9", "1_000"]),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                         st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                             max_size=2))


def _ascii_number(text: str) -> bool:
    return all(c in "0123456789.eE+-" for c in text)


@fuzz(2000)
@given(header=st.one_of(st.none(), numberish, st.floats(min_value=1e-3, max_value=1e8).map(str)),
       parameter=st.one_of(st.none(), st.integers(0, dl.MAX_TIMEOUT_US + 10), json_scalars))
def test_http_deadline(header, parameter):
    RUNS["deadline.http_deadline"] += 1
    try:
        d = dl.http_deadline(NOW_S, header, parameter, DEFAULT_MS)
    except dl.DeadlineError as exc:
        assert "geogate-timeout-ms" in str(exc) or "'timeout'" in str(exc)
        return
    assert math.isfinite(d.at_s) and NOW_S <= d.at_s <= NOW_S + DEFAULT_MS / 1000
    assert isinstance(d.client, bool)
    if header is not None:
        assert header.isascii() and _ascii_number(header) and 0 < float(header) <= dl.MAX_TIMEOUT_MS
        assert d.client == (float(header) < DEFAULT_MS)
    if parameter is not None:  # checked even when the header wins
        assert not isinstance(parameter, bool) and isinstance(parameter, int | float)
        assert 0 <= parameter <= dl.MAX_TIMEOUT_US
    RUNS["deadline.http_deadline (accepted)"] += 1


@fuzz(1000)
@given(remaining=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       parameter=st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)))
def test_grpc_deadline(remaining, parameter):
    RUNS["deadline.grpc_deadline"] += 1
    try:
        d = dl.grpc_deadline(NOW_S, remaining, parameter, DEFAULT_MS)
    except dl.DeadlineError as exc:
        assert "'timeout'" in str(exc) and parameter is not None
        assert parameter < 0 or parameter > dl.MAX_TIMEOUT_US
        return
    assert math.isfinite(d.at_s) and NOW_S <= d.at_s <= NOW_S + DEFAULT_MS / 1000


@fuzz(1000)
@given(value=numberish, body_len=st.integers(0, 1 << 20))
def test_header_length(value, body_len):
    RUNS["translate.parse_header_length"] += 1
    try:
        n = parse_header_length(value, body_len)
    except TranslateError as exc:
        assert "Inference-Header-Content-Length" in str(exc)
        return
    assert value.isascii() and value.isdigit() and 0 <= n <= body_len


@fuzz(500)
@given(value=numberish, body=st.binary(max_size=64))
def test_header_length_through_the_request_parser(value, body):
    RUNS["request_checks.parse_http_header/header-length"] += 1
    try:
        header, binary_len = parse_http_header(body, value, None)
    except RequestError as exc:
        assert exc.status == 400 and str(exc)
        return
    assert value.isascii() and value.isdigit() and isinstance(header, dict) and 0 <= binary_len <= len(body)


@fuzz(1000)
@given(value=st.one_of(numberish, st.text(alphabet="gzipdeflatbr,;q=0.5 *identity", max_size=40),
                       st.text(max_size=40)))
def test_codings(value):
    RUNS["request_checks.check_coding"] += 1
    for header in ("Accept-Encoding", "Content-Encoding"):
        try:
            check_coding(header, value)
        except RequestError as exc:
            assert header in str(exc) and exc.status == 400
            continue
        assert value.isascii() and all(c.isprintable() or c == "\t" for c in value)
        value.encode("latin-1")  # what the HTTP/1.1 upstream client does with it


@fuzz(1000)
@given(value=st.one_of(st.none(), numberish))
def test_hops(value):
    RUNS["request_checks.parse_hops"] += 1
    try:
        hops = parse_hops(value)
    except RequestError as exc:
        assert "geogate-hops" in str(exc)
        return
    assert 0 <= hops <= MAX_HOPS
    assert value in (None, "") or (value.isascii() and value.isdigit())


SPECS = ModelSpecs.from_metadata({
    "name": "fuzz", "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [-1]},
                               {"name": "X", "datatype": "FP32", "shape": [-1, 2]}],
    "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1]}]})
nested = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@st.composite
def translatable(draw):
    """A request for the fuzz model with BYTES and FP32 inputs, mostly close to valid."""
    n = draw(st.integers(0, 4))
    text = {"name": "TEXT", "datatype": "BYTES", "shape": [draw(st.integers(0, 5))]}
    if draw(st.booleans()):
        text["data"] = draw(st.one_of(st.lists(st.text(max_size=4), min_size=text["shape"][0],
                                               max_size=text["shape"][0]), nested))
    else:
        text["data"] = draw(st.lists(st.one_of(st.text(max_size=3), st.integers(0, 2**40)), max_size=5))
    x = {"name": "X", "datatype": "FP32", "shape": [n, 2],
         "data": draw(st.one_of(st.lists(st.floats(width=32, allow_nan=False), min_size=2 * n, max_size=2 * n),
                                nested))}
    header: dict = {"inputs": [text, x]}
    if draw(st.booleans()):
        header["parameters"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), json_scalars, max_size=3),
                                              json_scalars))
    if draw(st.booleans()):
        header["outputs"] = [{"name": "Y", "parameters": draw(st.one_of(
            st.dictionaries(st.sampled_from(["binary_data", "k"]), json_scalars, max_size=2), json_scalars))}]
    return header


@fuzz(1000)
@given(header=translatable())
def test_translation_of_checked_requests(header):
    """What passes check_http translates to gRPC or fails with TranslateError / ValueError
    (values protobuf cannot hold), and the message is a bounded multiple of the JSON."""
    RUNS["translate.http_request_to_grpc/checked"] += 1
    body = json.dumps(header).encode()
    try:
        parsed, binary_len = parse_http_header(body, None, None)
        check_http("fuzz", parsed, binary_len, SPECS)
    except RequestError:
        return
    RUNS["translate.http_request_to_grpc/checked (accepted)"] += 1
    try:
        raw, _, _ = http_request_to_grpc("fuzz", None, parsed, memoryview(b""), "rid")
    except (TranslateError, ValueError):
        return
    assert len(raw) <= 8 * len(body) + 256
