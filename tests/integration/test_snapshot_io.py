"""relay.snapshot_io on real files: directory modes, atomic replacement, a full disk.

The full-disk case mounts a 64 KiB tmpfs when the test may (root with mount rights) and
also always runs with ``os.write`` failing with ENOSPC. Print the write figures with::

    .venv/bin/pytest tests/integration/test_snapshot_io.py -k figures -s
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.codec import MessageEvent
from relay.snapshot import RUN_HEADER, decode_snapshot, encode_snapshot
from relay.snapshot_io import (
    SnapshotDirError,
    SnapshotWriteError,
    delete_run_files,
    delete_snapshot,
    load_snapshots,
    prepare_data_dir,
    read_epoch,
    read_pruned,
    run_files,
    run_path,
    runs_dir,
    sync_slots_dir,
    write_epoch,
    write_run_files,
    write_snapshot,
)
from tests.conftest import small_tmpfs

HLC = 1_700_000_000_000 << 16
EXPIRES = 1_700_604_800_000


def events(n: int, body_size: int = 100, seed: int = 0) -> list[MessageEvent]:
    # Random bodies: lz4 cannot shrink them, so the file is as large as the state.
    rnd = random.Random(seed)
    return [
        MessageEvent(
            f"m-{i}", f"inbox:u{i % 97}", "bob", HLC + i, "sg", rnd.randbytes(body_size), EXPIRES
        )
        for i in range(n)
    ]


def snap(slot: int, n: int = 3, *, log_id: str = "1-0", body_size: int = 100) -> bytes:
    return encode_snapshot(
        slot, log_id, {"fra": "2-0"}, events(n, body_size), [("c", "acked", HLC)], region="sg"
    )


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def slots(tmp_path: Path) -> Path:
    return prepare_data_dir(tmp_path / "data")


# ---------------------------------------------------------------- the data directory


def test_prepare_creates_private_directories(tmp_path: Path) -> None:
    old = os.umask(0o000)  # even a permissive umask makes no open directory
    try:
        slots = prepare_data_dir(tmp_path / "a" / "data")
    finally:
        os.umask(old)
    assert slots == tmp_path / "a" / "data" / "slots"
    assert mode(slots) == 0o700
    assert mode(slots.parent) == 0o700
    assert prepare_data_dir(tmp_path / "a" / "data") == slots  # idempotent


@pytest.mark.parametrize("bad", [0o755, 0o750, 0o705, 0o701, 0o710, 0o720])
def test_an_open_data_directory_is_refused_until_chmod_700(tmp_path: Path, bad: int) -> None:
    data = tmp_path / "data"
    prepare_data_dir(data)
    data.chmod(bad)
    with pytest.raises(SnapshotDirError) as e:
        prepare_data_dir(data)
    assert str(data) in str(e.value) and f"{bad:04o}" in str(e.value)
    assert e.value.path == data and e.value.mode == bad
    data.chmod(0o700)
    assert prepare_data_dir(data) == data / "slots"


def test_an_open_slots_directory_is_refused(tmp_path: Path) -> None:
    slots = prepare_data_dir(tmp_path / "data")
    slots.chmod(0o755)
    with pytest.raises(SnapshotDirError, match="slots has mode 0755"):
        prepare_data_dir(tmp_path / "data")
    slots.chmod(0o700)
    prepare_data_dir(tmp_path / "data")


def test_an_existing_open_directory_is_not_silently_fixed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    with pytest.raises(SnapshotDirError, match="mode 0755"):
        prepare_data_dir(data)
    assert mode(data) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prepare_data_dir(data)
    os.chown(data, 65534, -1)
    with pytest.raises(SnapshotDirError, match="owned by uid 65534"):
        prepare_data_dir(data)


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").write_bytes(b"")
    with pytest.raises(SnapshotDirError, match="data"):
        prepare_data_dir(tmp_path / "data")


# ---------------------------------------------------------------- write and load


def test_write_then_load(slots: Path) -> None:
    data = snap(5)
    assert write_snapshot(slots, 5, data) == len(data)
    path = slots / "5.snap"
    assert path.read_bytes() == data
    assert mode(path) == 0o600
    assert os.stat(path).st_uid == os.geteuid()
    assert sorted(p.name for p in slots.iterdir()) == ["5.snap"]  # no tmp left
    loaded, refused = load_snapshots(slots)
    assert refused == []
    assert loaded == {5: decode_snapshot(data)}
    assert loaded[5].mirrors == {"fra": "2-0"} and loaded[5].tombstones == [("c", "acked", HLC)]


def test_the_file_mode_ignores_the_umask(slots: Path) -> None:
    old = os.umask(0o000)
    try:
        write_snapshot(slots, 1, snap(1))
    finally:
        os.umask(old)
    assert mode(slots / "1.snap") == 0o600


def test_a_write_replaces_the_previous_snapshot(slots: Path) -> None:
    write_snapshot(slots, 5, snap(5, log_id="1-0"))
    write_snapshot(slots, 5, snap(5, 7, log_id="9-0"))
    loaded, _ = load_snapshots(slots)
    assert loaded[5].log_id == "9-0" and len(loaded[5].messages) == 7


def test_a_stale_tmp_file_is_replaced_not_a_reason_to_fail(slots: Path) -> None:
    (slots / "5.snap.tmp").write_bytes(b"half a snapshot from before a crash")
    write_snapshot(slots, 5, snap(5))
    assert sorted(p.name for p in slots.iterdir()) == ["5.snap"]


def test_several_writes_then_one_directory_sync(
    slots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import relay.snapshot_io as snapshot_io

    synced: list[Path] = []
    real = snapshot_io._fsync_dir
    monkeypatch.setattr(snapshot_io, "_fsync_dir", lambda d: (synced.append(d), real(d))[1])
    for s in (1, 2, 3):
        assert write_snapshot(slots, s, snap(s), sync_dir=False) == len(snap(s))
    assert synced == []  # left to the caller
    sync_slots_dir(slots)
    assert synced == [slots]
    loaded, refused = load_snapshots(slots)
    assert refused == [] and sorted(loaded) == [1, 2, 3]
    assert sorted(p.name for p in slots.iterdir()) == ["1.snap", "2.snap", "3.snap"]


def test_a_failed_directory_sync_is_a_coded_error(
    slots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import relay.snapshot_io as snapshot_io

    def broken(d: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    write_snapshot(slots, 1, snap(1), sync_dir=False)
    monkeypatch.setattr(snapshot_io, "_fsync_dir", broken)
    with pytest.raises(SnapshotWriteError) as e:
        sync_slots_dir(slots)
    assert e.value.errno == errno.EIO and e.value.slot is None
    assert "may not be durable" in str(e.value)


def test_a_crash_before_the_rename_leaves_the_old_snapshot(slots: Path) -> None:
    old = snap(5, log_id="1-0")
    write_snapshot(slots, 5, old)
    # A crash mid-write: the tmp file holds part of the next snapshot.
    new = snap(5, 50, log_id="2-0")
    (slots / "5.snap.tmp").write_bytes(new[: len(new) // 2])
    # And a slot whose very first write was cut short.
    (slots / "8.snap.tmp").write_bytes(new[:10])
    loaded, refused = load_snapshots(slots)
    assert refused == []
    assert loaded == {5: decode_snapshot(old)}
    assert sorted(p.name for p in slots.iterdir()) == ["5.snap"]  # tmp files removed


def test_load_refuses_damaged_files_and_keeps_them(slots: Path) -> None:
    for s in (1, 2, 3, 4):
        write_snapshot(slots, s, snap(s))
    raw = bytearray((slots / "2.snap").read_bytes())
    raw[40] ^= 0xFF
    (slots / "2.snap").write_bytes(bytes(raw))
    (slots / "3.snap").write_bytes((slots / "3.snap").read_bytes()[:-5])  # truncated
    shutil.copy(slots / "1.snap", slots / "6.snap")  # slot 1's state under slot 6's name
    (slots / "README").write_text("not a snapshot")
    (slots / "07.snap").write_bytes(b"not a canonical name: ignored")
    loaded, refused = load_snapshots(slots)
    assert sorted(loaded) == [1, 4]
    assert [s for s, _ in refused] == [2, 3, 6]
    reasons = dict(refused)
    assert "checksum mismatch" in reasons[2]
    assert "truncated" in reasons[3]
    assert "holds slot 1, expected slot 6" in reasons[6]
    # Refused files stay: the caller rebuilds the slot and writes over them.
    assert {"2.snap", "3.snap", "6.snap"} <= {p.name for p in slots.iterdir()}
    write_snapshot(slots, 2, snap(2))
    assert 2 in load_snapshots(slots)[0]


def test_delete_snapshot(slots: Path) -> None:
    write_snapshot(slots, 3, snap(3))
    (slots / "3.snap.tmp").write_bytes(b"x")
    assert delete_snapshot(slots, 3) is True
    assert list(slots.iterdir()) == []
    assert delete_snapshot(slots, 3) is False


# ---------------------------------------------------------------- failing writes


def assert_old_kept(slots: Path, slot: int, old: bytes) -> None:
    assert (slots / f"{slot}.snap").read_bytes() == old
    assert not (slots / f"{slot}.snap.tmp").exists()
    loaded, refused = load_snapshots(slots)
    assert refused == [] and loaded[slot] == decode_snapshot(old)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for this test, or a skip where mounting is not allowed."""
    with small_tmpfs(tmp_path / "tmpfs", "64k") as mnt:
        yield mnt


def test_a_full_disk_keeps_the_previous_snapshot(tiny_tmpfs: Path) -> None:
    slots = prepare_data_dir(tiny_tmpfs / "data")
    old = snap(5, 3)
    write_snapshot(slots, 5, old)
    big = snap(5, 1000, body_size=100)  # ~110 KB: more than the disk holds
    assert len(big) > 64 * 1024
    with pytest.raises(SnapshotWriteError) as e:
        write_snapshot(slots, 5, big)
    assert e.value.errno == errno.ENOSPC and e.value.slot == 5
    assert "ENOSPC" in str(e.value) and "previous one is kept" in str(e.value)
    assert_old_kept(slots, 5, old)
    # The space of the failed tmp file was given back: the node can go on writing.
    newer = snap(5, 10, log_id="3-0")
    write_snapshot(slots, 5, newer)
    assert load_snapshots(slots)[0][5].log_id == "3-0"


def test_enospc_from_write_keeps_the_previous_snapshot(
    slots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = snap(5)
    write_snapshot(slots, 5, old)
    real_write = os.write
    calls = 0

    def full(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data)[:100])  # a short first write, then full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "write", full)
        with pytest.raises(SnapshotWriteError) as e:
            write_snapshot(slots, 5, snap(5, 40))
    assert e.value.errno == errno.ENOSPC and calls == 2
    assert_old_kept(slots, 5, old)


def test_eio_from_fsync_keeps_the_previous_snapshot(
    slots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = snap(5)
    write_snapshot(slots, 5, old)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", broken)
        with pytest.raises(SnapshotWriteError) as e:
            write_snapshot(slots, 5, snap(5, 40))
    assert e.value.errno == errno.EIO
    assert_old_kept(slots, 5, old)


def test_short_writes_are_completed(slots: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def dribble(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data)[:7])

    data = snap(5, 20)
    with monkeypatch.context() as m:
        m.setattr(os, "write", dribble)
        assert write_snapshot(slots, 5, data) == len(data)
    assert (slots / "5.snap").read_bytes() == data


def test_a_read_only_directory_fails_cleanly(slots: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    old = snap(5)
    write_snapshot(slots, 5, old)
    slots.chmod(0o500)
    try:
        with pytest.raises(SnapshotWriteError) as e:
            write_snapshot(slots, 5, snap(5, 9))
        assert e.value.errno == errno.EACCES
    finally:
        slots.chmod(0o700)
    assert_old_kept(slots, 5, old)


# ---------------------------------------------------------------- figures


def test_write_figures(slots: Path) -> None:
    """Snapshot of a slot holding ~4 MB of pending messages: encode time per MB, write
    rate (tmp, fsync, rename, fsync dir) in MB/s, load time, and the longest pause a
    thread doing the encode and write causes. Printed, not asserted."""
    evs = events(20_000, body_size=200, seed=1)  # 4.0 MB of bodies, incompressible
    state_mb = sum(len(e.body) + len(e.id) + len(e.ch) + 16 for e in evs) / 1e6
    encode_s, write_s, load_s = [], [], []
    data = b""
    for i in range(7):
        t0 = time.perf_counter()
        data = encode_snapshot(i, "1-0", {"fra": "1-0"}, evs)
        t1 = time.perf_counter()
        write_snapshot(slots, i, data)
        t2 = time.perf_counter()
        encode_s.append(t1 - t0)
        write_s.append(t2 - t1)
    for _ in range(3):
        t0 = time.perf_counter()
        loaded, _ = load_snapshots(slots)
        load_s.append(time.perf_counter() - t0)
    assert len(loaded) == 7
    pause = longest_pause_while(
        lambda: [write_snapshot(slots, i, encode_snapshot(i, "1-0", {}, evs)) for i in range(5)]
    )
    mb = len(data) / 1e6
    enc, wr, ld = (statistics.median(v) for v in (encode_s, write_s, load_s))
    print(
        f"\nsnapshot of {len(evs)} messages, {state_mb:.1f} MB of state, file {mb:.2f} MB:"
        f"\n  encode {enc * 1e3:.1f} ms ({enc * 1e3 / mb:.1f} ms/MB)"
        f"\n  write+fsync+rename+fsync dir {wr * 1e3:.1f} ms ({mb / wr:.0f} MB/s);"
        f" max {max(write_s) * 1e3:.1f} ms"
        f"\n  load+decode 7 slots {ld * 1e3:.0f} ms ({7 * mb / ld:.0f} MB/s)"
        f"\n  encode+write of 5 slots in a thread: longest pause of the main thread"
        f" {pause * 1e3:.1f} ms (1 ms sleeps)"
    )


def longest_pause_while(work: Callable[[], object]) -> float:
    """The longest gap between 1 ms sleeps of this thread while ``work`` runs in another
    (as the reactor would see an ``asyncio.to_thread`` snapshot write)."""
    done = threading.Event()

    def run() -> None:
        try:
            work()
        finally:
            done.set()

    worker = threading.Thread(target=run)
    longest, last = 0.0, time.perf_counter()
    worker.start()
    while not done.is_set():
        time.sleep(0.001)  # the probe: how late a 1 ms poll wakes is the stall
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    worker.join()
    return longest


# ---------------------------------------------------------------- tombstone run files


def test_run_files_on_a_full_disk_fail_with_a_coded_error_and_no_tmp_left(
    tiny_tmpfs: Path,
) -> None:
    slots = prepare_data_dir(tiny_tmpfs / "data")
    small = RUN_HEADER + b"x" * 100
    big = RUN_HEADER + os.urandom(100 * 1024)  # more than the disk holds
    with pytest.raises(SnapshotWriteError) as e:
        write_run_files(slots, [(3, 1, small), (4, 2, big)])
    assert e.value.errno == errno.ENOSPC and e.value.slot == 4
    assert "slot 4's tombstone run file" in str(e.value)
    # The first is in place (named by no snapshot: removed once old); no tmp file left.
    assert sorted(os.listdir(runs_dir(slots))) == ["3-1.tomb"]
    assert run_files(slots) == [(3, 1)]
    assert mode(run_path(slots, 3, 1)) == 0o600


def test_the_pruned_record_only_rises_and_a_damaged_one_reads_as_none(slots: Path) -> None:
    assert read_pruned(slots) == 0
    write_run_files(slots, [(1, 5, RUN_HEADER), (2, 6, RUN_HEADER)])
    gone, err = delete_run_files(slots, [(1, 5), (9, 9)], below_hlc=HLC)
    assert err is None and gone == [(1, 5), (9, 9)]  # one removed, one missing already
    assert read_pruned(slots) == HLC
    delete_run_files(slots, [], below_hlc=HLC - 1)
    assert read_pruned(slots) == HLC  # never lowered
    p = runs_dir(slots) / "pruned"
    assert mode(p) == 0o600
    p.write_bytes(p.read_bytes()[:-1] + b"?")
    assert read_pruned(slots) == 0  # damaged: snapshots naming removed runs are refused
    assert run_files(slots) == [(2, 6)]


def test_run_files_are_removed_even_when_the_record_cannot_be_written(slots: Path) -> None:
    write_run_files(slots, [(1, 5, RUN_HEADER), (2, 6, RUN_HEADER)])
    (runs_dir(slots) / "pruned").mkdir()  # in the way of the record's rename
    gone, err = delete_run_files(slots, [(1, 5), (2, 6)], below_hlc=HLC)
    assert gone == [(1, 5), (2, 6)] and run_files(slots) == []
    assert isinstance(err, OSError)  # reported; a snapshot naming them is then refused
    assert read_pruned(slots) == 0


def test_the_epoch_file_round_trips_and_anything_else_reads_as_none(tmp_path: Path) -> None:
    slots = prepare_data_dir(tmp_path / "data")
    assert read_epoch(slots) == 0  # never written
    write_epoch(slots, 41)
    write_epoch(slots, 42)
    assert read_epoch(slots) == 42
    assert oct(stat.S_IMODE((tmp_path / "data" / "epoch").stat().st_mode)) == "0o600"
    for junk in (b"", b"-3", b"4x", b"\xff\xfe", b"9" * 40):
        (tmp_path / "data" / "epoch").write_bytes(junk)
        assert read_epoch(slots) == 0, junk
