"""Mesh wire format: length-prefixed msgpack frames between the nodes of a region.

A frame is a 4-byte big-endian length, then that many bytes of msgpack holding one
message: a list whose first element is the message kind (a small int, see :class:`Kind`).
:class:`FrameReader` is a sans-I/O parser: feed it bytes in any chunks, take whole
messages out; a frame over ``max_frame`` or that is not a msgpack list is a
:class:`WireError` and the connection must be closed (a peer that breaks framing cannot
be resynchronised).
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import msgspec

from cluster.errors import ClusterError

_LEN = struct.Struct(">I")
DEFAULT_MAX_FRAME = 8 * 1024 * 1024

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class WireError(ClusterError):
    """A peer sent bytes that are not mesh frames; close the connection."""


class Kind(enum.IntEnum):
    HELLO = 1  # [HELLO, node_id, epoch, nonce]
    PING = 2  # [PING, seq]
    PONG = 3  # [PONG, seq]
    REQUEST = 4  # [REQUEST, req_id, op, args]
    REPLY = 5  # [REPLY, req_id, ok, result]
    DELIVER = 6  # [DELIVER, ch, [msg fields...]]
    INTEREST = 7  # [INTEREST, ch, on]
    AUTH = 8  # [AUTH, proof] (cluster/meshauth.py)
    BATCH = 9  # [BATCH, [message, message, ...]]: many messages in one frame, in order


def encode(message: list[Any]) -> bytes:
    """One frame holding ``message``."""
    body = _encoder.encode(message)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Bytes in, messages out."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[list[Any]]:
        """Add received bytes; return every message now complete, in order."""
        self._buf += data
        out: list[list[Any]] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > self.max_frame:
                raise WireError(f"frame of {n} bytes is over the limit of {self.max_frame}")
            if len(buf) - pos - 4 < n:
                break
            body = bytes(buf[pos + 4 : pos + 4 + n])
            pos += 4 + n
            try:
                msg = _decoder.decode(body)
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError) as e:
                raise WireError(f"frame is not msgpack: {e}") from None
            if not isinstance(msg, list) or not msg or not isinstance(msg[0], int):
                raise WireError("a mesh message is a list starting with its kind")
            out.append(msg)
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
