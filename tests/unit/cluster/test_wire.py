"""Mesh framing: any chunking, bounded frames, garbage refused."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.wire import (
    DEFAULT_MAX_FRAME,
    MAX_FRAME_BEFORE_AUTH,
    FrameReader,
    Kind,
    WireError,
    encode,
    max_frame_for,
)

MESSAGES: list[list[Any]] = [
    [Kind.HELLO, "sg/n1", 7],
    [Kind.PING, 1],
    [Kind.REQUEST, 9, "pub", {"ch": "inbox:a", "id": "x", "body": b"\x00\xff"}],
    [Kind.REPLY, 9, True, {"ts": 1}],
    [Kind.DELIVER, "inbox:a", ["x", "anon", 5, "sg", b"hi"]],
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 16, 1000])
def test_every_chunk_size(chunk: int) -> None:
    data = b"".join(encode(m) for m in MESSAGES)
    r = FrameReader()
    got: list[list[Any]] = []
    for i in range(0, len(data), chunk):
        got.extend(r.feed(data[i : i + chunk]))
    assert got == [[int(m[0]), *m[1:]] for m in MESSAGES]
    assert r.buffered == 0


@given(st.lists(st.binary(max_size=50), max_size=20), st.integers(1, 64))
def test_round_trip_any_payloads(bodies: list[bytes], chunk: int) -> None:
    msgs = [[int(Kind.DELIVER), "c", b] for b in bodies]
    data = b"".join(encode(m) for m in msgs)
    r = FrameReader()
    got: list[list[Any]] = []
    for i in range(0, len(data), chunk):
        got.extend(r.feed(data[i : i + chunk]))
    assert got == msgs


def test_oversized_frame_is_refused_before_buffering_it() -> None:
    r = FrameReader(max_frame=100)
    with pytest.raises(WireError, match="over the limit"):
        r.feed((101).to_bytes(4, "big"))


@pytest.mark.parametrize("body", [b"\xc1", b"\x01", b"\x90", b"\x91\xa1x", b"\x81\x01\x02"])
def test_garbage_is_refused(body: bytes) -> None:
    with pytest.raises(WireError):
        FrameReader().feed(len(body).to_bytes(4, "big") + body)


@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    r = FrameReader(max_frame=1000)
    try:
        for m in r.feed(data):
            assert isinstance(m, list) and isinstance(m[0], int)
    except WireError:
        pass


def test_the_handshake_frames_are_small_and_the_rest_may_be_large() -> None:
    big = encode([Kind.REQUEST, 1, "echo", b"x" * (MAX_FRAME_BEFORE_AUTH + 1)])
    hello, auth = encode([Kind.HELLO, "sg/a", 1, b"n" * 16]), encode([Kind.AUTH, b"p"])
    with pytest.raises(WireError, match="over the limit of 65536"):
        FrameReader(handshake=2).feed(hello + big)  # before the AUTH: refused, unread
    # In the same read as the handshake: the large frame is the third, allowed.
    assert len(FrameReader(handshake=2).feed(hello + auth + big)) == 3


def test_the_mesh_frame_limit_holds_a_whole_channel() -> None:
    assert max_frame_for(1024, 10) == DEFAULT_MAX_FRAME  # never below the default
    # The defaults (16 MiB, 10,000 messages): room for the pending bytes, every
    # message's channel name and framing.
    assert max_frame_for(16 * 1024 * 1024, 10_000) >= 16 * 1024 * 1024 + 10_000 * 300
