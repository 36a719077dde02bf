"""A slot's snapshot on disk: the file format, and which slots need writing.

Pure: no files, no clock. :mod:`relay.snapshot_io` reads and writes the bytes made here;
the caller passes ``now`` (monotonic seconds) to :class:`DirtySlots`.

File format of ``<data_dir>/slots/<slot>.snap`` (integers little-endian)::

    header, 20 bytes
        4s  magic        b"RSNP"
        H   version      1, or 2 when the snapshot names tombstone runs (below)
        I   slot
        H   flags        none defined; any set bit is refused
        Q   body_len     bytes of the body that follows
    body
        positions the state covers
            H  len, log_id          the slot log's entry id (ASCII "ms-seq", "0-0" = none)
            H  mirror count
            per mirror, by origin:  B len, origin (UTF-8); H len, mirror entry id (ASCII)
        state
            I  batch count
            per batch:              I len, a relay.codec batch (msgpack+lz4)
        tombstone runs (version 2 only)
            I  run count
            per run:                Q run file, Q offset, I length, 16s blake2b of
                                    those bytes, Q newest hlc of its tombstones
    trailer
        16s blake2b (digest_size=16) of header and body

The batches hold the slot's pending messages (``MessageEvent``) and then its ack
tombstones (``AckEvent``), so a loader applies them with :func:`cluster.apply.apply_events`
like any log entry. The state is cut into batches of a bounded size, so every batch
decodes under the codec's default limits however large the slot.

Version 2 (written only when there are runs): a slot's older tombstones, sealed by
:class:`SealedTombstones` 500 at a time, are written once to a *run file*
(``<data_dir>/tombstones/<slot>-<n>.tomb``, :func:`encode_run_file`; a slot's own files,
so a damaged one refuses only that slot's snapshot) and every later snapshot of
the slot names them (:class:`RunRef`) instead of carrying them again: a busy node holds
a dedupe window of tombstones (ten minutes of acks), and rewriting all of them with
every changed slot every tick made the snapshots' disk writes grow with uptime, not with
what changed. A run's bytes are a sequence of ``I len, batch`` (its tombstones as
``AckEvent``s) and its digest is checked on load. The runs' events come between the
messages and the batches' tombstones (tombstones stay oldest first). A run wholly older
than the dedupe window is not read (it dedupes nothing): its file may be gone.

:func:`decode_snapshot` trusts nothing: it returns a snapshot only when every check
passed, and refuses anything else with :class:`SnapshotError` — never another exception,
whatever the bytes — so a snapshot is loaded whole or not at all.
"""

from __future__ import annotations

import hashlib
import heapq
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from relay.codec import (
    AckEvent,
    CodecError,
    Event,
    MessageEvent,
    decode_batch,
    encode_batch,
)
from relay.errors import InvariantError, RelayError
from relay.frames import MAX_ACK_IDS
from relay.store import MAX_ORIGIN_BYTES

MAGIC: Final = b"RSNP"
VERSION: Final = 1
VERSION_RUNS: Final = 2  # version 1 plus the tombstone runs
READS: Final = (VERSION, VERSION_RUNS)
MAX_SLOT: Final = 2**32 - 1

_HEADER: Final = struct.Struct("<4sHIHQ")
HEADER_SIZE: Final = _HEADER.size
DIGEST_SIZE: Final = 16
_U8: Final = struct.Struct("<B")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_RUN_REF: Final = struct.Struct("<QQI16sQ")
# A run file: this magic and version, then the runs' bytes back to back (each run's
# place and digest are in the snapshots that name it).
RUN_MAGIC: Final = b"RTMB"
RUN_VERSION: Final = 1
RUN_HEADER: Final = RUN_MAGIC + struct.pack("<H", RUN_VERSION)

# A batch is cut when it holds this many events or its estimated msgpack size passes
# this many bytes: well inside the codec's defaults (100 000 events, 64 MiB). Small
# batches bound how long one C call holds the GIL when a thread encodes or decodes a
# snapshot: measured with 4 MB slots, the reactor thread's longest pause was 14 ms
# (median) with 4 MiB batches and 9 ms with 1 MiB ones, at no cost in encode speed.
BATCH_MAX_EVENTS: Final = 10_000
BATCH_MAX_BYTES: Final = 1024 * 1024

# Tombstones are sealed (encoded once, their bytes reused by every later snapshot of the
# slot) this many at a time: see :class:`SealedTombstones`.
SEAL_TOMBSTONES: Final = 500

# A Redis stream id: "<ms>-<seq>", both unsigned 64-bit decimal.
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_MAX_MIRRORS: Final = 0xFFFF

Tombstone = tuple[str, str, int]
"""An ack tombstone: (channel, message id, hlc the message was accepted at)."""


class SnapshotError(RelayError):
    """A snapshot failed its checks on decode; the message says which check.

    Nothing of it may be loaded. The caller counts and logs the refusal, and rebuilds the
    slot from the region (checkpoint and logs), then writes a fresh snapshot over it.
    """


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A slot's state as of its slot log at ``log_id`` and each origin's mirror at
    ``mirrors[origin]``: a loader applies ``events``, then replays every stream after
    these positions."""

    slot: int
    log_id: str
    mirrors: Mapping[str, str]
    events: tuple[Event, ...]
    runs: tuple[RunRef, ...] = ()  # the tombstone runs it names (version 2)

    @property
    def messages(self) -> list[MessageEvent]:
        """The pending messages, in the order they were written."""
        return [e for e in self.events if isinstance(e, MessageEvent)]

    @property
    def tombstones(self) -> list[Tombstone]:
        """The ack tombstones as (ch, id, hlc)."""
        return [
            (e.ch, msg_id, e.hlc)
            for e in self.events
            if isinstance(e, AckEvent)
            for msg_id in e.ids
        ]


# ---------------------------------------------------------------- encode


def encode_snapshot(
    slot: int,
    log_id: str,
    mirrors: Mapping[str, str],
    events: Sequence[Event],
    tombstones: Iterable[Tombstone] = (),
    *,
    region: str = "",
    tombstone_runs: Sequence[RunRef] = (),
) -> bytes:
    """The bytes of ``slot``'s snapshot file.

    ``log_id``: the slot log entry the state includes ("0-0" when there is no log);
    ``mirrors``: origin region → the newest mirror entry applied; ``events``: the pending
    messages (oldest first); ``tombstones``: (ch, id, hlc) of acked ids still remembered,
    written as ``AckEvent``s from ``region`` (this node's region, required when there are
    tombstones). ``tombstone_runs``: older tombstones, sealed in runs
    (:class:`SealedTombstones`) and in run files already on disk, named rather than
    written; a loader puts them between the messages and ``tombstones``, so that
    tombstones stay oldest first (version 2; a snapshot without them is version 1,
    which every earlier build reads). Raises
    :class:`~relay.errors.InvariantError` for what :func:`decode_snapshot` would
    refuse — a bug in the caller, never to be written.

    It only reads its arguments (events are frozen), so the caller may capture the state
    on the reactor and encode it in a thread: a slot of 4 MB of messages takes about
    50 ms to encode, too long for one reactor turn.
    """
    if not 0 <= slot <= MAX_SLOT:
        raise InvariantError(f"slot {slot} is outside 0..{MAX_SLOT}")
    acks: list[Event] = list(_tombstone_events(tombstones, region))
    positions = [_position_id(log_id, "log_id")]
    if len(mirrors) > _MAX_MIRRORS:
        raise InvariantError(f"{len(mirrors)} mirrors is over {_MAX_MIRRORS}")
    positions.append(_U16.pack(len(mirrors)))
    for origin, mirror_id in sorted(mirrors.items()):
        o = _utf8(origin, "origin")
        if not 1 <= len(o) <= MAX_ORIGIN_BYTES:
            raise InvariantError(f"origin {origin!r} is not 1–{MAX_ORIGIN_BYTES} bytes")
        positions.append(_U8.pack(len(o)) + o)
        positions.append(_position_id(mirror_id, f"mirror id of {origin!r}"))
    batches = [encode_batch(chunk) for chunk in _chunks(list(events))]
    batches.extend(encode_batch(chunk) for chunk in _chunks(acks))
    parts = [b"".join(positions), _U32.pack(len(batches))]
    for b in batches:
        parts.append(_U32.pack(len(b)))
        parts.append(b)
    version = VERSION
    if tombstone_runs:
        version = VERSION_RUNS
        parts.append(_U32.pack(len(tombstone_runs)))
        for ref in tombstone_runs:
            if len(ref.digest) != DIGEST_SIZE:
                raise InvariantError(f"a run's digest is {len(ref.digest)} bytes")
            parts.append(
                _RUN_REF.pack(ref.file, ref.offset, ref.length, ref.digest, ref.newest_hlc)
            )
    body = b"".join(parts)
    header = _HEADER.pack(MAGIC, version, slot, 0, len(body))
    digest = hashlib.blake2b(header, digest_size=DIGEST_SIZE)
    digest.update(body)
    return b"".join((header, body, digest.digest()))


def encode_tombstones(tombstones: Iterable[Tombstone], region: str) -> tuple[bytes, ...]:
    """``tombstones`` encoded as snapshot batches once (a sealed run's, written once to a
    run file and reused by every later checkpoint of the slot)."""
    acks: list[Event] = list(_tombstone_events(tombstones, region))
    return tuple(encode_batch(chunk) for chunk in _chunks(acks))


@dataclass(frozen=True, slots=True)
class Sealed:
    """Tombstones ``start`` to ``end`` (their sequence numbers, end excluded) of a slot,
    encoded; ``newest_hlc``: the newest hlc among them."""

    start: int
    end: int
    batches: tuple[bytes, ...]
    newest_hlc: int


@dataclass(frozen=True, slots=True)
class RunRef:
    """Where a sealed run of tombstones is on disk: ``length`` bytes at ``offset`` of run
    file ``file``, whose blake2b (16 bytes) is ``digest``; ``newest_hlc``: the newest hlc
    of its tombstones (a run older than the dedupe window need not be read)."""

    file: int
    offset: int
    length: int
    digest: bytes
    newest_hlc: int


def run_bytes(run: Sealed) -> bytes:
    """A sealed run as it is written to a run file (``I len, batch`` each)."""
    return b"".join(_U32.pack(len(b)) + b for b in run.batches)


def encode_run_file(runs: Sequence[Sealed], file: int) -> tuple[bytes, list[RunRef]]:
    """Run file number ``file`` holding ``runs``: its bytes, and where each run is."""
    parts = [RUN_HEADER]
    refs = []
    offset = len(RUN_HEADER)
    for run in runs:
        chunk = run_bytes(run)
        digest = hashlib.blake2b(chunk, digest_size=DIGEST_SIZE).digest()
        refs.append(RunRef(file, offset, len(chunk), digest, run.newest_hlc))
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts), refs


class SealedTombstones:
    """Per slot, its older tombstones already encoded, so that a snapshot encodes only
    those added since (a node holds a dedupe window of them: millions when busy, and
    every snapshot of a changed slot carries all of its own).

    Sequence numbers are the ones :class:`cluster.positions.Tombstones` gives: a slot's
    tombstones are added at the new end and dropped from the old one. A sealed run is
    written until its newest tombstone is dropped, so a snapshot may carry up to
    :data:`SEAL_TOMBSTONES` tombstones older than the window; a loader drops those
    (they dedupe nothing)."""

    __slots__ = ("_by_slot", "seal_every")

    def __init__(self, seal_every: int = SEAL_TOMBSTONES) -> None:
        if seal_every < 1:
            raise InvariantError("seal_every must be >= 1")
        self.seal_every = seal_every
        self._by_slot: dict[int, list[Sealed]] = {}

    def end(self, slot: int) -> int:
        """The sequence number of the first tombstone of ``slot`` not sealed."""
        runs = self._by_slot.get(slot)
        return runs[-1].end if runs else 0

    def runs(self, slot: int, first: int) -> tuple[int, list[Sealed]]:
        """For a snapshot or checkpoint of ``slot`` whose oldest tombstone is ``first``:
        where the tombstones to encode afresh start, and the sealed runs before them
        (oldest first). Runs wholly older than ``first`` are forgotten."""
        runs = [r for r in self._by_slot.get(slot, ()) if r.end > first]
        if runs:
            self._by_slot[slot] = runs
        else:
            self._by_slot.pop(slot, None)
        return max(first, self.end(slot)), runs

    def seal(self, slot: int, run: Sealed) -> None:
        """Keep ``run`` (encoded by a writer from :meth:`take`'s start); ignored when a
        run covering it was kept meanwhile."""
        if run.start >= self.end(slot) and run.end > run.start:
            self._by_slot.setdefault(slot, []).append(run)

    def to_seal(
        self, start: int, tombstones: Sequence[Tombstone], region: str
    ) -> tuple[list[Sealed], Sequence[Tombstone]]:
        """Of ``tombstones`` (numbered from ``start``), the whole runs to seal, encoded,
        and the rest to encode afresh. Pure: call it from the writer's thread."""
        n = len(tombstones) - len(tombstones) % self.seal_every
        runs = [
            Sealed(
                start + i,
                start + i + self.seal_every,
                encode_tombstones(tombstones[i : i + self.seal_every], region),
                max(t[2] for t in tombstones[i : i + self.seal_every]),
            )
            for i in range(0, n, self.seal_every)
        ]
        return runs, tombstones[n:]


def _utf8(s: str, what: str) -> bytes:
    try:
        return s.encode()
    except UnicodeEncodeError as exc:
        raise InvariantError(f"{what} {s!r} is not valid UTF-8: {exc}") from None


def _position_id(stream_id: str, what: str) -> bytes:
    if not isinstance(stream_id, str) or not _STREAM_ID.fullmatch(stream_id):
        raise InvariantError(f"{what} {stream_id!r} is not a stream id like '1700000000000-0'")
    return _U16.pack(len(stream_id)) + stream_id.encode("ascii")


def _tombstone_events(tombstones: Iterable[Tombstone], region: str) -> list[AckEvent]:
    # One AckEvent per (channel, hlc), its ids cut to the codec's limit: every tombstone
    # keeps its own hlc.
    grouped: dict[tuple[str, int], list[str]] = {}
    for ch, msg_id, hlc in tombstones:
        grouped.setdefault((ch, hlc), []).append(msg_id)
    if grouped and not region:
        raise InvariantError("tombstones need the region that records them")
    out = []
    for (ch, hlc), ids in grouped.items():
        for i in range(0, len(ids), MAX_ACK_IDS):
            out.append(AckEvent(ch, tuple(ids[i : i + MAX_ACK_IDS]), hlc, region))
    return out


def _estimate(e: Event) -> int:
    # An upper bound of the event's msgpack size: a string takes at most 4 bytes a
    # character plus a 5-byte header, an integer 9 bytes.
    if isinstance(e, MessageEvent):
        return 64 + 4 * (len(e.id) + len(e.ch) + len(e.sender) + len(e.origin)) + len(e.body)
    if isinstance(e, AckEvent):
        return 48 + 4 * (len(e.ch) + len(e.origin)) + sum(5 + 4 * len(i) for i in e.ids)
    raise InvariantError(f"not an event: {type(e).__name__}")


def _chunks(events: list[Event]) -> Iterator[list[Event]]:
    start = 0
    size = 0
    for i, e in enumerate(events):
        n = _estimate(e)
        if i > start and (i - start >= BATCH_MAX_EVENTS or size + n > BATCH_MAX_BYTES):
            yield events[start:i]
            start, size = i, 0
        size += n
    if start < len(events):
        yield events[start:]


# ---------------------------------------------------------------- decode


def decode_snapshot(
    data: bytes,
    *,
    slot: int | None = None,
    runs: Callable[[RunRef], bytes | None] | None = None,
    cutoff_hlc: int = 0,
    pruned_hlc: int = 0,
) -> Snapshot:
    """Check and decode a snapshot made by :func:`encode_snapshot`.

    ``slot``: the slot the file is named for; a snapshot of another slot is refused.
    ``runs``: the bytes a :class:`RunRef` names — None when its file does not exist,
    any other wrong bytes (empty, short) when it cannot be read; a run whose
    ``newest_hlc`` is below ``cutoff_hlc`` (older than the dedupe window) is left out
    without being read, and so is a run whose file does not exist when its
    ``newest_hlc`` is below ``pruned_hlc`` (the node removed it, out of the window it
    enforced then). A run needed and missing or unreadable, or whose bytes
    fail their digest, refuses the snapshot.
    Raises :class:`SnapshotError` — and nothing else, whatever the bytes — for a foreign
    file, a version this node cannot read, a truncated, extended or corrupt file (the
    checksum covers every byte), or a wrong slot. The caller must then load none of it.
    """
    n = len(data)
    if bytes(data[:4]) != MAGIC[: min(4, n)]:
        raise SnapshotError(f"not a relay snapshot: starts with {bytes(data[:4])!r}, not {MAGIC!r}")
    if n < 6:
        raise SnapshotError(f"truncated snapshot: {n} bytes, shorter than its header")
    (version,) = _U16.unpack_from(data, 4)
    if version not in READS:
        raise SnapshotError(
            f"snapshot version {version}, this node reads {VERSION} and {VERSION_RUNS}"
        )
    if n < HEADER_SIZE:
        raise SnapshotError(f"truncated snapshot: {n} bytes, shorter than its header")
    _, _, held, flags, body_len = _HEADER.unpack_from(data)
    size = HEADER_SIZE + body_len + DIGEST_SIZE
    if n < size:
        raise SnapshotError(f"truncated snapshot: {n} bytes, its header says {size}")
    if n > size:
        raise SnapshotError(f"{n - size} trailing bytes after the snapshot")
    digest = hashlib.blake2b(memoryview(data)[: n - DIGEST_SIZE], digest_size=DIGEST_SIZE)
    if digest.digest() != bytes(data[n - DIGEST_SIZE :]):
        raise SnapshotError("checksum mismatch: the snapshot is corrupt")
    if flags:
        raise SnapshotError(f"unknown snapshot flags 0x{flags:04x}")
    if slot is not None and held != slot:
        raise SnapshotError(f"snapshot holds slot {held}, expected slot {slot}")
    r = _Reader(memoryview(data)[HEADER_SIZE : HEADER_SIZE + body_len])
    log_id = r.stream_id("log_id")
    mirrors: dict[str, str] = {}
    for _ in range(r.u16()):
        raw = r.take(r.u8())
        try:
            origin = raw.decode()
        except UnicodeDecodeError:
            raise SnapshotError("a mirror's origin is not UTF-8") from None
        if not origin or origin in mirrors:
            raise SnapshotError(f"mirror origin {origin!r} is empty or repeated")
        mirrors[origin] = r.stream_id(f"mirror id of {origin!r}")
    events: list[Event] = []
    for _ in range(r.u32()):
        events.extend(_decode(r.take(r.u32()), "batch in snapshot"))
    refs: list[RunRef] = []
    if version == VERSION_RUNS:
        refs = [_read_ref(r) for _ in range(r.u32())]
        if not refs:
            raise SnapshotError("a version 2 snapshot names no tombstone runs")
        older: list[Event] = []
        for ref in refs:
            if ref.newest_hlc < cutoff_hlc:
                continue  # wholly older than the dedupe window: dedupes nothing
            chunk = runs(ref) if runs is not None else None
            if chunk is None and ref.newest_hlc < pruned_hlc:
                continue  # removed by the node once out of its window
            older.extend(_run_events(ref, chunk))
        # The runs' tombstones are older than those in the batches: messages first, then
        # the runs, then the rest.
        msgs = [e for e in events if not isinstance(e, AckEvent)]
        events = [*msgs, *older, *(e for e in events if isinstance(e, AckEvent))]
    if r.left:
        raise SnapshotError(f"{r.left} unread bytes at the end of the snapshot body")
    return Snapshot(held, log_id, mirrors, tuple(events), tuple(refs))


def _decode(batch: bytes, what: str) -> list[Event]:
    try:
        return decode_batch(batch)
    except CodecError as exc:
        raise SnapshotError(f"bad {what}: {exc}") from None


def _run_events(ref: RunRef, chunk: bytes | None) -> list[Event]:
    where = f"tombstone run at {ref.offset} of run file {ref.file}"
    if chunk is None or len(chunk) != ref.length:
        raise SnapshotError(f"{where} cannot be read (its file is gone, unreadable or short)")
    if hashlib.blake2b(chunk, digest_size=DIGEST_SIZE).digest() != ref.digest:
        raise SnapshotError(f"{where} fails its checksum")
    r = _Reader(memoryview(chunk))
    out: list[Event] = []
    while r.left:
        out.extend(_decode(r.take(r.u32()), where))
    if not all(isinstance(e, AckEvent) for e in out):
        raise SnapshotError(f"{where} holds events other than tombstones")
    return out


def _read_ref(r: _Reader) -> RunRef:
    file, offset, length, digest, newest = _RUN_REF.unpack(r.take(_RUN_REF.size))
    return RunRef(file, offset, length, digest, newest)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.left:
            raise SnapshotError(f"snapshot body ends inside a field ({n} bytes, {self.left} left)")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def u8(self) -> int:
        v: int = _U8.unpack(self.take(1))[0]
        return v

    def u16(self) -> int:
        v: int = _U16.unpack(self.take(2))[0]
        return v

    def u32(self) -> int:
        v: int = _U32.unpack(self.take(4))[0]
        return v

    def stream_id(self, what: str) -> str:
        raw = self.take(self.u16())
        s = raw.decode("ascii", errors="replace")
        if not _STREAM_ID.fullmatch(s):
            raise SnapshotError(f"{what} {raw!r} is not a stream id")
        return s


# ---------------------------------------------------------------- dirty tracking


@dataclass(frozen=True, slots=True)
class WriteSnapshot:
    """Order: encode ``slot``'s state as it is now, write it, then report the outcome
    with :meth:`DirtySlots.written` or :meth:`DirtySlots.failed`.

    ``dirty_since``: when the oldest change this write saves was made.
    """

    slot: int
    dirty_since: float


class DirtySlots:
    """Which slots changed since their last snapshot, and which to write next.

    The owner calls :meth:`mark` on every change of a slot's pending state, and on each
    snapshot tick :meth:`take`; it encodes each slot taken in that same reactor turn (so
    the snapshot holds exactly the changes made before it), writes it off the reactor and
    reports :meth:`written` or :meth:`failed`. A slot changed again while its write is in
    flight is dirty again; a failed write leaves the slot dirty from its oldest change.
    A slot is never taken while its previous write is in flight, so two writes of one slot
    never race on its tmp file.

    A dirty slot is taken once it is due (:meth:`due`: in a region, once its checkpoint
    has been captured, so the snapshot covers at least what the checkpoint does and a
    restart still starts from it) or once its oldest unwritten change is ``max_age_s``
    old, whichever comes first (``max_age_s`` 0: every dirty slot, every tick). Writing
    a small slot costs the node about as much as replaying a couple of hundred events
    at a restart, so a slot is not rewritten on every tick just because it changed.
    """

    __slots__ = (
        "_dirty",
        "_due",
        "_in_flight",
        "_last_taken",
        "_last_written",
        "max_age_s",
        "min_interval_s",
    )

    def __init__(self, *, min_interval_s: float = 0.0, max_age_s: float = 0.0) -> None:
        """``min_interval_s``: a slot is taken at most once in this long (coalesces a
        busy slot's changes when ticks are frequent); ``max_age_s``: see the class."""
        if min_interval_s < 0:
            raise InvariantError("min_interval_s must be >= 0")
        if max_age_s < 0:
            raise InvariantError("max_age_s must be >= 0")
        self.min_interval_s = min_interval_s
        self.max_age_s = max_age_s
        # slot -> time of its oldest change that no taken snapshot holds
        self._dirty: dict[int, float] = {}
        # dirty slots due now, whatever their age
        self._due: set[int] = set()
        # slot -> time of the oldest change its in-flight write saves (None: discarded)
        self._in_flight: dict[int, float | None] = {}
        self._last_taken: dict[int, float] = {}
        self._last_written: dict[int, float] = {}

    def mark(self, slot: int, now: float) -> None:
        """``slot``'s pending state changed at ``now``."""
        if slot not in self._dirty:
            self._dirty[slot] = now

    def due(self, slot: int) -> None:
        """Take ``slot`` on the next tick if it has unwritten changes (its checkpoint was
        captured, or it was rebuilt whole); one without any stays as it is."""
        if slot in self._dirty:
            self._due.add(slot)

    def take(self, now: float, budget: int, *, every: bool = False) -> list[WriteSnapshot]:
        """The slots to write now, oldest change first: those due (see the class), or
        with ``every`` all dirty ones (a graceful stop); within ``min_interval_s`` either
        way.

        At most ``budget`` writes are ever in flight, counting those not yet reported, so
        one tick never starts more than ``budget`` and a slow disk slows the ticks down
        rather than piling writes up.
        """
        if budget < 0:
            raise InvariantError("budget must be >= 0")
        room = budget - len(self._in_flight)
        if room <= 0 or not self._dirty:
            return []
        wait = self.min_interval_s
        last = self._last_taken
        due = self._due
        old = now - self.max_age_s
        eligible = [
            (since, slot)
            for slot, since in self._dirty.items()
            if slot not in self._in_flight
            and (slot not in last or now - last[slot] >= wait)
            and (every or since <= old or slot in due)
        ]
        out = []
        for since, slot in heapq.nsmallest(room, eligible):
            del self._dirty[slot]
            due.discard(slot)
            self._in_flight[slot] = since
            last[slot] = now
            out.append(WriteSnapshot(slot, since))
        return out

    def written(self, slot: int, at: float) -> None:
        """The write taken for ``slot`` is on disk (file and directory synced) at ``at``."""
        if self._in_flight.pop(slot, None) is not None:
            self._last_written[slot] = at

    def failed(self, slot: int) -> None:
        """The write taken for ``slot`` failed: the slot stays dirty from its oldest change
        and is taken again on the next tick."""
        since = self._in_flight.pop(slot, None)
        if since is None:
            return
        current = self._dirty.get(slot)
        self._dirty[slot] = since if current is None else min(since, current)
        self._due.add(slot)  # it was due: again on the next tick

    def discard(self, slot: int) -> None:
        """The node no longer holds ``slot``: forget it. A write still in flight is
        reported as usual but changes nothing; delete the file once
        :meth:`in_flight` is false for the slot, or the write may bring it back."""
        self._dirty.pop(slot, None)
        self._due.discard(slot)
        self._last_taken.pop(slot, None)
        self._last_written.pop(slot, None)
        if slot in self._in_flight:
            self._in_flight[slot] = None

    def in_flight(self, slot: int) -> bool:
        """Whether a write of ``slot`` was taken and not reported yet."""
        return slot in self._in_flight

    def is_dirty(self, slot: int) -> bool:
        """Whether ``slot`` has changes not yet on disk (dirty or being written)."""
        return slot in self._dirty or self._in_flight.get(slot) is not None

    def last_written(self, slot: int) -> float | None:
        """When ``slot``'s last snapshot reached the disk, if one did since it was held."""
        return self._last_written.get(slot)

    @property
    def count(self) -> int:
        """Slots with changes not yet on disk (for the data-at-risk gauge)."""
        extra = sum(
            1 for s, since in self._in_flight.items() if since is not None and s not in self._dirty
        )
        return len(self._dirty) + extra

    @property
    def writing(self) -> int:
        """Writes taken and not reported yet."""
        return len(self._in_flight)

    def age_s(self, now: float) -> float:
        """Seconds since the oldest change not yet on disk; 0 when all is saved
        (``relay_snapshot_age_seconds``)."""
        times = [t for t in self._in_flight.values() if t is not None]
        times.extend(self._dirty.values())
        return max(0.0, now - min(times)) if times else 0.0
