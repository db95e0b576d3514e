"""Reject malformed inference requests at the gateway, before any replica sees them.

Answers follow the replica's (Triton's) semantics: HTTP 400 / gRPC INVALID_ARGUMENT with a
message naming the problem. Only the JSON header is parsed; binary blobs are counted, and read
only for BYTES inputs (their 4-byte length prefixes must cover the blob exactly). Every input's
element count is checked against its shape, whatever its datatype: JSON data (nested lists are
walked without recursion, at most MAX_DATA_DEPTH deep), binary_data_size (elements x itemsize)
and gRPC raw contents; JSON BYTES elements must be strings. Checks against the model use its
cached metadata (inputs: name, datatype, shape with -1 for variable dims); without metadata
only the request's own consistency is checked and the replica judges the rest.

Also here: strict parsers for the other headers and metadata the gateway reads (ASCII only:
Python's int() reads fullwidth digits), and ``ClientErrorLog``, the one-line, rate-limited warning for
requests refused as malformed (a flood of bad requests must not flood the log).
"""

from __future__ import annotations

import logging
import time

import orjson

from core.datatypes import ELEMENT_SIZE
from core.kserve import HOPS_HEADER
from gateway.upstream.model_specs import ModelSpecs, TensorSpec
from gateway.upstream.proto_peek import InferRequestPeek
from gateway.upstream.translate import (
    DEFAULT_MAX_DECODED_BYTES,
    MAX_DATA_DEPTH,
    BodyTooLarge,
    TranslateError,
    bytes_elements_problem,
    decode_body,
    parse_header_length,
)

# [limits] max_tensor_elements default: a shape naming more elements than this is refused before
# any replica allocates for it (BYTES tensors have no byte size to check the shape against).
DEFAULT_MAX_TENSOR_ELEMENTS = 1 << 26


class RequestError(ValueError):
    """A malformed request: `status` (400 or 413) and a message for the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


MAX_DIMENSION = (1 << 63) - 1  # int64, as the protocols carry shapes


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
                  byte_size: int | None, max_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS) -> int:
    """The tensor's element count, once its shape, datatype and byte size (fixed-size types) are
    consistent; RequestError otherwise."""
    if any((not isinstance(d, int)) or isinstance(d, bool) or d < 0 or d > MAX_DIMENSION for d in shape):
        raise RequestError(f"input '{name}' has an invalid shape {_short(shape)} for model '{model}': "
                           "dimensions must be non-negative 64-bit integers")
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
    if byte_size is not None and datatype == "BYTES" and byte_size < 4 * elements:
        raise RequestError(f"input '{name}' for model '{model}': {byte_size} bytes cannot hold the {elements} "
                           f"BYTES elements of shape {_fmt(shape)} (a 4-byte length each)")
    return elements


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_elements(model: str, name: str, data: object, bytes_type: bool, expected: int) -> int:
    """How many elements JSON tensor `data` holds (a flat or nested list, or one value), walked
    without recursion; RequestError when nested deeper than MAX_DATA_DEPTH or, for BYTES, when
    an element is not a string (a number must never become bytes(n) downstream)."""
    if not isinstance(data, list):
        leaves = 1
        if bytes_type and not isinstance(data, str):
            raise _not_string(model, name, data)
        return leaves
    if not data or not isinstance(data[0], list):  # flat: the usual case, counted without a walk
        if bytes_type:
            for v in data:
                if not isinstance(v, str):
                    raise _not_string(model, name, v)
        return len(data)
    count = 0
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                if len(stack) >= MAX_DATA_DEPTH:
                    raise RequestError(f"input '{name}' for model '{model}': 'data' is nested deeper than "
                                       f"{MAX_DATA_DEPTH} levels")
                stack.append(iter(v))
                break
            if bytes_type and not isinstance(v, str):
                raise _not_string(model, name, v)
            count += 1
            if count > expected:
                return count  # already wrong: no need to walk the rest
        else:
            stack.pop()
    return count


def _not_string(model: str, name: str, value: object) -> RequestError:
    return RequestError(f"input '{name}' for model '{model}': BYTES elements in JSON 'data' must be strings, "
                        f"got {type(value).__name__} {_short(value, 40)}")


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


def _decode_and_split(body: bytes, header_len: str | None, content_encoding: str | None,
                      max_decoded_bytes: int) -> tuple[dict, bytes, int]:
    """(JSON header, the body without its Content-Encoding, where the binary part starts)."""
    if content_encoding and content_encoding != "identity":
        try:
            body = decode_body(body, content_encoding, max_decoded_bytes)
        except BodyTooLarge as exc:
            raise RequestError(str(exc), 413) from None
        except TranslateError as exc:
            raise RequestError(str(exc)) from None
    if header_len is not None:
        try:
            hl = parse_header_length(header_len, len(body))
        except TranslateError as exc:
            raise RequestError(str(exc)) from None
        head_bytes = memoryview(body)[:hl]
    else:
        head_bytes = body
        hl = len(body)
    if not head_bytes:
        raise RequestError("the request body is empty: expected a JSON inference request")
    try:
        header = orjson.loads(head_bytes)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"failed to parse the request JSON buffer: {exc}") from None
    if not isinstance(header, dict):
        raise RequestError("the inference request must be a JSON object")
    return header, body, hl


def parse_http_header(body: bytes, header_len: str | None, content_encoding: str | None,
                      max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> tuple[dict, int]:
    """(JSON header, number of binary bytes after it); RequestError when malformed (413 when a
    compressed body expands past `max_decoded_bytes`)."""
    header, plain, hl = _decode_and_split(body, header_len, content_encoding, max_decoded_bytes)
    return header, len(plain) - hl


def check_bytes_blobs(model: str, body: bytes, binary_start: int, blobs: list[tuple[str, int, int, int]]) -> None:
    """The BYTES binary inputs `check_http` listed (name, offset in the binary part, size,
    elements): each blob must be exactly that many length-prefixed elements."""
    view = memoryview(body)[binary_start:]
    for name, offset, size, elements in blobs:
        problem = bytes_elements_problem(view[offset:offset + size], elements)
        if problem:
            raise RequestError(f"input '{name}' for model '{model}': binary BYTES data does not match "
                               f"its {elements} elements: {problem}")


def check_http(model: str, header: dict, binary_len: int, specs: ModelSpecs | None,
               max_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS) -> list[tuple[str, int, int, int]]:
    """RequestError unless `header` is a consistent inference request (for `specs`, when known).
    Returns the binary BYTES inputs as (name, offset in the binary part, size, elements): their
    length prefixes are checked against the body by `check_bytes_blobs`."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(f"the inference request for model '{model}' must have a non-empty 'inputs' list")
    top_params = header.get("parameters")
    if top_params is not None and not isinstance(top_params, dict):
        raise RequestError(f"the inference request's 'parameters' must be a JSON object, got "
                           f"{type(top_params).__name__}")
    names: list[str] = []
    binary_total = 0
    bytes_blobs: list[tuple[str, int, int, int]] = []
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
                                   f"got {_short(size)}")
            byte_size = size
        elif "data" not in inp:
            raise RequestError(f"input '{name}' for model '{model}' has neither 'data' nor "
                               "binary_data_size")
        spec = specs.inputs.get(name) if specs is not None else None
        elements = _check_tensor(model, name, datatype, shape, spec, byte_size, max_elements)
        if byte_size is not None:
            if datatype == "BYTES":
                bytes_blobs.append((name, binary_total, byte_size, elements))
            binary_total += byte_size
        else:
            got = _json_elements(model, name, inp["data"], datatype == "BYTES", elements)
            if got != elements:
                raise RequestError(f"input '{name}' for model '{model}': shape {_fmt(shape)} needs "
                                   f"{elements} elements, got {got if got < elements else 'more'} in 'data'")
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
    return bytes_blobs


class ValidatedHeaders:
    """Binary requests from one client repeat the same small JSON header request after
    request (same inputs, shapes, sizes): remember headers that passed the checks, keyed by
    their bytes and the model specs they were checked against, and skip parsing and checking
    them again. JSON-tensor requests (data inside the header) are not cached."""

    MAX_ENTRIES = 512
    MAX_HEADER_BYTES = 4096

    def __init__(self, *, max_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS,
                 max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> None:
        self._ok: dict[tuple, tuple[dict, int, list[tuple[str, int, int, int]]]] = {}
        self.max_elements = max_elements
        self.max_decoded_bytes = max_decoded_bytes

    def check(self, model: str, body: bytes, header_len: str | None, content_encoding: str | None,
              specs: ModelSpecs | None) -> dict:
        """The parsed JSON header of a request that passes the checks; RequestError otherwise."""
        key = None
        if header_len is not None and not content_encoding and specs is not None:
            n = int(header_len) if header_len.isascii() and header_len.isdigit() and len(header_len) < 6 else -1
            if 0 < n <= self.MAX_HEADER_BYTES and n <= len(body):
                key = (model, id(specs), body[:n])
                hit = self._ok.get(key)
                if hit is not None and hit[1] == len(body) - n:
                    if hit[2]:
                        check_bytes_blobs(model, body, n, hit[2])
                    return hit[0]
        header, plain, hl = _decode_and_split(body, header_len, content_encoding, self.max_decoded_bytes)
        binary_len = len(plain) - hl
        bytes_blobs = check_http(model, header, binary_len, specs, self.max_elements)
        if bytes_blobs:
            check_bytes_blobs(model, plain, hl, bytes_blobs)
        if key is not None:
            if len(self._ok) >= self.MAX_ENTRIES:
                self._ok.clear()
            self._ok[key] = (header, binary_len, bytes_blobs)
        return header


# ------------------------------------------------------------------ gRPC


def check_grpc(model: str, peek: InferRequestPeek, specs: ModelSpecs | None,
               max_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS, raw: bytes | memoryview | None = None) -> None:
    """RequestError unless the peeked ModelInferRequest is consistent (for `specs`, when known).
    With `raw` (the serialized request), BYTES raw contents are checked element by element."""
    if not peek.inputs:
        raise RequestError(f"the inference request for model '{model}' has no inputs")
    lengths = peek.raw_input_lengths
    if lengths and len(lengths) != len(peek.inputs):
        raise RequestError(f"expected {len(peek.inputs)} raw_input_contents (one per input) but got "
                           f"{len(lengths)} for model '{model}'")
    names = []
    for i, t in enumerate(peek.inputs):
        if not t.name:
            raise RequestError(f"inputs[{i}] has no name")
        names.append(t.name)
        if specs is not None and t.name not in specs.inputs:
            _check_names(model, [t.name], specs)  # raises: unexpected input
        spec = specs.inputs.get(t.name) if specs is not None else None
        if not lengths and not t.has_contents:
            raise RequestError(f"input '{t.name}' for model '{model}' has no data (neither contents "
                               "nor raw_input_contents)")
        elements = _check_tensor(model, t.name, t.datatype, t.shape, spec, lengths[i] if lengths else None,
                                 max_elements)
        if lengths and t.datatype == "BYTES" and raw is not None:
            start = peek.raw_input_starts[i]
            problem = bytes_elements_problem(memoryview(raw)[start:start + lengths[i]], elements)
            if problem:
                raise RequestError(f"input '{t.name}' for model '{model}': raw_input_contents do not match "
                                   f"its {elements} BYTES elements: {problem}")
    _check_names(model, names, specs)


# ------------------------------------------------------------------ other headers and metadata

MAX_HOPS = 255  # far more regions than any deployment has
MAX_HOPS_DIGITS = 3
# Accept-Encoding / Content-Encoding: tokens, q-values, commas and spaces (RFC 9110), ASCII only.
_CODING_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~,;= \t")
MAX_CODING_CHARS = 256


def parse_hops(value: str | None) -> int:
    """``geogate-hops`` (how many gateways forwarded the request): 0 when absent; RequestError
    unless plain ASCII digits, at most MAX_HOPS (int() would also read fullwidth digits and '1_0')."""
    if value is None or value == "":
        return 0
    if not (len(value) <= MAX_HOPS_DIGITS and value.isascii() and value.isdigit()) or int(value) > MAX_HOPS:
        raise RequestError(f"header {HOPS_HEADER} must be an integer from 0 to {MAX_HOPS} (ASCII digits), "
                           f"got {value[:16]!r}")
    return int(value)


def check_coding(header: str, value: str | None) -> None:
    """RequestError unless `value` (Accept-Encoding, Content-Encoding) is a plain ASCII coding
    list: the gateway forwards it to replicas on HTTP/1.1."""
    if value is None:
        return
    if len(value) > MAX_CODING_CHARS or not _CODING_CHARS.issuperset(value):
        raise RequestError(f"header {header} must be a list of ASCII content codings (e.g. gzip, deflate), "
                           f"got {value[:40]!r}")


class ClientErrorLog:
    """Requests refused as malformed, logged at warning level: one line each, at most
    `per_interval` lines per `interval_s` (then one line saying how many were left out), never a
    traceback (a client's mistake is not the gateway's error)."""

    def __init__(self, logger: logging.Logger, *, interval_s: float = 10.0, per_interval: int = 5) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.per_interval = per_interval
        self._window_start_s = 0.0
        self._logged = 0
        self._suppressed = 0

    def allow(self, now_s: float | None = None) -> bool:
        """Whether a line may be written now (counts the ones that may not)."""
        now = time.monotonic() if now_s is None else now_s
        if now - self._window_start_s >= self.interval_s:
            if self._suppressed:
                self.logger.warning("%d more malformed requests were refused in the last %.0f s (not logged one "
                                    "by one)", self._suppressed, self.interval_s)
            self._window_start_s = now
            self._logged = 0
            self._suppressed = 0
        if self._logged < self.per_interval:
            self._logged += 1
            return True
        self._suppressed += 1
        return False

    def refused(self, what: str, detail: str) -> None:
        if self.allow():
            self.logger.warning("refused %s: %s", what, " ".join(str(detail).split())[:300])
