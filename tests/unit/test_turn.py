"""relay/turn.py: a callback once the current reactor turn is over."""

from __future__ import annotations

import asyncio

from twisted.internet.task import Clock

from relay.turn import soon
from tests.conftest import aio, until


def test_on_a_plain_reactor_it_is_a_call_later_of_zero() -> None:
    clock = Clock()
    called: list[int] = []
    soon(clock, lambda: called.append(1))
    assert called == []  # not within the caller's turn
    clock.advance(0)
    assert called == [1]


@aio
async def test_on_the_asyncio_reactor_it_runs_after_the_turn_in_order() -> None:
    loop = asyncio.get_running_loop()

    class Reactor:
        _asyncioEventloop = loop

    order: list[str] = []

    def turn() -> None:
        soon(Reactor(), lambda: order.append("first"))
        soon(Reactor(), lambda: order.append("second"))
        order.append("turn")

    loop.call_soon(turn)
    await until(lambda: len(order) == 3, what="both callbacks")
    assert order == ["turn", "first", "second"]
