"""cluster/checkpoint.py: tombstones, the writer's clock, and what a resync proves gone."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.checkpoint import (
    MAGIC,
    MAGIC_V3,
    decode_checkpoint,
    encode_checkpoint,
    superseded,
    tombstone_events,
)
from relay.codec import DEFAULT_MAX_EVENTS, AckEvent, CodecError, MessageEvent, encode_batch


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


@pytest.mark.parametrize(
    "data",
    [
        b"RC\x02",
        b"RC\x02\x93\x80",
        b"RC\x01junk",
        b"\x00" * 9,
        b"RC\x03",
        b"RC\x03\x93\x80\x91\xc4\x01x\x00",  # a batch that is not one
        b"RC\x03\x93\x80\xc4\x00\x00",  # batches not a list
    ],
)
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


def test_sealed_batches_are_read_first_then_the_rest() -> None:
    sealed = [
        encode_batch(tombstone_events([("inbox:a", f"old{i}", i)], "sg", limit=1)) for i in range(3)
    ]
    fresh = tombstone_events([("inbox:b", "new", 9)], "sg", limit=1)
    data = encode_checkpoint([*fresh, msg("m1")], {"fra": {7: "12-0"}}, hlc=99, batches=sealed)
    assert data.startswith(MAGIC_V3)
    cp = decode_checkpoint(data)
    assert cp.is_checkpoint and cp.hlc == 99 and cp.mirrors == {"fra": {7: "12-0"}}
    assert cp.events == [
        AckEvent("inbox:a", ("old0",), 0, "sg"),
        AckEvent("inbox:a", ("old1",), 1, "sg"),
        AckEvent("inbox:a", ("old2",), 2, "sg"),
        AckEvent("inbox:b", ("new",), 9, "sg"),
        msg("m1"),
    ]
    # Without sealed batches it is the version-2 checkpoint, as before.
    assert not encode_checkpoint([msg("m1")], {}, hlc=1).startswith(MAGIC_V3)


def test_a_checkpoint_of_more_events_than_one_batch_may_hold_is_refused() -> None:
    half = DEFAULT_MAX_EVENTS // 2 + 1
    big = encode_batch([msg(f"m{i}", ch=f"inbox:{i}") for i in range(half)])
    data = MAGIC_V3 + msgspec.msgpack.encode([{}, [big, big], 0])
    with pytest.raises(CodecError, match="over"):
        decode_checkpoint(data)


@given(st.binary(max_size=200))
def test_any_bytes_after_the_version_3_prefix_decode_or_are_a_codec_error(tail: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode_checkpoint(MAGIC_V3 + tail)


@given(st.lists(st.integers(0, 40), max_size=6), st.integers(0, 3000))
def test_a_version_3_checkpoint_cut_anywhere_is_a_codec_error(sizes: list[int], cut: int) -> None:
    batches = [
        encode_batch(tombstone_events([("inbox:a", f"i{j}", j) for j in range(n)], "sg", limit=n))
        for n in sizes
    ]
    data = encode_checkpoint([msg("m")], {"fra": {1: "1-0"}}, hlc=5, batches=batches)
    if cut >= len(data):
        return
    with pytest.raises(CodecError):
        decode_checkpoint(data[:cut])


def test_a_link_sends_version_2_whatever_this_node_writes() -> None:
    from cluster.checkpoint import MAGIC_V2, as_version_2, without_clock

    sealed = [encode_batch(tombstone_events([("inbox:a", "old", 3)], "sg", limit=1))]
    v3 = encode_checkpoint([msg("m1")], {"fra": {7: "12-0"}}, hlc=99, batches=sealed)
    for data, hlc in ((as_version_2(v3), 99), (without_clock(v3), 0)):
        assert data.startswith(MAGIC_V2)
        cp = decode_checkpoint(data)
        assert cp.hlc == hlc and cp.mirrors == {"fra": {7: "12-0"}}
        assert cp.events == decode_checkpoint(v3).events
    # Older formats and plain batches go as they are.
    v2 = encode_checkpoint([msg("m1")], {}, hlc=5)
    assert as_version_2(v2) == v2
    plain = encode_batch([msg("m")])
    assert as_version_2(plain) == plain and without_clock(plain) == plain
    assert decode_checkpoint(without_clock(v2)).hlc == 0


def test_version_3_sent_as_version_2_leaves_out_tombstones_past_the_cutoff() -> None:
    from cluster.checkpoint import as_version_2, without_clock

    old = AckEvent("inbox:a", ("old",), 100, "sg")
    new = AckEvent("inbox:a", ("new",), 300, "sg")
    v3 = encode_checkpoint([msg("m1")], {}, hlc=400, batches=[encode_batch([old, new])])
    for convert in (as_version_2, without_clock):
        assert decode_checkpoint(convert(v3, cutoff_hlc=200)).events == [new, msg("m1")]
        assert decode_checkpoint(convert(v3)).events == [old, new, msg("m1")]
    # A version-2 checkpoint is not touched (its tombstones were the window's when written).
    v2 = encode_checkpoint([old, msg("m1")], {}, hlc=400)
    assert as_version_2(v2, cutoff_hlc=200) == v2
