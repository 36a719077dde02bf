"""A link closes all its connections to the destination, whatever one close does."""

from __future__ import annotations

import asyncio

from cluster.link import _close_all
from tests.conftest import aio


class _Conn:
    def __init__(self, name: str, closes: list[str], fail: bool = False) -> None:
        self.name, self.closes, self.fail = name, closes, fail

    async def disconnect(self, nowait: bool = False) -> None:
        if self.fail:  # redis-py raises when a close outlasts its connect timeout
            raise TimeoutError("Timed out closing connection")
        await asyncio.sleep(0)
        self.closes.append(self.name)


@aio
async def test_one_close_that_fails_leaves_no_other_connection_open() -> None:
    closes: list[str] = []
    conns = [_Conn("a", closes, fail=True), _Conn("b", closes), _Conn("c", closes)]
    await _close_all(conns)  # raises nothing: the copy's own error stays the one seen
    assert sorted(closes) == ["b", "c"]
