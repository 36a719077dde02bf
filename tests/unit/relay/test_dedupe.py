"""relay.dedupe: the window, lookups, the bound on remembered ids, and a model test."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.dedupe import DedupeIndex, dedupe_key
from relay.hlc import from_ms

T0 = 1_700_000_000_000
WINDOW_MS = 600_000


def test_lookup_returns_the_accepted_timestamp_within_the_window() -> None:
    d = DedupeIndex(window_ms=WINDOW_MS, max_ids=10)
    hlc = from_ms(T0) | 42  # the logical part is kept, not just the milliseconds
    d.remember("k", hlc, T0 + 5)
    assert d.lookup("k", T0 + 5) == hlc
    assert d.lookup("k", T0 + WINDOW_MS - 1) == hlc
    assert d.lookup("other", T0 + 5) is None


def test_window_expiry() -> None:
    d = DedupeIndex(window_ms=WINDOW_MS, max_ids=10)
    d.remember("old", from_ms(T0), T0)
    d.remember("new", from_ms(T0 + 1000), T0 + 1000)
    assert d.lookup("old", T0 + WINDOW_MS) is None  # window measured from acceptance
    assert d.lookup("new", T0 + WINDOW_MS) == from_ms(T0 + 1000)
    assert d.expire(T0 + WINDOW_MS) == 1
    assert len(d) == 1
    assert d.expire(T0 + WINDOW_MS + 1000) == 1
    assert len(d) == 0
    assert d.expire(T0 + 10 * WINDOW_MS) == 0


def test_remembering_after_the_window_passed_is_a_no_op() -> None:
    d = DedupeIndex(window_ms=WINDOW_MS, max_ids=10)
    d.remember("late", from_ms(T0), T0 + WINDOW_MS)
    assert len(d) == 0
    assert d.lookup("late", T0) is None


def test_remembering_again_within_the_window_keeps_the_first_timestamp() -> None:
    d = DedupeIndex(window_ms=WINDOW_MS, max_ids=10)
    d.remember("k", from_ms(T0), T0)
    d.remember("k", from_ms(T0 + 9), T0 + 9)
    assert len(d) == 1
    assert d.lookup("k", T0 + 10) == from_ms(T0)


def test_bound_on_max_ids_forgets_the_oldest_and_counts_them() -> None:
    d = DedupeIndex(window_ms=WINDOW_MS, max_ids=3)
    for i in range(5):
        d.remember(f"k{i}", from_ms(T0 + i), T0 + i)
    assert len(d) == 3
    assert d.forgotten_early == 2
    assert [d.lookup(f"k{i}", T0 + 10) is not None for i in range(5)] == [False, False] + [True] * 3


def test_expire_limit_spreads_the_work() -> None:
    d = DedupeIndex(window_ms=WINDOW_MS, max_ids=100)
    for i in range(5):
        d.remember(f"k{i}", from_ms(T0 + i), T0 + i)
    later = T0 + 2 * WINDOW_MS
    assert d.expire(later, limit=2) == 2
    assert len(d) == 3
    assert d.expire(later, limit=2) == 2
    assert d.expire(later, limit=2) == 1
    assert len(d) == 0


def test_dedupe_key_is_per_channel_and_unambiguous() -> None:
    assert dedupe_key("a", "x") != dedupe_key("b", "x")
    assert dedupe_key("a", "bc") != dedupe_key("ab", "c")
    assert dedupe_key("room:1", "m") == dedupe_key("room:1", "m")


@pytest.mark.parametrize(("window_ms", "max_ids", "max_weak"), [(-1, 10, 1), (10, 0, 1), (1, 1, 0)])
def test_bad_parameters_are_refused(window_ms: int, max_ids: int, max_weak: int) -> None:
    with pytest.raises(ValueError):
        DedupeIndex(window_ms=window_ms, max_ids=max_ids, max_weak=max_weak)


def test_remember_again_after_the_window_before_expire_runs() -> None:
    d = DedupeIndex(window_ms=WINDOW_MS, max_ids=10)
    d.remember("k", from_ms(T0), T0)
    later = T0 + WINDOW_MS + 1
    assert d.lookup("k", later) is None  # the window passed: the id may be used again
    d.remember("k", from_ms(later), later)  # accepted again, then acked
    assert d.lookup("k", later + 1) == from_ms(later)


def test_remember_again_after_out_of_order_acks_and_expire() -> None:
    d = DedupeIndex(window_ms=WINDOW_MS, max_ids=10)
    d.remember("young", from_ms(T0 + 500_000), T0 + 500_000)  # acked first
    d.remember("old", from_ms(T0), T0 + 501_000)  # acked later, accepted long before
    t = T0 + 700_000
    d.expire(t)
    assert d.lookup("old", t) is None
    d.remember("old", from_ms(t), t + 1)  # the id reused, accepted and acked again
    assert d.lookup("old", t + 2) == from_ms(t)


def test_weak_ids_are_held_apart_and_never_push_out_accepted_ones() -> None:
    d = DedupeIndex(window_ms=WINDOW_MS, max_ids=10, max_weak=3)
    for i in range(8):
        d.remember(f"s{i}", from_ms(T0), T0)
    for i in range(100):  # acks of ids never seen here
        d.remember(f"w{i}", from_ms(T0 + 1), T0 + 1, weak=True)
    now = T0 + 2
    assert all(d.lookup(f"s{i}", now) is not None for i in range(8))
    # Every weak id that fits: 3 at most, and not past max_ids in all.
    assert [i for i in range(100) if d.lookup(f"w{i}", now) is not None] == [98, 99]
    assert len(d) == 10 and d.forgotten_early == 98
    d.remember("w99", from_ms(now), now, weak=True)  # within its window: kept as it was
    assert d.lookup("w99", now) == from_ms(T0 + 1)
    d.remember("s8", from_ms(now), now)  # full: the oldest weak id goes first
    assert d.lookup("w98", now) is None and d.lookup("s0", now) is not None
    assert len(d) == 10
    d.remember("w99", from_ms(now), now)  # its message accepted later: held as any other
    later = T0 + 1 + WINDOW_MS
    d.expire(later)
    assert d.lookup("w99", later) == from_ms(now) and d.lookup("s0", later) is None


def test_a_fresh_weak_id_is_seen_past_an_accepted_one_whose_window_passed() -> None:
    d = DedupeIndex(window_ms=WINDOW_MS, max_ids=10)
    d.remember("k", from_ms(T0), T0)
    later = T0 + WINDOW_MS + 1  # not swept yet
    d.remember("k", from_ms(later), later, weak=True)  # the id reused, acked early
    assert d.lookup("k", later) == from_ms(later)


# -- model test ------------------------------------------------------------------------


@dataclass
class Model:
    """The index as a list in remember order (hlcs are remembered in order here)."""

    window_ms: int
    max_ids: int
    entries: list[tuple[str, int]] = field(default_factory=list)  # (key, accepted ms)
    live_forgotten: int = 0
    all_forgotten: int = 0

    def find(self, key: str) -> int | None:
        for k, ms in self.entries:
            if k == key:
                return ms
        return None

    def live(self, ms: int, now: int) -> bool:
        return ms + self.window_ms > now


# Small times, so that the edges of the window (== and off by one) come up often.
_op = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0, 1, 2, 3, 5, 10])),
    st.tuples(st.just("remember"), st.integers(0, 9), st.integers(0, 8)),
    st.tuples(st.just("lookup"), st.integers(0, 9)),
    st.tuples(st.just("expire")),
)


@settings(max_examples=300)
@given(
    window_ms=st.sampled_from([0, 1, 3, 10, 20]),
    max_ids=st.integers(1, 6),
    ops=st.lists(_op, max_size=60),
)
@example(window_ms=1, max_ids=3, ops=[("remember", 0, 0), ("advance", 1), ("expire",)])
def test_against_a_model(window_ms: int, max_ids: int, ops: list[tuple[Any, ...]]) -> None:
    """A key is remembered again only while it is live or after the index dropped it
    (re-remembering an expired id has its own tests above)."""
    d = DedupeIndex(window_ms=window_ms, max_ids=max_ids)
    m = Model(window_ms, max_ids)
    now = T0
    last_ms = T0 - 100  # remembered acceptance times never decrease in this test
    for op in ops:
        kind = op[0]
        if kind == "advance":
            now += op[1]
        elif kind == "remember":
            key = f"k{op[1]}"
            ms = max(last_ms, now - op[2])
            prior = m.find(key)
            if prior is not None and not m.live(prior, now):
                continue  # re-remembering after expiry: tested on its own above
            d.remember(key, from_ms(ms) | 1, now)
            if m.live(ms, now) and prior is None:
                last_ms = ms
                m.entries.append((key, ms))
                while len(m.entries) > max_ids:
                    _, gone = m.entries.pop(0)
                    m.all_forgotten += 1
                    m.live_forgotten += m.live(gone, now)
        elif kind == "lookup":
            key = f"k{op[1]}"
            ms_or_none = m.find(key)
            want = None if ms_or_none is None or not m.live(ms_or_none, now) else ms_or_none
            assert d.lookup(key, now) == (None if want is None else from_ms(want) | 1)
        else:
            before = len(m.entries)
            m.entries = [(k, ms) for k, ms in m.entries if m.live(ms, now)]
            assert d.expire(now) == before - len(m.entries)
        assert len(d) == len(m.entries) <= max_ids
        # Ids dropped for the bound while still live must be counted; whether an id
        # already past its window (not yet swept) counts as "early" is left open.
        assert m.live_forgotten <= d.forgotten_early <= m.all_forgotten
        for i in range(10):
            found = m.find(f"k{i}")
            live = found if found is not None and m.live(found, now) else None
            assert d.lookup(f"k{i}", now) == (None if live is None else from_ms(live) | 1)
