"""A raw-socket mesh peer for tests: speaks the frames of cluster/wire.py by hand.

It plays any node id, with or without the right secret, so tests can act as an
unauthenticated peer or an impostor against a real node's mesh port.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

import msgspec

from cluster import meshauth
from cluster.wire import Kind

_LEN = struct.Struct(">I")


class MeshPeer:
    """A blocking mesh connection to ``port`` on loopback (use it from a thread)."""

    def __init__(self, port: int, timeout_s: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.buf = b""
        self.nonce = os.urandom(meshauth.NONCE_BYTES)
        self.hello: list[Any] | None = None

    def send(self, message: list[Any]) -> bool:
        """Send; False when the node has already closed the connection."""
        body = msgspec.msgpack.encode(message)
        try:
            self.sock.sendall(_LEN.pack(len(body)) + body)
        except (ConnectionResetError, BrokenPipeError):
            return False
        return True

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> list[Any] | None:
        """The next message, or None when the node closed the connection."""
        while True:
            if len(self.buf) >= 4:
                (n,) = _LEN.unpack_from(self.buf)
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                    msg: list[Any] = msgspec.msgpack.decode(body)
                    return msg
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not data:
                return None
            self.buf += data

    def closed_within(self, timeout_s: float) -> bool:
        """Whether the node closes the connection within ``timeout_s`` (reading and
        dropping whatever it sends meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if self.recv() is None:
                    return True
            except TimeoutError:
                return False
        return False

    def handshake(self, node_id: str, epoch: int, secret: str | None) -> list[Any] | None:
        """Say HELLO as ``node_id`` (a listener's peer: we dial) and, with ``secret``,
        prove it; return the node's AUTH message (None if it closed)."""
        self.hello = self.recv()
        if self.hello is None:
            return None
        self.send([Kind.HELLO, node_id, epoch, self.nonce])
        if secret is not None:
            self.send(
                [
                    Kind.AUTH,
                    meshauth.proof(
                        meshauth.secret_key(secret),
                        role=meshauth.DIAL,
                        sender=node_id,
                        receiver=str(self.hello[1]),
                        sender_nonce=self.nonce,
                        receiver_nonce=bytes(self.hello[3]),
                    ),
                ]
            )
        return self.recv()

    def request(self, req_id: int, op: str, args: Any, timeout_s: float = 5.0) -> Any:
        """Send a request; the REPLY to it ([kind, id, ok, result]), answering pings;
        None if the node closed the connection."""
        self.send([Kind.REQUEST, req_id, op, args])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            m = self.recv()
            if m is None:
                return None
            if m[0] == Kind.PING:
                self.send([Kind.PONG, m[1]])
            elif m[0] == Kind.REPLY and m[1] == req_id:
                return m
        raise TimeoutError(f"no reply to {op} in {timeout_s}s")

    def close(self) -> None:
        self.sock.close()
