"""relay.ratelimit: a token bucket driven by the caller's clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.ratelimit import TokenBucket


def test_burst_then_refused() -> None:
    b = TokenBucket(rate_per_s=4, burst=5, now_s=100.0)
    assert [b.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert b.tokens(100.0) == pytest.approx(0.0)


def test_refills_at_rate() -> None:
    b = TokenBucket(rate_per_s=4, burst=5, now_s=0.0)
    for _ in range(5):
        assert b.take(0.0)
    assert not b.take(0.125)  # half a token
    assert b.take(0.25)  # one token after a quarter second
    assert not b.take(0.25)
    assert b.tokens(1.25) == pytest.approx(4.0)
    assert [b.take(1.25) for _ in range(5)] == [True] * 4 + [False]


def test_never_saves_more_than_burst() -> None:
    b = TokenBucket(rate_per_s=1000, burst=3, now_s=0.0)
    assert b.tokens(3600.0) == 3.0
    assert [b.take(3600.0) for _ in range(4)] == [True, True, True, False]


def test_take_n_is_all_or_nothing() -> None:
    b = TokenBucket(rate_per_s=1, burst=10, now_s=0.0)
    assert b.take(0.0, 7)
    assert not b.take(0.0, 4)  # only three left: nothing is spent
    assert b.tokens(0.0) == pytest.approx(3.0)
    assert b.take(0.0, 3)


def test_tokens_does_not_spend() -> None:
    b = TokenBucket(rate_per_s=2, burst=2, now_s=0.0)
    for _ in range(5):
        assert b.tokens(0.0) == 2.0
    assert b.take(0.0) and b.take(0.0) and not b.take(0.0)


def test_time_going_backwards_gives_no_tokens_and_loses_none() -> None:
    b = TokenBucket(rate_per_s=10, burst=10, now_s=50.0)
    for _ in range(10):
        assert b.take(50.0)
    # A clock stepping back must not be read as a long idle period...
    assert not b.take(-1e9)
    assert b.tokens(-1e9) == 0.0
    # ...nor delay the refill measured from the latest time seen.
    assert b.take(50.1)
    assert b.tokens(50.1) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 5), (1, 0), (1, 0.5)])
def test_bad_parameters_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate_per_s=rate, burst=burst, now_s=0.0)


_steps = st.lists(
    st.tuples(
        st.floats(-5.0, 5.0, allow_nan=False),  # time step, possibly backwards
        st.sampled_from([0.5, 1.0, 1.0, 1.0, 2.0, 3.5]),  # tokens asked for
    ),
    max_size=80,
)


@settings(max_examples=300)
@given(
    rate=st.floats(0.1, 50.0),
    burst=st.integers(1, 20),
    steps=_steps,
)
def test_random_clocks(rate: float, burst: int, steps: list[tuple[float, float]]) -> None:
    """Never above burst, never below zero, never more granted than burst + rate x elapsed,
    and a clock that goes backwards behaves exactly like one that stalled."""
    b = TokenBucket(rate, burst, 0.0)
    stalled = TokenBucket(rate, burst, 0.0)
    now = 0.0
    latest = 0.0
    granted = 0.0
    for dt, n in steps:
        now += dt
        latest = max(latest, now)
        ok = b.take(now, n)
        assert ok == stalled.take(latest, n)
        if ok:
            granted += n
        assert 0.0 <= b.tokens(now) <= burst
        assert b.tokens(now) == stalled.tokens(latest)
        assert granted <= burst + rate * latest + 1e-6
