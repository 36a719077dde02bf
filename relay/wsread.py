"""Client frames read in one pass, for the common case only.

A client sends most of its frames whole: final, masked, text or binary, with a payload
short enough for a 7- or 16-bit length. Autobahn reads each of those through a frame
header object, a masker object built per frame (CFFI), five callbacks and two copies of
the rest of its buffer. :func:`read_frame` reads one such frame where it starts and
returns ``None`` for anything else — a control frame, a fragment, a reserved bit, an
unmasked frame, a 64-bit length, a payload over the limit, or a frame not yet whole — so
that the caller leaves that frame (and the protocol errors it may hold) to Autobahn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.websocket import xormasker

_masker: Callable[[bytes, int], Any] = xormasker.create_xor_masker  # type: ignore[attr-defined]

TEXT = 0x81  # FIN + text
BINARY = 0x82  # FIN + binary
# Up to here an XOR of two Python ints is cheaper than Autobahn's masker (measured:
# 1.3 against 3.1 µs at 500 bytes, even at 1,400); past it the masker's C loop wins.
INT_XOR_MAX = 1400


def unmask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XOR the 4-byte ``mask`` repeated (RFC 6455 §5.3)."""
    n = len(payload)
    if not n:
        return b""
    if n > INT_XOR_MAX:
        return bytes(_masker(mask, n).process(payload))
    key = (mask * ((n >> 2) + 1))[:n]
    x = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return x.to_bytes(n, "little")


def read_frame(data: bytes, pos: int, limit: int) -> tuple[int, bool, bytes] | None:
    """The whole simple frame at ``data[pos:]``: (its end, is binary, unmasked payload).

    ``None`` when the bytes there are not one (see the module docstring); ``limit`` is
    the largest payload taken here (0: no limit), so an oversized frame gets Autobahn's
    1009 close.
    """
    n = len(data)
    if n - pos < 6:
        return None
    b0 = data[pos]
    if b0 != TEXT and b0 != BINARY:
        return None
    b1 = data[pos + 1]
    if b1 < 0x80:  # not masked
        return None
    size = b1 & 0x7F
    if size < 126:
        head = pos + 2
    elif size == 126:
        if n - pos < 8:
            return None
        size = (data[pos + 2] << 8) | data[pos + 3]
        if size < 126:  # not the minimal encoding: Autobahn's violation
            return None
        head = pos + 4
    else:
        return None
    if limit and size > limit:
        return None
    end = head + 4 + size
    if end > n:
        return None
    return end, b0 == BINARY, unmask(data[head + 4 : end], data[head : head + 4])
