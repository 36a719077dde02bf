"""Group commit (cluster/commit.py): when the next slot-log append goes out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cluster.commit import GroupCommit
from relay.batch import Batcher
from relay.codec import MessageEvent
from tests.conftest import aio, until


def _event(i: int) -> MessageEvent:
    return MessageEvent(f"m{i}", "ch", "anon", i, "r", b"x", 10**12)


class _Log:
    """A batcher and a slot log whose appends return when the test says so."""

    def __init__(self, fail: bool = False) -> None:
        self.batcher = Batcher(window_ms=60_000)  # the window must not be what sends
        self.appends: list[int] = []  # events per append, in order
        self.release: asyncio.Event = asyncio.Event()
        self.release.set()
        self.fail = fail
        self.failures = 0
        self.sleeps: list[float] = []

    async def flush(self) -> None:
        entries = self.batcher.flush(0, force=True)
        if not entries:
            return
        self.appends.append(sum(len(e.events) for e in entries))
        await self.release.wait()
        for e in entries:
            if self.fail:
                self.failures += 1
                self.batcher.append_failed(e.batch_id)
            else:
                self.batcher.appended(e.batch_id)

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        await asyncio.sleep(0)

    def loop(self) -> GroupCommit:
        gc = GroupCommit(
            flush=self.flush,
            pending=lambda: self.batcher.has_open,
            failures=lambda: self.failures,
            window_s=60.0,
            sleep=self.sleep,
        )
        self.batcher.on_gather = gc.wake
        return gc


async def _run(body: Callable[[_Log, GroupCommit], Awaitable[None]], fail: bool = False) -> _Log:
    log = _Log(fail)
    gc = log.loop()
    task = asyncio.ensure_future(gc.run())
    try:
        await body(log, gc)
    finally:
        gc.stop()
        log.release.set()
        await asyncio.wait_for(task, 5)
    return log


@aio
async def test_an_idle_append_goes_at_once_not_after_the_window() -> None:
    async def body(log: _Log, gc: GroupCommit) -> None:
        log.batcher.add(1, _event(1), 0, waiter="w1")
        await until(lambda: log.appends == [1], what="the append")
        await until(lambda: log.batcher.in_flight == 0, what="its return")

    log = await _run(body)
    assert log.appends == [1] and not log.sleeps


@aio
async def test_what_gathers_during_an_append_goes_in_the_next_one() -> None:
    async def body(log: _Log, gc: GroupCommit) -> None:
        log.release.clear()
        log.batcher.add(1, _event(0), 0)
        await until(lambda: log.appends == [1], what="the first append")
        for i in range(1, 6):
            log.batcher.add(i % 3, _event(i), 0)
        assert log.appends == [1]  # the first has not returned: nothing else goes
        log.release.set()
        await until(lambda: log.appends == [1, 5], what="one append carrying the five")
        await until(lambda: not log.batcher.has_open and not log.batcher.in_flight, what="idle")

    log = await _run(body)
    assert log.appends == [1, 5]


@aio
async def test_a_waiter_alone_wakes_the_loop() -> None:
    async def body(log: _Log, gc: GroupCommit) -> None:
        log.batcher.add_waiter(4, "dup", 0)
        await until(lambda: log.batcher.in_flight == 0 and not log.batcher.has_open, what="sent")

    await _run(body)


@aio
async def test_after_a_failed_append_the_retry_waits_the_window() -> None:
    async def body(log: _Log, gc: GroupCommit) -> None:
        log.batcher.add(1, _event(1), 0)
        await until(lambda: log.sleeps == [60.0], what="the back-off")

    log = await _run(body, fail=True)
    assert log.appends == [1]


@aio
async def test_back_to_back_appends_start_at_least_gather_s_apart() -> None:
    now = [0.0]

    async def body(log: _Log, gc: GroupCommit) -> None:
        gc._clock = lambda: now[0]
        gc.gather_s = 0.001
        log.release.clear()
        log.batcher.add(1, _event(0), 0)
        await until(lambda: log.appends == [1], what="the first append")
        log.batcher.add(2, _event(1), 0)
        now[0] += 0.0004  # the round trip took 0.4 ms
        log.release.set()
        await until(lambda: log.appends == [1, 1], what="the second append")
        assert log.sleeps == [pytest.approx(0.0006)]  # the rest of the gather time
        log.release.clear()
        log.batcher.add(2, _event(2), 0)
        await until(lambda: log.appends == [1, 1, 1], what="the third append")
        log.batcher.add(3, _event(3), 0)
        now[0] += 0.005  # a round trip longer than gather_s: the next goes at once
        log.release.set()
        await until(lambda: log.appends == [1, 1, 1, 1], what="the fourth append")

    log = await _run(body)
    assert log.sleeps == [pytest.approx(0.0006)]


@aio
async def test_an_idle_loop_wakes_for_each_of_many_spells_and_looks_again_after_the_window() -> (
    None
):
    async def body(log: _Log, gc: GroupCommit) -> None:
        # Idle spells one after another: each wake-up is taken, none is lost.
        for i in range(20):
            await until(lambda: gc._waiter is not None, what="the idle wait")
            log.batcher.add(i % 4, _event(i), 0)
            await until(lambda n=i + 1: len(log.appends) == n, what=f"append {i}")
        # With nothing to wake it, the loop still looks again once the window is over.
        # (A wake with nothing pending ends the current wait, whose timer is 60 s.)
        gc.window_s = 0.01
        gc.wake()
        seen: list[object] = []
        for _ in range(3):
            await until(
                lambda: gc._waiter is not None and gc._waiter not in seen, what="a new wait"
            )
            seen.append(gc._waiter)

    log = await _run(body)
    assert log.appends == [1] * 20 and not log.sleeps


@aio
async def test_stop_ends_an_idle_loop_at_once() -> None:
    log = _Log()
    gc = log.loop()  # window_s 60: only stop() can end the wait within the test
    task = asyncio.ensure_future(gc.run())
    await until(lambda: gc._waiter is not None, what="the idle wait")
    gc.stop()
    await asyncio.wait_for(task, 1)
    assert gc._waiter is None


@aio
async def test_an_idle_wait_makes_no_task() -> None:
    loop = asyncio.get_running_loop()
    made: list[object] = []
    factory = loop.get_task_factory()

    def counting(lp: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
        made.append(coro)
        if factory is not None:
            return factory(lp, coro, **kw)
        return asyncio.Task(coro, loop=lp, **kw)

    async def body(log: _Log, gc: GroupCommit) -> None:
        def idle() -> bool:  # (the old loop had no _waiter: its idle wait was a task)
            return getattr(gc, "_waiter", None) is not None or bool(made)

        await until(idle, what="the first idle wait")
        loop.set_task_factory(counting)
        try:
            for i in range(5):
                log.batcher.add(1, _event(i), 0)
                await until(lambda n=i + 1: len(log.appends) == n, what="the append")
                await until(idle, what="idle again")
        finally:
            loop.set_task_factory(factory)
        # wait_for(event.wait(), …) made a task for every idle spell
        assert made == []

    await _run(body)


@aio
async def test_stop_during_an_append_ends_the_loop_without_an_idle_wait() -> None:
    log = _Log()
    gc = log.loop()  # window_s 60
    task = asyncio.ensure_future(gc.run())
    log.release.clear()
    log.batcher.add(1, _event(1), 0)
    await until(lambda: log.appends == [1], what="the append under way")
    gc.stop()
    log.release.set()
    await asyncio.wait_for(task, 1)
