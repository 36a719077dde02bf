"""cluster/checkpoint.py: tombstones, the writer's clock, and what a resync proves gone."""

from __future__ import annotations

import msgspec
import pytest

from cluster.checkpoint import (
    MAGIC,
    decode_checkpoint,
    encode_checkpoint,
    superseded,
    tombstone_events,
)
from relay.codec import AckEvent, CodecError, MessageEvent, encode_batch


def msg(i: str, ch: str = "inbox:a", origin: str = "sg", hlc: int = 10) -> MessageEvent:
    return MessageEvent(i, ch, "anon", hlc, origin, b"body", 2**40)


def test_round_trip_with_positions_tombstones_and_clock() -> None:
    acks = tombstone_events([("inbox:a", "x", 5), ("inbox:b", "y", 6)], "sg", limit=100)
    data = encode_checkpoint([*acks, msg("m1")], {"fra": {7: "12-0"}}, hlc=99)
    cp = decode_checkpoint(data)
    assert cp.is_checkpoint and cp.hlc == 99 and cp.mirrors == {"fra": {7: "12-0"}}
    assert cp.events == [
        AckEvent("inbox:a", ("x",), 5, "sg"),
        AckEvent("inbox:b", ("y",), 6, "sg"),
        msg("m1"),
    ]


def test_older_checkpoints_and_plain_batches_still_decode() -> None:
    old = MAGIC + msgspec.msgpack.encode([{"fra": {"3": "1-0"}}, encode_batch([msg("m")])])
    cp = decode_checkpoint(old)
    assert cp.is_checkpoint and cp.hlc == 0 and cp.mirrors == {"fra": {3: "1-0"}}
    plain = decode_checkpoint(encode_batch([msg("m")]))
    assert not plain.is_checkpoint and plain.events == [msg("m")]


@pytest.mark.parametrize("data", [b"RC\x02", b"RC\x02\x93\x80", b"RC\x01junk", b"\x00" * 9])
def test_garbage_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_checkpoint(data)


def test_tombstones_are_chunked_and_capped_to_the_newest() -> None:
    rows = [("inbox:a", f"id{i}", i) for i in range(2500)]
    events = tombstone_events(rows, "sg", limit=2100)
    ids = [i for e in events for i in e.ids]  # type: ignore[union-attr]
    assert len(ids) == 2100 and ids[0] == "id400" and ids[-1] == "id2499"
    assert all(len(e.ids) <= 1000 for e in events)  # type: ignore[union-attr]
    assert tombstone_events(rows, "sg", limit=0) == []


def test_a_resync_proves_gone_only_the_origins_own_older_messages() -> None:
    cp = decode_checkpoint(encode_checkpoint([msg("kept", hlc=5)], {}, hlc=100))
    held = [
        ("inbox:a", "kept", "sg", 5),  # still pending there
        ("inbox:a", "acked", "sg", 50),  # sg's, older than the checkpoint, gone there
        ("inbox:a", "newer", "sg", 150),  # accepted after the checkpoint was taken
        ("inbox:a", "theirs", "iad", 50),  # another region's: proves nothing
    ]
    assert superseded(cp, "sg", held) == [("inbox:a", "acked")]
    # Without a recorded clock nothing is proven.
    assert superseded(decode_checkpoint(encode_checkpoint([], {})), "sg", held) == []
