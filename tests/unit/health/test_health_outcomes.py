import grpc
import pytest

from health.outcomes import Outcome, classify_grpc_code, classify_http_status


@pytest.mark.parametrize(("status", "outcome"), [
    (200, Outcome.SUCCESS), (204, Outcome.SUCCESS),
    (400, Outcome.CLIENT_ERROR), (404, Outcome.CLIENT_ERROR), (413, Outcome.CLIENT_ERROR),
    (429, Outcome.UNAVAILABLE), (503, Outcome.UNAVAILABLE),
    (408, Outcome.TIMEOUT), (504, Outcome.TIMEOUT),
    (500, Outcome.SERVER_ERROR), (502, Outcome.SERVER_ERROR),
])
def test_http_status(status, outcome):
    assert classify_http_status(status) is outcome


@pytest.mark.parametrize(("code", "outcome"), [
    (grpc.StatusCode.OK, Outcome.SUCCESS),
    (grpc.StatusCode.UNAVAILABLE, Outcome.UNAVAILABLE),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, Outcome.UNAVAILABLE),
    (grpc.StatusCode.DEADLINE_EXCEEDED, Outcome.TIMEOUT),
    (grpc.StatusCode.INTERNAL, Outcome.SERVER_ERROR),
    (grpc.StatusCode.UNKNOWN, Outcome.SERVER_ERROR),
    (grpc.StatusCode.INVALID_ARGUMENT, Outcome.CLIENT_ERROR),
    (grpc.StatusCode.NOT_FOUND, Outcome.CLIENT_ERROR),
])
def test_grpc_code(code, outcome):
    assert classify_grpc_code(code) is outcome


def test_every_grpc_code_is_classified():
    for code in grpc.StatusCode:
        assert isinstance(classify_grpc_code(code), Outcome)


def test_retryable_and_failure():
    retryable = {o for o in Outcome if o.retryable}
    assert retryable == {Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT, Outcome.UNAVAILABLE}
    failures = {o for o in Outcome if o.is_failure}
    assert failures == set(Outcome) - {Outcome.SUCCESS, Outcome.CLIENT_ERROR, Outcome.DEADLINE_CLIENT,
                                       Outcome.CANCELLED}
    # What the client caused is no verdict on the replica either way.
    assert {o for o in Outcome if o.no_verdict} == {Outcome.DEADLINE_CLIENT, Outcome.CANCELLED}
