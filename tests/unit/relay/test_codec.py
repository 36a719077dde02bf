"""relay.codec: round trips, every check on decode, and fuzzing for stray exceptions."""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import lz4.frame
import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.codec import (
    DEFAULT_MAX_EVENTS,
    MAGIC,
    PREFIX,
    VERSION,
    AckEvent,
    CodecError,
    Event,
    MessageEvent,
    decode_batch,
    encode_batch,
)
from relay.errors import InvariantError, RelayError

MSG = MessageEvent(
    id="m-1",
    ch="inbox:alice",
    sender="bob",
    hlc=(1_700_000_000_000 << 16) | 3,
    origin="sg",
    body=b"hello \x00\xff",
    expires_ms=1_700_604_800_000,
)
ACK = AckEvent(ch="inbox:alice", ids=("m-0", "m-1"), hlc=(1_700_000_000_500 << 16), origin="fra")
SAMPLE: list[Event] = [
    MSG,
    ACK,
    MessageEvent("é" * 64, "ç" * 100, "ü" * 10, 2**64 - 1, "iad", b"", 2**63 - 1),
    AckEvent("x", ("a",), 0, "o"),
]


def frame(payload: bytes, **kw: Any) -> bytes:
    """A batch around an arbitrary msgpack payload, compressed as encode_batch does."""
    compressed: bytes = lz4.frame.compress(payload, store_size=True, content_checksum=True, **kw)
    return PREFIX + compressed


def wire(rows: Any) -> bytes:
    return frame(msgspec.msgpack.encode(rows))


def msg_row(**over: Any) -> list[Any]:
    row = {
        "kind": 0,
        "id": "m",
        "ch": "c",
        "sender": "s",
        "hlc": 1,
        "origin": "o",
        "body": b"b",
        "expires_ms": 2,
    }
    row.update(over)
    return list(row.values())


def ack_row(**over: Any) -> list[Any]:
    row = {"kind": 1, "ch": "c", "ids": ["a"], "hlc": 1, "origin": "o"}
    row.update(over)
    return list(row.values())


# ---------------------------------------------------------------- round trips


def test_round_trip() -> None:
    data = encode_batch(SAMPLE)
    assert data.startswith(MAGIC + bytes([VERSION]))
    assert decode_batch(data) == SAMPLE


def test_empty_batch_round_trips() -> None:
    assert decode_batch(encode_batch([])) == []


def test_codec_error_is_a_relay_error() -> None:
    assert issubclass(CodecError, RelayError)


def test_encode_accepts_buffer_bodies() -> None:
    e = MessageEvent("i", "c", "s", 1, "o", bytearray(b"xy"), 1)  # type: ignore[arg-type]
    [got] = decode_batch(encode_batch([e]))
    assert isinstance(got, MessageEvent) and got.body == b"xy"


_id = st.text(min_size=1, max_size=64)
# Up to 50 characters is at most 200 bytes of UTF-8; the ASCII branch reaches the limit.
_channel = st.text(min_size=1, max_size=50) | st.text(
    alphabet=st.characters(max_codepoint=127), min_size=1, max_size=200
)
_name = st.text(min_size=1, max_size=20)
_hlc = st.integers(0, 2**64 - 1)

_message = st.builds(
    MessageEvent,
    id=_id,
    ch=_channel,
    sender=_name,
    hlc=_hlc,
    origin=_name,
    body=st.binary(max_size=300),
    expires_ms=st.integers(0, 2**63 - 1),
)
_ack = st.builds(
    AckEvent,
    ch=_channel,
    ids=st.lists(_id, min_size=1, max_size=20).map(tuple),
    hlc=_hlc,
    origin=_name,
)
_events = st.lists(_message | _ack, max_size=30)


@given(_events)
def test_round_trip_any_events(events: list[Event]) -> None:
    assert decode_batch(encode_batch(events)) == events


# ---------------------------------------------------------------- encode refuses


@pytest.mark.parametrize(
    "event",
    [
        MessageEvent("", "c", "s", 1, "o", b"", 1),
        MessageEvent("i" * 65, "c", "s", 1, "o", b"", 1),
        MessageEvent("i", "", "s", 1, "o", b"", 1),
        MessageEvent("i", "c" * 201, "s", 1, "o", b"", 1),
        MessageEvent("i", "é" * 101, "s", 1, "o", b"", 1),  # 101 chars, 202 bytes
        MessageEvent("i", "c", "", 1, "o", b"", 1),
        MessageEvent("i", "c", "s", -1, "o", b"", 1),
        MessageEvent("i", "c", "s", 2**64, "o", b"", 1),
        MessageEvent("i", "c", "s", 1, "", b"", 1),
        MessageEvent("i", "c", "s", 1, "o" * 256, b"", 1),
        MessageEvent("i", "c", "s", 1, "o", b"", -1),
        MessageEvent("i", "c", "s", 1, "o", b"", 2**63),
        MessageEvent("i", "c", "s", 1, "o", "str body", 1),  # type: ignore[arg-type]
        MessageEvent("i", "c", "s", True, "o", b"", 1),
        MessageEvent("i", "\ud800", "s", 1, "o", b"", 1),  # lone surrogate
        AckEvent("c", (), 1, "o"),
        AckEvent("c", tuple(str(i) for i in range(1001)), 1, "o"),
        AckEvent("c", ("",), 1, "o"),
        AckEvent("c", ("a",), 1.5, "o"),  # type: ignore[arg-type]
    ],
)
def test_encode_refuses_what_decode_would_refuse(event: Event) -> None:
    with pytest.raises(InvariantError):
        encode_batch([event])


def test_encode_refuses_non_events() -> None:
    with pytest.raises(InvariantError, match="not an event"):
        encode_batch([MSG, ("m", "c")])  # type: ignore[list-item]


def test_encode_refuses_too_many_events() -> None:
    with pytest.raises(InvariantError, match="split it"):
        encode_batch([ACK] * (DEFAULT_MAX_EVENTS + 1))


def test_encode_accepts_the_largest_allowed_fields() -> None:
    events: list[Event] = [
        MessageEvent("i" * 64, "c" * 200, "s" * 0xFFFF, 2**64 - 1, "o" * 255, b"", 2**63 - 1),
        AckEvent("é" * 100, tuple(str(i) for i in range(1000)), 0, "o"),
    ]
    assert decode_batch(encode_batch(events)) == events


# ---------------------------------------------------------------- prefix and version


def test_unknown_version_is_named() -> None:
    data = MAGIC + bytes([2]) + encode_batch([MSG])[len(PREFIX) :]
    with pytest.raises(CodecError, match=r"unsupported batch version 2\b.*version 1"):
        decode_batch(data)


@pytest.mark.parametrize("data", [b"", b"R", b"RB"])
def test_shorter_than_prefix(data: bytes) -> None:
    with pytest.raises(CodecError, match="truncated"):
        decode_batch(data)


def test_foreign_prefix() -> None:
    with pytest.raises(CodecError, match="not a relay batch"):
        decode_batch(b"XX\x01" + encode_batch([MSG])[3:])


# ---------------------------------------------------------------- wire-level checks


@pytest.mark.parametrize(
    "rows",
    [
        {"not": "a list"},
        "string",
        7,
        None,
        [None],
        [[]],
        [[2, "x"]],  # unknown kind
        [["0", "m", "c", "s", 1, "o", b"b", 2]],  # kind as str
        [msg_row()[:-1]],  # missing field
        [[*msg_row(), "extra"]],
        [msg_row(id="")],
        [msg_row(id="x" * 65)],
        [msg_row(id=5)],
        [msg_row(ch="")],
        [msg_row(ch="c" * 201)],
        [msg_row(ch="€" * 67)],  # 67 chars, 201 bytes
        [msg_row(ch=b"bytes")],
        [msg_row(sender="")],
        [msg_row(sender=None)],
        [msg_row(hlc=-1)],
        [msg_row(hlc="1")],
        [msg_row(hlc=1.0)],
        [msg_row(hlc=True)],
        [msg_row(origin="")],
        [msg_row(origin="o" * 256)],
        [msg_row(body="text")],
        [msg_row(body=None)],
        [msg_row(expires_ms=-1)],
        [msg_row(expires_ms=2**63)],
        [ack_row(ids=[])],
        [ack_row(ids=["a"] * 1001)],
        [ack_row(ids=["a", 1])],
        [ack_row(ids="a")],
        [ack_row(ch="")],
        [ack_row(hlc=None)],
        [ack_row()[:-1]],
        [msg_row(), {"kind": 0}],
    ],
)
def test_decode_refuses_bad_fields(rows: Any) -> None:
    with pytest.raises(CodecError):
        decode_batch(wire(rows))


def test_decode_accepts_hand_built_rows() -> None:
    got = decode_batch(wire([msg_row(), ack_row(ids=["a", "b"])]))
    assert got == [
        MessageEvent("m", "c", "s", 1, "o", b"b", 2),
        AckEvent("c", ("a", "b"), 1, "o"),
    ]


def test_decode_refuses_invalid_utf8() -> None:
    # msgpack fixstr of 2 bytes that are not UTF-8, where the id goes.
    good = msgspec.msgpack.encode([msg_row(id="QQ")])
    bad = good.replace(b"\xa2QQ", b"\xa2\xff\xfe")
    assert bad != good
    with pytest.raises(CodecError):
        decode_batch(frame(bad))


def test_decode_refuses_trailing_msgpack() -> None:
    with pytest.raises(CodecError):
        decode_batch(frame(msgspec.msgpack.encode([msg_row()]) + b"\xc0"))


def test_max_events() -> None:
    data = encode_batch([ACK] * 10)
    assert len(decode_batch(data, max_events=10)) == 10
    with pytest.raises(CodecError, match="length"):
        decode_batch(data, max_events=9)


def test_array_header_claiming_billions_of_events_is_refused_cheaply() -> None:
    # array32 header announcing 2**32 - 1 elements, followed by almost nothing.
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            decode_batch(frame(b"\xdd\xff\xff\xff\xff" + b"\xc0" * 16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# ---------------------------------------------------------------- lz4 frame checks


def test_frame_without_content_size_is_refused() -> None:
    payload = msgspec.msgpack.encode([msg_row()])
    data = PREFIX + lz4.frame.compress(payload, store_size=False)
    with pytest.raises(CodecError, match="content size"):
        decode_batch(data)


def test_max_decompressed_bound_is_inclusive() -> None:
    data = encode_batch([MSG])
    size = lz4.frame.get_frame_info(data[len(PREFIX) :])["content_size"]
    assert decode_batch(data, max_decompressed=size) == [MSG]
    with pytest.raises(CodecError, match="over the limit"):
        decode_batch(data, max_decompressed=size - 1)


def _peak_bytes(data: bytes) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        try:
            decode_batch(data)
        except CodecError as exc:
            return exc, tracemalloc.get_traced_memory()[1]
        return None, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


BOMB_BYTES = 256 * 1024 * 1024  # 256 MiB of zeros compresses to about 1 MiB


@pytest.fixture(scope="module")
def bomb_frame() -> bytes:
    frame_: bytes = lz4.frame.compress(bytes(BOMB_BYTES), store_size=True)
    assert len(frame_) < BOMB_BYTES // 100
    return frame_


def test_decompression_bomb_is_refused_before_decompressing(bomb_frame: bytes) -> None:
    exc, peak = _peak_bytes(PREFIX + bomb_frame)
    assert isinstance(exc, CodecError)
    assert "over the limit" in str(exc)
    assert peak < 8 << 20


def _xxh32(data: bytes, seed: int = 0) -> int:
    """XXH32 for inputs shorter than 16 bytes (an lz4 frame descriptor), for the header
    checksum of a hand-edited frame."""
    p1, p2, p3, p4, p5 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1
    m = 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & m

    assert len(data) < 16
    h = (seed + p5 + len(data)) & m
    i = 0
    while i + 4 <= len(data):
        h = (rotl((h + struct.unpack_from("<I", data, i)[0] * p3) & m, 17) * p4) & m
        i += 4
    for b in data[i:]:
        h = (rotl((h + b * p5) & m, 11) * p1) & m
    h ^= h >> 15
    h = (h * p2) & m
    h ^= h >> 13
    h = (h * p3) & m
    h ^= h >> 16
    return h


def _with_declared_size(frame_: bytes, size: int) -> bytes:
    """Rewrite an lz4 frame's declared content size, keeping its header checksum valid."""
    flg = frame_[4]
    assert flg & 0x08, "frame must carry a content size"
    assert not flg & 0x01, "no dictionary id expected"
    descriptor = frame_[4:6] + struct.pack("<Q", size)
    hc = (_xxh32(descriptor) >> 8) & 0xFF
    return frame_[:4] + descriptor + bytes([hc]) + frame_[15:]


def test_xxh32_helper_matches_lz4() -> None:
    real = lz4.frame.compress(b"abc" * 100, store_size=True)
    assert _with_declared_size(real, 300) == real


def test_frame_lying_about_its_size_is_cut_off(bomb_frame: bytes) -> None:
    liar = _with_declared_size(bomb_frame, 1000)
    assert lz4.frame.get_frame_info(liar)["content_size"] == 1000
    exc, peak = _peak_bytes(PREFIX + liar)
    assert isinstance(exc, CodecError)
    assert peak < 8 << 20


def test_frame_shorter_than_declared_is_refused() -> None:
    good = encode_batch([MSG])[len(PREFIX) :]
    size = lz4.frame.get_frame_info(good)["content_size"]
    with pytest.raises(CodecError):
        decode_batch(PREFIX + _with_declared_size(good, size + 1))


def test_trailing_bytes_after_frame_are_refused() -> None:
    data = encode_batch([MSG])
    with pytest.raises(CodecError, match="trailing"):
        decode_batch(data + b"\x00")
    with pytest.raises(CodecError, match="trailing"):
        decode_batch(data + data[len(PREFIX) :])


# ---------------------------------------------------------------- fuzzing


def _decodes_or_refuses(data: bytes) -> list[Event] | None:
    """Decode, allowing only CodecError: any other exception fails the test."""
    try:
        return decode_batch(data)
    except CodecError:
        return None


@given(st.binary(max_size=2000))
@example(b"RB\x01")
@example(b"RB\x01\x04\x22\x4d\x18")
def test_random_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)


@given(st.binary(max_size=2000))
def test_random_bytes_after_a_valid_prefix(tail: bytes) -> None:
    _decodes_or_refuses(PREFIX + tail)


@given(st.binary(max_size=2000))
def test_random_bytes_after_a_valid_lz4_header(tail: bytes) -> None:
    head = encode_batch(SAMPLE)[: len(PREFIX) + 15]
    _decodes_or_refuses(head + tail)


def test_every_truncation_is_refused() -> None:
    data = encode_batch(SAMPLE)
    for n in range(len(data)):
        assert _decodes_or_refuses(data[:n]) is None, n


def test_every_single_byte_corruption_is_refused_or_harmless() -> None:
    # The content checksum makes any change to the payload a refusal; a change that still
    # decodes (none is expected) must at least give back the original events.
    data = encode_batch(SAMPLE)
    for i in range(len(data)):
        for mask in (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF):
            corrupt = bytearray(data)
            corrupt[i] ^= mask
            got = _decodes_or_refuses(bytes(corrupt))
            assert got is None or got == SAMPLE, (i, mask)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(_events, st.data())
def test_corrupting_any_batch(events: list[Event], data: st.DataObject) -> None:
    good = encode_batch(events)
    i = data.draw(st.integers(0, len(good) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != good[i]))
    corrupt = good[:i] + bytes([value]) + good[i + 1 :]
    got = _decodes_or_refuses(corrupt)
    assert got is None or got == events


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=80)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=10) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=40,
)
_near_rows = st.lists(
    st.builds(
        lambda row, i, v: [*row[:i], v, *row[i + 1 :]],
        st.sampled_from([msg_row(), ack_row()]),
        st.integers(0, 7),
        _msgpack_values,
    ),
    max_size=5,
)


@given(_msgpack_values | _near_rows)
def test_well_framed_garbage_is_refused_or_valid(rows: Any) -> None:
    # Past the frame checks: any msgpack document at all, and rows one field off.
    got = _decodes_or_refuses(wire(rows))
    if got is not None:
        assert decode_batch(encode_batch(got)) == got
