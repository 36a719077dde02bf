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
async def test_on_the_real_reactor_it_is_the_loops_call_soon_not_a_delayed_call() -> None:
    from twisted.internet import reactor

    r: object = reactor
    # The attribute soon() relies on: were it renamed, soon() would fall back to
    # callLater(0) without a word, and this fails.
    assert getattr(r, "_asyncioEventloop", None) is asyncio.get_running_loop()
    order: list[str] = []
    before = len(reactor.getDelayedCalls())

    def turn() -> None:
        reactor.callLater(0, order.append, "callLater(0)")
        soon(reactor, lambda: order.append("first"))
        soon(reactor, lambda: order.append("second"))
        assert len(reactor.getDelayedCalls()) == before + 1  # soon() made none
        order.append("turn")

    asyncio.get_running_loop().call_soon(turn)
    await until(lambda: len(order) == 4, what="every callback")
    # Both run after the turn; soon()'s first, in order, ahead of the Twisted timer.
    assert order == ["turn", "first", "second", "callLater(0)"]
