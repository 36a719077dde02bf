"""The batcher: windows, full batches, waiters, in-flight bookkeeping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.batch import Batcher, ack_events
from relay.codec import MessageEvent, decode_batch, encode_batch


def msg(i: int, ch: str = "c", body: bytes = b"x") -> MessageEvent:
    return MessageEvent(str(i), ch, "anon", i, "sg", body, 10**12)


def test_nothing_to_flush_before_the_window_ends() -> None:
    b = Batcher(window_ms=100)
    assert b.deadline_ms() is None
    assert b.add(3, msg(1), now_ms=1000) == []
    assert b.deadline_ms() == 1100
    assert b.flush(1099) == []
    (entry,) = b.flush(1100)
    assert entry.slot == 3 and [e.id for e in entry.events] == ["1"]  # type: ignore[union-attr]
    assert b.deadline_ms() is None and b.pending_events == 0 and b.in_flight == 1


def test_one_entry_per_changed_slot_in_slot_order() -> None:
    b = Batcher(window_ms=100)
    for i, slot in enumerate([5, 1, 5, 9, 1]):
        b.add(slot, msg(i), now_ms=0, waiter=("w", i))
    out = b.flush(100)
    assert [e.slot for e in out] == [1, 5, 9]
    assert [len(e.events) for e in out] == [2, 2, 1]
    assert out[1].waiters == (("w", 0), ("w", 2))
    assert len({e.batch_id for e in out}) == 3


def test_full_batch_is_cut_at_once() -> None:
    b = Batcher(window_ms=100, max_events=3)
    assert b.add(0, msg(1), 0) == []
    assert b.add(0, msg(2), 0) == []
    (entry,) = b.add(0, msg(3), 0)
    assert len(entry.events) == 3
    assert b.flush(1000) == []


def test_byte_cap_cuts_a_batch() -> None:
    b = Batcher(window_ms=100, max_bytes=1000)
    assert b.add(0, msg(1, body=b"x" * 500), 0) == []
    assert len(b.add(0, msg(2, body=b"x" * 500), 0)) == 1


def test_force_flush_ignores_the_window() -> None:
    b = Batcher(window_ms=100)
    b.add(0, msg(1), 0)
    assert len(b.flush(1, force=True)) == 1


def test_appended_and_failed_release_in_flight_entries() -> None:
    b = Batcher()
    b.add(0, msg(1), 0, waiter="a")
    b.add(1, msg(2), 0, waiter="b")
    e0, e1 = b.flush(10_000)
    assert b.appended(e0.batch_id).waiters == ("a",)
    assert b.append_failed(e1.batch_id).waiters == ("b",)
    assert b.in_flight == 0
    with pytest.raises(KeyError):
        b.appended(e0.batch_id)


def test_ack_events_are_split_to_the_codec_bound() -> None:
    evs = ack_events("c", [str(i) for i in range(2500)], 7, "sg")
    assert [len(e.ids) for e in evs] == [1000, 1000, 500]
    assert decode_batch(encode_batch(evs)) == evs


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 300)), max_size=200))
def test_every_event_is_handed_out_exactly_once(adds: list[tuple[int, int]]) -> None:
    b = Batcher(window_ms=50, max_events=10)
    seen: list[str] = []
    for n, (slot, t) in enumerate(adds):
        for entry in b.add(slot, msg(n), now_ms=t) + b.flush(t):
            seen.extend(e.id for e in entry.events)  # type: ignore[union-attr]
    for entry in b.flush(10**9, force=True):
        seen.extend(e.id for e in entry.events)  # type: ignore[union-attr]
    assert sorted(seen, key=int) == [str(n) for n in range(len(adds))]
