"""gateway.front.rate_limit: token bucket, concurrency limiter, Retry-After values."""

import math

import pytest

from gateway.front.rate_limit import ConcurrencyLimiter, TokenBucket, format_wait, retry_after_header


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_bucket_burst_then_rate():
    clock = FakeClock()
    b = TokenBucket(10.0, 5, clock=clock)
    assert [b.try_take() for _ in range(5)] == [0.0] * 5  # the burst
    wait = b.try_take()
    assert wait == pytest.approx(0.1)  # one token every 1/10 s
    clock.t += 0.05
    assert b.try_take() == pytest.approx(0.05)
    clock.t += 0.05
    assert b.try_take() == 0.0
    assert b.try_take() == pytest.approx(0.1)


def test_bucket_refill_caps_at_burst():
    clock = FakeClock()
    b = TokenBucket(100.0, 3, clock=clock)
    for _ in range(3):
        assert b.try_take() == 0.0
    clock.t += 3600  # an hour idle still gives only `burst` tokens
    assert b.tokens() == pytest.approx(3.0)
    assert sum(1 for _ in range(10) if b.try_take() == 0.0) == 3


def test_bucket_long_run_rate_is_respected():
    clock = FakeClock()
    b = TokenBucket(50.0, 10, clock=clock)
    admitted = 0
    for _ in range(10_000):  # 10 s of attempts every 1 ms
        clock.t += 0.001
        if b.try_take() == 0.0:
            admitted += 1
    assert 500 <= admitted <= 50 * 10 + 10 + 1


def test_bucket_clock_going_backwards_mints_nothing():
    clock = FakeClock()
    b = TokenBucket(1.0, 1, clock=clock)
    assert b.try_take() == 0.0
    clock.t -= 100
    assert b.try_take() > 0
    clock.t += 100
    assert b.try_take() > 0


def test_bucket_impossible_request_and_bad_args():
    b = TokenBucket(5.0, 2, clock=FakeClock())
    assert math.isinf(b.try_take(3))
    with pytest.raises(ValueError, match="rate_per_s"):
        TokenBucket(0)
    assert TokenBucket(0.5, clock=FakeClock()).burst == 1.0  # at least one request can ever pass
    assert b.same_limits(5.0, 2) and not b.same_limits(5.0, 3)


def test_concurrency_limiter():
    c = ConcurrencyLimiter(2)
    assert c.try_acquire() and c.try_acquire()
    assert not c.try_acquire()
    c.release()
    assert c.try_acquire()
    c.release()
    c.release()
    c.release()  # extra releases never go negative
    assert c.in_flight == 0
    with pytest.raises(ValueError, match="limit"):
        ConcurrencyLimiter(0)


@pytest.mark.parametrize(("wait", "header"), [(0.0, "1"), (0.12, "1"), (1.0, "1"), (1.01, "2"), (59.5, "60"),
                                              (math.inf, "3600")])
def test_retry_after_header(wait, header):
    assert retry_after_header(wait) == header


def test_format_wait():
    assert format_wait(0.123) == "0.12 s"
    assert "never" in format_wait(math.inf)
