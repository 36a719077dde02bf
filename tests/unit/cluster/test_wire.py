"""Mesh framing: any chunking, bounded frames, garbage refused."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.wire import FrameReader, Kind, WireError, encode

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
