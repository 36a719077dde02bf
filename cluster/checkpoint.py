"""The checkpoint of a slot: its pending messages and the log positions they cover.

A checkpoint is the slot's state as of its own log at ``covers_id`` (kept by the slot
log beside the data) *and* each mirrored origin's log at the ids recorded here, so that a
node rebuilding the slot resumes every stream exactly after what the state already holds
(re-reading a mirror from its start could bring back a message acked here since).
"""

from __future__ import annotations

import msgspec

from relay.codec import CodecError, Event, decode_batch, encode_batch

MAGIC = b"RC\x01"


def encode_checkpoint(events: list[Event], mirrors: dict[str, dict[int, str]]) -> bytes:
    """``events``: the pending messages; ``mirrors``: origin → slot → applied entry id."""
    doc = {o: {str(s): i for s, i in by_slot.items()} for o, by_slot in mirrors.items()}
    return MAGIC + msgspec.msgpack.encode([doc, encode_batch(events)])


def decode_checkpoint(data: bytes) -> tuple[list[Event], dict[str, dict[int, str]]]:
    """Inverse of :func:`encode_checkpoint`; a plain batch (no positions) is accepted too.
    Raises CodecError when the bytes are neither."""
    if not data.startswith(MAGIC):
        return decode_batch(data), {}
    try:
        doc, batch = msgspec.msgpack.decode(
            data[len(MAGIC) :], type=tuple[dict[str, dict[str, str]], bytes]
        )
    except msgspec.DecodeError as e:
        raise CodecError(f"bad checkpoint: {e}") from None
    mirrors = {o: {int(s): i for s, i in by_slot.items()} for o, by_slot in doc.items()}
    return decode_batch(batch), mirrors
