"""Slot snapshots on disk: the data directory, and writing, loading, deleting files.

The edge of :mod:`relay.snapshot` (which makes and checks the bytes). Layout::

    <data_dir>/            0700, owned by the node's user
        slots/             0700
            <slot>.snap    0600, one per slot this node holds
            <slot>.snap.tmp  a write in progress, or left by a crash (removed on load)
        tombstones/        0700
            <slot>-<n>.tomb  0600, runs of a slot's older ack tombstones, written once,
                           named by its snapshots (relay/snapshot.py, version 2);
                           removed once every tombstone in it is older than the dedupe
                           window by a minute (a damaged one refuses only its own
                           slot's snapshot)
            <slot>-<n>.tomb.tmp  as above
            pruned         0600, the hlc below which runs may have been removed (a
                           loader leaves them out: written before any removal, so a
                           start with a larger dedupe window or an earlier clock does
                           not refuse a snapshot naming one)

Every function here is synchronous and may block on the disk (``fsync`` can take tens of
milliseconds, far more on a busy or failing disk). A node calls them off the reactor —
``await asyncio.to_thread(write_snapshot, slots_dir, slot, data)``, or several slots'
``write_snapshot(…, sync_dir=False)`` and one :func:`sync_slots_dir` in one thread call —
with at most one write per slot at a time (:class:`relay.snapshot.DirtySlots` sees to
that). It captures the slot's events on the reactor, so the snapshot holds one
consistent state, and may encode them in the same thread as the write
(:func:`relay.snapshot.encode_snapshot`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from relay.errors import InvariantError, RelayError
from relay.snapshot import RUN_HEADER, RunRef, Snapshot, SnapshotError, decode_snapshot

SLOTS_DIR = "slots"
RUNS_DIR = "tombstones"
RUN_SUFFIX = ".tomb"
SUFFIX = ".snap"
TMP_SUFFIX = ".snap.tmp"
DIR_MODE = 0o700
FILE_MODE = 0o600

_SNAP_NAME = re.compile(r"(0|[1-9][0-9]{0,9})\.snap")
_TMP_NAME = re.compile(r"(0|[1-9][0-9]{0,9})\.snap\.tmp")
_RUN_NAME = re.compile(r"(0|[1-9][0-9]{0,9})-(0|[1-9][0-9]{0,18})\.tomb")
_RUN_TMP_NAME = re.compile(r"(0|[1-9][0-9]{0,9})-(0|[1-9][0-9]{0,18})\.tomb\.tmp")


class SnapshotDirError(RelayError):
    """The data directory cannot be used safely: it is not a directory, others may read
    or write it, or another user owns it. The node must not start; the message says
    what to fix."""

    def __init__(self, message: str, path: Path, mode: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.mode = mode


class SnapshotWriteError(RelayError):
    """A snapshot could not be written or deleted (``errno``: e.g. ENOSPC, EIO, EROFS).

    The previous good snapshot of the slot, if any, is still in place and no tmp file is
    left behind. The node keeps serving: it counts the failure
    (``relay_snapshot_failures_total``), leaves the slot dirty and tries again later.
    ``slot`` is None for the directory's fsync after several writes.
    """

    def __init__(self, message: str, *, slot: int | None, errno: int | None) -> None:
        super().__init__(message)
        self.slot = slot
        self.errno = errno


# ---------------------------------------------------------------- the directory


def prepare_data_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``<path>``, ``<path>/slots`` and ``<path>/tombstones`` (mode 0700) where
    missing; return the slots directory, which the other functions take (the run files'
    directory is :func:`runs_dir` of it).

    Raises :class:`SnapshotDirError` if any of them is not a directory, is not owned by this
    process's user, or grants any access to group or others (snapshots hold message
    bodies): the node must not start until an operator fixes it (``chmod 700``).
    """
    data_dir = Path(path)
    slots_dir = data_dir / SLOTS_DIR
    for d in (data_dir, slots_dir, data_dir / RUNS_DIR):
        try:
            _make_dir(d)
            st = os.stat(d)
        except OSError as exc:
            raise SnapshotDirError(f"cannot create data directory {d}: {exc}", d) from exc
        _check_dir(d, st)
    return slots_dir


def _make_dir(d: Path) -> None:
    if d.exists():
        return
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(d, DIR_MODE)
    except FileExistsError:
        return  # made meanwhile; checked like any existing one
    # mkdir's mode is cut by the umask: set it exactly, then make the new entry durable.
    os.chmod(d, DIR_MODE)
    _fsync_dir(d.parent)


def _check_dir(d: Path, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise SnapshotDirError(f"data directory {d} is not a directory", d, mode)
    uid = os.geteuid()
    if st.st_uid != uid:
        raise SnapshotDirError(
            f"data directory {d} is owned by uid {st.st_uid}, not by this node's uid {uid}"
            f" (mode {mode:04o}); chown it or choose another node.data_dir",
            d,
            mode,
        )
    if mode & 0o077:
        raise SnapshotDirError(
            f"data directory {d} has mode {mode:04o}: group or others may access the"
            f" snapshots (message bodies); run `chmod 700 {d}`",
            d,
            mode,
        )


def runs_dir(slots_dir: Path) -> Path:
    """Where the run files of tombstones live, beside ``slots_dir``."""
    return slots_dir.parent / RUNS_DIR


def snapshot_path(slots_dir: Path, slot: int) -> Path:
    """Where ``slot``'s snapshot lives."""
    if slot < 0:
        raise InvariantError(f"slot {slot} is negative")
    return slots_dir / f"{slot}{SUFFIX}"


# ---------------------------------------------------------------- write


def write_snapshot(slots_dir: Path, slot: int, data: bytes, *, sync_dir: bool = True) -> int:
    """Replace ``slot``'s snapshot with ``data`` atomically; return the bytes written.

    Writes ``<slot>.snap.tmp`` (``O_CREAT|O_EXCL``, mode 0600; a stale one is removed
    first), fsyncs it, renames it over ``<slot>.snap`` and fsyncs the directory: after a
    crash at any point the slot has either its old snapshot or the new one, whole.
    Raises :class:`SnapshotWriteError` on any OS error, after removing the tmp file; the
    previous snapshot stays in place (unless the error came after the rename, in which
    case the new one is in place but may not be durable yet). Blocks on the disk: call it
    in a thread (``asyncio.to_thread``), one write per slot at a time.

    ``sync_dir=False`` leaves the directory's fsync to the caller, who writes several
    slots and then calls :func:`sync_slots_dir` once: a slot's new snapshot is durable
    only after that call returns.
    """
    final = snapshot_path(slots_dir, slot)
    renamed = False
    try:
        _replace_with(final, slots_dir / f"{slot}{TMP_SUFFIX}", data)
        renamed = True
        if sync_dir:
            _fsync_dir(slots_dir)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno, "?") if exc.errno else "?"
        outcome = (
            "the new one is in place but may not be durable"
            if renamed
            else "the previous one is kept"
        )
        raise SnapshotWriteError(
            f"writing the snapshot of slot {slot} to {final} failed"
            f" ({code}: {exc.strerror or exc}); {outcome}",
            slot=slot,
            errno=exc.errno,
        ) from exc
    return len(data)


_TMP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW


EPOCH_FILE = "epoch"


def read_epoch(slots_dir: Path) -> int:
    """The last epoch this node joined its region under (``<data_dir>/epoch``), 0 when
    none was written or the file is unreadable: a floor for its next join, so that a
    restart after the region's Redis lost its epoch counter still joins above what its
    peers recorded for it."""
    try:
        text = (slots_dir.parent / EPOCH_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return 0
    return int(text) if text.isdigit() and len(text) <= 18 else 0


def write_epoch(slots_dir: Path, epoch: int) -> None:
    """Record ``epoch`` durably (a tmp file, fsynced, renamed, the directory fsynced).
    Raises OSError."""
    d = slots_dir.parent
    _replace_with(d / EPOCH_FILE, d / f"{EPOCH_FILE}.tmp", str(epoch).encode())
    _fsync_dir(d)


def sync_slots_dir(slots_dir: Path) -> None:
    """fsync the slots directory: the renames of :func:`write_snapshot` (``sync_dir=False``)
    before it are durable once it returns. Raises :class:`SnapshotWriteError`."""
    try:
        _fsync_dir(slots_dir)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno, "?") if exc.errno else "?"
        raise SnapshotWriteError(
            f"syncing the directory {slots_dir} failed ({code}: {exc.strerror or exc});"
            " the new snapshots are in place but may not be durable",
            slot=None,
            errno=exc.errno,
        ) from exc


def run_path(slots_dir: Path, slot: int, file: int) -> Path:
    """Where run file ``file`` of ``slot`` lives."""
    if slot < 0 or file < 0:
        raise InvariantError(f"run file {slot}-{file} has a negative number")
    return runs_dir(slots_dir) / f"{slot}-{file}{RUN_SUFFIX}"


def write_run_files(slots_dir: Path, files: Sequence[tuple[int, int, bytes]]) -> int:
    """Write the run files ``(slot, file, data)`` (:func:`relay.snapshot.encode_run_file`)
    durably — each a tmp file, fsynced and renamed, then one fsync of their directory —
    so that snapshots naming them may be written next. Return the bytes written. Raises
    :class:`SnapshotWriteError` at the first OS error, after removing that tmp file (the
    files renamed before it are named by no snapshot: removed once old). Blocks on the
    disk."""
    d = runs_dir(slots_dir)
    total = 0
    slot = None
    try:
        for slot, file, data in files:
            final = run_path(slots_dir, slot, file)
            _replace_with(final, final.with_name(final.name + ".tmp"), data)
            total += len(data)
        if files:
            slot = None
            _fsync_dir(d)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno, "?") if exc.errno else "?"
        what = f"slot {slot}'s tombstone run file" if slot is not None else "the run files"
        raise SnapshotWriteError(
            f"writing {what} in {d} failed ({code}: {exc.strerror or exc})",
            slot=slot,
            errno=exc.errno,
        ) from exc
    return total


def run_files(slots_dir: Path) -> list[tuple[int, int]]:
    """The run files on disk, as (slot, file) (tmp files left by a crash are removed;
    anything but a regular file is ignored)."""
    d = runs_dir(slots_dir)
    out = []
    try:
        with os.scandir(d) as entries:
            names = [(e.name, e.is_file(follow_symlinks=False)) for e in entries]
    except FileNotFoundError:
        return []
    for name, regular in names:
        if not regular:
            continue
        if _RUN_TMP_NAME.fullmatch(name):
            with contextlib.suppress(OSError):
                _unlink_quietly(d / name)
        elif (m := _RUN_NAME.fullmatch(name)) is not None:
            out.append((int(m.group(1)), int(m.group(2))))
    return sorted(out)


def delete_run_files(
    slots_dir: Path, files: Iterable[tuple[int, int]], *, below_hlc: int
) -> tuple[list[tuple[int, int]], OSError | None]:
    """Remove the run files ``(slot, file)`` no snapshot needs any more, each of whose
    runs is older than ``below_hlc``: first record ``below_hlc`` durably
    (:func:`read_pruned`; if that fails, the files still go: a snapshot naming one is
    then refused and its slot rebuilt from the region), then remove each file, then fsync
    the directory. Return the files gone (removed, or missing already) and the first
    error met, if any (the others are still tried). Blocks on the disk."""
    d = runs_dir(slots_dir)
    error: OSError | None = None
    try:
        _write_pruned(d, below_hlc)
    except OSError as exc:
        error = exc
    gone = []
    for slot, file in files:
        try:
            _unlink_quietly(run_path(slots_dir, slot, file))
            gone.append((slot, file))
        except OSError as exc:
            error = error or exc
    if gone:
        try:
            _fsync_dir(d)
        except OSError as exc:
            error = error or exc
    return gone, error


_PRUNED = "pruned"
_PRUNED_FORMAT = struct.Struct("<4sQ16s")


def read_pruned(slots_dir: Path) -> int:
    """The hlc below which the node removed tombstone runs: a run below it whose file
    does not exist is left out on load (0: none ever was, or the record is unreadable —
    then a snapshot naming a removed run is refused and its slot rebuilt from the
    region; removing the record is safe in that sense)."""
    try:
        data = _read(runs_dir(slots_dir) / _PRUNED)
    except OSError:
        return 0
    if len(data) != _PRUNED_FORMAT.size:
        return 0
    magic, hlc, digest = _PRUNED_FORMAT.unpack(data)
    body = data[: _PRUNED_FORMAT.size - 16]
    if magic != b"RPRN" or hashlib.blake2b(body, digest_size=16).digest() != digest:
        return 0
    return int(hlc)


def _write_pruned(d: Path, hlc: int) -> None:
    # Only ever raised: a record is replaced by a larger one (tmp, fsync, rename, fsync).
    current = read_pruned(d.parent / SLOTS_DIR)
    if hlc <= current:
        return
    body = struct.pack("<4sQ", b"RPRN", hlc)
    _replace_with(
        d / _PRUNED, d / (_PRUNED + ".tmp"), body + hashlib.blake2b(body, digest_size=16).digest()
    )
    _fsync_dir(d)


def _replace_with(final: Path, tmp: Path, data: bytes) -> None:
    """``final`` replaced by ``data``: written to ``tmp`` (``O_CREAT|O_EXCL``, mode 0600;
    a stale one, from an earlier write cut short, is removed first), fsynced, renamed
    over ``final``. The caller fsyncs the directory. On an OS error before the rename the
    tmp file is removed and the error raised (the first error is the one to report)."""
    try:
        try:
            fd = os.open(tmp, _TMP_FLAGS, FILE_MODE)
        except FileExistsError:
            _unlink_quietly(tmp)
            fd = os.open(tmp, _TMP_FLAGS, FILE_MODE)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            _unlink_quietly(tmp)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # not expected from a regular file; never spin
            raise OSError(errno.EIO, "write returned 0")
        view = view[n:]


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(p: Path) -> bool:
    try:
        os.unlink(p)
    except FileNotFoundError:
        return False
    return True


# ---------------------------------------------------------------- load and delete


def load_snapshots(
    slots_dir: Path, *, cutoff_hlc: int = 0
) -> tuple[dict[int, Snapshot], list[tuple[int, str]]]:
    """Read every ``<slot>.snap``: return the snapshots that passed every check, by slot,
    and the refused ones as (slot, reason), sorted by slot.

    The tombstone runs a snapshot names are read from its slot's run files (each once);
    runs whose newest tombstone is below ``cutoff_hlc`` (older than the dedupe window)
    are not read, nor those whose file does not exist and which :func:`read_pruned`
    says the node removed. A snapshot naming a needed run that is missing, unreadable
    or corrupt is refused (the run files are left in place: a later start may read
    them).

    A refused file is left in place: the caller counts and logs it, rebuilds the slot
    from the region and writes a fresh snapshot over it. Tmp files (a write cut short by
    a crash) are removed; other names are ignored. Blocks on the disk: call it before
    serving, or in a thread.
    """
    loaded: dict[int, Snapshot] = {}
    refused: list[tuple[int, str]] = []
    pruned_hlc = read_pruned(slots_dir)
    with os.scandir(slots_dir) as entries:
        names = [e.name for e in entries]
    removed_tmp = False
    for name in names:
        if _TMP_NAME.fullmatch(name):
            # Harmless if it stays: the next write of that slot removes it first.
            with contextlib.suppress(OSError):
                removed_tmp |= _unlink_quietly(slots_dir / name)
            continue
        m = _SNAP_NAME.fullmatch(name)
        if m is None:
            continue
        slot = int(m.group(1))
        try:
            data = _read(slots_dir / name)
            runs = _RunFiles(slots_dir, slot).chunk
            loaded[slot] = decode_snapshot(
                data, slot=slot, runs=runs, cutoff_hlc=cutoff_hlc, pruned_hlc=pruned_hlc
            )
        except SnapshotError as exc:
            refused.append((slot, str(exc)))
        except OSError as exc:
            refused.append((slot, f"cannot read {name}: {exc}"))
    if removed_tmp:
        with contextlib.suppress(OSError):  # only makes the removals durable sooner
            _fsync_dir(slots_dir)
    refused.sort()
    return loaded, refused


class _RunFiles:
    """A slot's run files, each read once for its snapshot: None for a file that does
    not exist, empty bytes for one that cannot be read or is not a run file."""

    def __init__(self, slots_dir: Path, slot: int) -> None:
        self.slots_dir = slots_dir
        self.slot = slot
        self.files: dict[int, bytes | None] = {}

    def chunk(self, ref: RunRef) -> bytes | None:
        if ref.file not in self.files:
            try:
                data: bytes | None = _read(run_path(self.slots_dir, self.slot, ref.file))
            except FileNotFoundError:
                data = None
            except OSError:
                data = b""
            if data and not data.startswith(RUN_HEADER):
                data = b""
            self.files[ref.file] = data
        data = self.files[ref.file]
        if data is None:
            return None
        if ref.offset < len(RUN_HEADER) or ref.offset + ref.length > len(data):
            return b""
        return data[ref.offset : ref.offset + ref.length]


def _read(p: Path) -> bytes:
    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def delete_snapshot(slots_dir: Path, slot: int) -> bool:
    """Remove ``slot``'s snapshot (and any tmp file) once the node no longer holds the
    slot; return whether a snapshot was there. Do not call it while a write of the slot
    is in flight (the write would bring the file back). Raises
    :class:`SnapshotWriteError` on an OS error. Blocks on the disk."""
    try:
        existed = _unlink_quietly(snapshot_path(slots_dir, slot))
        tmp = _unlink_quietly(slots_dir / f"{slot}{TMP_SUFFIX}")
        if existed or tmp:
            _fsync_dir(slots_dir)
    except OSError as exc:
        raise SnapshotWriteError(
            f"deleting the snapshot of slot {slot} failed: {exc}", slot=slot, errno=exc.errno
        ) from exc
    return existed
