"""peek_stream_response reads what the stream relay needs of a ModelStreamInferResponse (error,
request id, triton_final_response) the way protobuf itself does."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2

from gateway.upstream.grpc_stream import error_response
from gateway.upstream.proto_peek import ProtoError, peek_stream_response


@pytest.mark.parametrize("final", [None, True, False])
def test_peek_matches_protobuf(final):
    resp = service_pb2.ModelStreamInferResponse()
    r = resp.infer_response
    r.model_name, r.id = "repeat", "req-7"
    r.parameters["other"].int64_param = 3
    if final is not None:
        r.parameters["triton_final_response"].bool_param = final
    out = r.outputs.add(name="OUT", datatype="INT32", shape=[1])
    out.contents.int_contents.append(42)
    peek = peek_stream_response(resp.SerializeToString())
    assert (peek.error_message, peek.request_id, peek.final) == ("", "req-7", final)


def test_error_responses_round_trip():
    raw = error_response("replica x failed", model="m", request_id="r1")
    peek = peek_stream_response(raw)
    assert (peek.error_message, peek.request_id, peek.final) == ("replica x failed", "r1", None)
    parsed = service_pb2.ModelStreamInferResponse.FromString(raw)
    assert parsed.error_message == "replica x failed" and parsed.infer_response.model_name == "m"


def test_truncated_response_is_refused():
    raw = error_response("x" * 50, request_id="r")
    with pytest.raises(ProtoError):
        peek_stream_response(raw[:-3])
