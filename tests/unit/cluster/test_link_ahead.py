"""What a (re)starting link read ahead of its log, from the positions the destination
last confirmed, against what a read from the mirrors' tops gives (cluster/linkread.py,
``ahead_from``): never an entry the read from the tops would not give, in its order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.chain import split_on_gaps
from cluster.linkread import ahead_from
from cluster.slotlog import TailEntry

COUNT = 5  # entries a read gives per slot at most


def _id(n: int) -> str:
    return f"{n}-0" if n else "0-0"


@st.composite
def slots(draw: st.DrawFn) -> tuple[list[TailEntry], str, str]:
    """One slot's log (entries 1..n, the first ``trimmed`` gone), where a read ahead
    started and the mirror's top: each anywhere, trimmed entries included."""
    slot = draw(st.integers(0, 3))
    n = draw(st.integers(0, 12))
    trimmed = draw(st.integers(0, n))
    log = [
        TailEntry(slot, _id(i), b"x%d" % i, _id(i - 1) if i > 1 else "")
        for i in range(trimmed + 1, n + 1)
    ]
    read_from = _id(draw(st.integers(0, n)))
    top = _id(draw(st.integers(0, n)))
    return log, read_from, top


def _after(log: list[TailEntry], at: str) -> list[TailEntry]:
    n = int(at.split("-")[0])
    return [e for e in log if int(e.id.split("-")[0]) > n][:COUNT]


@settings(max_examples=500)
@given(st.lists(slots(), min_size=1, max_size=4, unique_by=lambda t: t[0][0].slot if t[0] else -1))
def test_what_is_kept_is_what_a_read_from_the_tops_gives_first(
    drawn: list[tuple[list[TailEntry], str, str]],
) -> None:
    drawn = [d for d in drawn if d[0]]
    read_from = {d[0][0].slot: d[1] for d in drawn}
    tops = {d[0][0].slot: d[2] for d in drawn}
    read = [e for log, at, _ in drawn for e in _after(log, at)]
    kept = ahead_from((read_from, read), tops)
    for log, at, top in drawn:
        slot = log[0].slot
        mine = [e for e in kept if e.slot == slot]
        from_top = _after(log, top)
        # A prefix of what the read from the top gives: same entries, same order.
        assert mine == from_top[: len(mine)]
        if at == top:
            assert mine == from_top  # read from the top itself: all of it
        elif mine:
            # Taken in from the top, the chain holds (no gap invented).
            good, gaps = split_on_gaps({slot: top}, mine)
            assert good == mine and not gaps


def test_a_slot_read_from_elsewhere_is_left_to_the_next_read() -> None:
    log = [TailEntry(0, _id(i), b"", _id(i - 1) if i > 1 else "") for i in range(1, 6)]
    # Read from 0-0, top 3-0: 4 and 5 kept; top 9-0 (beyond the read): nothing.
    assert ahead_from(({0: "0-0"}, log), {0: "3-0"}) == log[3:]
    assert ahead_from(({0: "0-0"}, log), {0: "9-0"}) == []
    # Top 3-0 is not in this log any more (4 follows 2 after a restart of the log):
    # none of it, the copy reads the slot from its top and finds the gap itself.
    other = [TailEntry(0, "4-0", b"", "2-0"), TailEntry(0, "5-0", b"", "4-0")]
    assert ahead_from(({0: "0-0"}, other), {0: "3-0"}) == []
    # A slot without a top (not the link's) is left out.
    assert ahead_from(({0: "0-0"}, log), {}) == []
