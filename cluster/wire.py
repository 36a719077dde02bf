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
# Before a peer has proved the region's secret: its HELLO and AUTH are tiny.
MAX_FRAME_BEFORE_AUTH = 64 * 1024
# A pending message's fields on the mesh beyond what the store counts against the
# channel's byte cap (its record and id): the channel name, the origin, msgpack framing.
MESSAGE_OVERHEAD_BOUND = 512


def max_frame_for(channel_max_bytes: int, channel_max_messages: int) -> int:
    """The mesh frame limit a region needs: the reply to a ``sub`` carries every
    pending message of the channel in one frame, up to the channel's caps."""
    whole_channel = channel_max_bytes + channel_max_messages * MESSAGE_OVERHEAD_BOUND
    return max(DEFAULT_MAX_FRAME, whole_channel + 1024 * 1024)


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
    """Bytes in, messages out. The first ``handshake`` messages (a peer's HELLO and
    AUTH, before it has proved anything) may be at most :data:`MAX_FRAME_BEFORE_AUTH`."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, handshake: int = 0) -> None:
        self.max_frame = max_frame
        self.handshake = handshake
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[list[Any]]:
        """Add received bytes; return every message now complete, in order."""
        self._buf += data
        out: list[list[Any]] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            limit = MAX_FRAME_BEFORE_AUTH if self.handshake else self.max_frame
            if n > limit:
                raise WireError(f"frame of {n} bytes is over the limit of {limit}")
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
            if self.handshake:
                self.handshake -= 1
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
