"""A test client on the independent ``websockets`` library (not Autobahn)."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection


class Client:
    """Objects in, objects out; replies that come as arrays are flattened in order."""

    def __init__(self, conn: ClientConnection, fmt: str) -> None:
        self.conn = conn
        self.fmt = fmt
        self.inbox: deque[dict[str, Any]] = deque()

    @classmethod
    async def connect(
        cls, url: str, fmt: str = "json", *, subprotocol: bool = True, **kw: Any
    ) -> Client:
        protos = [f"relay.v1.{fmt}"] if subprotocol else None
        conn = await websockets.connect(url, subprotocols=protos, max_size=None, **kw)
        return cls(conn, fmt)

    async def send(self, obj: Any) -> None:
        if self.fmt == "json":
            await self.conn.send(json.dumps(obj))
        else:
            await self.conn.send(msgspec.msgpack.encode(obj))

    async def send_raw(self, data: str | bytes) -> None:
        await self.conn.send(data)

    async def recv(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The next object from the node."""
        while not self.inbox:
            frame = await asyncio.wait_for(self.conn.recv(), timeout_s)
            data = json.loads(frame) if self.fmt == "json" else msgspec.msgpack.decode(frame)
            self.inbox.extend(data if isinstance(data, list) else [data])
        return self.inbox.popleft()

    async def expect(self, op: str, timeout_s: float = 5.0) -> dict[str, Any]:
        obj = await self.recv(timeout_s)
        assert obj.get("op") == op, f"expected {op}, got {obj}"
        return obj

    async def request(self, obj: Any, op: str) -> dict[str, Any]:
        await self.send(obj)
        return await self.expect(op)

    async def closed(self, timeout_s: float = 5.0) -> tuple[int | None, str]:
        """Wait for the node to close; return (code, reason)."""
        try:
            while True:
                await asyncio.wait_for(self.conn.recv(), timeout_s)
        except websockets.ConnectionClosed as e:
            rcvd = e.rcvd
            return (rcvd.code if rcvd else None, rcvd.reason if rcvd else "")

    async def close(self) -> None:
        await self.conn.close()
