"""core.kserve: one HTTP status <-> gRPC code mapping, Triton's where geogate's old tables disagreed."""

import grpc
import pytest

from core import kserve
from core.kserve import GRPC_TO_HTTP, HTTP_TO_GRPC, grpc_to_http, http_to_grpc


@pytest.mark.parametrize(("status", "code"), [
    (200, grpc.StatusCode.OK),
    (400, grpc.StatusCode.INVALID_ARGUMENT),
    (401, grpc.StatusCode.UNAUTHENTICATED),
    (403, grpc.StatusCode.PERMISSION_DENIED),
    (404, grpc.StatusCode.NOT_FOUND),
    (409, grpc.StatusCode.ALREADY_EXISTS),
    (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (415, grpc.StatusCode.INVALID_ARGUMENT),
    (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (499, grpc.StatusCode.CANCELLED),
    (500, grpc.StatusCode.INTERNAL),
    (501, grpc.StatusCode.UNIMPLEMENTED),
    (503, grpc.StatusCode.UNAVAILABLE),
    (504, grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_http_to_grpc_listed(status, code):
    assert http_to_grpc(status) is code


def test_unlisted_client_errors_are_invalid_argument_as_triton_answers():
    # The replica's old table answered UNKNOWN here, the gateway's INVALID_ARGUMENT; Triton's
    # HTTP 400 class is INVALID_ARGUMENT on its gRPC endpoint.
    for status in (405, 411, 422, 431):
        assert http_to_grpc(status) is grpc.StatusCode.INVALID_ARGUMENT


def test_unlisted_other_statuses_are_internal():
    for status in (302, 502, 505, 599):
        assert http_to_grpc(status) is grpc.StatusCode.INTERNAL


def test_grpc_to_http_and_default():
    assert grpc_to_http(grpc.StatusCode.OK) == 200
    assert grpc_to_http(grpc.StatusCode.NOT_FOUND) == 404
    assert grpc_to_http(grpc.StatusCode.UNAVAILABLE) == 503
    assert grpc_to_http(grpc.StatusCode.RESOURCE_EXHAUSTED) == 429
    assert grpc_to_http(grpc.StatusCode.UNKNOWN) == 500
    assert grpc_to_http(grpc.StatusCode.DATA_LOSS) == 500


def test_round_trip_from_grpc():
    # Every gRPC code with an HTTP status comes back as itself, except the ones that share 400
    # with INVALID_ARGUMENT.
    shared_400 = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
    for code, status in GRPC_TO_HTTP.items():
        expected = grpc.StatusCode.INVALID_ARGUMENT if code in shared_400 else code
        assert http_to_grpc(status) is expected, code


def test_every_listed_status_maps_back_to_its_class():
    # 408 (the client's request timed out) and 504 share DEADLINE_EXCEEDED, which reads back as 504.
    for status, code in HTTP_TO_GRPC.items():
        if status == 408:
            continue
        back = grpc_to_http(code)
        assert back // 100 == status // 100, (status, code, back)


def test_request_timeout_reads_back_as_gateway_timeout():
    assert grpc_to_http(http_to_grpc(408)) == 504


def test_one_definition_of_each_header():
    assert kserve.PRIORITY_HEADER == "geogate-priority"
    assert kserve.HEADER_LENGTH_LC == "inference-header-content-length"
    assert kserve.REQUEST_ID_HEADERS == ("geogate-request-id", "x-request-id")


def test_modules_use_the_shared_definitions():
    from gateway.routing import admission
    from gateway.upstream import peer_links
    from replicas.server import infer_errors

    assert admission.PRIORITY_HEADER is kserve.PRIORITY_HEADER
    assert peer_links.PRIORITY_HEADER is kserve.PRIORITY_HEADER
    assert infer_errors.InferError(415, "x").grpc_code is grpc.StatusCode.INVALID_ARGUMENT
    assert infer_errors.InferError(422, "x").grpc_code is grpc.StatusCode.INVALID_ARGUMENT
