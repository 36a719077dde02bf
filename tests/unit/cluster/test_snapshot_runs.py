"""A region node's snapshots of a slot with many ack tombstones, on real files (the
in-memory slot log, no Redis): the tombstones sealed in runs are written once, to the
slot's run file, and every later snapshot names them; a restarted node reads them back;
a run file that cannot be written fails its batch; run files older than the dedupe
window (by the runs' own hlc) are removed, and a snapshot still naming them loads
without them; a missing or damaged run file refuses only its own slot."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

import cluster.region.snapshots as snapshots_mod
import relay.snapshot_io as snapshot_io
from cluster.ring import Ring, slot_of
from cluster.slotlog import MemorySlotLog
from relay.snapshot import SEAL_TOMBSTONES
from relay.snapshot_io import (
    SnapshotWriteError,
    load_snapshots,
    prepare_data_dir,
    run_files,
    run_path,
    runs_dir,
)
from tests.conftest import aio, memory_router, publish_at

CH = "inbox:erin"
T0 = 1_700_000_000_000


class _Wall:
    """A wall clock in ms the test moves."""

    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


def _router(node: str, log: MemorySlotLog, data_dir: Path, wall: _Wall, window_s: int = 600) -> Any:
    r = memory_router(
        node,
        log,
        wall_ms=wall,
        env={
            "RELAY_NODE__DATA_DIR": str(data_dir),
            "RELAY_STORE__DEDUPE_WINDOW_S": str(window_s),
            "RELAY_NODE__SNAPSHOT_MAX_AGE_S": "0",  # every changed slot, every tick
        },
    )
    r.ring = Ring({node: 1.0}, slots=r.slots, replicas=r.replicas)
    return r


async def _owner(tmp_path: Path, wall: _Wall) -> tuple[Any, MemorySlotLog, int]:
    log = MemorySlotLog("sg")
    r = _router("sg/n1", log, tmp_path / "data", wall)
    await r._load_snapshots()
    slot = slot_of(CH, r.slots)
    await r._claim_now(slot)
    return r, log, slot


async def _acked(r: Any, slot: int, first: int, n: int, wall: _Wall) -> None:
    """``n`` acks in the slot (ids a<first>…, each at the wall clock's hlc), then a
    message published, so the slot is dirty and has a log position."""
    for i in range(first, first + n):
        r._tombstone(slot, CH, [f"a{i}"], (wall.ms << 16) + i)
    publish_at(r, CH, f"m{first}")
    await r._flush(force=True)


def _ids(r_or_snap: Any, slot: int) -> list[str]:
    return [i for _, i, _ in r_or_snap.acks.of(slot)]


@aio
async def test_runs_are_written_once_and_named_by_every_later_snapshot(tmp_path: Path) -> None:
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    n = 2 * SEAL_TOMBSTONES + 120
    await _acked(r, slot, 0, n, wall)
    await r._snapshot_once(r.slots)
    assert r.data_at_risk()["unsaved_slots"] == 0
    files = run_files(r.slots_dir)
    assert len(files) == 1 and files[0][0] == slot  # the two whole runs, in one run file
    run_file = run_path(r.slots_dir, *files[0])
    first_bytes = run_file.read_bytes()
    snap_size = (r.slots_dir / f"{slot}.snap").stat().st_size
    assert snap_size < len(first_bytes)  # the runs are named, not carried

    # A later snapshot: the runs are not written again, only the new tombstones.
    written = r.snapshot_stats["bytes"]
    await _acked(r, slot, n, 10, wall)
    await r._snapshot_once(r.slots)
    assert run_files(r.slots_dir) == files
    assert run_file.read_bytes() == first_bytes
    assert r.snapshot_stats["bytes"] - written < len(first_bytes)

    loaded, refused = load_snapshots(r.slots_dir)
    assert refused == []
    assert [i for _, i, _ in loaded[slot].tombstones] == [f"a{i}" for i in range(n + 10)]
    await log.close()


@aio
async def test_a_restarted_node_gets_every_tombstone_back_and_keeps_unnamed_run_files_until_old(
    tmp_path: Path,
) -> None:
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    n = 3 * SEAL_TOMBSTONES + 7
    await _acked(r, slot, 0, n, wall)
    await r._snapshot_once(r.slots)
    kept = run_files(r.slots_dir)
    d = runs_dir(r.slots_dir)
    # Left by a batch whose snapshots failed, and by a write cut short.
    (d / f"{slot}-12.tomb").write_bytes(b"RTMB\x01\x00named by no snapshot")
    (d / f"{slot}-13.tomb.tmp").write_bytes(b"cut short")
    wall.ms += 1000

    r2 = _router("sg/n1", log, tmp_path / "data", wall)
    await r2._load_snapshots()
    assert r2.snapshot_stats["refused"] == 0
    assert _ids(r2, slot) == [f"a{i}" for i in range(n)]
    # The tmp file is gone; the unnamed one stays (a start that could not read a run
    # file never removes it) until it is older than the window and the margin.
    assert run_files(r2.slots_dir) == sorted([*kept, (slot, 12)])
    assert not (d / f"{slot}-13.tomb.tmp").exists()
    assert r2._next_run_file > max(f for _, f in kept)
    # Numbered on from the files on disk, even with the clock an hour back.
    wall.ms -= 3_600_000
    r3 = _router("sg/n1", log, tmp_path / "data", wall)
    await r3._load_snapshots()
    assert r3._next_run_file == max(f for _, f in kept) + 1
    wall.ms += 3_600_000
    wall.ms += r2.node.dedupe.window_ms + snapshots_mod.RUN_FILE_MARGIN_MS + 1000
    await r2._snapshot_once(r2.slots)
    assert (slot, 12) not in run_files(r2.slots_dir)
    await log.close()


@aio
async def test_a_run_file_that_cannot_be_written_fails_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    await _acked(r, slot, 0, SEAL_TOMBSTONES + 3, wall)

    def full(*a: Any) -> int:
        raise SnapshotWriteError(
            "writing the tombstone run file failed (ENOSPC)", slot=None, errno=28
        )

    with monkeypatch.context() as m:
        m.setattr(snapshots_mod, "write_run_files", full)
        await r._snapshot_once(r.slots)
    assert r.snapshot_stats["failures"] == 1
    assert r.data_at_risk()["unsaved_slots"] == 1  # still dirty
    assert not (r.slots_dir / f"{slot}.snap").exists()
    assert r.sealed_tombstones.end(slot) == 0  # nothing kept as sealed meanwhile

    await r._snapshot_once(r.slots)
    assert r.data_at_risk()["unsaved_slots"] == 0
    loaded, refused = load_snapshots(r.slots_dir)
    assert refused == []
    assert [i for _, i, _ in loaded[slot].tombstones] == [
        f"a{i}" for i in range(SEAL_TOMBSTONES + 3)
    ]
    await log.close()


@aio
async def test_old_run_files_are_removed_and_a_snapshot_naming_them_loads_without_them(
    tmp_path: Path,
) -> None:
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    await _acked(r, slot, 0, SEAL_TOMBSTONES, wall)
    await r._snapshot_once(r.slots)
    old = run_files(r.slots_dir)
    assert len(old) == 1
    # Later acks, in another run file: the first is older than the window, then older
    # by the margin.
    window = r.node.dedupe.window_ms
    wall.ms += window // 2
    await _acked(r, slot, SEAL_TOMBSTONES, SEAL_TOMBSTONES, wall)
    await r._snapshot_once(r.slots)
    assert len(run_files(r.slots_dir)) == 2
    wall.ms += window // 2 + 1000
    await r._snapshot_once(r.slots)  # nothing dirty; the old file is within the margin
    assert len(run_files(r.slots_dir)) == 2
    wall.ms += snapshots_mod.RUN_FILE_MARGIN_MS
    await r._snapshot_once(r.slots)
    assert old[0] not in run_files(r.slots_dir)
    assert len(run_files(r.slots_dir)) == 1
    assert all(ref.file != old[0][1] for ref in r._run_refs.values())

    # The slot's snapshot on disk still names the removed file: loaded without its run,
    # which the window left behind anyway.
    r2 = _router("sg/n1", log, tmp_path / "data", wall)
    await r2._load_snapshots()
    assert r2.snapshot_stats["refused"] == 0
    assert _ids(r2, slot) == [f"a{i}" for i in range(SEAL_TOMBSTONES, 2 * SEAL_TOMBSTONES)]
    await log.close()


@aio
async def test_a_run_missing_within_the_window_refuses_the_snapshot(tmp_path: Path) -> None:
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    await _acked(r, slot, 0, SEAL_TOMBSTONES + 1, wall)
    await r._snapshot_once(r.slots)
    for f in run_files(r.slots_dir):
        run_path(r.slots_dir, *f).unlink()
    r2 = _router("sg/n1", log, tmp_path / "data", wall)
    await r2._load_snapshots()
    assert r2.snapshot_stats["refused"] == 1  # rebuilt from the region, never half-loaded
    assert slot not in r2._loaded_slots
    await log.close()


def test_the_data_directory_holds_the_run_files_directory(tmp_path: Path) -> None:
    slots = prepare_data_dir(tmp_path / "data")
    d = runs_dir(slots)
    assert d == tmp_path / "data" / "tombstones"
    assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700


@aio
async def test_a_run_file_is_kept_while_its_tombstones_are_in_the_window_by_their_own_hlc(
    tmp_path: Path,
) -> None:
    # Another region's clock five minutes ahead: this node's hybrid clock follows it,
    # and so do the tombstones' hlc.
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    ahead = (wall.ms + 5 * 60_000) << 16
    r.node.clock.observe(ahead + SEAL_TOMBSTONES)
    for i in range(SEAL_TOMBSTONES):
        r._tombstone(slot, CH, [f"a{i}"], ahead + i)
    publish_at(r, CH, "m0")
    await r._flush(force=True)
    await r._snapshot_once(r.slots)
    files = run_files(r.slots_dir)
    assert len(files) == 1
    wall.ms += r.node.dedupe.window_ms + snapshots_mod.RUN_FILE_MARGIN_MS + 1000
    await r._snapshot_once(r.slots)
    assert run_files(r.slots_dir) == files  # still within the window by its hlc
    r2 = _router("sg/n1", log, tmp_path / "data", wall)
    await r2._load_snapshots()
    assert r2.snapshot_stats["refused"] == 0
    assert _ids(r2, slot) == [f"a{i}" for i in range(SEAL_TOMBSTONES)]
    await log.close()


@aio
async def test_runs_a_checkpoint_sealed_are_written_by_the_next_snapshot(tmp_path: Path) -> None:
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    n = 2 * SEAL_TOMBSTONES + 5
    await _acked(r, slot, 0, n, wall)
    r._checkpoint_tombstones(slot, n)  # seals the two runs, on the reactor
    assert r.sealed_tombstones.end(slot) == 2 * SEAL_TOMBSTONES
    await r._snapshot_once(r.slots)
    loaded, refused = load_snapshots(r.slots_dir)
    assert refused == []
    assert [i for _, i, _ in loaded[slot].tombstones] == [f"a{i}" for i in range(n)]
    assert len(loaded[slot].runs) == 2
    await log.close()


@aio
async def test_a_damaged_run_file_refuses_only_its_own_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    other = "inbox:zed"
    other_slot = slot_of(other, r.slots)
    assert other_slot != slot
    await r._claim_now(other_slot)
    await _acked(r, slot, 0, SEAL_TOMBSTONES, wall)
    for i in range(SEAL_TOMBSTONES):
        r._tombstone(other_slot, other, [f"z{i}"], (wall.ms << 16) + i)
    publish_at(r, other, "z-m")
    await r._flush(force=True)
    await r._snapshot_once(r.slots)
    mine = [f for f in run_files(r.slots_dir) if f[0] == slot]
    assert len(mine) == 1 and len(run_files(r.slots_dir)) == 2
    p = run_path(r.slots_dir, *mine[0])
    good = p.read_bytes()
    data = bytearray(good)
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))
    loaded, refused = load_snapshots(r.slots_dir)
    assert [s for s, _ in refused] == [slot]
    assert "fails its checksum" in refused[0][1]
    assert [i for _, i, _ in loaded[other_slot].tombstones] == [
        f"z{i}" for i in range(SEAL_TOMBSTONES)
    ]
    # Whole again but unreadable (EIO): refused too, and left on disk for a later start.
    p.write_bytes(good)
    real = snapshot_io._read

    def failing(path: Path) -> bytes:
        if path == p:
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(snapshot_io, "_read", failing)
    r2 = _router("sg/n1", log, tmp_path / "data", wall)
    await r2._load_snapshots()
    assert r2.snapshot_stats["refused"] == 1
    assert slot not in r2._loaded_slots and other_slot in r2._loaded_slots
    assert p.exists()
    monkeypatch.setattr(snapshot_io, "_read", real)
    loaded, refused = load_snapshots(r.slots_dir)  # the next start reads it
    assert refused == []
    await log.close()


@aio
async def test_a_larger_window_or_an_earlier_clock_at_start_does_not_refuse_a_pruned_run(
    tmp_path: Path,
) -> None:
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    await _acked(r, slot, 0, SEAL_TOMBSTONES, wall)
    await r._snapshot_once(r.slots)  # names run file 1
    window = r.node.dedupe.window_ms
    wall.ms += window + snapshots_mod.RUN_FILE_MARGIN_MS + 1000
    await r._snapshot_once(r.slots)  # the slot is quiet: its snapshot still names it
    assert run_files(r.slots_dir) == []
    # Restarted with the window three times as long, then with the clock two minutes
    # back: the run was removed once older than the window the node enforced, and the
    # record of that keeps the loader from asking for it.
    for window_s, back_ms in ((3 * window // 1000, 0), (window // 1000, 120_000)):
        wall.ms -= back_ms
        r2 = _router("sg/n1", log, tmp_path / "data", wall, window_s=window_s)
        await r2._load_snapshots()
        assert r2.snapshot_stats["refused"] == 0
        assert slot in r2._loaded_slots and _ids(r2, slot) == []
        wall.ms += back_ms
    await log.close()


@aio
async def test_a_run_file_that_cannot_be_removed_holds_back_only_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    for k in range(3):
        await _acked(r, slot, k * SEAL_TOMBSTONES, SEAL_TOMBSTONES, wall)
        await r._snapshot_once(r.slots)
    files = run_files(r.slots_dir)
    assert len(files) == 3
    (runs_dir(r.slots_dir) / f"{slot}-1.tomb").mkdir()  # not a run file: ignored
    assert run_files(r.slots_dir) == files
    stuck = run_path(r.slots_dir, *files[1])
    real = snapshot_io._unlink_quietly

    def failing(p: Path) -> bool:
        if p == stuck:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real(p)

    monkeypatch.setattr(snapshot_io, "_unlink_quietly", failing)
    wall.ms += r.node.dedupe.window_ms + snapshots_mod.RUN_FILE_MARGIN_MS + 1000
    await r._snapshot_once(r.slots)
    assert run_files(r.slots_dir) == [files[1]]  # the others are gone
    monkeypatch.setattr(snapshot_io, "_unlink_quietly", real)
    await r._snapshot_once(r.slots)  # tried again
    assert run_files(r.slots_dir) == []
    await log.close()


@aio
async def test_a_clock_ahead_at_a_prune_never_leaves_out_runs_on_disk(tmp_path: Path) -> None:
    wall = _Wall()
    t = wall.ms
    r, log, slot = await _owner(tmp_path, wall)
    await _acked(r, slot, 0, SEAL_TOMBSTONES, wall)
    await r._snapshot_once(r.slots)
    # The wall clock an hour ahead for a while (a boot before NTP): a tick removes the
    # run file; the record says no more than what that file held.
    wall.ms += 3_600_000
    await r._snapshot_once(r.slots)
    assert run_files(r.slots_dir) == []
    assert snapshot_io.read_pruned(r.slots_dir) <= ((t + 1) << 16) + SEAL_TOMBSTONES
    # Stepped back: new acks, sealed into a run file on disk, well inside the window.
    wall.ms = t + 2000
    await _acked(r, slot, SEAL_TOMBSTONES, SEAL_TOMBSTONES, wall)
    await r._snapshot_once(r.slots)
    wall.ms = t + 5 * 60_000
    r2 = _router("sg/n1", log, tmp_path / "data", wall)
    await r2._load_snapshots()
    assert r2.snapshot_stats["refused"] == 0
    # All of them: the first run, back inside the window, was written again too.
    assert _ids(r2, slot) == [f"a{i}" for i in range(2 * SEAL_TOMBSTONES)]
    await log.close()


@aio
async def test_a_run_file_is_aged_by_its_runs_and_at_start_by_the_loaded_tombstones(
    tmp_path: Path,
) -> None:
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    await _acked(r, slot, 0, SEAL_TOMBSTONES + 1, wall)
    newest = (wall.ms << 16) + SEAL_TOMBSTONES - 1
    r._checkpoint_tombstones(slot, SEAL_TOMBSTONES)  # sealed now, on the reactor
    wall.ms += 5 * 60_000  # written five minutes later: aged by its run, not by then
    await r._snapshot_once(r.slots)
    [key] = r._run_files
    assert r._run_files[key] == newest
    # A start: a file no snapshot names is aged from the hybrid clock once the loaded
    # tombstones (another region's clock ahead by ten minutes) went through it.
    ahead = (wall.ms + 600_000) << 16
    r._tombstone(slot, CH, ["late"], ahead)
    publish_at(r, CH, "m-late")
    await r._flush(force=True)
    await r._snapshot_once(r.slots)
    (runs_dir(r.slots_dir) / f"{slot}-12.tomb").write_bytes(b"RTMB\x01\x00")
    r2 = _router("sg/n1", log, tmp_path / "data", wall)
    await r2._load_snapshots()
    assert r2._run_files[(slot, 12)] > ahead
    await log.close()
