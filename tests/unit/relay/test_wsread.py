"""relay.wsread: whole simple client frames read in one pass; everything else left alone."""

from __future__ import annotations

import os
import struct

from autobahn.websocket.xormasker import create_xor_masker
from hypothesis import given
from hypothesis import strategies as st

from relay.wsread import INT_XOR_MAX, read_frame, unmask


def frame(payload: bytes, mask: bytes, *, b0: int = 0x81, masked: bool = True) -> bytes:
    """A client frame as RFC 6455 §5.2 lays it out (the 64-bit length included)."""
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes([b0, bit | n])
    elif n < 65536:
        head = bytes([b0, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([b0, bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    body = create_xor_masker(mask, n).process(payload) if n else b""
    return head + mask + body


@given(st.binary(max_size=3000), st.binary(min_size=4, max_size=4))
def test_unmask_matches_autobahns_masker(payload: bytes, mask: bytes) -> None:
    expected = create_xor_masker(mask, len(payload)).process(payload) if payload else b""
    assert unmask(payload, mask) == expected


def test_unmask_on_both_sides_of_the_int_xor_limit() -> None:
    mask = os.urandom(4)
    for n in (INT_XOR_MAX - 1, INT_XOR_MAX, INT_XOR_MAX + 1, 70_000):
        payload = os.urandom(n)
        assert unmask(unmask(payload, mask), mask) == payload


messages = st.lists(
    st.tuples(st.booleans(), st.binary(max_size=700), st.binary(min_size=4, max_size=4)),
    max_size=8,
)


@given(messages, st.integers(0, 2000))
def test_a_stream_of_simple_frames_reads_back_whole(
    msgs: list[tuple[bool, bytes, bytes]], cut: int
) -> None:
    data = b"".join(frame(p, m, b0=0x82 if b else 0x81) for b, p, m in msgs)
    pos = 0
    got = []
    while (r := read_frame(data, pos, 0)) is not None:
        pos, binary, payload = r
        got.append((binary, payload))
    assert got == [(b, p) for b, p, _ in msgs]
    assert pos == len(data)
    # Cut anywhere: the whole frames before the cut are read, the partial one is left.
    part = data[: min(cut, len(data))]
    pos = 0
    while (r := read_frame(part, pos, 0)) is not None:
        pos = r[0]
    ends = [0]
    for b, p, m in msgs:
        ends.append(ends[-1] + len(frame(p, m, b0=0x82 if b else 0x81)))
    assert pos == max(e for e in ends if e <= len(part))


MASK = b"\x01\x02\x03\x04"


def test_everything_but_a_simple_frame_is_left_for_autobahn() -> None:
    left = [
        frame(b"ping", MASK, b0=0x89),  # control frame
        frame(b"part", MASK, b0=0x01),  # first fragment (FIN clear)
        frame(b"rest", MASK, b0=0x80),  # continuation
        frame(b"rsv", MASK, b0=0xC1),  # RSV1 set
        frame(b"x" * 10, MASK, b0=0x83),  # reserved opcode
        frame(b"plain", MASK, masked=False),  # unmasked
        frame(b"y" * 70_000, MASK),  # 64-bit length
        bytes([0x81, 0x80 | 126, 0, 5]) + MASK + b"abcde",  # length not minimal
    ]
    for data in left:
        assert read_frame(data, 0, 0) is None, data[:4]


def test_a_payload_over_the_limit_is_left_for_autobahns_1009() -> None:
    data = frame(b"z" * 200, MASK)
    assert read_frame(data, 0, 199) is None
    assert read_frame(data, 0, 200) is not None


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise_and_never_overrun(data: bytes) -> None:
    r = read_frame(data, 0, 1 << 20)
    if r is not None:
        assert 6 <= r[0] <= len(data)
