"""Protocol translation for inference, used only when a client's protocol differs from the
replica's (a replica URL's scheme is the protocol the gateway speaks to it, DESIGN.md).

The hot path never comes here: HTTP clients go to http:// replicas and gRPC clients to grpc://
replicas with bytes passed through. When a pool has only the other kind, requests are
re-encoded: HTTP JSON/binary <-> ModelInferRequest/Response, following Triton's mapping
(binary blobs become raw_input_contents in input order; BYTES elements are 4-byte
little-endian length-prefixed strings).
"""

from __future__ import annotations

import zlib

import numpy as np
import orjson
from tritonclient.grpc import service_pb2

from replicas.datatypes import V2_TO_NUMPY


class TranslateError(ValueError):
    """The request cannot be expressed in the other protocol (a 400 / INVALID_ARGUMENT)."""


HEADER_LENGTH = "Inference-Header-Content-Length"
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


def split_body(body: bytes, header_len: str | None) -> tuple[bytes, memoryview]:
    """(JSON header bytes, the binary part after it)."""
    view = memoryview(body)
    if header_len is None:
        return body, view[len(body):]
    n = int(header_len)
    return bytes(view[:n]), view[n:]


def _serialize_bytes(values: list) -> bytes:
    out = bytearray()
    for v in values:
        b = v.encode() if isinstance(v, str) else bytes(v)
        out += len(b).to_bytes(4, "little") + b
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


def _flatten(data) -> list:
    if isinstance(data, list) and data and isinstance(data[0], list):
        flat: list = []
        for d in data:
            flat.extend(_flatten(d))
        return flat
    return data if isinstance(data, list) else [data]


def _json_to_raw(datatype: str, data) -> bytes:
    flat = _flatten(data)
    if datatype == "BYTES":
        return _serialize_bytes(flat)
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is None:
        raise TranslateError(f"unsupported datatype {datatype!r}")
    try:
        return np.asarray(flat, dtype=dtype).tobytes()
    except (ValueError, TypeError) as exc:
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


def http_request_to_grpc(model: str, version: str | None, header: dict, binary: memoryview,
                         request_id: str) -> tuple[bytes, set[str], bool]:
    """(serialized ModelInferRequest, names of outputs wanted as binary, all-binary flag)."""
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version or "")
    if header.get("id"):
        req.id = str(header["id"])
    params = header.get("parameters") or {}
    binary_all = bool(params.get("binary_data_output", False))
    for k, v in params.items():
        if k != "binary_data_output":
            _set_param(req.parameters, k, v)
    offset = 0
    for inp in header.get("inputs", []):
        t = req.inputs.add(name=inp["name"], datatype=inp["datatype"], shape=inp["shape"])
        iparams = inp.get("parameters") or {}
        size = iparams.get("binary_data_size")
        if size is not None:
            req.raw_input_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        else:
            req.raw_input_contents.append(_json_to_raw(inp["datatype"], inp.get("data", [])))
        for k, v in iparams.items():
            if k != "binary_data_size":
                _set_param(t.parameters, k, v)
    binary_outputs: set[str] = set()
    for out in header.get("outputs", []) or []:
        o = req.outputs.add(name=out["name"])
        for k, v in (out.get("parameters") or {}).items():
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
            data_raw = _json_to_raw(out.datatype, values)
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


def grpc_request_to_http(raw: bytes) -> tuple[str, str, bytes, str]:
    """(model, version, HTTP body, Inference-Header-Content-Length) of a ModelInferRequest;
    every tensor travels as a binary blob."""
    req = service_pb2.ModelInferRequest.FromString(raw)
    head: dict = {}
    if req.id:
        head["id"] = req.id
    params = {k: _param_value(v) for k, v in req.parameters.items()}
    blobs: list[bytes] = []
    inputs = []
    for i, t in enumerate(req.inputs):
        if i < len(req.raw_input_contents):
            blob = req.raw_input_contents[i]
        else:
            field = _CONTENTS_FIELD.get(t.datatype, "")
            blob = _json_to_raw(t.datatype, list(getattr(t.contents, field)) if field else [])
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
    resp = service_pb2.ModelInferResponse(model_name=head.get("model_name", ""),
                                          model_version=str(head.get("model_version", "")),
                                          id=str(head.get("id", "") or ""))
    for k, v in (head.get("parameters") or {}).items():
        _set_param(resp.parameters, k, v)
    offset = 0
    for out in head.get("outputs", []):
        resp.outputs.add(name=out["name"], datatype=out["datatype"], shape=out["shape"])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            resp.raw_output_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        else:
            resp.raw_output_contents.append(_json_to_raw(out["datatype"], out.get("data", [])))
    return resp.SerializeToString()
