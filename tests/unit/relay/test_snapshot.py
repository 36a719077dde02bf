"""relay.snapshot: the file format (round trips; every truncation and single-byte
corruption refused; nothing but SnapshotError for any input) and dirty tracking."""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from relay.codec import AckEvent, MessageEvent, encode_batch
from relay.errors import InvariantError, RelayError
from relay.frames import MAX_ACK_IDS
from relay.snapshot import (
    BATCH_MAX_EVENTS,
    DIGEST_SIZE,
    HEADER_SIZE,
    MAGIC,
    RUN_HEADER,
    VERSION,
    VERSION_RUNS,
    DirtySlots,
    RunRef,
    Sealed,
    SealedTombstones,
    Snapshot,
    SnapshotError,
    Tombstone,
    WriteSnapshot,
    decode_snapshot,
    encode_run_file,
    encode_snapshot,
)
from tests.unit.test_boundaries import FORBIDDEN, imported

ROOT = Path(__file__).resolve().parents[3]
HLC = 1_700_000_000_000 << 16
EXPIRES = 1_700_604_800_000


def msg(i: int, ch: str = "inbox:alice", body: bytes = b"hello \x00\xff") -> MessageEvent:
    return MessageEvent(f"m-{i}", ch, "bob", HLC + i, "sg", body, EXPIRES)


MESSAGES = [msg(i) for i in range(5)] + [msg(9, "é" * 100, b"")]
TOMBSTONES: list[Tombstone] = [
    ("inbox:alice", "m-old", HLC - 5),
    ("inbox:alice", "m-older", HLC - 5),
    ("inbox:bob", "x", HLC - 9),
]
MIRRORS = {"fra": "1700000000123-4", "iad": "0-0"}


def sample(slot: int = 5) -> bytes:
    return encode_snapshot(slot, "1700000000999-17", MIRRORS, MESSAGES, TOMBSTONES, region="sg")


def resign(data: bytes | bytearray) -> bytes:
    """``data`` with its checksum recomputed: a file a buggy writer could have made."""
    body = bytes(data[:-DIGEST_SIZE])
    return body + hashlib.blake2b(body, digest_size=DIGEST_SIZE).digest()


def build(body: bytes, *, slot: int = 5, version: int = VERSION, flags: int = 0) -> bytes:
    """A file around an arbitrary body, with a valid header and checksum."""
    header = struct.pack("<4sHIHQ", MAGIC, version, slot, flags, len(body))
    return resign(header + body + bytes(DIGEST_SIZE))


def pos(s: str) -> bytes:
    return struct.pack("<H", len(s)) + s.encode()


# ---------------------------------------------------------------- round trips


def test_round_trip() -> None:
    snap = decode_snapshot(sample(), slot=5)
    assert snap.slot == 5
    assert snap.log_id == "1700000000999-17"
    assert snap.mirrors == MIRRORS
    assert snap.messages == MESSAGES
    assert sorted(snap.tombstones) == sorted(TOMBSTONES)
    # Messages first, then the tombstones, as acks from this region.
    acks = [e for e in snap.events if isinstance(e, AckEvent)]
    assert snap.events[: len(MESSAGES)] == tuple(MESSAGES)
    assert {a.origin for a in acks} == {"sg"}
    assert decode_snapshot(sample()) == snap  # the slot check is optional


def test_empty_snapshot() -> None:
    data = encode_snapshot(0, "0-0", {}, [])
    assert decode_snapshot(data, slot=0) == Snapshot(0, "0-0", {}, ())
    assert len(data) == HEADER_SIZE + 2 + 3 + 2 + 4 + DIGEST_SIZE


def test_tombstones_keep_their_own_hlc_and_respect_the_ack_limit() -> None:
    many = [("c", f"id-{i}", HLC) for i in range(MAX_ACK_IDS * 2 + 1)] + [("c", "late", HLC + 1)]
    snap = decode_snapshot(encode_snapshot(1, "0-0", {}, [], many, region="sg"))
    assert sorted(snap.tombstones) == sorted(many)
    assert max(len(e.ids) for e in snap.events if isinstance(e, AckEvent)) == MAX_ACK_IDS


def test_large_slots_are_cut_into_batches_the_codec_accepts() -> None:
    # Over the event bound of one batch, and over its byte bound.
    small = [msg(i, body=b"") for i in range(BATCH_MAX_EVENTS * 2 + 7)]
    assert decode_snapshot(encode_snapshot(2, "0-0", {}, small)).messages == small
    big = [msg(i, body=bytes([i]) * (3 << 20)) for i in range(5)]
    assert decode_snapshot(encode_snapshot(2, "0-0", {}, big)).messages == big


stream_ids = st.builds(
    lambda a, b: f"{a}-{b}", st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)
)
utf8 = st.characters(codec="utf-8")
names = st.text(utf8, min_size=1, max_size=50)  # at most 200 bytes
messages = st.builds(
    MessageEvent,
    id=st.text(utf8, min_size=1, max_size=64),
    ch=names,
    sender=names,
    hlc=st.integers(0, 2**64 - 1),
    origin=names,
    body=st.binary(max_size=300),
    expires_ms=st.integers(0, 2**63 - 1),
)
tombstones = st.tuples(names, names.filter(lambda s: len(s) <= 64), st.integers(0, 2**64 - 1))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    slot=st.integers(0, 2**32 - 1),
    log_id=stream_ids,
    mirrors=st.dictionaries(names, stream_ids, max_size=5),
    events=st.lists(messages, max_size=20),
    tombs=st.lists(tombstones, max_size=20),
)
def test_round_trip_any(
    slot: int,
    log_id: str,
    mirrors: dict[str, str],
    events: list[MessageEvent],
    tombs: list[Tombstone],
) -> None:
    snap = decode_snapshot(
        encode_snapshot(slot, log_id, mirrors, events, tombs, region="sg"), slot=slot
    )
    assert (snap.slot, snap.log_id, snap.mirrors) == (slot, log_id, mirrors)
    assert snap.messages == events
    assert sorted(snap.tombstones) == sorted(tombs)


# ---------------------------------------------------------------- refusals


def test_every_truncation_is_refused() -> None:
    data = sample()
    for n in range(len(data)):
        with pytest.raises(SnapshotError):
            decode_snapshot(data[:n], slot=5)


def test_truncation_messages() -> None:
    data = sample()
    with pytest.raises(SnapshotError, match=r"truncated snapshot: 0 bytes"):
        decode_snapshot(b"")
    with pytest.raises(
        SnapshotError,
        match=rf"truncated snapshot: {len(data) - 1} bytes, its header says {len(data)}",
    ):
        decode_snapshot(data[:-1])


def test_every_single_byte_corruption_is_refused() -> None:
    data = sample()
    for i in range(len(data)):
        for mask in (0x01, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            with pytest.raises(SnapshotError):
                decode_snapshot(bytes(bad), slot=5)


def test_corruption_of_the_content_is_reported_as_a_checksum_mismatch() -> None:
    data = bytearray(sample())
    data[HEADER_SIZE + 3] ^= 0x01
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        decode_snapshot(bytes(data))


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(SnapshotError, match="1 trailing bytes"):
        decode_snapshot(sample() + b"\x00")
    data = sample()
    with pytest.raises(SnapshotError, match=f"{len(data)} trailing bytes"):
        decode_snapshot(data + data)


def test_version_mismatch_is_refused_with_a_clear_message() -> None:
    data = bytearray(sample())
    struct.pack_into("<H", data, 4, 3)
    with pytest.raises(SnapshotError) as e:
        decode_snapshot(bytes(data), slot=5)
    assert str(e.value) == "snapshot version 3, this node reads 1 and 2"
    # Even when a future version also changed the length or layout after the version.
    with pytest.raises(SnapshotError, match=r"^snapshot version 3, this node reads 1 and 2$"):
        decode_snapshot(bytes(data[:6]))
    with pytest.raises(SnapshotError, match=r"^snapshot version 0, this node reads 1 and 2$"):
        decode_snapshot(build(b"", version=0))


def test_bad_magic_is_refused() -> None:
    data = sample()
    with pytest.raises(SnapshotError, match="not a relay snapshot: starts with b'RSNQ'"):
        decode_snapshot(b"RSNQ" + data[4:])
    with pytest.raises(SnapshotError, match="not a relay snapshot"):
        decode_snapshot(encode_batch([msg(1)]))  # a slot-log batch is not a snapshot
    with pytest.raises(SnapshotError, match="not a relay snapshot"):
        decode_snapshot(b"X")


def test_wrong_slot_is_refused() -> None:
    with pytest.raises(SnapshotError) as e:
        decode_snapshot(sample(5), slot=6)
    assert str(e.value) == "snapshot holds slot 5, expected slot 6"


def test_unknown_flags_are_refused() -> None:
    body = sample()[HEADER_SIZE:-DIGEST_SIZE]
    assert decode_snapshot(build(body)).slot == 5
    with pytest.raises(SnapshotError, match="unknown snapshot flags 0x0004"):
        decode_snapshot(build(body, flags=4))


EMPTY_STATE = struct.pack("<I", 0)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (pos("12") + struct.pack("<H", 0) + EMPTY_STATE, "log_id b'12' is not a stream id"),
        (pos("1-2") + struct.pack("<H", 1), "ends inside a field"),
        (pos("1-2") + b"\x00\x00" + EMPTY_STATE + b"x", "1 unread bytes"),
        (pos("1-2") + b"\x01\x00\x00" + pos("1-1") + EMPTY_STATE, "empty or repeated"),
        (
            pos("1-2") + b"\x02\x00" + (b"\x02sg" + pos("1-1")) * 2 + EMPTY_STATE,
            "empty or repeated",
        ),
        (pos("1-2") + b"\x01\x00\x01\xff" + pos("1-1") + EMPTY_STATE, "not UTF-8"),
        (pos("1-2") + b"\x01\x00\x02fr" + pos("x-1") + EMPTY_STATE, "mirror id of 'fr'"),
        (pos("1-2") + b"\x00\x00" + struct.pack("<II", 1, 3) + b"abc", "bad batch in snapshot"),
        (pos("1-2") + b"\x00\x00" + struct.pack("<II", 1, 99) + b"abc", "ends inside a field"),
        (pos("1-2") + b"\x00\x00" + struct.pack("<I", 2**32 - 1), "ends inside a field"),
    ],
)
def test_a_malformed_body_with_a_valid_checksum_is_refused(body: bytes, reason: str) -> None:
    with pytest.raises(SnapshotError, match=reason):
        decode_snapshot(build(body))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
@example(b"")
@example(MAGIC)
@example(MAGIC + struct.pack("<H", VERSION))
def test_random_bytes_raise_only_snapshot_error(data: bytes) -> None:
    with pytest.raises(SnapshotError):
        decode_snapshot(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 2**16 - 1))
def test_random_bodies_with_valid_checksums_raise_only_snapshot_error(
    body: bytes, flags: int
) -> None:
    # Past the checksum: the body parser and the codec see arbitrary bytes.
    with contextlib.suppress(SnapshotError):
        decode_snapshot(build(body, flags=flags))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_damage_to_a_real_snapshot_raises_only_snapshot_error(data: st.DataObject) -> None:
    raw = bytearray(sample())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    damaged = bytes(raw[:cut])
    if data.draw(st.booleans()):
        damaged = resign(damaged) if len(damaged) >= DIGEST_SIZE else damaged
    try:
        snap = decode_snapshot(damaged)
    except SnapshotError:
        return
    assert isinstance(snap, Snapshot)  # only when the damage changed nothing that matters


def test_snapshot_error_is_a_relay_error() -> None:
    assert issubclass(SnapshotError, RelayError)


# ---------------------------------------------------------------- encode refusals


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"slot": -1}, "outside"),
        ({"slot": 2**32}, "outside"),
        ({"log_id": "12"}, "log_id '12' is not a stream id"),
        ({"log_id": "1-2 "}, "not a stream id"),
        ({"mirrors": {"fra": "x"}}, "mirror id of 'fra'"),
        ({"mirrors": {"": "1-1"}}, "origin '' is not"),
        ({"mirrors": {"o" * 256: "1-1"}}, "is not 1–255 bytes"),
        ({"mirrors": {"\ud800": "1-1"}}, "not valid UTF-8"),
        ({"tombstones": [("c", "i", 1)]}, "tombstones need the region"),
        ({"events": [MessageEvent("", "c", "s", 1, "o", b"", 1)]}, "invalid batch"),
    ],
)
def test_encode_refuses_what_decode_would_refuse(kwargs: dict[str, object], reason: str) -> None:
    args: dict[str, object] = {"slot": 1, "log_id": "1-1", "mirrors": {}, "events": []}
    args.update(kwargs)
    with pytest.raises(InvariantError, match=reason):
        encode_snapshot(**args)  # type: ignore[arg-type]


def test_snapshot_format_is_pure_core() -> None:
    names = imported(ROOT / "relay/snapshot.py")
    roots = {n.split(".")[0] for n in names}
    assert not roots & (FORBIDDEN | {"os", "io", "pathlib", "shutil", "tempfile"})
    assert {n for n in names if n.startswith(("relay.", "cluster."))} <= {
        "relay.codec",
        "relay.errors",
        "relay.frames",
        "relay.store",
    }


# ---------------------------------------------------------------- dirty tracking


def test_take_respects_the_budget_and_writes_in_flight_count_against_it() -> None:
    d = DirtySlots()
    for s in range(10):
        d.mark(s, 1.0 + s)
    first = d.take(20.0, 3)
    assert [w.slot for w in first] == [0, 1, 2]
    assert d.take(20.1, 3) == []  # three still in flight
    d.written(0, 20.2)
    assert [w.slot for w in d.take(20.3, 3)] == [3]
    d.written(1, 20.4)
    d.failed(2)
    assert [w.slot for w in d.take(20.5, 3)] == [2, 4]
    assert d.writing == 3
    assert d.take(21.0, 0) == []
    with pytest.raises(InvariantError):
        d.take(21.0, -1)


def test_oldest_change_first() -> None:
    d = DirtySlots()
    d.mark(7, 5.0)
    d.mark(3, 9.0)
    d.mark(200, 1.0)
    d.mark(7, 0.5)  # an older mark does not move a slot already dirty: marks come in order
    assert d.take(10.0, 10) == [
        WriteSnapshot(200, 1.0),
        WriteSnapshot(7, 5.0),
        WriteSnapshot(3, 9.0),
    ]


def test_a_failed_write_stays_dirty_from_its_oldest_change() -> None:
    d = DirtySlots()
    d.mark(1, 2.0)
    d.mark(2, 3.0)
    assert len(d.take(4.0, 2)) == 2
    d.mark(1, 5.0)  # changed again while being written
    d.failed(1)
    d.written(2, 6.0)
    assert d.is_dirty(1) and not d.is_dirty(2)
    assert d.count == 1
    assert d.age_s(10.0) == 8.0  # from 2.0, not 5.0
    assert d.take(10.0, 5) == [WriteSnapshot(1, 2.0)]
    d.written(1, 11.0)
    assert d.count == 0 and d.age_s(12.0) == 0.0
    assert d.last_written(1) == 11.0 and d.last_written(2) == 6.0


def test_a_change_during_a_write_keeps_the_slot_dirty_after_it() -> None:
    d = DirtySlots()
    d.mark(4, 1.0)
    assert d.take(2.0, 1) == [WriteSnapshot(4, 1.0)]
    assert d.in_flight(4) and d.is_dirty(4)
    assert d.take(2.5, 5) == []  # never a second write of a slot in flight
    d.mark(4, 3.0)
    assert d.take(3.5, 5) == []
    d.written(4, 4.0)
    assert d.is_dirty(4) and d.age_s(5.0) == 2.0
    assert d.take(5.0, 5) == [WriteSnapshot(4, 3.0)]


def test_age_and_count() -> None:
    d = DirtySlots()
    assert (d.count, d.age_s(100.0)) == (0, 0.0)
    d.mark(1, 10.0)
    d.mark(2, 12.0)
    assert (d.count, d.age_s(15.0)) == (2, 5.0)
    d.take(15.0, 1)  # slot 1 in flight: still unsaved
    assert (d.count, d.age_s(16.0)) == (2, 6.0)
    d.written(1, 16.0)
    assert (d.count, d.age_s(16.0)) == (1, 4.0)
    assert d.age_s(11.0) == 0.0  # never negative


def test_min_interval_coalesces_a_busy_slot() -> None:
    d = DirtySlots(min_interval_s=2.0)
    d.mark(1, 0.0)
    d.mark(2, 0.5)
    assert [w.slot for w in d.take(1.0, 5)] == [1, 2]
    d.written(1, 1.1)
    d.written(2, 1.1)
    d.mark(1, 1.2)
    assert d.take(2.0, 5) == []
    assert d.take(3.0, 5) == [WriteSnapshot(1, 1.2)]
    with pytest.raises(InvariantError):
        DirtySlots(min_interval_s=-1)


def test_a_slot_is_taken_once_due_or_old_enough() -> None:
    d = DirtySlots(max_age_s=10.0)
    d.mark(1, 0.0)
    d.mark(2, 1.0)
    d.mark(2, 1.5)
    assert d.take(2.0, 5) == []  # changed, but neither due nor 10 s old
    assert (d.count, d.age_s(2.0)) == (2, 2.0)  # unsaved all the same
    d.due(2)  # its checkpoint was captured
    d.due(3)  # nothing unwritten: stays clean
    assert d.take(3.0, 5) == [WriteSnapshot(2, 1.0)]
    d.written(2, 3.5)
    d.mark(2, 4.0)
    assert d.take(4.0, 5) == []  # due once, not for good
    assert d.take(9.9, 5) == []
    assert d.take(10.0, 5) == [WriteSnapshot(1, 0.0)]  # 10 s old
    d.written(1, 10.5)
    assert not d.is_dirty(3)
    d.mark(4, 12.0)
    assert d.take(12.0, 5, every=True) == [WriteSnapshot(2, 4.0), WriteSnapshot(4, 12.0)]
    with pytest.raises(InvariantError):
        DirtySlots(max_age_s=-1.0)


def test_due_during_a_write_and_a_failed_write() -> None:
    d = DirtySlots(max_age_s=60.0)
    d.mark(1, 0.0)
    d.due(1)
    assert d.take(1.0, 5) == [WriteSnapshot(1, 0.0)]
    d.due(1)  # captured after the snapshot, nothing changed between: nothing to add
    d.written(1, 1.5)
    assert d.take(2.0, 5) == [] and not d.is_dirty(1)
    d.mark(1, 3.0)
    d.due(1)
    assert d.take(3.0, 5) == [WriteSnapshot(1, 3.0)]
    d.mark(1, 3.5)  # changed while written
    d.due(1)  # and checkpointed: due once the write is done
    d.failed(1)
    assert d.take(4.0, 5) == [WriteSnapshot(1, 3.0)]  # a failed write: the next tick
    d.failed(1)
    assert d.take(5.0, 5) == [WriteSnapshot(1, 3.0)]
    d.written(1, 5.5)
    d.mark(1, 6.0)
    d.due(1)
    d.discard(1)
    d.mark(1, 7.0)  # held again: not due until it is checkpointed
    assert d.take(8.0, 5) == []


def test_discard_forgets_a_slot_even_mid_write() -> None:
    d = DirtySlots()
    d.mark(1, 1.0)
    d.mark(2, 1.0)
    d.take(2.0, 1)  # slot 1
    d.discard(1)
    d.discard(2)
    assert d.count == 0 and d.age_s(5.0) == 0.0
    assert d.in_flight(1)  # the file must not be deleted before the write reports
    d.mark(1, 3.0)  # the slot came back
    assert d.take(3.0, 5) == []  # the old write still holds the budget and the slot
    d.failed(1)  # the old write's failure does not resurrect its changes
    assert d.age_s(4.0) == 1.0
    assert d.take(4.0, 5) == [WriteSnapshot(1, 3.0)]
    d.written(9, 5.0)  # reports for unknown slots change nothing
    d.failed(9)
    assert d.count == 1


class DirtyMachine(RuleBasedStateMachine):
    """Any interleaving of changes, checkpoints, ticks and outcomes: no change is ever
    forgotten, the budget holds, a slot is never written twice at once, a slot is taken
    only once it is due (checkpointed or failed since its last write, old enough, or
    every one asked for) and none due is passed over while the budget has room."""

    BUDGET = 3
    MAX_AGE_S = 2.0

    def __init__(self) -> None:
        super().__init__()
        self.d = DirtySlots(max_age_s=self.MAX_AGE_S)
        self.now = 0.0
        self.unsaved: dict[int, list[float]] = {}  # the model: change times not on disk
        self.covers: dict[int, list[float]] = {}  # what each in-flight write saves
        self.flagged: set[int] = set()  # due whatever their age

    def _due(self, slot: int) -> bool:
        left = Counter(self.unsaved.get(slot, [])) - Counter(self.covers.get(slot, []))
        return bool(left) and (slot in self.flagged or self.now - min(left) >= self.MAX_AGE_S)

    @rule(slot=st.integers(0, 7), dt=st.sampled_from([0.0, 0.1, 1.0]))
    def mark(self, slot: int, dt: float) -> None:
        self.now += dt
        self.d.mark(slot, self.now)
        self.unsaved.setdefault(slot, []).append(self.now)

    @rule(slot=st.integers(0, 7))
    def checkpointed(self, slot: int) -> None:
        self.d.due(slot)
        left = Counter(self.unsaved.get(slot, [])) - Counter(self.covers.get(slot, []))
        if left:  # changes no write holds: due
            self.flagged.add(slot)

    @rule(budget=st.integers(0, 5), every=st.booleans())
    def take(self, budget: int, every: bool) -> None:
        budget = min(budget, self.BUDGET)
        due_before = {s for s in self.unsaved if s not in self.covers and self._due(s)}
        taken = self.d.take(self.now, budget, every=every)
        slots = [w.slot for w in taken]
        assert len(set(slots)) == len(slots)
        assert not set(slots) & set(self.covers)  # never twice at once
        for w in taken:
            assert self.unsaved.get(w.slot)
            assert every or w.slot in due_before  # never before it is due
            self.covers[w.slot] = list(self.unsaved[w.slot])
            self.flagged.discard(w.slot)
            assert w.dirty_since == min(self.unsaved[w.slot])
        assert len(self.covers) <= self.BUDGET
        sinces = [w.dirty_since for w in taken]
        assert sinces == sorted(sinces)
        if len(self.covers) < budget:  # room left: nothing due was passed over
            for slot, ts in self.unsaved.items():
                if slot not in self.covers and ts:
                    assert not (every or slot in due_before), slot

    @precondition(lambda self: self.covers)
    @rule(data=st.data(), ok=st.booleans())
    def report(self, data: st.DataObject, ok: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(self.covers)))
        saved = self.covers.pop(slot)
        if ok:
            self.d.written(slot, self.now)
            left = Counter(self.unsaved[slot]) - Counter(saved)
            self.unsaved[slot] = sorted(left.elements())
        else:
            self.d.failed(slot)
            self.flagged.add(slot)  # due again on the next tick

    @invariant()
    def agrees_with_the_model(self) -> None:
        dirty = {s for s, ts in self.unsaved.items() if ts}
        assert self.d.count == len(dirty)
        assert all(self.d.is_dirty(s) for s in dirty)
        oldest = min((min(ts) for ts in self.unsaved.values() if ts), default=None)
        assert self.d.age_s(self.now) == (0.0 if oldest is None else self.now - oldest)
        assert self.d.writing == len(self.covers)


DirtyMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_dirty_machine = DirtyMachine.TestCase


def _tombs(lo: int, hi: int) -> list[Tombstone]:
    return [(f"inbox:{i % 3}", f"t-{i}", HLC + i) for i in range(lo, hi)]


def test_sealed_tombstones_are_encoded_once_and_written_oldest_first() -> None:
    sealed = SealedTombstones(seal_every=4)
    start, old = sealed.runs(7, first=0)
    assert (start, old) == (0, [])
    runs, fresh = sealed.to_seal(start, _tombs(0, 10), "sg")
    assert [(r.start, r.end) for r in runs] == [(0, 4), (4, 8)] and list(fresh) == _tombs(8, 10)
    file, refs = encode_run_file(runs, 3)
    data = encode_snapshot(7, "1-0", {}, MESSAGES, fresh, region="sg", tombstone_runs=refs)
    snap = decode_snapshot(data, slot=7, runs=_resolver({3: file}))
    assert snap.messages == MESSAGES
    assert snap.tombstones == _tombs(0, 10)  # every one, oldest first
    for r in runs:
        sealed.seal(7, r)
    sealed.seal(7, runs[0])  # a run kept already: ignored
    assert sealed.end(7) == 8
    # The oldest tombstones fall out of the window: a run goes once all of it is gone.
    start, old = sealed.runs(7, first=5)
    assert start == 8 and [b for r in old for b in r.batches] == list(runs[1].batches)
    start, old = sealed.runs(7, first=9)
    assert (start, old) == (9, []) and sealed.end(7) == 0


def test_sealed_and_fresh_tombstones_decode_as_encoding_them_all_would() -> None:
    tombs = _tombs(0, 7)
    whole = decode_snapshot(encode_snapshot(1, "1-0", {}, [], tombs, region="sg"))
    runs, fresh = SealedTombstones(seal_every=3).to_seal(0, tombs, "sg")
    assert [(r.start, r.end) for r in runs] == [(0, 3), (3, 6)] and list(fresh) == tombs[6:]
    file, refs = encode_run_file(runs, 4)
    parts = decode_snapshot(
        encode_snapshot(1, "1-0", {}, [], fresh, region="sg", tombstone_runs=refs),
        runs=_resolver({4: file}),
    )
    assert whole.tombstones == parts.tombstones == tombs
    with pytest.raises(InvariantError):
        SealedTombstones(seal_every=0)


# ---------------------------------------------------------------- tombstone runs (version 2)


def _runs(n_runs: int, per_run: int = 3) -> list[Sealed]:
    """``n_runs`` sealed runs of tombstones, ids r<run>-<i>, the newer the later."""
    sealing = SealedTombstones(seal_every=per_run)
    stones = [
        (f"inbox:c{j % 2}", f"r{j // per_run}-{j % per_run}", HLC + 1000 * (j // per_run) + j)
        for j in range(n_runs * per_run)
    ]
    runs, rest = sealing.to_seal(0, stones, "sg")
    assert not rest
    return runs


def _with_runs(runs: list[Sealed], file: int = 7) -> tuple[bytes, dict[int, bytes], list[RunRef]]:
    """A snapshot naming ``runs`` (in run file ``file``), and the run files by number."""
    data, refs = encode_run_file(runs, file)
    snap = encode_snapshot(
        5, "1700000000999-17", MIRRORS, MESSAGES, TOMBSTONES, region="sg", tombstone_runs=refs
    )
    return snap, {file: data}, refs


def _resolver(files: dict[int, bytes], asked: list[RunRef] | None = None) -> Any:
    def chunk(ref: RunRef) -> bytes | None:
        if asked is not None:
            asked.append(ref)
        data = files.get(ref.file)
        return None if data is None else data[ref.offset : ref.offset + ref.length]

    return chunk


def test_a_snapshot_names_its_runs_and_reads_them_back_between_messages_and_tombstones() -> None:
    runs = _runs(2)
    snap, files, refs = _with_runs(runs)
    assert struct.unpack_from("<H", snap, 4)[0] == VERSION_RUNS
    got = decode_snapshot(snap, slot=5, runs=_resolver(files))
    assert got.messages == MESSAGES
    assert got.runs == tuple(refs)
    ids = [t[1] for t in got.tombstones]
    assert ids == ["r0-0", "r0-1", "r0-2", "r1-0", "r1-1", "r1-2"] + [t[1] for t in TOMBSTONES]
    assert [r.newest_hlc for r in refs] == [
        max(t[2] for t in got.tombstones[i * 3 : i * 3 + 3]) for i in range(2)
    ]
    # Without runs the snapshot stays version 1, which every earlier build reads.
    assert struct.unpack_from("<H", sample(), 4)[0] == VERSION


def test_a_run_older_than_the_window_is_not_read_and_may_be_gone() -> None:
    runs = _runs(2)
    snap, files, refs = _with_runs(runs)
    asked: list[RunRef] = []
    got = decode_snapshot(
        snap, slot=5, runs=_resolver({}, asked), cutoff_hlc=refs[1].newest_hlc + 1
    )
    assert asked == []  # neither read: both wholly older than the cutoff
    assert [t[1] for t in got.tombstones] == [t[1] for t in TOMBSTONES]
    got = decode_snapshot(snap, slot=5, runs=_resolver(files, asked), cutoff_hlc=refs[1].newest_hlc)
    assert asked == [refs[1]]
    assert [t[1] for t in got.tombstones][:3] == ["r1-0", "r1-1", "r1-2"]


def test_a_needed_run_missing_short_or_damaged_refuses_the_snapshot() -> None:
    snap, files, refs = _with_runs(_runs(2))
    with pytest.raises(SnapshotError, match="cannot be read"):
        decode_snapshot(snap, slot=5, runs=_resolver({}))
    with pytest.raises(SnapshotError, match="cannot be read"):
        decode_snapshot(snap, slot=5)  # no run files given at all
    with pytest.raises(SnapshotError, match="cannot be read"):
        decode_snapshot(snap, slot=5, runs=_resolver({7: files[7][: refs[1].offset + 3]}))
    damaged = bytearray(files[7])
    damaged[refs[0].offset + 5] ^= 0x40
    with pytest.raises(SnapshotError, match="fails its checksum"):
        decode_snapshot(snap, slot=5, runs=_resolver({7: bytes(damaged)}))


def test_a_run_holding_anything_but_tombstones_is_refused() -> None:
    chunk = struct.pack("<I", len(b := encode_batch([msg(1)]))) + b
    ref = RunRef(
        3,
        len(RUN_HEADER),
        len(chunk),
        hashlib.blake2b(chunk, digest_size=DIGEST_SIZE).digest(),
        HLC,
    )
    snap = encode_snapshot(5, "1-0", {}, [], region="sg", tombstone_runs=[ref])
    with pytest.raises(SnapshotError, match="other than tombstones"):
        decode_snapshot(snap, slot=5, runs=_resolver({3: RUN_HEADER + chunk}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_damage_to_a_snapshot_and_its_runs_raises_only_snapshot_error(
    data: st.DataObject,
) -> None:
    snap, files, _ = _with_runs(_runs(2))
    target = data.draw(st.sampled_from(["snapshot", "runs"]))
    buf = bytearray(snap if target == "snapshot" else files[7])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    damaged = bytes(buf[:cut])
    if target == "snapshot":
        damaged = (
            resign(damaged) if data.draw(st.booleans()) and len(damaged) > DIGEST_SIZE else damaged
        )
        args = (damaged, files)
    else:
        args = (snap, {7: damaged})
    try:
        got = decode_snapshot(args[0], slot=5, runs=_resolver(args[1]))
    except SnapshotError:
        return
    assert isinstance(got, Snapshot)
