"""relay.hlc: strictly increasing timestamps whatever the wall clock does."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.hlc import LOGICAL_BITS, HybridClock, from_ms, physical_ms

T0 = 1_700_000_000_000  # a plausible wall clock, in ms
MAX_LOGICAL = (1 << LOGICAL_BITS) - 1


def test_from_ms_and_physical_ms_are_inverse() -> None:
    assert physical_ms(from_ms(T0)) == T0
    assert physical_ms(from_ms(T0) | MAX_LOGICAL) == T0
    assert from_ms(T0 + 1) == from_ms(T0) + MAX_LOGICAL + 1


def test_tick_follows_an_advancing_wall_clock() -> None:
    c = HybridClock()
    assert c.tick(T0) == from_ms(T0)
    assert c.tick(T0 + 5) == from_ms(T0 + 5)
    assert physical_ms(c.tick(T0 + 6)) == T0 + 6


def test_stalled_wall_clock_counts_logically() -> None:
    c = HybridClock()
    ts = [c.tick(T0) for _ in range(5)]
    assert ts == [from_ms(T0) + i for i in range(5)]
    assert {physical_ms(t) for t in ts} == {T0}


def test_backwards_wall_clock_never_goes_backwards() -> None:
    c = HybridClock()
    a = c.tick(T0)
    b = c.tick(T0 - 10_000)  # NTP step back by ten seconds
    d = c.tick(T0 - 1)
    assert a < b < d
    assert physical_ms(d) == T0  # stays at the highest wall time seen
    # Once the wall clock passes what was issued, it is followed again.
    assert c.tick(T0 + 1) == from_ms(T0 + 1)


def test_logical_overflow_carries_into_the_physical_part() -> None:
    c = HybridClock(last=from_ms(T0) | MAX_LOGICAL)
    t = c.tick(T0)
    assert t == from_ms(T0 + 1)
    assert physical_ms(t) == T0 + 1
    # The next tick at the real wall time T0 + 1 still increases.
    assert c.tick(T0 + 1) == from_ms(T0 + 1) + 1


def test_observe_moves_past_a_remote_timestamp() -> None:
    c = HybridClock()
    c.tick(T0)
    remote = from_ms(T0 + 60_000) + 7  # a region whose clock is a minute ahead
    c.observe(remote)
    t = c.tick(T0 + 1)
    assert t == remote + 1
    assert physical_ms(t) == T0 + 60_000


def test_observe_of_an_older_timestamp_changes_nothing() -> None:
    c = HybridClock()
    t1 = c.tick(T0)
    c.observe(from_ms(T0 - 5))
    c.observe(t1)
    assert c.tick(T0) == t1 + 1


_event = st.one_of(
    st.tuples(st.just("tick"), st.integers(-50, 50)),
    st.tuples(st.just("observe"), st.integers(-50, 50), st.integers(0, MAX_LOGICAL)),
)


@settings(max_examples=300)
@given(
    start=st.integers(0, 2**40),
    last_logical=st.integers(0, MAX_LOGICAL),
    events=st.lists(_event, max_size=60),
)
def test_random_wall_clock_sequences(
    start: int, last_logical: int, events: list[tuple[Any, ...]]
) -> None:
    """Whatever the wall clock and the remotes do, tick() is strictly increasing, above
    everything observed, at least the wall time, and never runs ahead of the largest time
    seen by more than the number of ticks."""
    initial = from_ms(start) | last_logical
    c = HybridClock(last=initial)
    wall = start
    highest_seen = initial  # largest timestamp issued, observed or implied by the wall
    previous = initial
    for ev in events:
        kind, delta = ev[0], ev[1]
        if kind == "tick":
            wall = max(0, wall + delta)
            t = c.tick(wall)
            assert t > previous
            assert t >= from_ms(wall)
            # Close to wall time: a tick adds one to the best known time, at most.
            assert t <= max(highest_seen + 1, from_ms(wall))
            highest_seen = max(highest_seen, t)
            previous = t
        else:
            remote = from_ms(max(0, wall + delta)) | ev[2]
            c.observe(remote)
            highest_seen = max(highest_seen, remote)
            previous = max(previous, remote)
