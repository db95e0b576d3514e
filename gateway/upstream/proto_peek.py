"""A minimal protobuf wire reader for the gRPC hot path.

The gateway needs a handful of fields from a raw ``inference.ModelInferRequest`` (model name,
version, id, input tensor headers and the lengths of ``raw_input_contents``) and one from a raw
``ModelInferResponse`` (``model_version``). Deserializing the whole message with the generated
classes would copy every tensor blob; this reader walks the wire format over a memoryview and
never touches blob bytes beyond their length prefixes.

Field numbers (grpc_service.proto):
  ModelInferRequest:  1 model_name, 2 model_version, 3 id, 4 parameters (map), 5 inputs,
                      6 outputs, 7 raw_input_contents
  InferInputTensor:   1 name, 2 datatype, 3 shape (packed int64), 4 parameters, 5 contents
  ModelInferResponse: 1 model_name, 2 model_version, 3 id, ...
  InferParameter:     1 bool_param, 2 int64_param, 3 string_param, 4 double_param, 5 uint64_param
"""

from __future__ import annotations

from dataclasses import dataclass, field

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_START_GROUP = 3
WIRE_END_GROUP = 4
WIRE_FIXED32 = 5
MAX_GROUP_DEPTH = 100  # protobuf's own recursion limit

# ModelInferRequest / ModelInferResponse
F_MODEL_NAME = 1
F_MODEL_VERSION = 2
F_ID = 3
F_PARAMETERS = 4
F_INPUTS = 5
F_OUTPUTS = 6
F_RAW_INPUT_CONTENTS = 7
# InferInputTensor
F_T_NAME = 1
F_T_DATATYPE = 2
F_T_SHAPE = 3
F_T_PARAMETERS = 4
F_T_CONTENTS = 5


class ProtoError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(slots=True)
class TensorHeader:
    name: str = ""
    datatype: str = ""
    shape: list[int] = field(default_factory=list)
    has_contents: bool = False  # typed `contents` instead of raw_input_contents


@dataclass(slots=True)
class InferRequestPeek:
    model_name: str = ""
    model_version: str = ""
    id: str = ""
    inputs: list[TensorHeader] = field(default_factory=list)
    raw_input_lengths: list[int] = field(default_factory=list)
    raw_input_starts: list[int] = field(default_factory=list)  # offsets in the message (BYTES checks)
    # Request-level parameters with int values (e.g. Triton's "timeout" in microseconds).
    int_parameters: dict[str, int] = field(default_factory=dict)
    # ... with bool or string values (sequence_start / sequence_end, a string sequence_id).
    other_parameters: dict[str, bool | str] = field(default_factory=dict)


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtoError("varint too long")


def _skip(buf: memoryview, pos: int, end: int, wire: int, fno: int = -1) -> int:
    if wire == WIRE_VARINT:
        _, pos = _varint(buf, pos, end)
    elif wire == WIRE_FIXED64:
        pos += 8
    elif wire == WIRE_LEN:
        n, pos = _varint(buf, pos, end)
        pos += n
    elif wire == WIRE_FIXED32:
        pos += 4
    elif wire == WIRE_START_GROUP:
        pos = _skip_group(buf, pos, end, fno)
    else:
        raise ProtoError(f"unsupported wire type {wire}")
    if pos > end:
        raise ProtoError("field runs past the end of the message")
    return pos


def _skip_group(buf: memoryview, pos: int, end: int, fno: int) -> int:
    """Past the END_GROUP matching a START_GROUP of field `fno` (an unknown field encoded as a
    proto2 group is legal in any message: protobuf skips it, so must we). Found by fuzzing the
    peek against the protobuf runtime."""
    open_groups = [fno]
    while open_groups:
        if pos >= end:
            raise ProtoError("group field runs past the end of the message")
        key, pos = _varint(buf, pos, end)
        f, w = key >> 3, key & 7
        if w == WIRE_END_GROUP:
            if f != open_groups.pop():
                raise ProtoError(f"end-group tag of field {f} does not match its start")
        elif w == WIRE_START_GROUP:
            if len(open_groups) >= MAX_GROUP_DEPTH:
                raise ProtoError(f"groups nested deeper than {MAX_GROUP_DEPTH}")
            open_groups.append(f)
        else:
            pos = _skip(buf, pos, end, w)
    return pos


def _len_field(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """(start, stop) of a length-delimited payload starting at pos (after the tag)."""
    n, pos = _varint(buf, pos, end)
    stop = pos + n
    if stop > end:
        raise ProtoError("length-delimited field runs past the end of the message")
    return pos, stop


def _str(buf: memoryview, start: int, stop: int) -> str:
    try:
        return str(buf[start:stop], "utf-8")
    except UnicodeDecodeError:
        raise ProtoError("string field is not valid UTF-8") from None


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def _peek_tensor(buf: memoryview, pos: int, end: int) -> TensorHeader:
    t = TensorHeader()
    while pos < end:
        key, pos = _varint(buf, pos, end)
        fno, wire = key >> 3, key & 7
        if fno == F_T_NAME and wire == WIRE_LEN:
            s, e = _len_field(buf, pos, end)
            t.name = _str(buf, s, e)
            pos = e
        elif fno == F_T_DATATYPE and wire == WIRE_LEN:
            s, e = _len_field(buf, pos, end)
            t.datatype = _str(buf, s, e)
            pos = e
        elif fno == F_T_SHAPE and wire == WIRE_LEN:  # packed
            s, e = _len_field(buf, pos, end)
            while s < e:
                v, s = _varint(buf, s, e)
                t.shape.append(_signed64(v))
            pos = e
        elif fno == F_T_SHAPE and wire == WIRE_VARINT:  # unpacked (legal too)
            v, pos = _varint(buf, pos, end)
            t.shape.append(_signed64(v))
        elif fno == F_T_CONTENTS:
            t.has_contents = True
            pos = _skip(buf, pos, end, wire, fno)
        else:
            pos = _skip(buf, pos, end, wire, fno)
    return t


def _peek_parameter_entry(buf: memoryview, pos: int, end: int, out: dict[str, int],
                          others: dict[str, bool | str]) -> None:
    """One map<string, InferParameter> entry: key = 1, value = 2. int64/uint64 values go to
    `out`, bool and string values (sequence_start, a string sequence_id) to `others`."""
    key_name = ""
    value: int | None = None
    other: bool | str | None = None
    while pos < end:
        key, pos = _varint(buf, pos, end)
        fno, wire = key >> 3, key & 7
        if fno == 1 and wire == WIRE_LEN:
            s, e = _len_field(buf, pos, end)
            key_name = _str(buf, s, e)
            pos = e
        elif fno == 2 and wire == WIRE_LEN:
            s, e = _len_field(buf, pos, end)
            p = s
            while p < e:
                k2, p = _varint(buf, p, e)
                f2, w2 = k2 >> 3, k2 & 7
                if f2 in (2, 5) and w2 == WIRE_VARINT:
                    v, p = _varint(buf, p, e)
                    value, other = (_signed64(v) if f2 == 2 else v), None
                elif f2 == 1 and w2 == WIRE_VARINT:
                    v, p = _varint(buf, p, e)
                    value, other = None, bool(v)
                elif f2 == 3 and w2 == WIRE_LEN:
                    s2, p = _len_field(buf, p, e)
                    value, other = None, _str(buf, s2, p)
                else:
                    p = _skip(buf, p, e, w2, f2)
            pos = e
        else:
            pos = _skip(buf, pos, end, wire, fno)
    if key_name and value is not None:
        out[key_name] = value
        others.pop(key_name, None)
    elif key_name and other is not None:
        others[key_name] = other
        out.pop(key_name, None)


def peek_infer_request(raw: bytes | memoryview) -> InferRequestPeek:
    """The routing and validation fields of a serialized ModelInferRequest."""
    buf = raw if isinstance(raw, memoryview) else memoryview(raw)
    end = len(buf)
    pos = 0
    peek = InferRequestPeek()
    while pos < end:
        key, pos = _varint(buf, pos, end)
        fno, wire = key >> 3, key & 7
        if wire == WIRE_LEN and fno in (F_MODEL_NAME, F_MODEL_VERSION, F_ID, F_INPUTS,
                                          F_RAW_INPUT_CONTENTS, F_PARAMETERS):
            s, e = _len_field(buf, pos, end)
            if fno == F_RAW_INPUT_CONTENTS:
                peek.raw_input_lengths.append(e - s)
                peek.raw_input_starts.append(s)
            elif fno == F_INPUTS:
                peek.inputs.append(_peek_tensor(buf, s, e))
            elif fno == F_MODEL_NAME:
                peek.model_name = _str(buf, s, e)
            elif fno == F_MODEL_VERSION:
                peek.model_version = _str(buf, s, e)  # last occurrence wins, as in protobuf
            elif fno == F_ID:
                peek.id = _str(buf, s, e)
            else:
                _peek_parameter_entry(buf, s, e, peek.int_parameters, peek.other_parameters)
            pos = e
        else:
            pos = _skip(buf, pos, end, wire, fno)
    return peek


def peek_response_version(raw: bytes | memoryview) -> str:
    """``model_version`` of a serialized ModelInferResponse (empty when absent)."""
    buf = raw if isinstance(raw, memoryview) else memoryview(raw)
    end = len(buf)
    pos = 0
    version = ""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        fno, wire = key >> 3, key & 7
        if fno == F_MODEL_VERSION and wire == WIRE_LEN:
            s, e = _len_field(buf, pos, end)
            version = _str(buf, s, e)
            pos = e
        elif fno in (F_MODEL_NAME, F_ID) and wire == WIRE_LEN:
            pos = _len_field(buf, pos, end)[1]
        else:
            # The version comes right after the name in every known server's encoding;
            # stop at the first bulky field instead of walking the tensors.
            if version:
                break
            pos = _skip(buf, pos, end, wire, fno)
    return version


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def string_field(field_number: int, value: str) -> bytes:
    data = value.encode()
    return _encode_varint((field_number << 3) | WIRE_LEN) + _encode_varint(len(data)) + data


def with_model_version(raw: bytes, version: str) -> bytes:
    """The request with ``model_version`` set to `version`: appends field 2 (the last occurrence
    of a scalar field wins when parsing), so the tensor bytes are never re-encoded."""
    return raw + string_field(F_MODEL_VERSION, version)


# ---------------------------------------------------------------------------- streams

FINAL_RESPONSE_PARAMETER = "triton_final_response"


@dataclass(frozen=True, slots=True)
class ResponsePeek:
    error_message: str
    request_id: str
    final: bool | None  # triton_final_response, when the replica says


def peek_stream_response(raw: bytes) -> ResponsePeek:
    """error_message, infer_response.id and its triton_final_response parameter of a serialized
    ModelStreamInferResponse, without decoding the tensors."""
    buf = memoryview(raw)
    end = len(buf)
    pos = 0
    error = ""
    rid = ""
    final: bool | None = None
    while pos < end:
        key, pos = _varint(buf, pos, end)
        fno, wire = key >> 3, key & 7
        if fno == 1 and wire == WIRE_LEN:
            s, e = _len_field(buf, pos, end)
            error = _str(buf, s, e)
            pos = e
        elif fno == 2 and wire == WIRE_LEN:
            s, e = _len_field(buf, pos, end)
            rid, final = _peek_infer_response(buf, s, e)
            pos = e
        else:
            pos = _skip(buf, pos, end, wire, fno)
    return ResponsePeek(error, rid, final)


def _peek_infer_response(buf: memoryview, pos: int, end: int) -> tuple[str, bool | None]:
    rid = ""
    ints: dict[str, int] = {}
    others: dict[str, bool | str] = {}
    while pos < end:
        key, pos = _varint(buf, pos, end)
        fno, wire = key >> 3, key & 7
        if fno == 3 and wire == WIRE_LEN:  # id
            s, e = _len_field(buf, pos, end)
            rid = _str(buf, s, e)
            pos = e
        elif fno == 4 and wire == WIRE_LEN:  # parameters map entry
            s, e = _len_field(buf, pos, end)
            _peek_parameter_entry(buf, s, e, ints, others)
            pos = e
        else:
            pos = _skip(buf, pos, end, wire, fno)
    final = others.get(FINAL_RESPONSE_PARAMETER)
    return rid, final if isinstance(final, bool) else None
