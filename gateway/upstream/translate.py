"""Protocol translation for inference, used only when a client's protocol differs from the
replica's (a replica URL's scheme is the protocol the gateway speaks to it, DESIGN.md).

The hot path never comes here: HTTP clients go to http:// replicas and gRPC clients to grpc://
replicas with bytes passed through. When a pool has only the other kind, requests are
re-encoded: HTTP JSON/binary <-> ModelInferRequest/Response, following Triton's mapping
(binary blobs become raw_input_contents in input order; BYTES elements are 4-byte
little-endian length-prefixed strings).

Bounded work: what is built is a bounded multiple of what was received. Every tensor's element
count is checked against its shape before anything is allocated for it (JSON data, binary
blobs: elements x itemsize, BYTES: the 4-byte length prefixes must cover the blob exactly;
typed gRPC contents); JSON BYTES elements must be strings (a number once became ``bytes(n)``:
86 bytes received, 1.2 GB allocated); nested JSON data is walked without recursion, at most
MAX_DATA_DEPTH deep.
"""

from __future__ import annotations

import zlib

import numpy as np
import orjson
from tritonclient.grpc import service_pb2

from core.datatypes import V2_TO_NUMPY
from core.kserve import HEADER_LENGTH


class TranslateError(ValueError):
    """The request cannot be expressed in the other protocol (a 400 / INVALID_ARGUMENT)."""


JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"


# ------------------------------------------------------------------ helpers


class BodyTooLarge(TranslateError):
    """A compressed body that expands past the size limit (a 413 / RESOURCE_EXHAUSTED)."""


# zlib window bits: gzip container, zlib container (HTTP "deflate").
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
DEFAULT_MAX_DECODED_BYTES = 1 << 30


def decode_body(body: bytes, content_encoding: str | None, max_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> bytes:
    """The request body without its Content-Encoding (gzip / deflate), at most `max_bytes` of it:
    a small compressed body must not expand to gigabytes in memory (decompression bomb), so
    the output is bounded while decompressing and BodyTooLarge says when the limit was hit."""
    if not content_encoding or content_encoding == "identity":
        return body
    wbits = _WBITS.get(content_encoding)
    if wbits is None:
        raise TranslateError(f"unsupported Content-Encoding {content_encoding!r} (use gzip or deflate)")
    parts: list[bytes] = []
    size = 0
    data = body
    try:
        while True:
            d = zlib.decompressobj(wbits)
            out = d.decompress(data, max_bytes - size + 1)
            size += len(out)
            if size > max_bytes or d.unconsumed_tail:
                raise BodyTooLarge(f"the {content_encoding} request body expands to more than the limit of "
                                   f"{max_bytes} bytes")
            if not d.eof:
                raise TranslateError(f"body is not valid {content_encoding} data: the compressed stream is "
                                     "truncated")
            parts.append(out)
            # gzip allows several members back to back (as gzip.decompress reads them)
            if not d.unused_data or wbits != _WBITS["gzip"]:
                break
            data = d.unused_data
    except zlib.error as exc:
        raise TranslateError(f"body is not valid {content_encoding} data: {exc}") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


MAX_HEADER_LENGTH_DIGITS = 12  # more than any body the gateway accepts


def parse_header_length(header_len: str, body_len: int) -> int:
    """Inference-Header-Content-Length as an int in [0, body_len]; TranslateError unless it is
    plain ASCII digits (int() also reads other scripts' digits)."""
    if not (0 < len(header_len) <= MAX_HEADER_LENGTH_DIGITS and header_len.isascii() and header_len.isdigit()):
        raise TranslateError(f"{HEADER_LENGTH} must be a non-negative integer (ASCII digits), "
                             f"got {header_len[:MAX_HEADER_LENGTH_DIGITS + 4]!r}")
    n = int(header_len)
    if n > body_len:
        raise TranslateError(f"{HEADER_LENGTH} is {n} but the request body has only {body_len} bytes")
    return n


def split_body(body: bytes, header_len: str | None) -> tuple[bytes, memoryview]:
    """(JSON header bytes, the binary part after it)."""
    view = memoryview(body)
    if header_len is None:
        return body, view[len(body):]
    n = parse_header_length(header_len, len(body))
    return bytes(view[:n]), view[n:]


def shape_elements(shape) -> int | None:
    """The element count of `shape` (a sequence of ints), None when a dimension is negative or
    not an integer. A 0 dimension gives 0 before any product is taken."""
    n = 1
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            return None
        n *= d
        if n == 0:
            return 0
    return n


def bytes_elements_problem(blob: bytes | memoryview, expected: int) -> str:
    """"" when `blob` is exactly `expected` BYTES elements (each a 4-byte little-endian length,
    then that many bytes), else what is wrong. Stops at the first problem; O(expected)."""
    view = memoryview(blob)
    size = len(view)
    if expected * 4 > size:
        return f"{size} bytes cannot hold {expected} BYTES elements (4-byte length each)"
    pos = 0
    for i in range(expected):
        if pos + 4 > size:
            return f"BYTES data ends after {i} of {expected} elements"
        n = int.from_bytes(view[pos:pos + 4], "little")
        pos += 4 + n
        if pos > size:
            return f"BYTES element {i} claims {n} bytes, past the end of the {size}-byte data"
    if pos != size:
        return f"{size - pos} bytes left over after {expected} BYTES elements"
    return ""


def _check_blob(name: str, datatype: str, shape, blob: bytes | memoryview) -> None:
    """TranslateError unless `blob` (binary data / raw contents) holds exactly shape's elements."""
    elements = shape_elements(shape)
    if elements is None:
        raise TranslateError(f"input '{name}': invalid shape {list(shape)!r}")
    if datatype == "BYTES":
        problem = bytes_elements_problem(blob, elements)
        if problem:
            raise TranslateError(f"input '{name}': shape {list(shape)} needs {elements} BYTES elements: {problem}")
        return
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is not None and len(blob) != elements * dtype.itemsize:
        raise TranslateError(f"input '{name}': {len(blob)} bytes of data, expected {elements * dtype.itemsize} "
                             f"for shape {list(shape)} of {datatype}")


def _serialize_bytes(values: list) -> bytes:
    out = bytearray()
    for v in values:
        if isinstance(v, str):
            b = v.encode()
        elif isinstance(v, bytes | bytearray):  # typed gRPC bytes_contents
            b = v
        else:  # never bytes(int): that allocates int bytes
            raise TranslateError(f"BYTES elements must be strings, got {type(v).__name__} {str(v)[:40]}")
        out += len(b).to_bytes(4, "little")
        out += b
    return bytes(out)


def _deserialize_bytes(raw: bytes | memoryview) -> list[str]:
    out: list[str] = []
    view = memoryview(raw)
    pos = 0
    while pos + 4 <= len(view):
        n = int.from_bytes(view[pos:pos + 4], "little")
        pos += 4
        out.append(bytes(view[pos:pos + n]).decode(errors="replace"))
        pos += n
    return out


MAX_DATA_DEPTH = 64  # numpy's own limit on dimensions


def flatten_data(data, max_depth: int = MAX_DATA_DEPTH) -> list:
    """The leaves of (nested) JSON tensor data in order, walked without recursion; TranslateError
    when lists nest deeper than `max_depth`."""
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        if any(isinstance(v, list) for v in data):
            raise TranslateError("tensor data mixes lists and values at one level")
        return data
    flat: list = []
    stack = [(iter(data), 1)]
    while stack:
        it, depth = stack[-1]
        for v in it:
            if isinstance(v, list):
                if depth + 1 > max_depth:
                    raise TranslateError(f"tensor data is nested deeper than {max_depth} levels")
                stack.append((iter(v), depth + 1))
                break
            flat.append(v)
        else:
            stack.pop()
    return flat


def _json_to_raw(datatype: str, data, shape=None, name: str = "") -> bytes:
    """Raw bytes of JSON tensor data; with `shape`, the element count must match it. Nesting
    may go deeper than the shape's rank as long as the count matches (numpy reads it so, and
    so does the replica), up to MAX_DATA_DEPTH."""
    flat = flatten_data(data)
    if shape is not None:
        expected = shape_elements(shape)
        if expected is None:
            raise TranslateError(f"tensor '{name}': invalid shape {list(shape)!r}")
        if len(flat) != expected:
            raise TranslateError(f"tensor '{name}': shape {list(shape)} needs {expected} elements, "
                                 f"got {len(flat)}")
    if datatype == "BYTES":
        return _serialize_bytes(flat)
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is None:
        raise TranslateError(f"unsupported datatype {datatype!r}")
    try:
        return np.asarray(flat, dtype=dtype).tobytes()
    except (ValueError, TypeError, OverflowError) as exc:
        raise TranslateError(f"tensor data does not match datatype {datatype}: {exc}") from None


def _raw_to_json(datatype: str, raw: bytes | memoryview) -> list:
    if datatype == "BYTES":
        return _deserialize_bytes(raw)
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is None:
        raise TranslateError(f"unsupported datatype {datatype!r}")
    return np.frombuffer(raw, dtype=dtype).tolist()


def _set_param(target, key: str, value) -> None:
    p = target[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def _param_value(p: service_pb2.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


# ------------------------------------------------------------------ HTTP client -> gRPC replica


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TranslateError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def http_request_to_grpc(model: str, version: str | None, header: dict, binary: memoryview,
                         request_id: str) -> tuple[bytes, set[str], bool]:
    """(serialized ModelInferRequest, names of outputs wanted as binary, all-binary flag)."""
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version or "")
    if header.get("id"):
        req.id = str(header["id"])
    params = _object(header.get("parameters"), "'parameters'")
    binary_all = bool(params.get("binary_data_output", False))
    for k, v in params.items():
        if k != "binary_data_output":
            _set_param(req.parameters, k, v)
    offset = 0
    for inp in header.get("inputs", []):
        name, datatype, shape = inp["name"], inp["datatype"], inp["shape"]
        if shape_elements(shape) is None:
            raise TranslateError(f"input '{name}': invalid shape {shape!r}")
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
        iparams = _object(inp.get("parameters"), f"input '{name}' 'parameters'")
        size = iparams.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise TranslateError(f"input '{name}': binary_data_size {size!r} does not fit the "
                                     f"{len(binary) - offset} binary bytes left")
            blob = binary[offset:offset + size]
            _check_blob(name, datatype, shape, blob)
            req.raw_input_contents.append(bytes(blob))
            offset += size
        else:
            req.raw_input_contents.append(_json_to_raw(datatype, inp.get("data", []), shape, name))
        for k, v in iparams.items():
            if k != "binary_data_size":
                _set_param(t.parameters, k, v)
    binary_outputs: set[str] = set()
    for out in header.get("outputs", []) or []:
        o = req.outputs.add(name=out["name"])
        for k, v in _object(out.get("parameters"), f"output '{out['name']}' 'parameters'").items():
            if k == "binary_data":
                if v:
                    binary_outputs.add(out["name"])
            else:
                _set_param(o.parameters, k, v)
    return req.SerializeToString(), binary_outputs, binary_all


def grpc_response_to_http(raw: bytes, binary_outputs: set[str], binary_all: bool
                          ) -> tuple[bytes, str | None, str]:
    """(HTTP body, Inference-Header-Content-Length or None, model_version)."""
    resp = service_pb2.ModelInferResponse.FromString(raw)
    head: dict = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id:
        head["id"] = resp.id
    if resp.parameters:
        head["parameters"] = {k: _param_value(v) for k, v in resp.parameters.items()}
    outputs = []
    blobs: list[bytes] = []
    for i, out in enumerate(resp.outputs):
        if i < len(resp.raw_output_contents):
            data_raw = resp.raw_output_contents[i]
        else:  # typed contents (rare from replicas)
            field = _CONTENTS_FIELD.get(out.datatype, "")
            values = list(getattr(out.contents, field)) if field else []
            data_raw = _json_to_raw(out.datatype, values, list(out.shape), out.name)
        o: dict = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if binary_all or out.name in binary_outputs:
            o["parameters"] = {"binary_data_size": len(data_raw)}
            blobs.append(data_raw)
        else:
            o["data"] = _raw_to_json(out.datatype, data_raw)
        outputs.append(o)
    head["outputs"] = outputs
    header = orjson.dumps(head)
    if not blobs:
        return header, None, resp.model_version
    return header + b"".join(blobs), str(len(header)), resp.model_version


# ------------------------------------------------------------------ gRPC client -> HTTP replica


GRPC_CONTROL_PREFIX = "triton_"


def grpc_request_to_http(raw: bytes) -> tuple[str, str, bytes, str]:
    """(model, version, HTTP body, Inference-Header-Content-Length) of a ModelInferRequest;
    every tensor travels as a binary blob."""
    req = service_pb2.ModelInferRequest.FromString(raw)
    head: dict = {}
    if req.id:
        head["id"] = req.id
    # "triton_*" request parameters are Triton's gRPC front-end controls (perf_analyzer sends
    # triton_enable_empty_final_response on every call); its HTTP front-end refuses the prefix.
    params = {k: _param_value(v) for k, v in req.parameters.items() if not k.startswith(GRPC_CONTROL_PREFIX)}
    blobs: list[bytes] = []
    inputs = []
    for i, t in enumerate(req.inputs):
        if i < len(req.raw_input_contents):
            blob = req.raw_input_contents[i]
            _check_blob(t.name, t.datatype, t.shape, blob)
        else:
            field = _CONTENTS_FIELD.get(t.datatype, "")
            blob = _json_to_raw(t.datatype, list(getattr(t.contents, field)) if field else [], list(t.shape), t.name)
        d: dict = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                   "parameters": {"binary_data_size": len(blob)}}
        for k, v in t.parameters.items():
            d["parameters"][k] = _param_value(v)
        inputs.append(d)
        blobs.append(blob)
    head["inputs"] = inputs
    if req.outputs:
        outs = []
        for o in req.outputs:
            op: dict = {k: _param_value(v) for k, v in o.parameters.items()}
            op["binary_data"] = True
            outs.append({"name": o.name, "parameters": op})
        head["outputs"] = outs
    else:
        params["binary_data_output"] = True
    if params:
        head["parameters"] = params
    header = orjson.dumps(head)
    return req.model_name, req.model_version, header + b"".join(blobs), str(len(header))


def http_response_to_grpc(body: bytes, header_len: str | None, content_encoding: str | None) -> bytes:
    """A successful HTTP inference answer as a serialized ModelInferResponse."""
    plain = decode_body(body, content_encoding)
    header_bytes, binary = split_body(plain, header_len)
    head = orjson.loads(header_bytes)
    if not isinstance(head, dict):
        raise TranslateError("the answer's JSON header is not an object")
    resp = service_pb2.ModelInferResponse(model_name=head.get("model_name", ""),
                                          model_version=str(head.get("model_version", "")),
                                          id=str(head.get("id", "") or ""))
    for k, v in _object(head.get("parameters"), "'parameters'").items():
        _set_param(resp.parameters, k, v)
    offset = 0
    for out in head.get("outputs", []):
        resp.outputs.add(name=out["name"], datatype=out["datatype"], shape=out["shape"])
        size = _object(out.get("parameters"), "output 'parameters'").get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise TranslateError(f"output '{out['name']}': binary_data_size {size!r} does not fit the answer")
            resp.raw_output_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        else:
            resp.raw_output_contents.append(_json_to_raw(out["datatype"], out.get("data", []), out["shape"],
                                                         out["name"]))
    return resp.SerializeToString()
