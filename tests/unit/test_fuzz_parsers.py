"""Property-based fuzzing (hypothesis) of every parser that reads bytes from the network or an
operator's file:

- replicas.server.v2_codec: decode_http (JSON and binary tensor extension), decode_grpc
- gateway.upstream.proto_peek: peek_infer_request, peek_response_version, with_model_version
- gateway.front.request_checks: parse_http_header, check_http, check_grpc
- geo.dns_server: GeoDnsResponder.handle (query bytes -> response bytes)
- core.config: parse_config (random TOML-ish text and random well-formed tables)
- gateway.upstream.translate.decode_body: gzip/deflate bodies against a size bound (decompression bombs)
- gateway.front.http_connection.ClientConnection: pipelined requests, truncated and oversized heads and
  random bytes in any split into packets (llhttp reads them; the size and order rules are ours)
- gateway.upstream.http1_client._Conn: chunked keep-alive answers in any split, random answer bytes
- replicas.releases.manifest: MANIFEST.json parsing and Ed25519 signatures (any change breaks them)
- gateway.front.access_log: any text (surrogates included) in a log line

Properties: nothing but the module's documented error type escapes (InferError, ProtoError,
RequestError, ConfigError; the DNS responder never raises at all), every example finishes well
within tests.fuzzing.FUZZ_DEADLINE (no hangs), and valid inputs round-trip (a request built with tritonclient
or the generated protobuf classes decodes to the same tensors / fields).

The number of examples run per target is printed at the end of the module (see the terminal
summary line "fuzz examples run"). Crashes found become plain regression tests at the bottom.
"""

from __future__ import annotations

import gzip
import json
import logging
import string
import zlib
from collections import Counter

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import numpy as np
import pytest
import tritonclient.http as triton_http
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2

from core.config import ConfigError, parse_config
from gateway.front.request_checks import ModelSpecs, RequestError, check_grpc, check_http, parse_http_header
from gateway.upstream.proto_peek import ProtoError, peek_infer_request, peek_response_version, with_model_version
from gateway.upstream.translate import BodyTooLarge, TranslateError, decode_body
from geo.client_locator import ClientLocator
from geo.dns_server import GeoDnsResponder
from geo.region_health import RegionHealthMonitor
from replicas.releases.manifest import FileEntry, Manifest, ManifestError, sign_manifest, signature_problem
from replicas.server.infer_errors import InferError
from replicas.server.signature import ModelSignature
from replicas.server.v2_codec import decode_grpc, decode_http
from tests.fuzzing import fuzz

RUNS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    line = "fuzz examples run: " + ", ".join(f"{k}={v}" for k, v in sorted(RUNS.items())) + \
        f" (total {sum(v for k, v in RUNS.items() if '(accepted)' not in k)})"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown even without -s
            tr.write_line("")
            tr.write_line(line)
    else:
        print(line)


# ---------------------------------------------------------------------------- the model

MAX_BATCH = 8


def _signature() -> ModelSignature:
    cfg = mc.ModelConfig(name="fuzz", max_batch_size=MAX_BATCH)
    cfg.input.add(name="INPUT0", data_type=mc.TYPE_FP32, dims=[4])
    cfg.input.add(name="INPUT1", data_type=mc.TYPE_INT64, dims=[2])
    cfg.output.add(name="OUTPUT0", data_type=mc.TYPE_FP32, dims=[4])
    return ModelSignature(cfg, 3)


SIG = _signature()
SPECS = ModelSpecs.from_metadata(SIG.metadata(["3"]))
DATATYPES = ["FP32", "INT64", "INT32", "BYTES", "FP16", "BOOL", "UINT8", "fp32", ""]
NAMES = ["INPUT0", "INPUT1", "OUTPUT0", "", "input0", "INPUT0\x00", "é"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                         st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                                 st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4)),
                           max_leaves=20)
shapes = st.one_of(st.lists(st.integers(-2, 10), max_size=4), st.lists(json_scalars, max_size=3), json_scalars)


@st.composite
def http_input(draw):
    entry: dict = {}
    if draw(st.booleans()):
        entry["name"] = draw(st.sampled_from(NAMES))
    if draw(st.booleans()):
        entry["datatype"] = draw(st.sampled_from(DATATYPES))
    if draw(st.integers(0, 4)):
        entry["shape"] = draw(shapes)
    choice = draw(st.integers(0, 3))
    if choice == 0:
        entry["data"] = draw(json_values)
    elif choice == 1:
        entry["data"] = draw(st.lists(st.floats(allow_nan=False, width=32), max_size=40))
    elif choice == 2:
        entry["parameters"] = {"binary_data_size": draw(st.one_of(st.integers(-4, 400), json_scalars))}
    else:
        entry["parameters"] = draw(json_values)
    return entry


@st.composite
def http_request(draw):
    header: dict = {}
    if draw(st.integers(0, 5)):
        header["inputs"] = draw(st.one_of(st.lists(http_input(), max_size=4), json_values))
    if draw(st.booleans()):
        header["outputs"] = draw(st.one_of(
            st.lists(st.fixed_dictionaries({"name": st.sampled_from(NAMES)},
                                           optional={"parameters": json_values}), max_size=3), json_values))
    if draw(st.booleans()):
        header["id"] = draw(json_scalars)
    if draw(st.booleans()):
        header["parameters"] = draw(json_values)
    head = json.dumps(header).encode()
    blob = draw(st.binary(max_size=300))
    with_binary = draw(st.booleans())
    body = head + blob if with_binary else head
    header_length = len(head) if with_binary else None
    if draw(st.integers(0, 9)) == 0:
        header_length = draw(st.integers(-5, len(body) + 5))
    return body, header_length, header


# ---------------------------------------------------------------------------- v2_codec (replica)


@fuzz(1000)
@given(body=st.binary(max_size=400), header_length=st.one_of(st.none(), st.integers(-3, 450)))
def test_decode_http_random_bytes(body, header_length):
    RUNS["v2_codec.decode_http/bytes"] += 1
    try:
        decode_http(body, header_length, SIG)
    except InferError as exc:
        assert exc.http_status == 400 and exc.message


@fuzz(500)
@given(req=http_request())
def test_decode_http_structured(req):
    RUNS["v2_codec.decode_http/structured"] += 1
    body, header_length, _ = req
    try:
        decoded = decode_http(body, header_length, SIG)
    except InferError as exc:
        assert exc.http_status == 400 and exc.message
        return
    # Whatever is accepted is a complete, well-typed request for the model.
    assert set(decoded.feeds) == {"INPUT0", "INPUT1"}
    assert 1 <= decoded.rows <= MAX_BATCH
    assert decoded.feeds["INPUT0"].dtype == np.float32 and decoded.feeds["INPUT0"].shape == (decoded.rows, 4)
    assert decoded.feeds["INPUT1"].dtype == np.int64 and decoded.feeds["INPUT1"].shape == (decoded.rows, 2)
    RUNS["v2_codec.decode_http/structured (accepted)"] += 1
    # Differential: the gateway never refuses what the replica accepts (no false 400s at the door).
    header, binary_len = parse_http_header(body, None if header_length is None else str(header_length), None)
    check_http("fuzz", header, binary_len, SPECS)


@st.composite
def valid_tensors(draw):
    rows = draw(st.integers(1, MAX_BATCH))
    # Finite only: tritonclient's JSON encoder writes inf as `Infinity`, which is not JSON and
    # which both the replica and the gateway refuse with 400 (see test_json_infinity_is_refused).
    x0 = np.array(draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False),
                                min_size=rows * 4, max_size=rows * 4)),
                  dtype=np.float32).reshape(rows, 4)
    x1 = np.array(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=rows * 2, max_size=rows * 2)),
                  dtype=np.int64).reshape(rows, 2)
    return x0, x1


@fuzz(200)
@given(tensors=valid_tensors(), binary0=st.booleans(), binary1=st.booleans(), rid=st.text(max_size=10),
       want_output=st.booleans())
def test_decode_http_round_trip_tritonclient(tensors, binary0, binary1, rid, want_output):
    RUNS["v2_codec.decode_http/round-trip"] += 1
    x0, x1 = tensors
    i0 = triton_http.InferInput("INPUT0", list(x0.shape), "FP32")
    i0.set_data_from_numpy(x0, binary_data=binary0)
    i1 = triton_http.InferInput("INPUT1", list(x1.shape), "INT64")
    i1.set_data_from_numpy(x1, binary_data=binary1)
    outputs = [triton_http.InferRequestedOutput("OUTPUT0", binary_data=True)] if want_output else None
    body, json_size = triton_http.InferenceServerClient.generate_request_body([i0, i1], outputs=outputs,
                                                                             request_id=rid)
    decoded = decode_http(body, json_size, SIG)
    np.testing.assert_array_equal(decoded.feeds["INPUT0"], x0)
    np.testing.assert_array_equal(decoded.feeds["INPUT1"], x1)
    assert decoded.id == rid and decoded.rows == x0.shape[0]
    assert (decoded.outputs is None) == (not want_output)
    # The gateway's checks accept what the replica accepts.
    header, binary_len = parse_http_header(body, None if json_size is None else str(json_size), None)
    check_http("fuzz", header, binary_len, SPECS)


HTTP_MUTATIONS = ["drop_input", "dup_input", "datatype", "shape_dim", "shape_len", "batch_mismatch", "binary_size",
                  "name", "data_len", "data_value", "output_name", "blob_trunc", "blob_extra", "header_length",
                  "no_header_length"]


@st.composite
def near_valid_http(draw):
    """A valid request for the fuzz model with 0-2 mutations: reaches the deep checks."""
    x0, x1 = draw(valid_tensors())
    inputs, blobs = [], []
    for name, dt, arr in (("INPUT0", "FP32", x0), ("INPUT1", "INT64", x1)):
        entry = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if draw(st.booleans()):
            entry["parameters"] = {"binary_data_size": arr.nbytes}
            blobs.append(arr.tobytes())
        else:
            entry["data"] = arr.reshape(-1).tolist()
        inputs.append(entry)
    if draw(st.booleans()):
        inputs.reverse()
        blobs.reverse()
    header: dict = {"inputs": inputs}
    if draw(st.booleans()):
        header["outputs"] = [{"name": "OUTPUT0", "parameters": {"binary_data": draw(st.booleans())}}]
    blob = b"".join(blobs)
    with_hl = bool(blobs) or draw(st.booleans())
    hl_delta = 0
    mutations = draw(st.lists(st.sampled_from(HTTP_MUTATIONS), max_size=2))
    for m in mutations:
        i = draw(st.integers(0, max(0, len(inputs) - 1)))
        inp = inputs[i] if inputs else None
        if m == "drop_input" and inputs:
            inputs.pop(i)
        elif m == "dup_input" and inp:
            inputs.append(json.loads(json.dumps(inp)))
        elif m == "datatype" and inp:
            inp["datatype"] = draw(st.sampled_from(DATATYPES))
        elif m == "shape_dim" and inp and inp["shape"]:
            inp["shape"][draw(st.integers(0, len(inp["shape"]) - 1))] = draw(st.integers(-1, 12))
        elif m == "shape_len" and inp:
            inp["shape"] = inp["shape"][:-1] if draw(st.booleans()) else [*inp["shape"], 1]
        elif m == "batch_mismatch" and len(inputs) == 2:
            inputs[1]["shape"][0] = draw(st.integers(1, MAX_BATCH + 1))
        elif m == "binary_size" and inp and "parameters" in inp:
            inp["parameters"]["binary_data_size"] += draw(st.integers(-4, 4))
        elif m == "name" and inp:
            inp["name"] = draw(st.sampled_from(NAMES))
        elif m == "data_len" and inp and "data" in inp:
            inp["data"] = inp["data"][:-1] if draw(st.booleans()) else [*inp["data"], 0]
        elif m == "data_value" and inp and inp.get("data"):
            inp["data"][0] = draw(st.one_of(json_scalars, st.lists(st.integers(0, 3), max_size=2)))
        elif m == "output_name" and "outputs" in header:
            header["outputs"][0]["name"] = draw(st.sampled_from(NAMES))
        elif m == "blob_trunc" and blob:
            blob = blob[:-1]
        elif m == "blob_extra":
            blob += b"\x00"
        elif m == "header_length":
            hl_delta = draw(st.sampled_from([-1, 1]))
        elif m == "no_header_length":
            with_hl = False
    head = json.dumps(header).encode()
    body = head + blob if with_hl else head
    return body, (len(head) + hl_delta if with_hl else None), mutations


@fuzz(800)
@given(req=near_valid_http())
def test_decode_http_near_valid_and_gateway_agrees(req):
    RUNS["v2_codec.decode_http/near-valid"] += 1
    body, header_length, mutations = req
    try:
        decoded = decode_http(body, header_length, SIG)
    except InferError as exc:
        assert exc.http_status == 400 and exc.message
        if not mutations and header_length is not None and header_length >= 0:
            raise AssertionError(f"an unmutated valid request was refused: {exc.message}") from None
        return
    RUNS["v2_codec.decode_http/near-valid (accepted)"] += 1
    assert set(decoded.feeds) == {"INPUT0", "INPUT1"}
    # Differential: the gateway never refuses what the replica accepts (no false 400s at the door).
    header, binary_len = parse_http_header(body, None if header_length is None else str(header_length), None)
    check_http("fuzz", header, binary_len, SPECS)


GRPC_MUTATIONS = ["drop_input", "dup_input", "datatype", "shape_dim", "shape_len", "batch_mismatch", "name",
                  "raw_trunc", "raw_extra_blob", "raw_drop_blob", "contents_len", "output_name"]


@st.composite
def near_valid_grpc(draw):
    x0, x1 = draw(valid_tensors())
    req = service_pb2.ModelInferRequest(model_name="fuzz")
    raw = draw(st.booleans())
    for name, dt, arr in (("INPUT0", "FP32", x0), ("INPUT1", "INT64", x1)):
        t = req.inputs.add(name=name, datatype=dt, shape=list(arr.shape))
        if raw:
            req.raw_input_contents.append(arr.tobytes())
        elif dt == "FP32":
            t.contents.fp32_contents.extend(arr.reshape(-1).tolist())
        else:
            t.contents.int64_contents.extend(arr.reshape(-1).tolist())
    if draw(st.booleans()):
        req.outputs.add(name="OUTPUT0")
    mutations = draw(st.lists(st.sampled_from(GRPC_MUTATIONS), max_size=2))
    for m in mutations:
        i = draw(st.integers(0, max(0, len(req.inputs) - 1)))
        t = req.inputs[i] if req.inputs else None
        if m == "drop_input" and t is not None:
            del req.inputs[i]
        elif m == "dup_input" and t is not None:
            req.inputs.add().CopyFrom(t)
        elif m == "datatype" and t is not None:
            t.datatype = draw(st.sampled_from(DATATYPES))
        elif m == "shape_dim" and t is not None and t.shape:
            t.shape[draw(st.integers(0, len(t.shape) - 1))] = draw(st.integers(-1, 12))
        elif m == "shape_len" and t is not None:
            if draw(st.booleans()) and t.shape:
                del t.shape[-1]
            else:
                t.shape.append(1)
        elif m == "batch_mismatch" and len(req.inputs) == 2:
            req.inputs[1].shape[0] = draw(st.integers(1, MAX_BATCH + 1))
        elif m == "name" and t is not None:
            t.name = draw(st.sampled_from(NAMES))
        elif m == "raw_trunc" and req.raw_input_contents:
            req.raw_input_contents[i % len(req.raw_input_contents)] = req.raw_input_contents[0][:-1]
        elif m == "raw_extra_blob":
            req.raw_input_contents.append(b"\x00" * 8)
        elif m == "raw_drop_blob" and req.raw_input_contents:
            del req.raw_input_contents[-1]
        elif m == "contents_len" and t is not None and t.HasField("contents"):
            if t.contents.fp32_contents:
                t.contents.fp32_contents.append(0.0)
            else:
                t.contents.int64_contents.append(0)
        elif m == "output_name" and req.outputs:
            req.outputs[0].name = draw(st.sampled_from(NAMES))
    return req, mutations


@fuzz(800)
@given(case=near_valid_grpc())
def test_decode_grpc_near_valid_and_gateway_agrees(case):
    RUNS["v2_codec.decode_grpc/near-valid"] += 1
    req, mutations = case
    try:
        decode_grpc(req, SIG)
    except InferError as exc:
        assert exc.http_status == 400 and exc.message
        if not mutations:
            raise AssertionError(f"an unmutated valid request was refused: {exc.message}") from None
        return
    RUNS["v2_codec.decode_grpc/near-valid (accepted)"] += 1
    check_grpc("fuzz", peek_infer_request(req.SerializeToString()), SPECS)  # no false 400 at the gateway


@fuzz(1000)
@given(raw=st.binary(max_size=300))
def test_decode_grpc_random_bytes(raw):
    RUNS["v2_codec.decode_grpc/bytes"] += 1
    try:
        request = service_pb2.ModelInferRequest.FromString(raw)
    except DecodeError:
        return
    try:
        decode_grpc(request, SIG)
    except InferError as exc:
        assert exc.http_status == 400 and exc.message


@st.composite
def grpc_request(draw):
    req = service_pb2.ModelInferRequest(model_name=draw(st.text(max_size=8)), model_version=draw(st.text(max_size=3)),
                                        id=draw(st.text(max_size=5)))
    for _ in range(draw(st.integers(0, 3))):
        t = req.inputs.add(name=draw(st.sampled_from(NAMES)), datatype=draw(st.sampled_from(DATATYPES)))
        t.shape.extend(draw(st.lists(st.integers(-3, 10), max_size=4)))
        kind = draw(st.integers(0, 4))
        if kind == 1:
            t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32, allow_nan=False), max_size=40)))
        elif kind == 2:
            t.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20)))
        elif kind == 3:
            t.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=4), max_size=3)))
        if draw(st.booleans()):
            t.parameters["binary_data_size"].int64_param = draw(st.integers(-1, 100))
    if draw(st.booleans()):
        for _ in range(draw(st.integers(0, 4))):
            req.raw_input_contents.append(draw(st.binary(max_size=80)))
    for _ in range(draw(st.integers(0, 2))):
        req.outputs.add(name=draw(st.sampled_from(NAMES)))
    if draw(st.booleans()):
        req.parameters["timeout"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    if draw(st.booleans()):
        req.parameters["priority"].uint64_param = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        req.parameters["tag"].string_param = draw(st.text(max_size=5))
    if draw(st.booleans()):
        req.parameters["sequence_start"].bool_param = draw(st.booleans())
    if draw(st.booleans()):
        seq = req.parameters["sequence_id"]
        if draw(st.booleans()):
            seq.string_param = draw(st.text(max_size=8))
        else:
            seq.uint64_param = draw(st.integers(0, 2**64 - 1))
    return req


@fuzz(500)
@given(req=grpc_request())
def test_decode_grpc_structured(req):
    RUNS["v2_codec.decode_grpc/structured"] += 1
    try:
        decoded = decode_grpc(req, SIG)
    except InferError as exc:
        assert exc.http_status == 400 and exc.message
        return
    assert set(decoded.feeds) == {"INPUT0", "INPUT1"} and 1 <= decoded.rows <= MAX_BATCH
    RUNS["v2_codec.decode_grpc/structured (accepted)"] += 1
    check_grpc("fuzz", peek_infer_request(req.SerializeToString()), SPECS)  # no false 400 at the gateway


@fuzz(200)
@given(tensors=valid_tensors(), raw=st.booleans())
def test_decode_grpc_round_trip(tensors, raw):
    RUNS["v2_codec.decode_grpc/round-trip"] += 1
    x0, x1 = tensors
    req = service_pb2.ModelInferRequest(model_name="fuzz", id="r1")
    t0 = req.inputs.add(name="INPUT0", datatype="FP32", shape=list(x0.shape))
    t1 = req.inputs.add(name="INPUT1", datatype="INT64", shape=list(x1.shape))
    if raw:
        req.raw_input_contents.extend([x0.tobytes(), x1.tobytes()])
    else:
        t0.contents.fp32_contents.extend(x0.reshape(-1).tolist())
        t1.contents.int64_contents.extend(x1.reshape(-1).tolist())
    wire = req.SerializeToString()
    decoded = decode_grpc(service_pb2.ModelInferRequest.FromString(wire), SIG)
    np.testing.assert_array_equal(decoded.feeds["INPUT0"], x0)
    np.testing.assert_array_equal(decoded.feeds["INPUT1"], x1)
    # The gateway's peek and checks see the same request.
    peek = peek_infer_request(wire)
    assert peek.model_name == "fuzz" and peek.id == "r1"
    assert [(t.name, t.datatype, tuple(t.shape)) for t in peek.inputs] == \
        [("INPUT0", "FP32", x0.shape), ("INPUT1", "INT64", x1.shape)]
    check_grpc("fuzz", peek, SPECS)


# ---------------------------------------------------------------------------- proto_peek (gateway)


@fuzz(2000)
@given(raw=st.binary(max_size=300))
def test_peek_random_bytes(raw):
    RUNS["proto_peek.peek_infer_request/bytes"] += 1
    try:
        peek = peek_infer_request(raw)
    except ProtoError:
        return
    # Whatever the peek accepts, it accepts consistently with the protobuf runtime.
    try:
        full = service_pb2.ModelInferRequest.FromString(raw)
    except DecodeError:
        return  # the replica will refuse it (INVALID_ARGUMENT); the gateway only routed it
    assert peek.model_name == full.model_name
    assert peek.model_version == full.model_version
    assert peek.id == full.id
    assert len(peek.inputs) == len(full.inputs)
    for p, f in zip(peek.inputs, full.inputs, strict=True):
        assert (p.name, p.datatype, p.shape) == (f.name, f.datatype, list(f.shape))
    assert peek.raw_input_lengths == [len(b) for b in full.raw_input_contents]


@fuzz(500)
@given(req=grpc_request(), version=st.text(max_size=6))
def test_peek_round_trip(req, version):
    RUNS["proto_peek.peek_infer_request/round-trip"] += 1
    wire = req.SerializeToString()
    peek = peek_infer_request(wire)
    assert peek.model_name == req.model_name
    assert peek.model_version == req.model_version
    assert peek.id == req.id
    assert [(t.name, t.datatype, t.shape, t.has_contents) for t in peek.inputs] == \
        [(t.name, t.datatype, list(t.shape), t.HasField("contents")) for t in req.inputs]
    assert peek.raw_input_lengths == [len(b) for b in req.raw_input_contents]
    expected_ints = {k: (v.int64_param if v.WhichOneof("parameter_choice") == "int64_param" else v.uint64_param)
                     for k, v in req.parameters.items()
                     if v.WhichOneof("parameter_choice") in ("int64_param", "uint64_param")}
    assert peek.int_parameters == expected_ints
    expected_others = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in req.parameters.items()
                       if v.WhichOneof("parameter_choice") in ("bool_param", "string_param")}
    assert peek.other_parameters == expected_others
    # Appending model_version never changes anything else.
    rewritten = with_model_version(wire, version)
    again = service_pb2.ModelInferRequest.FromString(rewritten)
    assert again.model_version == version
    assert peek_infer_request(rewritten).model_version == version
    again.model_version = req.model_version
    assert again == req
    try:
        check_grpc(req.model_name, peek, SPECS)
    except RequestError as exc:
        assert exc.status in (400, 413) and str(exc)


@fuzz(1000)
@given(raw=st.binary(max_size=200))
def test_peek_response_version_random_bytes(raw):
    RUNS["proto_peek.peek_response_version/bytes"] += 1
    try:
        version = peek_response_version(raw)
    except ProtoError:
        return
    assert isinstance(version, str)


@fuzz(500)
@given(name=st.text(max_size=10), version=st.text(max_size=5), rid=st.text(max_size=5),
       blobs=st.lists(st.binary(max_size=50), max_size=3))
def test_peek_response_version_round_trip(name, version, rid, blobs):
    RUNS["proto_peek.peek_response_version/round-trip"] += 1
    resp = service_pb2.ModelInferResponse(model_name=name, model_version=version, id=rid)
    for i, b in enumerate(blobs):
        resp.outputs.add(name=f"OUT{i}", datatype="UINT8", shape=[len(b)])
        resp.raw_output_contents.append(b)
    assert peek_response_version(resp.SerializeToString()) == version


# ---------------------------------------------------------------------------- request_checks (gateway)


@fuzz(1000)
@given(body=st.binary(max_size=300), header_len=st.one_of(st.none(), st.text(max_size=4),
                                                           st.integers(-3, 320).map(str)),
       encoding=st.sampled_from([None, "identity", "gzip", "deflate", "br", ""]))
def test_parse_http_header_random(body, header_len, encoding):
    RUNS["request_checks.parse_http_header/bytes"] += 1
    try:
        header, binary_len = parse_http_header(body, header_len, encoding)
    except RequestError as exc:
        assert exc.status in (400, 413) and str(exc)
        return
    assert isinstance(header, dict) and binary_len >= 0


@fuzz(500)
@given(req=http_request(), with_specs=st.booleans(), compress=st.sampled_from([None, "gzip", "deflate"]))
def test_check_http_structured(req, with_specs, compress):
    RUNS["request_checks.check_http/structured"] += 1
    body, header_length, _ = req
    if compress == "gzip":
        body = gzip.compress(body)
    elif compress == "deflate":
        body = zlib.compress(body)
    try:
        header, binary_len = parse_http_header(body, None if header_length is None else str(header_length),
                                               compress)
        check_http("fuzz", header, binary_len, SPECS if with_specs else None)
    except RequestError as exc:
        assert exc.status in (400, 413) and str(exc)


@fuzz(500)
@given(req=grpc_request(), with_specs=st.booleans())
def test_check_grpc_structured(req, with_specs):
    RUNS["request_checks.check_grpc/structured"] += 1
    peek = peek_infer_request(req.SerializeToString())
    try:
        check_grpc("fuzz", peek, SPECS if with_specs else None)
    except RequestError as exc:
        assert exc.status in (400, 413) and str(exc)


@fuzz(1000)
@given(data=st.one_of(st.binary(max_size=200),
                      st.binary(max_size=2000).map(gzip.compress),
                      st.binary(max_size=2000).map(zlib.compress),
                      st.tuples(st.binary(max_size=300), st.binary(max_size=300)).map(
                          lambda ab: gzip.compress(ab[0]) + gzip.compress(ab[1]))),
       encoding=st.sampled_from(["gzip", "deflate"]), limit=st.integers(0, 2500), cut=st.integers(0, 40))
def test_decode_body_is_bounded(data, encoding, limit, cut):
    """Whatever the bytes: the decoded body is at most `limit` bytes or BodyTooLarge (413); else
    a TranslateError (400); and what decodes equals what the stdlib decodes."""
    RUNS["translate.decode_body/bytes"] += 1
    if cut and cut < len(data):
        data = data[:-cut]
    try:
        out = decode_body(data, encoding, limit)
    except BodyTooLarge:
        full = _stdlib_decode(data, encoding)
        assert full is None or len(full) > limit
        return
    except TranslateError:
        return
    assert len(out) <= limit
    assert out == _stdlib_decode(data, encoding)


def _stdlib_decode(data: bytes, encoding: str) -> bytes | None:
    try:
        return gzip.decompress(data) if encoding == "gzip" else zlib.decompress(data)
    except (OSError, zlib.error, EOFError):
        return None


class _FakeTransport:
    def __init__(self):
        self.written = b""
        self.closed = False

    def is_closing(self):
        return self.closed

    def write(self, data):
        self.written += data

    def writelines(self, data):
        self.written += b"".join(data)

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def get_extra_info(self, name, default=None):
        return default


class _FakeInner:
    def __init__(self):
        self.fed = b""

    def connection_made(self, transport):
        pass

    def data_received(self, data):
        self.fed += data


class _Clock:
    def __init__(self):
        self.soon = []

    def time(self):
        return 0.0

    def call_soon(self, fn, *args):
        self.soon.append((fn, args))

    def call_later(self, delay, fn, *args):
        pass

    def run_soon(self):
        while self.soon:
            fn, args = self.soon.pop(0)
            fn(*args)


class _ConnTransport(_FakeTransport):
    eof = False

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def _connection(limit: int, max_body: int = 1 << 20):
    """A ClientConnection with every request handed to the (fake) aiohttp protocol."""
    from gateway.front.http_connection import ClientConnection
    from gateway.front.request_checks import ClientErrorLog
    from gateway.front.slow_clients import GuardLimits

    limits = GuardLimits(10.0, limit, ClientErrorLog(logging.getLogger("fuzz.connection")), max_body_bytes=max_body)
    limits.loop = _Clock()
    inner = _FakeInner()
    conn = ClientConnection(None, lambda: inner, limits, {})
    conn.connection_made(_ConnTransport())
    return conn, inner


def _answer_all(conn) -> None:
    """aiohttp answers every request handed to it, and the loop runs what follows."""
    while conn._busy:
        conn.request_done()
        conn.limits.loop.run_soon()


def _parse_all(data: bytes) -> list[tuple]:
    """(method, url, headers but framing ones, body) of every request in `data`."""
    import httptools

    out: list[tuple] = []

    class Reader:
        def on_message_begin(self):
            self.url, self.headers, self.body = b"", [], b""

        def on_url(self, url):
            self.url += url

        def on_header(self, name, value):
            if name.lower() not in (b"content-length", b"transfer-encoding", b"expect"):
                self.headers.append((name, value))

        def on_body(self, body):
            self.body += body

        def on_message_complete(self):
            out.append((parser.get_method(), self.url, self.headers, self.body))

    parser = httptools.HttpRequestParser(Reader())
    parser.feed_data(data)
    return out


def _feed_in_pieces(feed, data: bytes, cuts: list[int], stop=lambda: False) -> None:
    pos = 0
    for c in [*sorted(set(cuts)), len(data)]:
        if c <= pos:
            continue
        feed(data[pos:c])
        pos = c
        if stop():
            return


_TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "-_.~!", min_size=1, max_size=12)
_VALUE = st.text(alphabet=string.ascii_letters + string.digits + " -_.,;=/", max_size=40).map(str.strip)


@st.composite
def _requests(draw) -> tuple[bytes, int]:
    """One well-formed request (canonical header lines) and the size of its head."""
    method = draw(st.sampled_from(["POST", "GET", "PUT", "DELETE"]))
    path = "/" + draw(st.text(alphabet=string.ascii_letters + "/-_.?=&%0123456789", max_size=60))
    special = ("host", "content-length", "transfer-encoding", "connection", "upgrade", "expect")
    headers = [("Host", "gw"), *draw(st.lists(st.tuples(_TOKEN.filter(lambda t: t.lower() not in special), _VALUE),
                                              max_size=8))]
    body = draw(st.binary(max_size=80))
    chunked = draw(st.booleans()) and method == "POST"
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
        sizes = draw(st.lists(st.integers(1, 30), max_size=4))
        payload, rest = b"", body
        for n in sizes:
            payload += f"{n:x}\r\n".encode() + (rest[:n].ljust(n, b"x")) + b"\r\n"
            rest = rest[n:]
        body = payload + b"0\r\n\r\n"
    else:
        headers.append(("Content-Length", str(len(body))))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode() + body, len(head)


@fuzz(300)
@given(reqs=st.lists(_requests(), min_size=1, max_size=4), limit=st.integers(40, 400),
       cuts=st.lists(st.integers(1, 1500), max_size=10), answer_each=st.booleans())
def test_client_connection_pipelined_requests(reqs, limit, cuts, answer_each):
    """However pipelined requests are split into packets, the connection hands aiohttp each
    request whole (same method, target, headers and body; framing may change), one at a time,
    when every head is within `limit` bytes; the first head over it is refused (431, JSON) - at
    once when everything before it was answered, otherwise only after those answers."""
    RUNS["http_connection.ClientConnection/pipelined"] += 1
    conn, inner = _connection(limit)
    data = b"".join(r for r, _ in reqs)

    def feed(piece: bytes) -> None:
        conn.data_received(piece)
        if answer_each:
            _answer_all(conn)

    _feed_in_pieces(feed, data, cuts, stop=lambda: conn.state >= conn.CLOSED)
    first_big = next((i for i, (_, n) in enumerate(reqs) if n > limit), None)
    if first_big is None:
        assert len(_parse_all(inner.fed)) == (len(reqs) if answer_each else 1)  # one at a time
        _answer_all(conn)
        assert _parse_all(inner.fed) == _parse_all(data) and conn.transport.written == b""
        return
    if not answer_each and first_big > 0:  # earlier requests unanswered: nothing written yet
        assert conn.state == conn.REFUSING and conn.transport.written == b""
    _answer_all(conn)
    assert _parse_all(inner.fed) == _parse_all(data)[:first_big]  # the oversized head was never handed over
    assert conn.transport.eof and conn.transport.written.startswith(b"HTTP/1.1 431 ")
    assert json.loads(conn.transport.written.partition(b"\r\n\r\n")[2])["error"]


@fuzz(300)
@given(req=_requests(), limit=st.integers(40, 400), cut=st.integers(0, 600), cuts=st.lists(st.integers(1, 600),
                                                                                             max_size=6))
def test_client_connection_truncated_requests(req, limit, cut, cuts):
    """A request cut short anywhere: refused (431) only once more than `limit` bytes of its head
    arrived; otherwise handed over when whole, or still waiting (the sweep's to time out)."""
    RUNS["http_connection.ClientConnection/truncated"] += 1
    data, head_len = req
    whole = len(data)
    data = data[:cut]
    conn, inner = _connection(limit)
    _feed_in_pieces(conn.data_received, data, cuts, stop=lambda: conn.state >= conn.CLOSED)
    if conn.transport.written:
        assert conn.transport.written.startswith(b"HTTP/1.1 431 ") and min(cut, head_len) > limit
    elif cut >= whole:
        assert head_len <= limit and _parse_all(inner.fed) == _parse_all(data)
    else:
        assert inner.fed == b"" and conn.overdue(100.0) is not None  # the sweep times it out


@fuzz(500)
@given(raw=st.binary(max_size=300), prefix=st.booleans(), cuts=st.lists(st.integers(1, 400), max_size=5))
def test_client_connection_random_bytes(raw, prefix, cuts):
    """Any bytes: the connection raises nothing; what it hands aiohttp is well-formed HTTP/1.1,
    and what it answers itself is a 400/413/431 with a JSON body, then the end of the connection."""
    RUNS["http_connection.ClientConnection/bytes"] += 1
    data = (b"POST /v2/models/m/infer HTTP/1.1\r\n" if prefix else b"") + raw
    conn, inner = _connection(200, max_body=100)

    def feed(piece: bytes) -> None:
        conn.data_received(piece)
        if conn.state != conn.PASS:
            _answer_all(conn)

    _feed_in_pieces(feed, data, cuts, stop=lambda: conn.state >= conn.CLOSED)
    written = conn.transport.written.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"")
    if written:
        assert written[9:12] in (b"400", b"413", b"431"), written
        assert json.loads(written.partition(b"\r\n\r\n")[2])["error"]
        assert conn.transport.eof or conn.transport.closed
    if conn.state != conn.PASS:  # an upgrade hands aiohttp the raw rest
        _parse_all(inner.fed)  # raises on malformed HTTP


@st.composite
def _chunked_answers(draw) -> tuple[bytes, bytes]:
    """A chunked answer (chunk extensions, trailers, any chunk sizes) and its body."""
    parts = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    for p in parts:
        ext = draw(st.sampled_from([b"", b";a=1", b";name"]))
        hexsize = draw(st.sampled_from([f"{len(p):x}", f"{len(p):X}", f"{len(p):04x}"])).encode()
        out += hexsize + ext + b"\r\n" + p + b"\r\n"
    trailers = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n", b"A: b\r\nC: d\r\n"]))
    return out + b"0\r\n" + trailers + b"\r\n", b"".join(parts)


def _conn_exchange(answers: bytes, cuts: list[int], n_requests: int) -> tuple[list, object]:
    """Drive the upstream client's connection with `answers` in pieces, one request at a time."""
    import asyncio

    from gateway.upstream.http1_client import _Conn

    loop = asyncio.new_event_loop()
    try:
        conn = _Conn()
        conn.connection_made(_FakeTransport())
        results: list = []
        waiter = loop.create_future()
        conn.send(b"POST / HTTP/1.1\r\n\r\n", waiter)

        def feed(piece: bytes) -> None:
            nonlocal waiter
            conn.data_received(piece)
            if waiter.done():
                results.append(waiter.exception() or waiter.result())
                if len(results) < n_requests and conn.keep_alive and not conn.closed:
                    waiter = loop.create_future()
                    conn.send(b"POST / HTTP/1.1\r\n\r\n", waiter)

        _feed_in_pieces(feed, answers, cuts, stop=lambda: len(results) >= n_requests or not conn.keep_alive)
        return results, conn
    finally:
        loop.close()


@fuzz(400)
@given(answers=st.lists(_chunked_answers(), min_size=1, max_size=3), cuts=st.lists(st.integers(1, 900), max_size=12))
def test_http1_client_chunked_answers_in_any_split(answers, cuts):
    """Keep-alive chunked answers split anywhere: each request gets exactly its body, and the
    connection stays usable for the next."""
    RUNS["http1_client._Conn/chunked"] += 1
    ends = [sum(len(a) for a, _ in answers[:i + 1]) for i in range(len(answers))]
    # the next answer comes only after the next request: never in one packet with the previous one
    results, conn = _conn_exchange(b"".join(a for a, _ in answers), cuts + ends, len(answers))
    assert [(r.status, r.body) for r in results] == [(200, body) for _, body in answers]
    assert conn.keep_alive


@fuzz(500)
@given(raw=st.binary(max_size=200), head=st.booleans(), cuts=st.lists(st.integers(1, 300), max_size=5))
def test_http1_client_any_answer_bytes(raw, head, cuts):
    """Any answer bytes: a Response or UpstreamReset (the connection then unusable), nothing else."""
    from gateway.upstream.http1_client import Response, UpstreamReset

    RUNS["http1_client._Conn/bytes"] += 1
    data = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" if head else b"") + raw
    results, conn = _conn_exchange(data, cuts, 1)
    for r in results:
        assert isinstance(r, Response | UpstreamReset), r
        if isinstance(r, UpstreamReset):
            assert not conn.keep_alive and str(r)


@fuzz(500)
@given(raw=st.binary(max_size=300))
def test_manifest_random_bytes(raw):
    RUNS["manifest.Manifest.from_bytes/bytes"] += 1
    try:
        m = Manifest.from_bytes(raw)
    except ManifestError as exc:
        assert str(exc)
        return
    assert all(".." not in f.path.split("/") and not f.path.startswith("/") for f in m.files)


_SIGNING_KEY = Ed25519PrivateKey.generate()


@fuzz(500)
@given(who=st.text(max_size=10), files=st.lists(st.tuples(st.text(alphabet="abc/.", min_size=1, max_size=8),
                                                          st.integers(0, 10**9)), max_size=4),
       field_name=st.sampled_from(["name", "version", "who", "when", "time_s", "size", "sha256", "path", "extra",
                                   "key_id"]),
       value=st.one_of(st.text(max_size=5), st.integers(-5, 5)))
def test_manifest_signature_covers_every_field(who, files, field_name, value):
    """A signed manifest verifies after a trip through the store's bytes, and any change to any
    member (a file's checksum, who, a new member) makes the signature check refuse it."""
    RUNS["manifest.signature/tamper"] += 1
    entries = [FileEntry(p, n, format(n, "064x")) for p, n in files]
    m = sign_manifest(Manifest("demo", "3", entries, who=who, when="2026-01-01T00:00:00+00:00", time_s=1.5),
                      _SIGNING_KEY)
    public = _SIGNING_KEY.public_key()
    try:
        read = Manifest.from_bytes(m.to_bytes())
    except ManifestError:
        return  # an unsafe path in the fuzzed file list: refused before any signature matters
    assert signature_problem(read, public) == ""
    doc = json.loads(m.to_bytes())
    if field_name in ("size", "sha256", "path"):
        if not doc["files"]:
            return
        doc["files"][0][field_name] = value
    elif field_name == "key_id":
        doc["signature"]["key_id"] = str(value)
    else:
        doc[field_name] = value
    try:
        tampered = Manifest.from_bytes(json.dumps(doc).encode())
    except ManifestError:
        return
    if field_name == "key_id":  # not covered by the signature: it is only a hint for the message
        assert signature_problem(tampered, public) == ""
    elif json.loads(m.to_bytes()) != doc:
        assert signature_problem(tampered, public), (field_name, value)


@fuzz(300)
@given(texts=st.lists(st.text(alphabet=st.characters(codec=None, exclude_categories=[]), max_size=20),
                      min_size=4, max_size=4))
def test_access_log_takes_any_text(texts):
    """Found by schemathesis (test_non_utf8_request_id_is_not_a_500): a str with lone surrogates
    made orjson raise inside the request. Any text now gives one valid JSON line."""
    import io

    from gateway.front.access_log import AccessLog, request_id_from

    RUNS["access_log.AccessLog.log/text"] += 1
    out = io.BytesIO()
    log = AccessLog(stream=out)
    rid = request_id_from(texts[0])
    assert rid.isascii() and rid.isprintable() and 0 < len(rid) <= 128
    log.log(request_id=texts[0], protocol="http", model=texts[1], version=texts[2], status=400, replica="",
            attempts=0, duration_s=0.0, outcome="rejected", error=texts[3])
    log.flush()
    line = json.loads(out.getvalue())
    assert line["outcome"] == "rejected"


# ---------------------------------------------------------------------------- GeoDNS responder

DNS_CONFIG = """
[dns]
zone = "geogate.test."
service = "infer.geogate.test."
ns_addresses = ["192.0.2.53", "2001:db8::53"]

[[regions]]
name = "eu-west"
location = [53.35, -6.26]
addresses = ["192.0.2.10", "2001:db8::10"]
client_cidrs = ["198.51.100.0/24"]

[[regions]]
name = "us-east"
location = [38.9, -77.0]
http = "127.0.0.1:18200"
grpc = "127.0.0.1:18201"
admin = "127.0.0.1:18202"
addresses = ["192.0.2.20"]
"""


@pytest.fixture(scope="module")
def responder():
    cfg = parse_config(DNS_CONFIG)
    monitor = RegionHealthMonitor.from_config(cfg)
    monitor.states["eu-west"].healthy = True
    return GeoDnsResponder(cfg, monitor, ClientLocator(cfg.regions))


def _dns_ok(responder, wire: bytes, source: str, udp: bool) -> bytes | None:
    reply = responder.handle(wire, source, udp=udp)  # must never raise
    assert reply is None or isinstance(reply, bytes)
    if reply is not None:
        assert len(reply) >= 12 and reply[:2] == wire[:2]  # same query id
        if udp:
            assert len(reply) <= 1232
    return reply


@fuzz(1000)
@given(wire=st.binary(max_size=600), source=st.sampled_from(["127.0.0.1", "198.51.100.7", "::1", "fe80::1%eth0",
                                                             "not-an-ip"]), udp=st.booleans())
def test_dns_random_packets(responder, wire, source, udp):
    RUNS["dns_server.GeoDnsResponder.handle/bytes"] += 1
    _dns_ok(responder, wire, source, udp)


dns_labels = st.text(alphabet=string.ascii_lowercase + string.digits + "-_*", min_size=1, max_size=12)


@st.composite
def dns_query(draw):
    labels = draw(st.lists(dns_labels, max_size=3))
    suffix = draw(st.sampled_from(["infer.geogate.test.", "geogate.test.", "ns1.geogate.test.", "example.com.",
                                   "x.infer.geogate.test.", "."]))
    name = dns.name.from_text(".".join([*labels, suffix]) if labels and suffix != "." else suffix)
    rdtype = draw(st.sampled_from([dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.ANY, dns.rdatatype.SOA,
                                   dns.rdatatype.NS, dns.rdatatype.TXT, dns.rdatatype.MX, dns.rdatatype.SRV]))
    rdclass = draw(st.sampled_from([dns.rdataclass.IN, dns.rdataclass.CH, dns.rdataclass.ANY]))
    edns = draw(st.sampled_from([-1, 0, 1]))
    options = []
    if edns >= 0 and draw(st.booleans()):
        if draw(st.booleans()):
            options.append(dns.edns.ECSOption(draw(st.sampled_from(["198.51.100.0", "203.0.113.9", "0.0.0.0"])),
                                              draw(st.integers(0, 32))))
        else:
            options.append(dns.edns.ECSOption(draw(st.sampled_from(["2001:db8::", "::"])), draw(st.integers(0, 128))))
    q = dns.message.make_query(name, rdtype, rdclass, use_edns=edns if edns >= 0 else False,
                               payload=draw(st.integers(0, 65535)), options=options or None)
    if draw(st.booleans()):
        q.set_opcode(draw(st.integers(0, 15)))
    if draw(st.integers(0, 9)) == 0:
        q.flags |= dns.flags.QR
    return q


@fuzz(500)
@given(query=dns_query(), udp=st.booleans(), source=st.sampled_from(["127.0.0.1", "198.51.100.7", "2001:db8::1"]))
def test_dns_structured_queries(responder, query, udp, source):
    RUNS["dns_server.GeoDnsResponder.handle/structured"] += 1
    wire = query.to_wire()
    reply = _dns_ok(responder, wire, source, udp)
    if query.flags & dns.flags.QR:
        assert reply is None  # never answer a response (reflection loops)
        return
    assert reply is not None
    response = dns.message.from_wire(reply)
    assert response.id == query.id and response.flags & dns.flags.QR
    q = query.question[0]
    if (query.opcode() == 0 and query.edns <= 0 and q.rdclass == dns.rdataclass.IN
            and q.name == dns.name.from_text("infer.geogate.test.") and q.rdtype == dns.rdatatype.A
            and not response.flags & dns.flags.TC):
        assert response.rcode() == dns.rcode.NOERROR
        addresses = {r.address for rr in response.answer for r in rr}
        assert addresses == {"192.0.2.10"}  # the only healthy region with an IPv4 address


# ---------------------------------------------------------------------------- config loader


TOML_TOKENS = [*'[]{}=".,\n #-_:/0123456789abcdefglnrstuxyz\'\\', "true", "false", "regions", "pools", "name",
               "http", "127.0.0.1:1", "\u00b2", "nan", "inf", "[[regions]]", "[[regions.pools]]"]


@fuzz(1000)
@given(text=st.lists(st.sampled_from(TOML_TOKENS), max_size=80).map("".join))
def test_config_random_text(text):
    RUNS["config.parse_config/text"] += 1
    try:
        parse_config(text)
    except ConfigError as exc:
        assert str(exc)


# Values that fit each key's type or nearly (so the validators, not only the type checks, run).
host_ports = st.one_of(st.sampled_from(["127.0.0.1:8000", "[::1]:80", "h:0", "h:65536", ":1", "h:", "h:x",
                                        "127.0.0.1:\u00b2", "h:1\u0661"]), st.text(max_size=12))
SECTION_VALUES = {
    "deployment": {"name": st.text(max_size=8)},
    "store": {"url": st.sampled_from(["file:///x", "s3://b/p", "http://x", "", "file://"])},
    "routing": {"mode": st.sampled_from(["local-first", "nearest-to-client", "x"]),
                "cutover": st.sampled_from(["global", "per-site", ""]),
                "overprovisioning_factor": st.one_of(st.floats(), st.integers(-2, 3)),
                "failback_hold_ms": st.integers(-5, 10**6),
                "trusted_proxies": st.lists(st.sampled_from(["10.0.0.0/8", "::1/128", "x", "1.2.3.4/33"]),
                                            max_size=3)},
    "health": {"interval_ms": st.integers(-5, 10**6), "timeout_ms": st.integers(-1, 10), "rise": st.integers(-1, 5),
               "max_ejection_percent": st.integers(-5, 200), "panic_threshold": st.floats()},
    "gateway": {"default_timeout_ms": st.integers(-5, 10**9), "max_attempts": st.integers(-1, 5),
                "retry_budget_percent": st.floats(), "access_log": st.booleans(), "metrics": host_ports},
    "dns": {"listen": host_ports, "ttl": st.integers(-3, 100), "answers": st.integers(0, 3),
            "ns_addresses": st.lists(st.sampled_from(["192.0.2.1", "::1", "300.1.1.1", ""]), max_size=3),
            "metrics": host_ports},
    "auth": {"keys_file": st.sampled_from(["", "keys.toml"]), "reload_interval_ms": st.integers(-2, 5000),
             "open_metadata": st.booleans(), "peer_key_env": st.text(max_size=6)},
    "tls": {"cert_file": st.sampled_from(["", "a.crt"]), "key_file": st.sampled_from(["", "a.key"]),
            "client_ca_file": st.sampled_from(["", "ca.crt"]), "check_interval_ms": st.integers(-1, 10),
            "admin": st.booleans()},
    "limits": {"max_header_bytes": st.integers(-1, 10**6), "max_tensor_elements": st.integers(-1, 10**9),
               "request_head_timeout_ms": st.integers(-1, 10**5), "request_body_timeout_ms": st.integers(-1, 10),
               "idle_timeout_ms": st.integers(-1, 10**6)},
    "signing": {"public_key_file": st.sampled_from(["", "k.pub"]), "private_key_file": st.text(max_size=4)},
}
pool_tables = st.fixed_dictionaries(
    {"name": st.sampled_from(["p1", "p2", ""])},
    optional={"kind": st.sampled_from(["geogate", "triton", "other"]),
              "replicas": st.lists(st.sampled_from(["grpc://127.0.0.1:1", "http://h:2", "https://h:3", "ftp://h:1",
                                                    "grpc://h", "grpc://h:\u00b2"]), max_size=3),
              "discover": st.sampled_from(["", "dns+srv://_grpc._tcp.x.", "dns+srv://", "srv://x"]),
              "weights": st.dictionaries(st.sampled_from(["grpc://127.0.0.1:1", "x"]), st.integers(-1, 5), max_size=2)})
region_tables = st.fixed_dictionaries(
    {"name": st.sampled_from(["eu", "us", "eu"])},
    optional={"location": st.lists(st.one_of(st.floats(), st.integers(-200, 200)), max_size=3),
              "http": host_ports, "grpc": host_ports,
              "addresses": st.lists(st.sampled_from(["192.0.2.1", "2001:db8::1", "x"]), max_size=2),
              "client_cidrs": st.lists(st.sampled_from(["198.51.100.0/24", "1.2.3.4/99", "::/0"]), max_size=2),
              "pools": st.lists(pool_tables, max_size=2)})


@st.composite
def config_tables(draw):
    doc: dict = {}
    for section, fields in SECTION_VALUES.items():
        if draw(st.booleans()):
            doc[section] = {k: draw(v) for k, v in fields.items() if draw(st.booleans())}
    if draw(st.booleans()):
        doc["regions"] = draw(st.lists(region_tables, max_size=3))
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.sampled_from(["gatway", "regions", "dns"]))] = draw(json_scalars)
    return doc


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        return '""'
    raise TypeError(type(v))


def to_toml(doc: dict) -> str:
    return "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items()) + "\n"


@fuzz(500)
@given(doc=config_tables())
def test_config_structured_tables(doc):
    RUNS["config.parse_config/structured"] += 1
    text = to_toml(doc)
    try:
        cfg = parse_config(text)
    except ConfigError as exc:
        assert str(exc)
        return
    # Accepted: the sections given are what the loader returns.
    for section, fields in doc.items():
        if section == "regions":
            assert [r.name for r in cfg.regions] == [r["name"] for r in fields]
        elif isinstance(fields, dict):
            for k, v in fields.items():
                got = getattr(getattr(cfg, section), k)
                assert got == v or (isinstance(v, float) and v != v) or (isinstance(v, int) and got == float(v))


# ---------------------------------------------------------------------------- regressions


def test_config_non_ascii_digit_port_regression():
    """Found by test_config_structured_tables (it failed CI): `listen = "127.0.0.1:²"` escaped as
    a bare ValueError (the CLI only catches ConfigError: a traceback instead of a message naming
    dns.listen). Replica URLs and every HOST:PORT key go through the same check."""
    with pytest.raises(ConfigError, match=r"dns\.listen: must be HOST:PORT"):
        parse_config('[dns]\nlisten = "127.0.0.1:\u00b2"\n')
    with pytest.raises(ConfigError, match=r"regions\[0\]\.pools\[0\]\.replicas\[0\]"):
        parse_config('[[regions]]\nname = "eu"\n[[regions.pools]]\nname = "p"\nreplicas = ["grpc://h:\u00b2"]\n')


def test_config_arabic_indic_port_is_refused():
    """int('\u0661\u0662') == 12: non-ASCII digits were accepted as port 12."""
    with pytest.raises(ConfigError, match=r"dns\.listen"):
        parse_config('[dns]\nlisten = "127.0.0.1:\u0661\u0662"\n')
    with pytest.raises(ConfigError, match=r"regions\[0\]\.http"):
        parse_config('[[regions]]\nname = "eu"\nhttp = "127.0.0.1:\uff18\uff10"\n')  # fullwidth 80


def test_peek_accepts_unknown_group_field_like_protobuf():
    """Found while checking peek against the protobuf runtime: an unknown field 99 encoded as an
    (empty) group is a legal ModelInferRequest for protobuf, but the peek raised ProtoError and
    the gateway answered INVALID_ARGUMENT. Fixed in gateway.upstream.proto_peek._skip (groups are walked
    to their matching END_GROUP); a stray or mismatched END_GROUP stays an error, as in protobuf."""
    raw = service_pb2.ModelInferRequest(model_name="demo").SerializeToString() + bytes([0x9B, 0x06, 0x9C, 0x06])
    assert service_pb2.ModelInferRequest.FromString(raw).model_name == "demo"
    assert peek_infer_request(raw).model_name == "demo"
    # nested groups, and a group inside a tensor
    nested = bytes([0x9B, 0x06, 0xA3, 0x06, 0x08, 0x01, 0xA4, 0x06, 0x9C, 0x06])
    assert peek_infer_request(raw + nested).model_name == "demo"
    for bad in (bytes([0x9C, 0x06]), bytes([0x9B, 0x06]), bytes([0x9B, 0x06, 0xA4, 0x06])):
        with pytest.raises(DecodeError):
            service_pb2.ModelInferRequest.FromString(raw + bad)
        with pytest.raises(ProtoError):
            peek_infer_request(raw + bad)


unknown_fields = st.lists(st.one_of(
    st.tuples(st.integers(20, 2000), st.just(0), st.integers(0, 2**64 - 1)),
    st.tuples(st.integers(20, 2000), st.just(2), st.binary(max_size=20)),
    st.tuples(st.integers(20, 2000), st.just(5), st.binary(min_size=4, max_size=4)),
    st.tuples(st.integers(20, 2000), st.just(1), st.binary(min_size=8, max_size=8)),
    st.tuples(st.integers(20, 2000), st.just(3), st.integers(0, 2**32))), max_size=5)


def _encode_unknown(fields) -> bytes:
    from gateway.upstream.proto_peek import _encode_varint

    out = b""
    for fno, wire, value in fields:
        tag = _encode_varint((fno << 3) | wire)
        if wire == 0:
            out += tag + _encode_varint(value)
        elif wire == 2:
            out += tag + _encode_varint(len(value)) + value
        elif wire in (1, 5):
            out += tag + value
        else:  # a group holding one varint field, then its END_GROUP
            out += tag + _encode_varint((7 << 3) | 0) + _encode_varint(value) + _encode_varint((fno << 3) | 4)
    return out


@fuzz(500)
@given(req=grpc_request(), extra=unknown_fields, front=st.booleans())
def test_peek_accepts_what_protobuf_accepts(req, extra, front):
    """The other direction of test_peek_random_bytes: a message protobuf parses (here a valid
    request with unknown fields of every wire type, groups included) is never refused by the
    peek, and the peek reads the same routing fields."""
    RUNS["proto_peek.peek_infer_request/unknown-fields"] += 1
    wire = req.SerializeToString()
    unknown = _encode_unknown(extra)
    raw = unknown + wire if front else wire + unknown
    full = service_pb2.ModelInferRequest.FromString(raw)
    peek = peek_infer_request(raw)
    assert (peek.model_name, peek.model_version, peek.id) == (full.model_name, full.model_version, full.id)
    assert len(peek.inputs) == len(full.inputs)


def test_json_infinity_is_refused():
    """Found by test_decode_http_round_trip_tritonclient: tritonclient's JSON encoding of a
    non-finite FP32 (`Infinity`, Python's json extension) is not JSON; the replica and the
    gateway both refuse it with 400 and a message saying the JSON did not parse (binary
    tensors carry such values fine)."""
    x0 = np.array([[0, 0, 0, np.inf]], dtype=np.float32)
    i0 = triton_http.InferInput("INPUT0", [1, 4], "FP32")
    i0.set_data_from_numpy(x0, binary_data=False)
    i1 = triton_http.InferInput("INPUT1", [1, 2], "INT64")
    i1.set_data_from_numpy(np.zeros((1, 2), dtype=np.int64), binary_data=False)
    body, json_size = triton_http.InferenceServerClient.generate_request_body([i0, i1])
    assert b"Infinity" in body
    with pytest.raises(InferError, match="failed to parse the request JSON"):
        decode_http(body, json_size, SIG)
    with pytest.raises(RequestError, match="failed to parse the request JSON"):
        parse_http_header(body, None, None)
    # Binary: fine.
    i0.set_data_from_numpy(x0, binary_data=True)
    body, json_size = triton_http.InferenceServerClient.generate_request_body([i0, i1])
    assert np.isinf(decode_http(body, json_size, SIG).feeds["INPUT0"][0, 3])
