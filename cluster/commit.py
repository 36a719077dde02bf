"""Group commit for the slot logs: the loop that decides when the next append goes out.

An append goes out as soon as the previous one has returned, carrying everything that
gathered meanwhile (as databases commit their log): at saturation the batches still fill
(they gather for one Redis round trip), and when idle an ``ack=log`` publish costs one
round trip instead of waiting for a window to end. One append from this loop is under way
at a time (per node, i.e. per connection to the slot logs), so a slot's entries reach its
log in the order they were cut. The batch window keeps two roles: the cadence of retries
after a failed append (Redis down or slow to answer: no tight loop), and the longest an
idle loop sleeps before it looks again at entries queued for retry by others.

One more bound, ``gather_s``: an append goes out no sooner than that after the previous
one *started*. Without it a node with a core to itself appends back to back, one round
trip each, a few events each: the rounds themselves (a script call, its reply) then fill
the core and every ack queues behind them. With it, at most ``1 / gather_s`` rounds a
second; an append after an idle spell still goes at once, and a busy loop whose round
trips take longer than ``gather_s`` never waits.

The edge part is this loop; what to append and how is the caller's (``flush``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# The least time between the starts of two appends (see the module's docstring): 1 ms
# adds at most 1 ms to an ack:"log" when busy, and caps the rounds at 1,000 a second.
GATHER_S = 0.001


class GroupCommit:
    """Run with :meth:`run` as a task; call :meth:`wake` whenever something is gathered
    for the log (cheap: an event set), :meth:`stop` to end it."""

    def __init__(
        self,
        *,
        flush: Callable[[], Awaitable[None]],
        pending: Callable[[], bool],
        failures: Callable[[], int],
        window_s: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        gather_s: float = GATHER_S,
    ) -> None:
        self._flush = flush
        self._pending = pending
        self._failures = failures
        self.window_s = window_s
        self._sleep = sleep
        self._clock = clock
        self.gather_s = gather_s
        # The idle wait: a bare future and a timer, not ``wait_for(event.wait())``, which
        # makes a task per wait (one per idle spell: hundreds a second at low rates).
        self._waiter: asyncio.Future[None] | None = None
        self.stopped = False
        self.rounds = 0  # appends attempted by this loop (a status figure)

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def stop(self) -> None:
        self.stopped = True
        self.wake()

    async def run(self) -> None:
        while not self.stopped:
            started = self._clock()
            failed_before = self._failures()
            try:
                await self._flush()
            except Exception:
                log.exception("flush failed")
                failed_before = -1
            self.rounds += 1
            if self._failures() != failed_before:
                # Redis refused or timed out: what failed is queued again; retry on the
                # window's cadence, with whatever else gathers meanwhile.
                await self._sleep(self.window_s)  # retry cadence after a failed append
                continue
            if self._pending():
                # Gathered during that append: go again, once gather_s has passed.
                wait = self.gather_s - (self._clock() - started)
                if wait > 0:
                    await self._sleep(wait)  # let the next round carry more
                continue
            if not self.stopped:
                await self._idle()

    async def _idle(self) -> None:
        """Wait for :meth:`wake`, at most ``window_s``. Nothing runs between the caller's
        last look at ``pending`` and the wait, so no wake-up is lost."""
        loop = asyncio.get_running_loop()
        w = self._waiter = loop.create_future()
        timer = loop.call_later(self.window_s, _settle, w)
        try:
            await w
        finally:
            timer.cancel()
            self._waiter = None


def _settle(w: asyncio.Future[None]) -> None:
    if not w.done():
        w.set_result(None)
