"""Checkpoints and snapshots through the region core's step (cluster/persist.py,
cluster/regioncore.py): each event kind in, its Ready out, on a fake clock; a walk
checks that a changed slot is persisted within one period and nothing is checkpointed
past what is logged."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.chain import parse_id
from cluster.persist import Persistence, Trim
from cluster.regioncore import (
    CheckpointDue,
    CheckpointFailed,
    CheckpointStart,
    CheckpointWritten,
    RegionCore,
    SnapshotDue,
    SnapshotFailed,
    SnapshotStart,
    SnapshotWritten,
)
from cluster.slots import SlotEvent
from relay.snapshot import DirtySlots
from tests.conftest import FakeClock
from tests.unit.cluster.cores import region_core

ME = "sg/n1"
SLOTS = 8
EVERY = 5.0  # the checkpoint period
NOW_MS = 1_000_000


def make(max_age_s: float = 0.0) -> RegionCore:
    persist = Persistence(
        checkpoint_interval_s=EVERY,
        max_backlog_s=60.0,
        snapshots=DirtySlots(max_age_s=max_age_s),
    )
    return region_core(ME, SLOTS, messages=100, dedupe_ms=60_000, tombstones=100, persist=persist)


def own(c: RegionCore, slot: int, logged: str | None = "0-0") -> None:
    c.table.fire(slot, SlotEvent.CLAIM)
    c.table.fire(slot, SlotEvent.CLAIMED, epoch=1)
    c.table.fire(slot, SlotEvent.CLAIM_ENDED)
    if logged is not None:
        c.positions.start(slot, logged)


# -- checkpoints


def test_checkpoint_due_keeps_a_fixed_cadence_and_names_changed_slots_not_handed_over() -> None:
    c, clock = make(), FakeClock()
    for s in (5, 3, 6):
        own(c, s)
        c.changed(s, clock.now)
    c.table.fire(6, SlotEvent.RELEASE)  # being handed over: the hand-over checkpoints it
    first = c.step(CheckpointDue(clock.now))
    assert first.checkpoints == () and first.due_at == clock.now + EVERY  # starts the cadence
    clock.now += EVERY - 0.1
    early = c.step(CheckpointDue(clock.now))
    assert early.checkpoints == () and early.due_at == first.due_at
    clock.now += 0.3  # a little late: the next round stays on the cadence
    ready = c.step(CheckpointDue(clock.now))
    assert ready.checkpoints == (3, 5) and ready.due_at == first.due_at + EVERY
    clock.now += 3 * EVERY  # a round that ran long: the next is due at once, not piled up
    late = c.step(CheckpointDue(clock.now))
    assert late.due_at == clock.now and late.checkpoints == (3, 5)  # not started: still due


def test_checkpoint_start_takes_an_owned_slot_with_a_position_and_a_failure_makes_it_due() -> None:
    c = make()
    own(c, 1, logged=None)  # claimed, its log not read yet: no position to cover
    own(c, 2, logged="7-0")
    for s in (1, 2, 4):  # 4: not ours
        c.changed(s, 0.0)
    assert c.step(CheckpointStart(4, 0.0)).checkpoints == ()
    assert c.step(CheckpointStart(1, 0.0)).checkpoints == ()
    assert c.persist.dirty == {1, 2, 4}  # nothing started: still due
    assert c.step(CheckpointStart(2, 0.0)).checkpoints == (2,)
    assert 2 not in c.persist.dirty  # a change from now on makes it due again
    assert c.step(CheckpointFailed(2)).checkpoints == ()
    c.step(CheckpointDue(0.0))
    assert 2 in c.step(CheckpointDue(EVERY)).checkpoints  # failed: due next round
    c.persist.lose(2)
    assert 2 not in c.step(CheckpointDue(2 * EVERY)).checkpoints


def written(c: RegionCore, covers: str, links: list[tuple[str, str | None]] | None) -> Trim:
    ready = c.step(CheckpointWritten(2, covers, {"fra": "9-0"}, links, NOW_MS))
    assert len(ready.trims) == 1 and ready.trims[0].slot == 2
    return ready.trims[0]


def test_checkpoint_written_trims_behind_the_checkpoint_the_links_and_the_mirrors() -> None:
    c = make()
    no_links = written(c, "50-0", [])
    assert no_links == Trim(2, "50-0", (("fra", "9-0"),), gapped=False)
    # Positions unknown: the log is left alone, the mirrors still trimmed.
    assert written(c, "50-0", None) == Trim(2, None, (("fra", "9-0"),))
    # Nothing logged yet: nothing to trim in the log.
    assert written(c, "0-0", []).log_before is None
    # A link behind the checkpoint, its oldest entry recent: the log is kept after it.
    recent = (f"{NOW_MS - 1000}-0", f"{NOW_MS - 999}-0")
    behind = written(c, f"{NOW_MS}-0", [(f"{NOW_MS + 5}-0", None), recent])
    assert behind.log_before == f"{NOW_MS - 1000}-0" and not behind.gapped
    # A link more than max_backlog_s behind: passed over (it resyncs), gapped.
    old = NOW_MS - 61_000
    gapped = written(c, f"{NOW_MS}-0", [(f"{old}-0", f"{old + 1}-0")])
    assert gapped.log_before == f"{NOW_MS}-0" and gapped.gapped


# -- snapshots


def test_snapshot_due_names_dirty_slots_oldest_first_within_budget_and_hears_outcomes() -> None:
    c = make()
    for s in (1, 2, 3):
        own(c, s)
    c.changed(2, 1.0)
    c.changed(1, 2.0)
    c.changed(3, 3.0)
    assert c.step(SnapshotDue(4.0, 1)).snapshots == (2,)  # oldest change first
    assert c.step(SnapshotDue(4.0, 3)).snapshots == (1, 3)  # 2 still in flight: counted
    assert c.step(SnapshotDue(4.0, 3)).snapshots == ()  # all in flight
    assert c.step(SnapshotStart(2, 4.0)).snapshots == (2,)
    assert c.step(SnapshotWritten(2, 4.5)).snapshots == ()
    assert not c.persist.snapshots.is_dirty(2)
    c.step(SnapshotFailed(1))  # dirty again from its oldest change
    assert c.persist.snapshots.is_dirty(1) and c.persist.snapshots.age_s(5.0) == 3.0
    c.table.fire(3, SlotEvent.LOSE)  # lost meanwhile: nothing to write, forgotten
    assert c.step(SnapshotStart(3, 5.0)).snapshots == ()
    assert not c.persist.snapshots.is_dirty(3) and not c.persist.snapshots.in_flight(3)
    assert c.step(SnapshotDue(5.0, 3)).snapshots == (1,)


def test_a_snapshot_follows_the_checkpoint_and_a_graceful_stop_takes_all() -> None:
    c = make()
    c.persist.snapshots = DirtySlots(max_age_s=30.0)
    for s in (1, 2, 3):
        own(c, s)
    c.changed(1, 1.0)
    c.changed(2, 1.0)
    c.changed(3, 1.5, rebuilt=True)  # claimed, or a hole filled: the next tick
    assert c.step(SnapshotDue(2.0, 5)).snapshots == (3,)
    c.step(SnapshotWritten(3, 2.0))
    c.step(CheckpointDue(0.0))  # starts the cadence
    assert c.step(CheckpointDue(EVERY)).checkpoints == (1, 2, 3)
    assert c.step(CheckpointStart(2, EVERY)).checkpoints == (2,)  # captured: its snapshot is due
    assert c.step(SnapshotDue(EVERY, 5)).snapshots == (2,)
    assert c.step(SnapshotDue(EVERY, 5, every=True)).snapshots == (1,)
    c.changed(1, 40.0)
    c.step(SnapshotWritten(1, 40.0))
    assert c.step(SnapshotDue(69.9, 5)).snapshots == ()
    assert c.step(SnapshotDue(70.0, 5)).snapshots == (1,)  # 30 s old


def test_a_snapshot_behind_the_checkpoint_is_written_again() -> None:
    c = make(max_age_s=30.0)
    own(c, 1)
    c.changed(1, 1.0, rebuilt=True)  # a publish, say, on a slot just claimed
    assert c.step(SnapshotDue(2.0, 5)).snapshots == (1,)
    assert c.step(SnapshotStart(1, 2.0)).snapshots == (1,)  # captured at 0-0
    c.step(SnapshotWritten(1, 2.0))
    c.positions.advance(1, "7-0")  # the publish's append returns: no change of state
    c.step(CheckpointDue(0.0))
    assert c.step(CheckpointDue(EVERY)).checkpoints == (1,)
    assert c.step(CheckpointStart(1, EVERY)).checkpoints == (1,)  # covers 7-0
    # The snapshot on disk is behind the checkpoint: a restart would drop it for the
    # checkpoint. So it is written again, on the next tick.
    assert c.persist.snapshots.is_dirty(1)
    assert c.step(SnapshotDue(EVERY + 1, 5)).snapshots == (1,)
    assert c.step(SnapshotStart(1, EVERY + 1)).snapshots == (1,)
    c.step(SnapshotWritten(1, EVERY + 1))
    c.step(CheckpointStart(1, EVERY + 2))  # nothing new since: the snapshot covers it
    assert not c.persist.snapshots.is_dirty(1)


# -- a walk

OPS = st.lists(
    st.tuples(
        st.sampled_from(["change", "log", "checkpoints", "snapshots", "lose", "claim"]),
        st.integers(0, SLOTS - 1),
        st.booleans(),  # a write of this op fails
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(OPS, st.sampled_from([0.0, 3.0]))
def test_walk_changed_slots_are_persisted_within_a_period_and_never_past_the_log(
    ops: list[tuple[str, int, bool]], max_age_s: float
) -> None:
    # max_age_s 0: every changed slot at every tick; 3 (the default's shape): a slot
    # after its checkpoint, or once its oldest change is that old.
    c, clock = make(max_age_s), FakeClock()
    for s in range(SLOTS // 2):
        own(c, s)
    logged = {s: 0 for s in range(SLOTS)}
    due = c.step(CheckpointDue(clock.now)).due_at
    failed_checkpoints: set[int] = set()
    failed_snapshots: set[int] = set()
    checkpointed: dict[int, str] = {}  # the position each slot's last checkpoint captured
    snapshotted: dict[int, str] = {}  # …and its last snapshot
    for op, slot, fail in ops:
        owned = slot in c.table.owned
        if op == "change" and owned:
            c.changed(slot, clock.now)
        elif op == "log" and owned:  # an append done: the position moves on
            logged[slot] += 1
            c.positions.advance(slot, f"{logged[slot]}-0")
            if not fail:  # else: its change was marked before the last snapshot's capture
                c.changed(slot, clock.now)
        elif op == "lose" and owned:
            c.table.fire(slot, SlotEvent.LOSE)
            c.persist.lose(slot)
            c.positions.forget(slot)
            checkpointed.pop(slot, None)
            snapshotted.pop(slot, None)
        elif op == "claim" and not owned:
            own(c, slot, logged=f"{logged[slot]}-0")
            c.changed(slot, clock.now, rebuilt=True)
        elif op == "checkpoints":  # the loop wakes at its due time and runs a round
            clock.now = due
            changed = {s for s in c.persist.dirty if s in c.table.owned}
            ready = c.step(CheckpointDue(clock.now))
            due = ready.due_at
            assert due == clock.now + EVERY
            assert failed_checkpoints & c.table.owned.keys() <= set(ready.checkpoints)
            assert changed <= set(ready.checkpoints), "a changed slot skipped a round"
            failed_checkpoints = set()
            for s in ready.checkpoints:
                if not c.step(CheckpointStart(s, clock.now)).checkpoints:
                    assert s not in c.table.owned
                    continue
                covers = checkpointed[s] = c.positions.log[s]
                assert parse_id(covers) <= (logged[s], 0), "checkpointed past the log"
                if fail and s == slot:
                    c.step(CheckpointFailed(s))
                    failed_checkpoints.add(s)
                    continue
                trim = c.step(CheckpointWritten(s, covers, {}, [], NOW_MS)).trims[0]
                assert trim.log_before is None or parse_id(trim.log_before) <= parse_id(covers)
            assert c.persist.dirty & c.table.owned.keys() == failed_checkpoints
        elif op == "snapshots":  # a tick, one period after the last (budget: every slot)
            clock.now += 1.0
            ready = c.step(SnapshotDue(clock.now, SLOTS))
            assert failed_snapshots & c.table.owned.keys() <= set(ready.snapshots)
            failed_snapshots = set()
            for s in ready.snapshots:
                if not c.step(SnapshotStart(s, clock.now)).snapshots:
                    assert s not in c.table.owned
                    continue
                at = c.positions.log[s]
                if fail and s == slot:
                    c.step(SnapshotFailed(s))
                    failed_snapshots.add(s)
                else:
                    c.step(SnapshotWritten(s, clock.now))
                    snapshotted[s] = at
            unsaved = {s for s in range(SLOTS) if c.persist.snapshots.is_dirty(s)}
            if max_age_s == 0:
                # Every changed slot was written at this tick, but for the failed ones.
                assert unsaved == failed_snapshots
            elif not failed_snapshots:
                assert c.persist.snapshots.age_s(clock.now) < max_age_s  # none too old
            # A snapshot on disk covers at least what the slot's last checkpoint does (a
            # restart starts from it), but where this tick's write failed.
            for s, cp in checkpointed.items():
                if s not in failed_snapshots:
                    assert s in snapshotted and parse_id(snapshotted[s]) >= parse_id(cp), s
