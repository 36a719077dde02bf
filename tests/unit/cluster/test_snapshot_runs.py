"""A region node's snapshots of a slot with many ack tombstones, on real files (the
in-memory slot log, no Redis): the tombstones sealed in runs are written once, to a run
file, and every later snapshot names them; a restarted node reads them back; a run file
that cannot be written fails its batch; run files older than the dedupe window are
removed, and a snapshot still naming them loads without them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import cluster.region.snapshots as snapshots_mod
from cluster.ring import Ring, slot_of
from cluster.slotlog import MemorySlotLog
from relay.snapshot import SEAL_TOMBSTONES
from relay.snapshot_io import (
    SnapshotWriteError,
    load_snapshots,
    prepare_data_dir,
    run_files,
    runs_dir,
)
from tests.conftest import aio, publish_at

CH = "inbox:erin"
T0 = 1_700_000_000_000


class _Wall:
    """A wall clock in ms the test moves."""

    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


def _router(node: str, log: MemorySlotLog, data_dir: Path, wall: _Wall) -> Any:
    from cluster.router import Router
    from relay.config import load_config
    from relay.server import build_node

    cfg = load_config(
        None,
        {
            "RELAY_CLUSTER__REDIS_URL": "redis://127.0.0.1:1/0",
            "RELAY_NODE__ID": node,
            "RELAY_NODE__DATA_DIR": str(data_dir),
        },
    )
    r = Router(
        config=cfg,
        node=build_node(cfg),
        reactor=None,
        fan_out=lambda m, h: None,
        wall_ms=wall,
    )
    r.slotlog = log
    r.lease_fresh = lambda: True
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
    assert len(files) == 1  # the two whole runs, in one run file
    run_file = runs_dir(r.slots_dir) / f"{files[0]}.tomb"
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
async def test_a_restarted_node_gets_every_tombstone_back_and_removes_unused_run_files(
    tmp_path: Path,
) -> None:
    wall = _Wall()
    r, log, slot = await _owner(tmp_path, wall)
    n = 3 * SEAL_TOMBSTONES + 7
    await _acked(r, slot, 0, n, wall)
    await r._snapshot_once(r.slots)
    kept = run_files(r.slots_dir)
    d = runs_dir(r.slots_dir)
    (d / "12.tomb").write_bytes(b"RTMB\x01\x00left by a batch whose snapshots failed")
    (d / "13.tomb.tmp").write_bytes(b"cut short")
    wall.ms += 1000

    r2 = _router("sg/n1", log, tmp_path / "data", wall)
    await r2._load_snapshots()
    assert r2.snapshot_stats["refused"] == 0
    assert _ids(r2, slot) == [f"a{i}" for i in range(n)]
    assert sorted(os.listdir(d)) == [f"{f}.tomb" for f in kept]
    assert r2._next_run_file > max(kept)
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
        m.setattr(snapshots_mod, "write_run_file", full)
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
        (runs_dir(r.slots_dir) / f"{f}.tomb").unlink()
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
