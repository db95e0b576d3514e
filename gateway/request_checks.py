"""Reject malformed inference requests at the gateway, before any replica sees them.

Answers follow the replica's (Triton's) semantics: HTTP 400 / gRPC INVALID_ARGUMENT with a
message naming the problem. Only the JSON header is parsed (binary blobs are counted, never
read) and JSON tensor data is not walked beyond a flat element count. Checks against the
model use its cached metadata (inputs: name, datatype, shape with -1 for variable dims);
without metadata only the request's own consistency is checked and the replica judges the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import orjson

from gateway.proto_peek import InferRequestPeek
from gateway.translate import DEFAULT_MAX_DECODED_BYTES, BodyTooLarge, TranslateError, decode_body
from replicas.datatypes import ELEMENT_SIZE

HEADER_LENGTH = "Inference-Header-Content-Length"
# [limits] max_tensor_elements default: a shape naming more elements than this is refused before
# any replica allocates for it (BYTES tensors have no byte size to check the shape against).
DEFAULT_MAX_TENSOR_ELEMENTS = 1 << 26


class RequestError(ValueError):
    """A malformed request: `status` (400 or 413) and a message for the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelSpecs:
    """What request checks need from a model's metadata."""

    name: str
    inputs: dict[str, TensorSpec]
    outputs: frozenset[str]

    @classmethod
    def from_metadata(cls, meta: dict) -> ModelSpecs:
        inputs = {t["name"]: TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"]))
                  for t in meta.get("inputs", [])}
        return cls(meta.get("name", ""), inputs, frozenset(t["name"] for t in meta.get("outputs", [])))


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _element_count(shape: list[int], cap: int) -> int:
    """The product of `shape`, but stops once past `cap` (a shape of a million huge dimensions
    must not cost a quadratic big-integer product)."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > cap:
            return n
    return n


def _check_tensor(model: str, name: str, datatype: str, shape: list[int], spec: TensorSpec | None,
                  byte_size: int | None, max_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS) -> None:
    if any((not isinstance(d, int)) or isinstance(d, bool) or d < 0 for d in shape):
        raise RequestError(f"input '{name}' has an invalid shape {shape!r} for model '{model}': "
                           "dimensions must be non-negative integers")
    elements = _element_count(shape, max_elements)
    if elements > max_elements:
        raise RequestError(f"input '{name}' for model '{model}': shape {_fmt(shape)} has {elements} elements, "
                           f"more than the gateway's limit of {max_elements} ([limits] max_tensor_elements)")
    if spec is not None:
        if datatype != spec.datatype:
            raise RequestError(f"inference input '{name}' data-type is '{datatype}', but model '{model}' "
                               f"expects '{spec.datatype}'")
        if len(shape) != len(spec.shape) or any(e != -1 and e != d for d, e in zip(shape, spec.shape,
                                                                                  strict=False)):
            raise RequestError(f"unexpected shape for input '{name}' for model '{model}'. "
                               f"Expected {_fmt(spec.shape)}, got {_fmt(shape)}")
    if byte_size is not None and datatype in ELEMENT_SIZE:
        expected = elements * ELEMENT_SIZE[datatype]
        if byte_size != expected:
            raise RequestError(f"input '{name}' for model '{model}': unexpected total byte size "
                               f"{byte_size}, expecting {expected} for shape {_fmt(shape)} of {datatype}")


def _check_names(model: str, given: list[str], specs: ModelSpecs | None) -> None:
    if len(set(given)) != len(given):
        dup = next(n for n in given if given.count(n) > 1)
        raise RequestError(f"input '{dup}' is given more than once for model '{model}'")
    if specs is None:
        return
    for n in given:
        if n not in specs.inputs:
            raise RequestError(f"unexpected inference input '{n}' for model '{model}'; "
                               f"the model's inputs are: {', '.join(sorted(specs.inputs))}")
    missing = [n for n in specs.inputs if n not in given]
    if missing:
        raise RequestError(f"expected {len(specs.inputs)} inputs but got {len(given)} inputs for model "
                           f"'{model}': missing {', '.join(repr(m) for m in missing)}")


# ------------------------------------------------------------------ HTTP


def parse_http_header(body: bytes, header_len: str | None, content_encoding: str | None,
                      max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> tuple[dict, int]:
    """(JSON header, number of binary bytes after it); RequestError when malformed (413 when a
    compressed body expands past `max_decoded_bytes`)."""
    if content_encoding and content_encoding != "identity":
        try:
            body = decode_body(body, content_encoding, max_decoded_bytes)
        except BodyTooLarge as exc:
            raise RequestError(str(exc), 413) from None
        except TranslateError as exc:
            raise RequestError(str(exc)) from None
    if header_len is not None:
        try:
            hl = int(header_len)
        except ValueError:
            raise RequestError(f"{HEADER_LENGTH} must be an integer, got {header_len!r}") from None
        if hl < 0 or hl > len(body):
            raise RequestError(f"{HEADER_LENGTH} is {hl} but the request body has only {len(body)} bytes")
        head_bytes = memoryview(body)[:hl]
        binary_len = len(body) - hl
    else:
        head_bytes = body
        binary_len = 0
    if not head_bytes:
        raise RequestError("the request body is empty: expected a JSON inference request")
    try:
        header = orjson.loads(head_bytes)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"failed to parse the request JSON buffer: {exc}") from None
    if not isinstance(header, dict):
        raise RequestError("the inference request must be a JSON object")
    return header, binary_len


def check_http(model: str, header: dict, binary_len: int, specs: ModelSpecs | None,
               max_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS) -> None:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(f"the inference request for model '{model}' must have a non-empty 'inputs' list")
    names: list[str] = []
    binary_total = 0
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict):
            raise RequestError(f"inputs[{i}] must be a JSON object")
        name = inp.get("name")
        datatype = inp.get("datatype")
        shape = inp.get("shape")
        if not isinstance(name, str) or not name:
            raise RequestError(f"inputs[{i}] has no 'name'")
        if not isinstance(datatype, str):
            raise RequestError(f"input '{name}' has no 'datatype'")
        if not isinstance(shape, list):
            raise RequestError(f"input '{name}' has no 'shape' list")
        names.append(name)
        if specs is not None and name not in specs.inputs:
            _check_names(model, [name], specs)  # raises: unexpected input
        params = inp.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(f"input '{name}': 'parameters' must be a JSON object")
        size = params.get("binary_data_size")
        byte_size: int | None = None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise RequestError(f"input '{name}': binary_data_size must be a non-negative integer, "
                                   f"got {size!r}")
            binary_total += size
            byte_size = size
        elif "data" not in inp:
            raise RequestError(f"input '{name}' for model '{model}' has neither 'data' nor "
                               "binary_data_size")
        spec = specs.inputs.get(name) if specs is not None else None
        _check_tensor(model, name, datatype, shape, spec, byte_size, max_elements)
        if byte_size is None and datatype in ELEMENT_SIZE:
            data = inp["data"]
            # A flat list is counted; nested lists are left to the replica (no deep walk).
            if isinstance(data, list) and (not data or not isinstance(data[0], list)):
                expected = math.prod(shape)
                if len(data) != expected:
                    raise RequestError(f"input '{name}' for model '{model}': shape {_fmt(shape)} needs "
                                       f"{expected} elements, got {len(data)}")
    _check_names(model, names, specs)
    if binary_total != binary_len:
        raise RequestError(f"the request's binary data is {binary_len} bytes but its inputs' "
                           f"binary_data_size add up to {binary_total}")
    outputs = header.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise RequestError("'outputs' must be a list")
        for j, out in enumerate(outputs):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise RequestError(f"outputs[{j}] must be a JSON object with a 'name'")
            if specs is not None and out["name"] not in specs.outputs:
                raise RequestError(f"unexpected inference output '{out['name']}' for model '{model}'")


class ValidatedHeaders:
    """Binary requests from one client repeat the same small JSON header request after
    request (same inputs, shapes, sizes): remember headers that passed the checks, keyed by
    their bytes and the model specs they were checked against, and skip parsing and checking
    them again. JSON-tensor requests (data inside the header) are not cached."""

    MAX_ENTRIES = 512
    MAX_HEADER_BYTES = 4096

    def __init__(self, *, max_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS,
                 max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> None:
        self._ok: dict[tuple, tuple[dict, int]] = {}
        self.max_elements = max_elements
        self.max_decoded_bytes = max_decoded_bytes

    def check(self, model: str, body: bytes, header_len: str | None, content_encoding: str | None,
              specs: ModelSpecs | None) -> dict:
        """The parsed JSON header of a request that passes the checks; RequestError otherwise."""
        key = None
        if header_len is not None and not content_encoding and specs is not None:
            try:
                n = int(header_len)
            except ValueError:
                n = -1
            if 0 < n <= self.MAX_HEADER_BYTES and n <= len(body):
                key = (model, id(specs), body[:n])
                hit = self._ok.get(key)
                if hit is not None and hit[1] == len(body) - n:
                    return hit[0]
        header, binary_len = parse_http_header(body, header_len, content_encoding, self.max_decoded_bytes)
        check_http(model, header, binary_len, specs, self.max_elements)
        if key is not None:
            if len(self._ok) >= self.MAX_ENTRIES:
                self._ok.clear()
            self._ok[key] = (header, binary_len)
        return header


# ------------------------------------------------------------------ gRPC


def check_grpc(model: str, peek: InferRequestPeek, specs: ModelSpecs | None,
               max_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS) -> None:
    if not peek.inputs:
        raise RequestError(f"the inference request for model '{model}' has no inputs")
    raw = peek.raw_input_lengths
    if raw and len(raw) != len(peek.inputs):
        raise RequestError(f"expected {len(peek.inputs)} raw_input_contents (one per input) but got "
                           f"{len(raw)} for model '{model}'")
    names = []
    for i, t in enumerate(peek.inputs):
        if not t.name:
            raise RequestError(f"inputs[{i}] has no name")
        names.append(t.name)
        if specs is not None and t.name not in specs.inputs:
            _check_names(model, [t.name], specs)  # raises: unexpected input
        spec = specs.inputs.get(t.name) if specs is not None else None
        if not raw and not t.has_contents:
            raise RequestError(f"input '{t.name}' for model '{model}' has no data (neither contents "
                               "nor raw_input_contents)")
        _check_tensor(model, t.name, t.datatype, t.shape, spec, raw[i] if raw else None, max_elements)
    _check_names(model, names, specs)
