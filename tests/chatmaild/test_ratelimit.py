"""GCRA rate limiter: burst, steady rate, bounded memory."""

from __future__ import annotations

import pytest

from chatmaild.ratelimit import RateLimiter


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def test_default_burst_then_one_per_second(clock):
    limiter = RateLimiter(per_minute=60, burst=10, clock=clock)
    assert [limiter.acquire("a") for _ in range(10)] == [None] * 10
    assert limiter.acquire("a") == pytest.approx(1.0)
    clock.now += 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") == pytest.approx(1.0)


def test_refused_requests_do_not_consume(clock):
    limiter = RateLimiter(per_minute=60, burst=2, clock=clock)
    assert limiter.acquire("a") is None and limiter.acquire("a") is None
    for _ in range(100):
        assert limiter.acquire("a") is not None
    clock.now += 1
    assert limiter.acquire("a") is None


@pytest.mark.parametrize(
    "per_minute,burst,seconds,expected",
    [(60, 10, 60, 70), (60, 1, 60, 61), (6, 3, 60, 9), (600, 5, 10, 105)],
    ids=["defaults", "no-burst", "slow", "fast"],
)
def test_allowed_in_a_window(clock, per_minute, burst, seconds, expected):
    limiter = RateLimiter(per_minute=per_minute, burst=burst, clock=clock)
    allowed = 0
    step = 0.01
    for _ in range(int(seconds / step)):
        while limiter.acquire("a") is None:
            allowed += 1
        clock.now += step
    assert abs(allowed - expected) <= 1


def test_keys_are_independent(clock):
    limiter = RateLimiter(per_minute=60, burst=1, clock=clock)
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") is not None
    assert limiter.acquire("b") is None


def test_refilled_keys_are_forgotten(clock):
    limiter = RateLimiter(per_minute=60, burst=10, clock=clock)
    for i in range(1000):
        limiter.acquire(f"user{i}")
    assert len(limiter) == 1000
    clock.now += 1.0  # each key used one unit: refilled after one interval
    limiter.acquire("late")
    assert len(limiter) == 1


def test_limited_keys_are_kept_until_refilled(clock):
    limiter = RateLimiter(per_minute=60, burst=10, clock=clock)
    for _ in range(10):
        limiter.acquire("busy")
    clock.now += 5
    limiter.acquire("other")
    assert len(limiter) == 2
    assert [limiter.acquire("busy") for _ in range(6)][-1] is not None  # 5 refilled
    clock.now += 11
    limiter.acquire("other")
    assert len(limiter) == 1


def test_memory_is_capped_under_a_flood_of_keys(clock):
    limiter = RateLimiter(per_minute=60, burst=10, max_keys=500, clock=clock)
    for i in range(10_000):
        for _ in range(10):
            limiter.acquire(f"spammer{i}")
    assert len(limiter) == 500
    assert limiter.acquire("spammer9999") is not None  # the most recent are still limited


def test_invalid_parameters():
    with pytest.raises(ValueError):
        RateLimiter(per_minute=0, burst=1)
