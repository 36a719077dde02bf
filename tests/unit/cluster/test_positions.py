"""Positions per slot and origin, the chain check, and ack tombstones (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cluster.positions import START, Positions, Tombstones


def test_a_slot_not_loaded_has_no_log_position_and_follows_nothing_chained() -> None:
    p = Positions(["fra"])
    assert p.at(3) is None and not p.loaded(3)
    assert not p.follows(3, "5-0")  # any chained entry is a hole: rebuild first
    assert p.follows(3, "")  # an entry from before the chain
    assert p.at(3, "fra") == START  # a mirror not read yet starts at the beginning
    assert p.follows(3, START, "fra") and not p.follows(3, "1-0", "fra")


def test_the_chain_check_follows_each_position() -> None:
    p = Positions(["fra", "iad"])
    p.start(1, None)
    assert p.at(1) == START
    p.advance(1, "10-0")
    assert p.follows(1, "10-0") and not p.follows(1, "9-0")
    p.advance(1, "7-0", "fra")
    assert p.follows(1, "7-0", "fra") and not p.follows(1, "10-0", "fra")
    assert p.at(1, "iad") == START  # origins are independent
    assert p.mirrors_of(1) == {"fra": "7-0"}


def test_a_rebuild_starts_from_the_checkpoint_and_forget_drops_every_position() -> None:
    p = Positions(["fra"])
    p.start(2, "42-1")
    p.advance(2, "3-0", "fra")
    assert p.at(2) == "42-1"
    p.forget(2)
    assert p.at(2) is None and p.mirrors_of(2) == {} and p.log == {}


def test_a_checkpoint_never_moves_a_mirror_back_and_ignores_unknown_origins() -> None:
    p = Positions(["fra"])
    p.advance(4, "20-0", "fra")
    p.merge_mirrors(4, {"fra": {4: "15-0"}, "nyc": {4: "99-0"}})
    assert p.mirrors_of(4) == {"fra": "20-0"}
    p.merge_mirrors(4, {"fra": {4: "25-0", 5: "30-0"}})
    assert p.mirrors_of(4) == {"fra": "25-0"} and p.mirrors_of(5) == {}


@given(st.lists(st.integers(0, 3), max_size=30))
def test_reading_a_chain_in_order_applies_exactly_the_entries_after_a_hole_none(
    holes: list[int],
) -> None:
    """A reader that applies only what follows stops at the first hole."""
    p = Positions([])
    p.start(0, None)
    prev, applied = START, []
    entries = []
    for i, skip in enumerate(holes, 1):
        eid = f"{i}-0"
        entries.append((eid, "gap" if skip == 0 and i > 1 else prev))
        prev = eid
    for eid, before in entries:
        if not p.follows(0, before):
            break
        p.advance(0, eid)
        applied.append(eid)
    first_hole = next((i for i, (_, b) in enumerate(entries) if b == "gap"), len(entries))
    assert len(applied) == first_hole


def test_tombstones_keep_a_window_and_a_bound() -> None:
    t = Tombstones(per_slot=3)
    t.add(1, "c", ["a", "b"], 100, cutoff_hlc=0)
    t.add(1, "c", ["x"], 200, cutoff_hlc=150)  # a and b fall out of the window
    assert list(t.of(1)) == [("c", "x", 200)]
    t.add(1, "d", ["1", "2", "3"], 300, cutoff_hlc=0)
    assert [i for _, i, _ in t.of(1)] == ["1", "2", "3"]  # at most per_slot
    assert t.gone(1) == {("d", "1"), ("d", "2"), ("d", "3")}
    assert list(t.of(9)) == [] and t.gone(9) == set()


def test_tombstones_are_numbered_so_a_writer_takes_only_the_newer_ones() -> None:
    t = Tombstones(per_slot=4)
    t.add(1, "c", ["a", "b", "c"], 100, cutoff_hlc=0)
    assert (t.first(1), t.added(1)) == (0, 3)
    assert t.since(1, 1) == [("c", "b", 100), ("c", "c", 100)]
    assert t.newest(1, 2) == t.since(1, 1) and t.newest(1, 0) == []
    t.add(1, "c", ["d", "e"], 200, cutoff_hlc=0)  # over per_slot: "a" is dropped
    assert (t.first(1), t.added(1)) == (1, 5)
    assert t.since(1, 0) == list(t.of(1))  # older than the oldest: all it holds
    assert t.since(1, 5) == [] and t.since(9, 0) == [] and t.first(9) == 0
    t.add(1, "c", ["f"], 300, cutoff_hlc=250)  # the window drops all but "f"
    assert (t.first(1), t.since(1, 3)) == (5, [("c", "f", 300)])
