"""The checkpoint of a slot: its pending messages, recent acks and the positions they cover.

A checkpoint is the slot's state as of its own log at ``covers_id`` (kept by the slot
log beside the data) *and* each mirrored origin's log at the ids recorded here, so that a
node rebuilding the slot resumes every stream exactly after what the state already holds
(re-reading a mirror from its start could bring back a message acked here since).

Besides the pending messages it carries the slot's recent acks as ack events (the
*tombstones*): a reader that rebuilds from it, or a region that receives it in place of
log entries it missed, removes what was acked meanwhile and never brings it back. It also
records ``hlc``, the writer's clock when it was taken: every message the writer's region
accepted at or before that time and that is not pending in the checkpoint was acked,
expired or evicted there (:func:`superseded`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from relay.codec import (
    DEFAULT_MAX_EVENTS,
    AckEvent,
    CodecError,
    Event,
    MessageEvent,
    decode_batch,
    encode_batch,
)
from relay.frames import MAX_ACK_IDS

MAGIC = b"RC\x01"
MAGIC_V2 = b"RC\x02"
# Version 3: the events as several codec batches (ack tombstones sealed once and reused
# by every later checkpoint of the slot, then the rest), read as one list of events.
MAGIC_V3 = b"RC\x03"


@dataclass(frozen=True, slots=True)
class Checkpointed:
    """A decoded checkpoint: ``events`` (pending messages, then ack tombstones),
    ``mirrors`` (origin → slot → applied entry id) and ``hlc`` (0 when not recorded)."""

    events: list[Event]
    mirrors: dict[str, dict[int, str]]
    hlc: int = 0
    is_checkpoint: bool = True


def encode_checkpoint(
    events: list[Event],
    mirrors: dict[str, dict[int, str]],
    *,
    hlc: int = 0,
    batches: Sequence[bytes] = (),
) -> bytes:
    """``events``: the pending messages and ack tombstones; ``mirrors``: origin → slot →
    applied entry id; ``hlc``: the writer's clock as the state was captured.
    ``batches``: events already encoded (:func:`relay.codec.encode_batch`: sealed ack
    tombstones), read before ``events``; with them the checkpoint is version 3, and the
    caller keeps all of its events within :data:`relay.codec.DEFAULT_MAX_EVENTS`, which a
    reader refuses to exceed."""
    doc = {o: {str(s): i for s, i in by_slot.items()} for o, by_slot in mirrors.items()}
    if batches:
        return MAGIC_V3 + msgspec.msgpack.encode([doc, [*batches, encode_batch(events)], hlc])
    return MAGIC_V2 + msgspec.msgpack.encode([doc, encode_batch(events), hlc])


def decode_checkpoint(data: bytes) -> Checkpointed:
    """Inverse of :func:`encode_checkpoint`; older checkpoints (no ``hlc``) and a plain
    batch (a slot-log entry: ``is_checkpoint`` false) are accepted too. Raises
    CodecError when the bytes are none of these."""
    if data.startswith(MAGIC_V3):
        try:
            doc, batches, hlc = msgspec.msgpack.decode(
                data[len(MAGIC_V3) :], type=tuple[dict[str, dict[str, str]], list[bytes], int]
            )
        except msgspec.DecodeError as e:
            raise CodecError(f"bad checkpoint: {e}") from None
        events: list[Event] = []
        for b in batches:
            events += decode_batch(b)
            if len(events) > DEFAULT_MAX_EVENTS:  # all together within what one may hold
                raise CodecError(f"bad checkpoint: over {DEFAULT_MAX_EVENTS} events")
        return Checkpointed(events, _mirrors(doc), hlc)
    if data.startswith(MAGIC_V2):
        try:
            doc, batch, hlc = msgspec.msgpack.decode(
                data[len(MAGIC_V2) :], type=tuple[dict[str, dict[str, str]], bytes, int]
            )
        except msgspec.DecodeError as e:
            raise CodecError(f"bad checkpoint: {e}") from None
    elif data.startswith(MAGIC):
        try:
            doc, batch = msgspec.msgpack.decode(
                data[len(MAGIC) :], type=tuple[dict[str, dict[str, str]], bytes]
            )
        except msgspec.DecodeError as e:
            raise CodecError(f"bad checkpoint: {e}") from None
        hlc = 0
    else:
        return Checkpointed(decode_batch(data), {}, 0, is_checkpoint=False)
    return Checkpointed(decode_batch(batch), _mirrors(doc), hlc)


def _mirrors(doc: dict[str, dict[str, str]]) -> dict[str, dict[int, str]]:
    try:
        return {o: {int(s): i for s, i in by_slot.items()} for o, by_slot in doc.items()}
    except ValueError as e:
        raise CodecError(f"bad checkpoint positions: {e}") from None


def without_clock(data: bytes, *, cutoff_hlc: int = 0) -> bytes:
    """The checkpoint ``data`` with its clock left out: merged by a reader as a plain
    state, proving nothing gone (:func:`superseded` returns nothing for it). Version 1
    and 2 checkpoints stay in their version; version 3 becomes 2 (:func:`as_version_2`)."""
    return as_version_2(data, clock=False, cutoff_hlc=cutoff_hlc)


def as_version_2(data: bytes, *, clock: bool = True, cutoff_hlc: int = 0) -> bytes:
    """A version-3 checkpoint as version 2, which every build reads: what a link sends
    another region (it may run an earlier build than ours); other bytes as they are.
    ``clock=False`` leaves the writer's clock out (of a version-2 checkpoint too).
    ``cutoff_hlc``: tombstones older than this (the dedupe window's start) are left out
    of a version-3 checkpoint — its sealed runs may carry some, which a reader of an
    earlier build would apply (one could name a message published again since with the
    same id). Raises InvariantError when the events do not fit one batch (a slot of
    tens of MB pending)."""
    v3 = data.startswith(MAGIC_V3)
    if clock and not v3:
        return data  # nothing to change: not decoded
    try:
        cp = decode_checkpoint(data)
    except CodecError:
        return data  # not ours to judge: the reader refuses it as it would anyway
    if not v3:
        if not cp.is_checkpoint or not cp.hlc:
            return data
        return encode_checkpoint(cp.events, cp.mirrors)
    events = [e for e in cp.events if not (isinstance(e, AckEvent) and e.hlc < cutoff_hlc)]
    return encode_checkpoint(events, cp.mirrors, hlc=cp.hlc if clock else 0)


def tombstone_events(
    tombstones: Iterable[tuple[str, str, int]], origin: str, *, limit: int
) -> list[Event]:
    """Recent acks ``(ch, id, hlc)``, oldest first, as ack events of at most
    MAX_ACK_IDS ids each; the newest ``limit`` ids at most."""
    rows = list(tombstones)[-limit:] if limit > 0 else []
    by_ch: dict[str, list[tuple[str, int]]] = {}
    for ch, msg_id, hlc in rows:
        by_ch.setdefault(ch, []).append((msg_id, hlc))
    out: list[Event] = []
    for ch, acked in by_ch.items():
        for i in range(0, len(acked), MAX_ACK_IDS):
            chunk = acked[i : i + MAX_ACK_IDS]
            out.append(AckEvent(ch, tuple(m for m, _ in chunk), max(h for _, h in chunk), origin))
    return out


def superseded(
    checkpoint: Checkpointed, origin: str, held: Iterable[tuple[str, str, str, int]]
) -> list[tuple[str, str]]:
    """Of the messages a region ``held`` for the slot, ``(ch, id, origin, hlc)``, those
    that ``origin``'s checkpoint proves gone: accepted by ``origin`` at or before the
    checkpoint's clock and no longer pending there (acked, expired or evicted). Returns
    ``(ch, id)`` pairs. Empty when the checkpoint records no clock."""
    if not checkpoint.hlc:
        return []
    pending = {(e.ch, e.id) for e in checkpoint.events if isinstance(e, MessageEvent)}
    return [
        (ch, msg_id)
        for ch, msg_id, o, hlc in held
        if o == origin and hlc <= checkpoint.hlc and (ch, msg_id) not in pending
    ]
