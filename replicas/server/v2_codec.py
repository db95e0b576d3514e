"""KServe v2 inference requests and responses: HTTP JSON (+ binary tensor extension) and gRPC.

Decoding checks each input against the model's signature as it goes (name, datatype, shape,
byte count), so a bad request is refused before any tensor is copied. Binary inputs become
numpy views of the request body (`np.frombuffer`, no copy); binary outputs are appended to the
response as buffers (no `tobytes` copy before the final join).

Every field is type-checked before it is used or quoted in a message (a client's value is never
repr'd whole: a 990-deep nested list made repr() raise RecursionError, a 500). JSON `data`
elements must be JSON numbers for numeric datatypes (integers for integer types, in range) and
true/false for BOOL, and their count must match the shape, for every datatype; binary and gRPC
raw inputs must have exactly the bytes their shape needs.

Binary requests from one client repeat the same JSON header byte for byte (same inputs, shapes,
options), so a header that decoded and validated cleanly is remembered per model version as a
plan (offsets, dtypes, shapes, batch key, requested outputs): the next request with those exact
header bytes skips JSON parsing and validation and only needs the body length to match.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from tritonclient.grpc import service_pb2

from replicas.server.infer_errors import invalid
from replicas.server.signature import ModelSignature

ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
# orjson serializes these numpy dtypes natively; others (float16) go through tolist().
_ORJSON_NUMPY_OK = frozenset("bool uint8 uint16 uint32 uint64 int8 int16 int32 int64 float32 float64".split())

# Header plans: only small headers are remembered, and only so many per model version (a client
# that varies ids or shapes per request just misses; the cache then starts over).
PLAN_MAX_HEADER_BYTES = 4096
PLANS_PER_VERSION = 64

# gRPC typed `contents` field per datatype (FP16 travels only as raw bytes, as in Triton).
GRPC_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(slots=True)
class DecodedRequest:
    """A validated inference request, protocol-independent."""

    id: str
    feeds: dict[str, np.ndarray]
    rows: int
    key: tuple
    outputs: list[RequestedOutput] | None  # None: all outputs
    binary_default: bool


def _finish(sig: ModelSignature, request_id: str, feeds: dict[str, np.ndarray],
            shapes: dict[str, tuple[int, ...]], outputs: list[RequestedOutput] | None,
            binary_default: bool) -> DecodedRequest:
    sig.check_complete(feeds)
    rows, key = sig.batch_rows_and_key(shapes)
    return DecodedRequest(request_id, feeds, rows, key, outputs, binary_default)


# ---------------------------------------------------------------------------------------- HTTP

@dataclass(frozen=True, slots=True)
class _BinaryPlan:
    """What a validated all-binary request header decodes to, for reuse on identical headers."""

    request_id: str
    inputs: tuple[tuple[str, np.dtype, tuple[int, ...], int, int], ...]  # name, dtype, shape, count, offset
    body_length: int
    rows: int
    key: tuple
    outputs: list[RequestedOutput] | None
    binary_default: bool


_PLANS: weakref.WeakKeyDictionary[ModelSignature, dict[bytes, _BinaryPlan]] = weakref.WeakKeyDictionary()


def _from_plan(plan: _BinaryPlan, body: bytes) -> DecodedRequest:
    feeds = {name: np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
             for name, dtype, shape, count, offset in plan.inputs}
    return DecodedRequest(plan.request_id, feeds, plan.rows, plan.key, plan.outputs, plan.binary_default)


def _kind(value: Any) -> str:
    """A client's value named by its JSON type, for messages (never its repr: it may be huge or deep)."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _str_field(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise invalid(f"{what} must be a string, got {_kind(value)}")
    return value


def _object_field(value: Any, what: str) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise invalid(f"{what} must be an object, got {_kind(value)}")
    return value


def _bool_field(params: dict | None, key: str, default: bool, what: str) -> bool:
    value = params.get(key, default) if params is not None else default
    if not isinstance(value, bool):
        raise invalid(f"{what} parameter '{key}' must be true or false, got {_kind(value)}")
    return value


def _shape_field(value: Any, name: str) -> list:
    if not isinstance(value, list) or not all(type(d) is int for d in value):
        raise invalid(f"inference input '{name}' has an invalid shape: expected an array of non-negative integers, "
                      f"got {_kind(value)}" + (" with other elements" if isinstance(value, list) else ""))
    return value


def decode_http(body: bytes | bytearray, header_length: int | None, sig: ModelSignature) -> DecodedRequest:
    """An HTTP infer body (JSON, or JSON + binary blobs when `header_length` is given)."""
    plan_key = None
    if header_length is not None and 0 < header_length <= min(PLAN_MAX_HEADER_BYTES, len(body)):
        plan_key = body[:header_length] if type(body) is bytes else bytes(body[:header_length])
        plans = _PLANS.get(sig)
        plan = plans.get(plan_key) if plans is not None else None
        if plan is not None and plan.body_length == len(body):
            return _from_plan(plan, body)
    try:
        decoded, plan = _decode_http(body, header_length, sig)
    except RecursionError:  # a safety net: every field is type-checked before use
        raise invalid("the request JSON is nested too deeply") from None
    if plan is not None and plan_key is not None:
        plans = _PLANS.get(sig)
        if plans is None:
            plans = _PLANS[sig] = {}
        elif len(plans) >= PLANS_PER_VERSION:
            plans.clear()
        plans[plan_key] = plan
    return decoded


def _decode_http(body: bytes, header_length: int | None, sig: ModelSignature
                 ) -> tuple[DecodedRequest, _BinaryPlan | None]:
    """The full decode; also the plan for these header bytes when every input is binary."""
    if header_length is None:
        header_bytes: Any = body
        blob_offset = len(body)
    else:
        if header_length < 0 or header_length > len(body):
            raise invalid(f"Inference-Header-Content-Length {header_length} is outside the body "
                          f"({len(body)} bytes)")
        header_bytes = memoryview(body)[:header_length]
        blob_offset = header_length
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"failed to parse the request JSON: {exc}") from None
    if not isinstance(header, dict):
        raise invalid("the request JSON must be an object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise invalid("the request JSON has no 'inputs' list")
    request_id = _str_field(header.get("id", ""), "'id'")
    params = _object_field(header.get("parameters"), "'parameters'")
    binary_default = _bool_field(params, "binary_data_output", False, "the request's")
    feeds: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    planned: list[tuple[str, np.dtype, tuple[int, ...], int, int]] | None = []
    for item in inputs:
        if not isinstance(item, dict):
            raise invalid("each entry of 'inputs' must be an object")
        spec = sig.input_spec(_str_field(item.get("name"), "an input's 'name'"))
        if spec.name in feeds:
            raise invalid(f"input '{spec.name}' is given more than once")
        shape = spec.check_header(_str_field(item.get("datatype"), f"input '{spec.name}': 'datatype'"),
                                  _shape_field(item.get("shape"), spec.name))
        iparams = _object_field(item.get("parameters"), f"input '{spec.name}': 'parameters'")
        size = iparams.get("binary_data_size") if iparams is not None else None
        if size is not None:
            if header_length is None:
                raise invalid(f"input '{spec.name}' has binary_data_size but the request has no "
                              "Inference-Header-Content-Length header")
            if type(size) is not int or size < 0:
                raise invalid(f"input '{spec.name}' has an invalid binary_data_size: expected a non-negative "
                              f"integer, got {_kind(size)}")
            spec.check_byte_size(shape, size)
            if blob_offset + size > len(body):
                raise invalid(f"unexpected end of binary data for input '{spec.name}': needs {size} bytes "
                              f"at offset {blob_offset}, the body has {len(body)}")
            count = math.prod(shape)
            arr = np.frombuffer(body, dtype=spec.dtype, count=count, offset=blob_offset)
            if planned is not None:
                planned.append((spec.name, spec.dtype, shape, count, blob_offset))
            blob_offset += size
            feeds[spec.name] = arr.reshape(shape)
        else:
            if "data" not in item:
                raise invalid(f"input '{spec.name}' has neither 'data' nor a binary_data_size parameter")
            feeds[spec.name] = _json_tensor(spec.name, item["data"], spec.datatype, spec.dtype, shape)
            planned = None  # the data lives in the header: nothing to reuse
        shapes[spec.name] = shape
    if blob_offset != len(body):
        raise invalid(f"the request body has {len(body) - blob_offset} bytes of binary data that no "
                      "input claims")
    outputs = None
    wanted = header.get("outputs")
    if wanted is not None:
        if not isinstance(wanted, list):
            raise invalid("'outputs' must be a list")
        outputs = []
        for out in wanted:
            if not isinstance(out, dict):
                raise invalid("each entry of 'outputs' must be an object")
            name = _str_field(out.get("name"), "an output's 'name'")
            sig.check_output_name(name)
            oparams = _object_field(out.get("parameters"), f"output '{name}': 'parameters'")
            if oparams is not None and "classification" in oparams:
                raise invalid(f"output '{name}': the classification extension is not supported")
            binary = _bool_field(oparams, "binary_data", binary_default, f"output '{name}':")
            outputs.append(RequestedOutput(name, binary))
    decoded = _finish(sig, request_id, feeds, shapes, outputs, binary_default)
    plan = None
    if planned is not None and header_length is not None:
        plan = _BinaryPlan(request_id, tuple(planned), len(body), decoded.rows, decoded.key, outputs,
                           binary_default)
    return decoded, plan


# JSON element kinds (numpy's, from the parsed values) each datatype accepts
_JSON_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"}
_INTEGER_KINDS = "iu"


def _json_tensor(name: str, data: Any, datatype: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(data, list):
        raise invalid(f"input '{name}': 'data' must be an array, got {_kind(data)}")
    try:
        values = np.asarray(data)  # numpy reads the JSON values as they are: their kind is checked below
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise invalid(f"input '{name}': 'data' must be a (nested) array of numbers with the same length at "
                      "each level") from None
    allowed = _JSON_KINDS.get(datatype, _INTEGER_KINDS)
    if values.dtype.kind not in allowed and values.size:
        wanted = {"b": "true/false", "iu": "integers", "iuf": "numbers"}[allowed]
        raise invalid(f"input '{name}': 'data' of datatype {datatype} must hold JSON {wanted}")
    expected = math.prod(shape)
    if values.size != expected:
        raise invalid(f"input '{name}': 'data' has {values.size} elements, the shape {list(shape)} needs "
                      f"{expected}")
    if dtype.kind in _INTEGER_KINDS and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise invalid(f"input '{name}': 'data' has values outside the range of {datatype} "
                          f"({info.min}..{info.max})")
    return values.astype(dtype, copy=False).reshape(shape)


def encode_http(sig: ModelSignature, request_id: str, outputs: list[tuple[str, np.ndarray, bool]]
                ) -> tuple[bytes, int | None]:
    """Response body and its Inference-Header-Content-Length (None when all outputs are JSON)."""
    out_json = []
    blobs: list[Any] = []
    for name, arr, binary in outputs:
        spec = sig.outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": spec.datatype, "shape": list(arr.shape)}
        if binary:
            arr = np.ascontiguousarray(arr)
            entry["parameters"] = {"binary_data_size": arr.nbytes}
            blobs.append(arr.data)
        else:
            flat = arr.reshape(-1)
            entry["data"] = flat if flat.dtype.name in _ORJSON_NUMPY_OK and flat.flags.c_contiguous \
                else flat.tolist()
        out_json.append(entry)
    body: dict[str, Any] = {"model_name": sig.model, "model_version": sig.version_str}
    if request_id:
        body["id"] = request_id
    body["outputs"] = out_json
    header = orjson.dumps(body, option=ORJSON_OPTS)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def select_outputs(sig_output_names: list[str], computed: list[np.ndarray], req: DecodedRequest
                   ) -> list[tuple[str, np.ndarray, bool]]:
    """(name, array, binary) for what the request asked for, in the order it asked."""
    if req.outputs is None:
        return [(n, a, req.binary_default) for n, a in zip(sig_output_names, computed, strict=True)]
    by_name = dict(zip(sig_output_names, computed, strict=True))
    return [(o.name, by_name[o.name], o.binary) for o in req.outputs]


# ---------------------------------------------------------------------------------------- gRPC

def decode_grpc(request: service_pb2.ModelInferRequest, sig: ModelSignature) -> DecodedRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"expected {len(request.inputs)} raw_input_contents (one per input), got {len(raw)}")
    feeds: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for i, item in enumerate(request.inputs):
        spec = sig.input_spec(item.name)
        if spec.name in feeds:
            raise invalid(f"input '{spec.name}' is given more than once")
        shape = spec.check_header(item.datatype, list(item.shape))
        if raw:
            blob = raw[i]
            spec.check_byte_size(shape, len(blob))
            arr = np.frombuffer(blob, dtype=spec.dtype)
        else:
            field = GRPC_CONTENTS_FIELD.get(spec.datatype)
            if field is None or not item.HasField("contents"):
                raise invalid(f"input '{spec.name}' has no data: datatype {spec.datatype} must be sent in "
                              "raw_input_contents" if field is None else
                              f"input '{spec.name}' has neither raw_input_contents nor contents")
            values = getattr(item.contents, field)
            expected = math.prod(shape)
            if len(values) != expected:
                raise invalid(f"input '{spec.name}': contents has {len(values)} elements, the shape "
                              f"{list(shape)} needs {expected}")
            try:
                arr = np.array(values, dtype=spec.dtype)
            except (ValueError, OverflowError):  # INT8/INT16/UINT8/UINT16 travel in 32-bit fields
                raise invalid(f"input '{spec.name}': contents has values outside the range of "
                              f"{spec.datatype}") from None
        feeds[spec.name] = arr.reshape(shape)
        shapes[spec.name] = shape
    outputs = None
    if request.outputs:
        outputs = []
        for out in request.outputs:
            sig.check_output_name(out.name)
            outputs.append(RequestedOutput(out.name, True))
    return _finish(sig, request.id, feeds, shapes, outputs, True)


def encode_grpc(sig: ModelSignature, request_id: str, outputs: list[tuple[str, np.ndarray, bool]]
                ) -> service_pb2.ModelInferResponse:
    """Outputs always travel in raw_output_contents (what Triton does and clients expect)."""
    response = service_pb2.ModelInferResponse(model_name=sig.model, model_version=sig.version_str,
                                              id=request_id)
    for name, arr, _binary in outputs:
        t = response.outputs.add()
        t.name = name
        t.datatype = sig.outputs[name].datatype
        t.shape.extend(arr.shape)
        response.raw_output_contents.append(np.ascontiguousarray(arr).tobytes())
    return response
