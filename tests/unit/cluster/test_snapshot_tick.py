"""A region node's snapshot tick on real files (the in-memory slot log, no Redis): the
slots due go to the writer thread together, one directory fsync covers their renames, and
a write or a directory sync that fails leaves exactly the slots it concerns dirty; a
slot rebuilt is written on the next tick."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cluster.region.snapshots as snapshots_mod
import relay.snapshot_io as snapshot_io
from cluster.chain import parse_id
from cluster.checkpoint import encode_checkpoint
from cluster.ring import Ring, slot_of
from cluster.slotlog import MemorySlotLog
from relay.codec import MessageEvent
from relay.snapshot_io import load_snapshots, prepare_data_dir
from tests.conftest import FakeClock, aio, memory_router, publish_at, until

CHANNELS = [f"inbox:u{i}" for i in range(40)]


async def _router_with_dirty_slots(tmp_path: Path) -> tuple[Any, MemorySlotLog, set[int]]:
    """A node owning the slots of CHANNELS, a message published on each."""
    log = MemorySlotLog("sg")
    r = memory_router("sg/n1", log, env={"RELAY_NODE__SNAPSHOT_MAX_AGE_S": "0"})
    r.ring = Ring({"sg/n1": 1.0}, slots=r.slots, replicas=r.replicas)
    r.slots_dir = prepare_data_dir(tmp_path / "data")
    slots = {slot_of(ch, r.slots) for ch in CHANNELS}
    for slot in sorted(slots):
        await r._claim_now(slot)
    for i, ch in enumerate(CHANNELS):
        publish_at(r, ch, f"m{i}")
    await r._flush(force=True)  # the slot logs hold them: each slot has a position to snapshot
    assert all(r.applied[s] != "0-0" for s in slots)
    assert r.data_at_risk()["unsaved_slots"] == len(slots)
    return r, log, slots


@pytest.fixture
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of slots in each hand-off to the writer thread."""
    calls: list[int] = []
    real = snapshots_mod.Snapshots._encode_and_write_many

    def counted(self: Any, batch: list[Any], files: dict[int, int]) -> Any:
        calls.append(len(batch))
        self.batches_seen = [*getattr(self, "batches_seen", []), [s for s, _ in batch]]
        return real(self, batch, files)

    monkeypatch.setattr(snapshots_mod.Snapshots, "_encode_and_write_many", counted)
    yield calls


@pytest.fixture
def dir_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every fsync of a directory, by path."""
    synced: list[str] = []
    real = snapshot_io._fsync_dir

    def counted(d: Path) -> None:
        synced.append(str(d))
        real(d)

    monkeypatch.setattr(snapshot_io, "_fsync_dir", counted)
    yield synced


@aio
async def test_the_slots_due_are_written_in_one_hand_off_and_one_directory_sync(
    tmp_path: Path, thread_calls: list[int], dir_syncs: list[str]
) -> None:
    r, log, slots = await _router_with_dirty_slots(tmp_path)
    dir_syncs.clear()  # those of preparing the data directory
    await r._snapshot_once(r.slots)
    assert thread_calls == [len(slots)]
    assert dir_syncs == [str(r.slots_dir)]
    assert r.snapshot_stats["written"] == len(slots) and r.snapshot_stats["failures"] == 0
    assert r.data_at_risk()["unsaved_slots"] == 0
    loaded, refused = load_snapshots(r.slots_dir)
    assert refused == [] and set(loaded) == slots
    held = {m.id for snap in loaded.values() for m in snap.messages}
    assert held == {f"m{i}" for i in range(len(CHANNELS))}
    await log.close()


@aio
async def test_a_batch_is_bounded_by_what_its_slots_hold(
    tmp_path: Path, thread_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bound of one item: every slot (each holds a message) goes on its own.
    monkeypatch.setattr(snapshots_mod, "SNAPSHOT_BATCH_ITEMS", 1)
    r, log, slots = await _router_with_dirty_slots(tmp_path)
    await r._snapshot_once(r.slots)
    assert thread_calls == [1] * len(slots)
    assert r.snapshot_stats["written"] == len(slots)
    await log.close()


@aio
async def test_a_failed_directory_sync_fails_every_slot_of_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, log, slots = await _router_with_dirty_slots(tmp_path)

    def broken(d: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as m:
        m.setattr(snapshot_io, "_fsync_dir", broken)
        await r._snapshot_once(r.slots)
    # Renamed but not known durable: none counts as written, every slot stays dirty.
    assert r.snapshot_stats["written"] == 0
    assert r.snapshot_stats["failures"] == len(slots)
    assert r.data_at_risk()["unsaved_slots"] == len(slots)
    # The next tick writes them all.
    await r._snapshot_once(r.slots)
    assert r.snapshot_stats["written"] == len(slots)
    assert r.data_at_risk()["unsaved_slots"] == 0
    loaded, refused = load_snapshots(r.slots_dir)
    assert refused == [] and set(loaded) == slots
    await log.close()


@aio
async def test_one_slot_that_cannot_be_written_fails_alone(
    tmp_path: Path, dir_syncs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    r, log, slots = await _router_with_dirty_slots(tmp_path)
    dir_syncs.clear()  # those of preparing the data directory
    bad = min(slots)
    real = snapshots_mod.write_snapshot

    def failing(slots_dir: Path, slot: int, data: bytes, *, sync_dir: bool = True) -> int:
        if slot == bad:
            raise snapshot_io.SnapshotWriteError("disk full", slot=slot, errno=errno.ENOSPC)
        return real(slots_dir, slot, data, sync_dir=sync_dir)

    with monkeypatch.context() as m:
        m.setattr(snapshots_mod, "write_snapshot", failing)
        await r._snapshot_once(r.slots)
    assert r.snapshot_stats["failures"] == 1
    assert r.snapshot_stats["written"] == len(slots) - 1
    assert r.data_at_risk()["unsaved_slots"] == 1
    assert dir_syncs == [str(r.slots_dir)]  # the others' renames are still synced
    loaded, _ = load_snapshots(r.slots_dir)
    assert set(loaded) == slots - {bad}
    await r._snapshot_once(r.slots)
    assert r.data_at_risk()["unsaved_slots"] == 0
    assert set(load_snapshots(r.slots_dir)[0]) == slots
    await log.close()


@aio
async def test_a_large_slot_ends_its_batch_and_small_ones_share_one(
    tmp_path: Path, thread_calls: list[int]
) -> None:
    r, log, slots = await _router_with_dirty_slots(tmp_path)
    big_ch = CHANNELS[0]
    big = slot_of(big_ch, r.slots)
    for i in range(snapshots_mod.SNAPSHOT_BATCH_ITEMS + 10):
        publish_at(r, big_ch, f"big{i}")
    await r._flush(force=True)
    await r._snapshot_once(r.slots)
    assert sum(thread_calls) == len(slots) and len(thread_calls) >= 2
    with_big = next(b for b in r.batches_seen if big in b)
    assert with_big[-1] == big  # nothing was added after it
    assert max(thread_calls) > 1  # the small ones went several at a time
    assert r.snapshot_stats["written"] == len(slots)
    await log.close()


@aio
async def test_a_failed_hand_off_leaves_every_slot_dirty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, log, slots = await _router_with_dirty_slots(tmp_path)

    def broken(self: Any, batch: list[Any], files: dict[int, int]) -> Any:
        raise RuntimeError("cannot schedule new futures after shutdown")

    with monkeypatch.context() as m:
        m.setattr(snapshots_mod.Snapshots, "_encode_and_write_many", broken)
        await r._snapshot_once(r.slots)
    assert r.snapshot_stats["failures"] == len(slots)
    assert r.data_at_risk()["unsaved_slots"] == len(slots)
    await r._snapshot_once(r.slots)  # none was left in flight: all are taken again
    assert r.snapshot_stats["written"] == len(slots)
    assert r.data_at_risk()["unsaved_slots"] == 0
    await log.close()


@pytest.fixture
def held_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[threading.Event, threading.Event, Any]]:
    """The writer thread waits for ``release`` once it has ``started`` (and the real
    writer, to put back)."""
    started, release = threading.Event(), threading.Event()
    real = snapshots_mod.Snapshots._encode_and_write_many

    def slow(self: Any, batch: list[Any], files: dict[int, int]) -> Any:
        started.set()
        release.wait(10)
        return real(self, batch, files)

    monkeypatch.setattr(snapshots_mod.Snapshots, "_encode_and_write_many", slow)
    yield started, release, real
    release.set()


@aio
async def test_a_tick_cancelled_mid_write_leaves_its_slots_to_the_next(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    held_writes: tuple[threading.Event, threading.Event, Any],
) -> None:
    r, log, slots = await _router_with_dirty_slots(tmp_path)
    monkeypatch.setattr(snapshots_mod, "SNAPSHOT_BATCH_ITEMS", 1)  # one slot a batch
    started, release, real = held_writes
    try:
        tick = asyncio.ensure_future(r._snapshot_once(r.slots))
        assert await asyncio.to_thread(started.wait, 10)
        tick.cancel()
        with pytest.raises(asyncio.CancelledError):
            await tick
        # The slot being written is still in flight: the next tick does not take it
        # (it would be a second write of that slot while the first thread writes);
        # the others were never handed off and are dirty again.
        assert r.snapshot_stats["written"] == 0
        assert r.data_at_risk()["unsaved_slots"] == len(slots)
        monkeypatch.setattr(snapshots_mod.Snapshots, "_encode_and_write_many", real)
        await r._snapshot_once(r.slots)
        assert r.snapshot_stats["written"] == len(slots) - 1
    finally:
        release.set()  # the cancelled tick's write ends and is reported then
    await until(lambda: r.snapshot_stats["written"] == len(slots), 10, what="the late report")
    assert r.data_at_risk()["unsaved_slots"] == 0
    await log.close()


def _snapshot_slots(r: Any) -> set[int]:
    assert r.slots_dir is not None
    loaded, refused = load_snapshots(r.slots_dir)
    assert refused == []
    return set(loaded)


@aio
async def test_with_the_defaults_a_slot_is_written_after_its_checkpoint_or_when_old(
    tmp_path: Path,
) -> None:
    # node.snapshot_max_age_s 10: a changed slot is written on the tick after its
    # checkpoint, or once its oldest unwritten change is 10 s old; a claimed slot at once;
    # every changed slot at a graceful stop.
    log = MemorySlotLog("sg")
    clock = FakeClock()
    r = memory_router("sg/n1", log, clock=clock)
    r.ring = Ring({"sg/n1": 1.0}, slots=r.slots, replicas=r.replicas)
    r.slots_dir = prepare_data_dir(tmp_path / "data")
    by_slot = {slot_of(c, r.slots): c for c in CHANNELS}
    (q, quiet), (b, busy), (z, last) = sorted(by_slot.items())[:3]
    for slot in (q, b, z):
        await r._claim_now(slot)
    await r._snapshot_once(r.slots)
    assert _snapshot_slots(r) == {q, b, z}  # claimed: rebuilt whole, written at once
    assert r.data_at_risk()["unsaved_slots"] == 0

    publish_at(r, quiet, "q0")
    publish_at(r, busy, "b0")
    await r._flush(force=True)
    before = r.snapshot_stats["written"]
    await r._snapshot_once(r.slots)
    assert r.snapshot_stats["written"] == before  # changed, neither checkpointed nor old
    assert r.data_at_risk()["unsaved_slots"] == 2
    await r._checkpoint(b)
    publish_at(r, busy, "b1")  # after the checkpoint: the snapshot holds it too
    await r._flush(force=True)
    await r._snapshot_once(r.slots)
    assert r.snapshot_stats["written"] == before + 1  # the checkpointed slot only
    loaded, _ = load_snapshots(r.slots_dir)
    assert [m.id for m in loaded[b].messages] == ["b0", "b1"] and loaded[q].messages == []
    cp = await log.read_checkpoint(b)
    assert cp is not None and parse_id(cp.covers_id) < parse_id(loaded[b].log_id)

    clock.now += 9.9
    await r._snapshot_once(r.slots)
    assert r.data_at_risk()["unsaved_slots"] == 1  # not yet 10 s old
    clock.now += 0.1
    await r._snapshot_once(r.slots)
    assert r.data_at_risk()["unsaved_slots"] == 0
    loaded, _ = load_snapshots(r.slots_dir)
    assert [m.id for m in loaded[q].messages] == ["q0"]

    publish_at(r, last, "z0")
    await r._flush(force=True)
    await r._snapshot_once(r.slots)
    assert r.data_at_risk()["unsaved_slots"] == 1
    await r._snapshot_all()  # a graceful stop: every changed slot
    assert r.data_at_risk()["unsaved_slots"] == 0
    loaded, _ = load_snapshots(r.slots_dir)
    assert [m.id for m in loaded[z].messages] == ["z0"]

    publish_at(r, quiet, "q1")
    await r._flush(force=True)
    assert r.data_at_risk()["unsaved_slots"] == 1
    r._lose(q)  # a changed slot lost is no longer counted as unsaved
    assert r.data_at_risk()["unsaved_slots"] == 0
    await log.close()


@aio
@pytest.mark.parametrize("covered", ["5-0", "2-0"])
async def test_an_owned_mirror_rebuilt_from_its_checkpoint_is_written_on_the_next_tick(
    tmp_path: Path, covered: str
) -> None:
    # The link found our mirror of fra's log for an owned slot trimmed past our position
    # (3-0 missing): the slot's checkpoint, if it covers the hole, is merged, and the
    # slot, rebuilt, is due at once (not only after its next checkpoint). A checkpoint
    # that does not cover the hole yet changes nothing.
    log = MemorySlotLog("sg")
    peers = {"RELAY_CLUSTER__PEERS": '["fra=redis://127.0.0.1:1/0"]'}
    r = memory_router("sg/n1", log, clock=FakeClock(), env=peers)
    r.ring = Ring({"sg/n1": 1.0}, slots=r.slots, replicas=r.replicas)
    r.slots_dir = prepare_data_dir(tmp_path / "data")
    ch = CHANNELS[0]
    slot = slot_of(ch, r.slots)
    await r._claim_now(slot)
    await r._snapshot_once(r.slots)  # the claim's snapshot: nothing is due after it
    owner = await log.get_owner(slot)
    assert owner is not None
    far = MessageEvent("f1", ch, "anon", 1_000_000 << 16, "fra", b"far", 2_000_000)
    data = encode_checkpoint([far], {"fra": {slot: covered}})
    await log.write_checkpoint(slot, "sg/n1", owner.epoch, data, r.applied[slot])
    written = r.snapshot_stats["written"]

    await r._mirror_gap_owned(slot, "fra", "3-0")
    await r._snapshot_once(r.slots)
    pending = [m.id for m in r.node.store.pending(ch, 1_000_000)]
    if covered == "5-0":
        assert pending == ["f1"] and r.positions.at(slot, "fra") == "5-0"
        assert r.snapshot_stats["written"] == written + 1
        loaded, _ = load_snapshots(r.slots_dir)
        assert [m.id for m in loaded[slot].messages] == ["f1"]
        assert loaded[slot].mirrors == {"fra": "5-0"}
    else:
        assert pending == [] and r.positions.at(slot, "fra") == "0-0"
        assert r.snapshot_stats["written"] == written
    await log.close()


@aio
async def test_a_graceful_stop_during_a_tick_saves_what_changed_while_it_wrote(
    tmp_path: Path, held_writes: tuple[threading.Event, threading.Event, Any]
) -> None:
    r, log, _ = await _router_with_dirty_slots(tmp_path)
    started, release, _ = held_writes
    try:
        tick = asyncio.ensure_future(r._snapshot_once(r.slots))  # the loop's tick
        assert await asyncio.to_thread(started.wait, 10)
        publish_at(r, CHANNELS[0], "late")  # a slot being written changes meanwhile
        await r._flush(force=True)
        stop = asyncio.ensure_future(r._snapshot_all())  # a graceful stop's final ticks
    finally:
        release.set()
    await tick
    await stop
    assert r.data_at_risk()["unsaved_slots"] == 0
    loaded, _ = load_snapshots(r.slots_dir)
    held = {m.id for m in loaded[slot_of(CHANNELS[0], r.slots)].messages}
    assert "late" in held
    await log.close()
