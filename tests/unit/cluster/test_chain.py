"""cluster/chain.py: chain checks and trim floors, alone and under random interleavings.

The property tests run appends, acks, checkpoints, trims, link reads and the passing of
time in any order against the in-memory slot log (the same trim rules as Redis) and
check that a reader never skips an entry: whatever it holds at its position is exactly
what the slot held there, and a link that never falls further behind than the stated
backlog never needs a resync.
"""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.chain import TrimBound, parse_id, split_on_gaps, trim_bound
from cluster.slotlog import MemorySlotLog, TailEntry

SLOT = 3
OWNER = "sg/n1"


def test_entries_that_follow_on_are_taken_and_a_break_stops_its_slot() -> None:
    entries = [
        TailEntry(1, "5-0", b"", "4-0"),
        TailEntry(1, "6-0", b"", "5-0"),
        TailEntry(2, "9-0", b"", "7-0"),  # slot 2 stands at 8-0: 8-0 was trimmed
        TailEntry(2, "10-0", b"", "9-0"),
        TailEntry(3, "2-0", b"", ""),  # no p recorded: taken
    ]
    good, gaps = split_on_gaps({1: "4-0", 2: "8-0", 3: "1-0"}, entries)
    assert [(e.slot, e.id) for e in good] == [(1, "5-0"), (1, "6-0"), (3, "2-0")]
    assert gaps == {2: "7-0"}


def test_a_slot_never_read_starts_at_zero() -> None:
    good, gaps = split_on_gaps({}, [TailEntry(4, "1-0", b"", "0-0")])
    assert [e.id for e in good] == ["1-0"] and gaps == {}
    good, gaps = split_on_gaps({}, [TailEntry(4, "3-0", b"", "2-0")])
    assert good == [] and gaps == {4: "2-0"}


def test_trim_bound_rules() -> None:
    common: dict[str, Any] = {"now_ms": 100_000, "max_backlog_ms": 10_000}
    # No links: the checkpoint is the bound.
    assert trim_bound(covers="50-0", links=[], **common) == TrimBound("50-0")
    # Links ahead of the checkpoint: the checkpoint.
    assert trim_bound(covers="50-0", links=[("60-0", None)], **common) == TrimBound("50-0")
    # A link behind, recently: its position.
    recent = ("40-0", "95000-0")
    assert trim_bound(covers="95000-0", links=[recent], **common) == TrimBound("40-0")
    # A link behind by more than the backlog bound: gapped, the checkpoint.
    old = ("40-0", "41-0")
    assert trim_bound(covers="95000-0", links=[old], **common) == TrimBound("95000-0", gapped=True)
    # Nothing the checkpoint covers waits: the checkpoint.
    idle = ("40-0", "96000-0")
    assert trim_bound(covers="95000-0", links=[idle], **common) == TrimBound("95000-0")
    # One link gapped does not pass over the others: the healthy one still holds the log.
    healthy = ("94000-0", "94500-0")
    assert trim_bound(covers="95000-0", links=[old, healthy], **common) == TrimBound(
        "94000-0", gapped=True
    )
    assert trim_bound(covers="95000-0", links=[recent, healthy], **common) == TrimBound("40-0")


# ---- random interleavings ----------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("pub"), st.integers(0, 0)),
        st.tuples(st.just("ack"), st.integers(0, 50)),
        st.tuples(st.just("checkpoint"), st.integers(0, 0)),
        st.tuples(st.just("trim"), st.integers(0, 0)),
        st.tuples(st.just("read"), st.integers(1, 5)),
        st.tuples(st.just("time"), st.integers(1, 4000)),
    ),
    max_size=80,
)


@dataclass
class Reader:
    """A link (or a replica): reads after its position, checks the chain, resyncs."""

    position: str = "0-0"
    state: frozenset[int] = frozenset()
    resyncs: int = 0
    behind_since_ms: int | None = None  # time of the oldest entry it has not read


@dataclass
class World:
    log: MemorySlotLog
    now_ms: list[int]
    pending: set[int] = field(default_factory=set)
    state_at: dict[str, frozenset[int]] = field(default_factory=lambda: {"0-0": frozenset()})
    checkpoints: dict[str, frozenset[int]] = field(default_factory=dict)
    covers: str = "0-0"
    next_id: int = 0


def drive(coro: Coroutine[Any, Any, list[Reader]]) -> list[Reader]:
    """Run a coroutine that never waits (the in-memory slot log) to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the coroutine waited for something")


def encode(state: frozenset[int]) -> bytes:
    return ",".join(map(str, sorted(state))).encode()


def decode(data: bytes) -> frozenset[int]:
    return frozenset(int(x) for x in data.decode().split(",") if x)


async def run(ops: list[tuple[str, int]], max_backlog_ms: int, honour_floor: bool) -> list[Reader]:
    now = [1_000_000]
    w = World(MemorySlotLog("sg", clock_ms=lambda: now[0]), now)
    await w.log.set_owner(SLOT, OWNER, 1)
    readers = [Reader(), Reader()]

    async def append(delta: str) -> None:
        # An entry holds a change (+id published, -id acked), as slot-log batches do.
        entry_id = await w.log.append(SLOT, OWNER, 1, delta.encode())
        w.state_at[entry_id] = frozenset(w.pending)

    async def read(r: Reader, count: int) -> None:
        entries = [
            TailEntry(SLOT, e.id, e.data, e.prev) for e in await w.log.read(SLOT, r.position, count)
        ]
        good, gaps = split_on_gaps({SLOT: r.position}, entries)
        for e in good:
            change = e.data.decode()
            n = int(change[1:])
            r.state = r.state | {n} if change[0] == "+" else r.state - {n}
            r.position = e.id
        if gaps:
            cp = await w.log.read_checkpoint(SLOT)
            assert cp is not None, "entries were trimmed with no checkpoint to resync from"
            assert parse_id(cp.covers_id) >= parse_id(gaps[SLOT])
            r.state, r.position = decode(cp.data), cp.covers_id
            r.resyncs += 1
        # What a reader holds at its position is what the slot held there.
        assert r.state == w.state_at[r.position]

    for op, arg in ops:
        if op == "pub":
            w.pending.add(w.next_id)
            w.next_id += 1
            await append(f"+{w.next_id - 1}")
        elif op == "ack" and w.pending:
            gone = sorted(w.pending)[arg % len(w.pending)]
            w.pending.discard(gone)
            await append(f"-{gone}")
        elif op == "checkpoint":
            top = max(w.state_at, key=parse_id)
            if top != "0-0":
                await w.log.write_checkpoint(SLOT, OWNER, 1, encode(w.state_at[top]), top)
                w.covers = top
        elif op == "trim" and w.covers != "0-0":
            links = (
                [(r.position, await w.log.first_after(SLOT, r.position)) for r in readers]
                if honour_floor
                else []
            )
            bound = trim_bound(
                covers=w.covers, links=links, now_ms=now[0], max_backlog_ms=max_backlog_ms
            )
            await w.log.trim(SLOT, bound.before_id)
        elif op == "read":
            await read(readers[arg % 2], arg)
        elif op == "time":
            now[0] += arg
    # Both readers catch up to the end: they hold the slot's final state.
    for r in readers:
        for _ in range(1000):
            before = r.position
            await read(r, 1000)
            if r.position == before:
                break
        assert r.state == frozenset(w.pending)
    return readers


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(ops=OPS)
def test_no_interleaving_lets_a_reader_skip_an_entry(ops: list[tuple[str, int]]) -> None:
    drive(run(ops, max_backlog_ms=5_000, honour_floor=True))


@FAST
@given(ops=OPS)
def test_even_trims_that_ignore_the_links_never_let_a_reader_skip(
    ops: list[tuple[str, int]],
) -> None:
    # Without the floor, readers meet gaps; the chain check turns each into a resync.
    drive(run(ops, max_backlog_ms=5_000, honour_floor=False))


@FAST
@given(ops=OPS)
def test_a_link_within_the_backlog_bound_never_needs_a_resync(
    ops: list[tuple[str, int]],
) -> None:
    readers = drive(run(ops, max_backlog_ms=10**12, honour_floor=True))
    assert [r.resyncs for r in readers] == [0, 0]
