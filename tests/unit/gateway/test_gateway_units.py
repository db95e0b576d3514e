"""The gateway's pure pieces, without sockets: protobuf peeking, deadlines, retry budget,
power-of-two-choices with peak EWMA, request checks."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from gateway.front import deadline as dl
from gateway.front.request_checks import ModelSpecs, RequestError, check_grpc, check_http, parse_http_header
from gateway.routing.balancer import pick_p2c
from gateway.routing.retry_budget import RetryBudget
from gateway.upstream.load_stats import LoadStats
from gateway.upstream.proto_peek import ProtoError, peek_infer_request, peek_response_version, with_model_version

names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=20)


@given(model=names, version=st.sampled_from(["", "1", "42"]), rid=st.text(max_size=10),
       shapes=st.lists(st.lists(st.integers(-1, 1 << 40), max_size=4), min_size=1, max_size=3),
       timeout=st.integers(0, 1 << 40))
def test_peek_matches_protobuf(model, version, rid, shapes, timeout):
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=rid)
    req.parameters["timeout"].int64_param = timeout
    for i, shape in enumerate(shapes):
        req.inputs.add(name=f"IN{i}", datatype="FP32", shape=shape)
        req.raw_input_contents.append(b"x" * (i * 7))
    req.outputs.add(name="OUT")
    raw = req.SerializeToString()
    peek = peek_infer_request(raw)
    assert (peek.model_name, peek.model_version, peek.id) == (model, version, rid)
    assert [t.shape for t in peek.inputs] == shapes
    assert [t.name for t in peek.inputs] == [f"IN{i}" for i in range(len(shapes))]
    assert peek.raw_input_lengths == [i * 7 for i in range(len(shapes))]
    assert peek.int_parameters.get("timeout", 0) == timeout
    # appending field 2 sets the version without re-encoding anything else
    again = service_pb2.ModelInferRequest.FromString(with_model_version(raw, "7"))
    assert again.model_version == "7" and again.raw_input_contents == req.raw_input_contents
    assert peek_infer_request(with_model_version(raw, "7")).model_version == "7"


def test_peek_response_version_and_errors():
    resp = service_pb2.ModelInferResponse(model_name="demo", model_version="3", id="x")
    resp.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 8])
    resp.raw_output_contents.append(b"\0" * 32)
    assert peek_response_version(resp.SerializeToString()) == "3"
    with pytest.raises(ProtoError):
        peek_infer_request(b"\x0a\x05ab")  # length runs past the end
    with pytest.raises(ProtoError):
        peek_infer_request(b"\x0f")  # wire type 7


def test_deadlines():
    assert dl.http_deadline(100.0, "250", None, 30000) == (pytest.approx(100.25), True)
    assert dl.http_deadline(100.0, None, 500_000, 30000) == (pytest.approx(100.5), True)
    assert dl.http_deadline(100.0, None, 0, 30000) == (pytest.approx(130.0), False)  # Triton: 0 = none
    # capped by the gateway's default: then the gateway's limit, not the client's, is the one that binds
    assert dl.http_deadline(100.0, "999999", None, 1000) == (pytest.approx(101.0), False)
    with pytest.raises(dl.DeadlineError):
        dl.http_deadline(100.0, "soon", None, 1000)
    with pytest.raises(dl.DeadlineError):
        dl.http_deadline(100.0, None, "1s", 1000)
    assert dl.grpc_deadline(5.0, 0.2, None, 30000) == (pytest.approx(5.2), True)
    assert dl.grpc_deadline(5.0, None, None, 30000) == (pytest.approx(35.0), False)
    assert dl.grpc_deadline(5.0, None, 100_000, 30000) == (pytest.approx(5.1), True)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "-1", "0", "0.0", "1e400", "", " ",
                                   "\uff11\uff10", "\u0663", "1_0", "0x10", "1e9", "86400001", "10ms", "+5", "\x00"])
def test_timeout_header_refused(value):
    with pytest.raises(dl.DeadlineError, match="geogate-timeout-ms"):
        dl.http_deadline(100.0, value, None, 30000)


@pytest.mark.parametrize("value", [-1, 2**64, 86_400_000_001, 1.5, float("nan"), float("inf"), "10", True, [1], None])
def test_timeout_parameter_refused(value):
    if value is None:  # absent: the default
        assert dl.http_deadline(1.0, None, None, 30000) == (pytest.approx(31.0), False)
        return
    with pytest.raises(dl.DeadlineError, match="'timeout'"):
        dl.http_deadline(100.0, None, value, 30000)
    if isinstance(value, int) and not isinstance(value, bool):
        with pytest.raises(dl.DeadlineError, match="'timeout'"):
            dl.grpc_deadline(100.0, None, value, 30000)


def test_timeout_values_accepted():
    assert dl.parse_timeout_header_ms("0.15") == pytest.approx(0.15)
    assert dl.parse_timeout_header_ms(".5") == pytest.approx(0.5)
    assert dl.parse_timeout_header_ms("1e3") == pytest.approx(1000.0)
    assert dl.parse_timeout_header_ms("86400000") == 86_400_000
    assert dl.parse_timeout_parameter_us(0) == 0 and dl.parse_timeout_parameter_us(1e6) == 1_000_000
    # gRPC deadlines come from grpc itself: never NaN, but a non-finite one would mean "none"
    assert dl.grpc_deadline(5.0, float("nan"), None, 1000) == (pytest.approx(6.0), False)
    assert dl.grpc_deadline(5.0, -3.0, None, 1000) == (pytest.approx(5.0), True)


def test_retry_budget_ratio_and_floor():
    now = [1000.0]
    budget = RetryBudget(percent=20.0, min_per_s=1.0, window_s=10, clock=lambda: now[0])
    # floor: 1/s over a 10 s window = 10 retries with no traffic at all
    assert sum(budget.try_spend() for _ in range(50)) == 10
    now[0] += 20  # the window has moved on
    for _ in range(1000):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(1000)) == 10 + 200


def test_p2c_prefers_fast_and_idle_and_honours_weight():
    class U:
        def __init__(self, name, weight=1):
            self.name = name
            self.load = LoadStats()
            self.state = type("S", (), {"weight": weight})()

    fast, slow, busy = U("fast"), U("slow"), U("busy")
    fast.load.observe(0.002, 0.0)
    slow.load.observe(0.200, 0.0)
    busy.load.observe(0.002, 0.0)
    busy.load.outstanding = 50
    rng = random.Random(1)
    picks = [pick_p2c([fast, slow, busy], 0.1, rng).name for _ in range(3000)]
    assert picks.count("slow") == 0 and picks.count("fast") > 1800
    # a replica that was slow is tried again after a while without traffic (idle decay)
    assert slow.load.cost(60.0, 1) < fast.load.cost(0.1, 1)
    # weight divides the cost
    a, b = U("a", weight=1), U("b", weight=3)
    for u in (a, b):
        u.load.observe(0.01, 0.0)
    picks = [pick_p2c([a, b], 0.0, rng).name for _ in range(1000)]
    assert picks.count("b") == 1000  # cheaper whenever compared: b wins every pair


SPECS = ModelSpecs.from_metadata({"name": "demo", "inputs": [{"name": "INPUT0", "datatype": "FP32",
                                                              "shape": [-1, 16]}],
                                  "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 8]}]})


def _check(body: bytes, header_len: str | None = None) -> None:
    header, binary_len = parse_http_header(body, header_len, None)
    check_http("demo", header, binary_len, SPECS)


def test_http_checks():
    _check(b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[2,16],"data":' +
           str([0.0] * 32).encode() + b"}]}")
    bin_head = b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"parameters":{"binary_data_size":64}}]}'
    _check(bin_head + b"\0" * 64, str(len(bin_head)))
    with pytest.raises(RequestError, match="binary"):
        _check(bin_head + b"\0" * 63, str(len(bin_head)))
    with pytest.raises(RequestError, match="JSON"):
        _check(b"{nope")
    with pytest.raises(RequestError, match="unexpected inference input"):
        _check(b'{"inputs":[{"name":"X","datatype":"FP32","shape":[1,16],"data":[]}]}')
    with pytest.raises(RequestError, match="shape"):
        _check(b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16,1],"data":[]}]}')
    with pytest.raises(RequestError, match="Inference-Header-Content-Length"):
        _check(bin_head, "x")


def test_grpc_checks():
    req = service_pb2.ModelInferRequest(model_name="demo")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 16])
    req.raw_input_contents.append(b"\0" * 128)
    check_grpc("demo", peek_infer_request(req.SerializeToString()), SPECS)
    req.raw_input_contents[0] = b"\0" * 120
    with pytest.raises(RequestError, match="byte size"):
        check_grpc("demo", peek_infer_request(req.SerializeToString()), SPECS)
    req.raw_input_contents.append(b"")
    with pytest.raises(RequestError, match="raw_input_contents"):
        check_grpc("demo", peek_infer_request(req.SerializeToString()), SPECS)


# ---------------------------------------------------------------------- the hot-path HTTP client


async def _serve(responses: list[bytes], *, close_after_each: bool = False):
    """A loopback HTTP server answering each request with the next canned response."""
    import asyncio

    seen: list[bytes] = []

    async def handle(reader, writer):
        while responses:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                              if ln.lower().startswith(b"content-length")))
            seen.append(head + await reader.readexactly(length))
            writer.write(responses.pop(0))
            await writer.drain()
            if close_after_each:
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


async def test_http1_client_content_length_chunked_and_reuse():
    from gateway.upstream.http1_client import ConnectionPool

    server, address, seen = await _serve([
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nInference-Header-Content-Length: 2\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    ])
    pool = ConnectionPool(address, max_connections=2)
    try:
        r1 = await pool.post("/v2/models/m/infer", b"x" * 10, {"x-request-id": "a"}, 5.0)
        assert (r1.status, r1.body, r1.headers["inference-header-content-length"]) == (200, b"hello", "2")
        r2 = await pool.post("/v2/models/m/infer", b"y", {}, 5.0)
        assert (r2.status, r2.body) == (200, b"abcde")
        r3 = await pool.post("/v2/models/m/infer", b"", {}, 5.0)
        assert r3.status == 503
        assert len(seen) == 3 and b"x-request-id: a" in seen[0] and seen[0].endswith(b"x" * 10)
        assert pool._open == 1  # one keep-alive connection carried all three
    finally:
        await pool.close()
        server.close()


async def test_http1_client_retries_a_connection_closed_while_idle():
    import asyncio

    from gateway.upstream.http1_client import ConnectionPool, UpstreamConnectError

    server, address, seen = await _serve([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"] * 2,
                                         close_after_each=True)
    pool = ConnectionPool(address, max_connections=4)
    try:
        assert (await pool.post("/p", b"1", {}, 5.0)).body == b"ok"
        await asyncio.sleep(0.1)  # the server closed the idle connection meanwhile
        assert (await pool.post("/p", b"2", {}, 5.0)).body == b"ok"
        assert len(seen) == 2
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
    with pytest.raises(UpstreamConnectError):
        await ConnectionPool(address, max_connections=1).post("/p", b"", {}, 1.0)


# ---------------------------------------------------------------------- bounded translation and checks


BYTES_SPECS = ModelSpecs.from_metadata({"name": "s", "inputs": [{"name": "T", "datatype": "BYTES", "shape": [-1]}],
                                        "outputs": [{"name": "L", "datatype": "INT64", "shape": [-1]}]})


def _blob(*items: bytes) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


@pytest.mark.parametrize("data", [[419430400], [[419430400]], ["a", 7], [None], [1.5]])
def test_bytes_number_never_becomes_bytes(data):
    """An 86-byte request once allocated 1.2 GB here (bytes(419430400))."""
    from gateway.upstream import translate

    header = {"inputs": [{"name": "T", "datatype": "BYTES", "shape": [len(data)], "data": data}]}
    with pytest.raises(translate.TranslateError, match="strings"):
        translate.http_request_to_grpc("s", None, header, memoryview(b""), "r")
    with pytest.raises(RequestError, match="must be strings"):
        check_http("s", header, 0, BYTES_SPECS)


def test_translation_checks_element_counts_both_ways():
    from gateway.upstream import translate

    def to_grpc(inp: dict, binary: bytes = b"") -> bytes:
        return translate.http_request_to_grpc("s", None, {"inputs": [inp]}, memoryview(binary), "r")[0]

    ok = service_pb2.ModelInferRequest.FromString(to_grpc({"name": "T", "datatype": "BYTES", "shape": [2],
                                                          "data": [["ab"], ["c"]]}))
    assert ok.raw_input_contents[0] == _blob(b"ab", b"c")
    for inp, binary in [({"name": "T", "datatype": "BYTES", "shape": [3], "data": ["a", "b"]}, b""),
                        ({"name": "X", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0]}, b""),
                        ({"name": "X", "datatype": "INT64", "shape": [1], "data": [2**70]}, b""),
                        ({"name": "T", "datatype": "BYTES", "shape": [1],
                          "parameters": {"binary_data_size": 9}}, _blob(b"abcd") + b"!"),
                        ({"name": "X", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}},
                         b"\0" * 4)]:
        with pytest.raises(translate.TranslateError):
            to_grpc(inp, binary)
    deep = 1.0
    for _ in range(990):  # once a RecursionError (500)
        deep = [deep]
    with pytest.raises(translate.TranslateError, match="nested deeper"):
        to_grpc({"name": "X", "datatype": "FP32", "shape": [1], "data": deep})
    with pytest.raises(translate.TranslateError, match="'parameters'"):
        translate.http_request_to_grpc("s", None, {"parameters": [1], "inputs": []}, memoryview(b""), "r")
    # gRPC -> HTTP: raw BYTES contents and typed contents against the shape
    req = service_pb2.ModelInferRequest(model_name="s")
    req.inputs.add(name="T", datatype="BYTES", shape=[2])
    req.raw_input_contents.append(_blob(b"a") + b"\xff\xff\xff\x7f")
    with pytest.raises(translate.TranslateError, match="past the end"):
        translate.grpc_request_to_http(req.SerializeToString())
    req = service_pb2.ModelInferRequest(model_name="s")
    req.inputs.add(name="X", datatype="INT32", shape=[3]).contents.int_contents.extend([1, 2])
    with pytest.raises(translate.TranslateError, match="needs 3 elements"):
        translate.grpc_request_to_http(req.SerializeToString())


def test_bytes_binary_and_raw_prefixes_are_checked():
    from gateway.front.request_checks import ValidatedHeaders

    checker = ValidatedHeaders()
    for blob, ok in [(_blob(b"ab", b""), True), (_blob(b"ab"), False), (_blob(b"ab", b"c") + b"x", False),
                     ((2**31).to_bytes(4, "little") + b"ab", False)]:
        head = json.dumps({"inputs": [{"name": "T", "datatype": "BYTES", "shape": [2],
                                       "parameters": {"binary_data_size": len(blob)}}]}).encode()
        for _ in range(2):  # the second time the header is a cache hit: the blob is still checked
            if ok:
                checker.check("s", head + blob, str(len(head)), None, BYTES_SPECS)
            else:
                with pytest.raises(RequestError, match="BYTES"):
                    checker.check("s", head + blob, str(len(head)), None, BYTES_SPECS)
        req = service_pb2.ModelInferRequest(model_name="s")
        req.inputs.add(name="T", datatype="BYTES", shape=[2])
        req.raw_input_contents.append(blob)
        raw = req.SerializeToString()
        if ok:
            check_grpc("s", peek_infer_request(raw), BYTES_SPECS, raw=raw)
        else:
            with pytest.raises(RequestError, match="BYTES"):
                check_grpc("s", peek_infer_request(raw), BYTES_SPECS, raw=raw)


@pytest.mark.parametrize(("header", "match"), [
    ({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}], "parameters": [1]},
     "'parameters'"),
    ({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [[0.0] * 8] * 3}]},
     "needs 16 elements, got more"),
    ({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2**64], "data": []}]}, "64-bit"),
])
def test_http_checks_counts_and_parameters(header, match):
    with pytest.raises(RequestError, match=match):
        check_http("demo", header, 0, SPECS)
    deep: object = 0.0
    for _ in range(990):
        deep = [deep]
    with pytest.raises(RequestError, match="nested deeper"):
        check_http("demo", {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [deep]}]},
                   0, SPECS)


def test_strict_header_parsers():
    from gateway.front.request_checks import check_coding, parse_hops

    assert parse_hops(None) == 0 and parse_hops("") == 0 and parse_hops("2") == 2
    for bad in ("\uff11", "1_0", "-1", " 1", "256", "x", "1" * 40):
        with pytest.raises(RequestError, match="geogate-hops"):
            parse_hops(bad)
    check_coding("Accept-Encoding", "gzip, deflate;q=0.5, *;q=0")
    for bad in ("gz\udce9ip", "gzip, \u2603", "a\r\nb", "x" * 300):
        with pytest.raises(RequestError, match="Accept-Encoding"):
            check_coding("Accept-Encoding", bad)
    for bad in ("\uff11\uff10", "\u0663", "-1", "", "1e3", "+5"):
        with pytest.raises(RequestError, match="Inference-Header-Content-Length"):
            parse_http_header(b'{"inputs":[]}', bad, None)


def test_client_error_log_is_rate_limited(caplog):
    import logging

    from gateway.front.request_checks import ClientErrorLog

    log = ClientErrorLog(logging.getLogger("test.client_errors"), interval_s=10.0, per_interval=3)
    with caplog.at_level(logging.WARNING, logger="test.client_errors"):
        for i in range(100):
            if log.allow(now_s=1000.0 + i * 0.01):
                log.logger.warning("bad request %d", i)
        log.allow(now_s=1011.0)  # the next window: one line counts what was left out
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["bad request 0", "bad request 1", "bad request 2"]
    assert len(lines) == 4 and "97 more malformed requests" in lines[3]
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in caplog.records)


def test_grpc_to_http_drops_tritons_grpc_control_parameters():
    """perf_analyzer sends triton_enable_empty_final_response on every gRPC call; Triton's HTTP
    front-end refuses "triton_" parameters, so translation leaves them out (and keeps the rest)."""
    import orjson

    from gateway.upstream import translate

    req = service_pb2.ModelInferRequest(model_name="s")
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    req.parameters["sequence_id"].int64_param = 7
    req.inputs.add(name="X", datatype="INT32", shape=[1]).contents.int_contents.append(5)
    _, _, body, hl = translate.grpc_request_to_http(req.SerializeToString())
    assert orjson.loads(body[:int(hl)])["parameters"] == {"sequence_id": 7, "binary_data_output": True}
