"""relay/turn.py: a callback once the current reactor turn is over."""

from __future__ import annotations

import asyncio
from typing import Any

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

    r: Any = reactor
    # The attribute soon() relies on: were it renamed, soon() would fall back to
    # callLater(0) without a word, and this fails.
    assert getattr(r, "_asyncioEventloop", None) is asyncio.get_running_loop()
    order: list[str] = []
    delayed: list[object] = []
    real_call_later = r.callLater

    def counting_call_later(*a: Any, **kw: Any) -> Any:
        delayed.append(a)
        return real_call_later(*a, **kw)

    def turn() -> None:
        r.callLater = counting_call_later
        try:
            soon(r, lambda: order.append("first"))
            soon(r, lambda: order.append("second"))
        finally:
            del r.callLater  # the class's method again
        order.append("turn")

    asyncio.get_running_loop().call_soon(turn)
    await until(lambda: len(order) == 3, what="both callbacks")
    assert order == ["turn", "first", "second"]  # after the turn, in order
    assert delayed == []  # no DelayedCall: not through Twisted's timers
