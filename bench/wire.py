"""Just enough WebSocket (RFC 6455) for a cheap load generator: no library in the loop.

Client frames are built by hand (text, masked with one fixed random key per connection:
the server unmasks whatever the key is, and a per-frame key would only cost the
generator); server frames are split by their headers and handed over as payloads.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Callable

_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def handshake_request(host: str, port: int, path: str, subprotocol: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Masker:
    """Masks client payloads with one key (XOR done on big ints: C speed, no loop)."""

    __slots__ = ("_rep", "key")

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else os.urandom(4)
        self._rep = self.key * 16

    def frame(self, payload: bytes, opcode: int = OP_TEXT) -> bytes:
        """One complete masked client frame (FIN set) holding ``payload``."""
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + _LEN16.pack(n)
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + _LEN64.pack(n)
        rep = self._rep
        if len(rep) < n:
            rep = self._rep = self.key * (n // 4 + 64)
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(rep[:n], "big")).to_bytes(
            n, "big"
        )
        return head + self.key + masked


class FrameReader:
    """Splits the server's byte stream into frames; calls ``on_frame(opcode, payload)``.

    Server frames are never masked. Fragmented messages are not expected (neither server
    fragments), so every frame is treated as a whole message.
    """

    __slots__ = ("buf", "on_frame")

    def __init__(self, on_frame: Callable[[int, bytes], None]) -> None:
        self.buf = b""
        self.on_frame = on_frame

    def feed(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        end = len(buf)
        on_frame = self.on_frame
        while end - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            p = pos + 2
            if b1 == 126:
                if end - p < 2:
                    break
                b1 = _LEN16.unpack_from(buf, p)[0]
                p += 2
            elif b1 == 127:
                if end - p < 8:
                    break
                b1 = _LEN64.unpack_from(buf, p)[0]
                p += 8
            if end - p < b1:
                break
            on_frame(buf[pos] & 0x0F, buf[p : p + b1])
            pos = p + b1
        self.buf = buf[pos:] if pos < end else b""
