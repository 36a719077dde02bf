"""The region node's one task group (cluster/region/tasks.py) and its injected sleeper:
loops start and stop in one place; a test steps a loop's waits instead of sleeping."""

from __future__ import annotations

import asyncio

from cluster.region.state import REMOTE_WAIT_S, PubWaiter
from cluster.region.tasks import TaskGroup
from cluster.slotlog import MemorySlotLog
from tests.conftest import FakeClock, aio, memory_router


async def forever(started: list[str], name: str) -> None:
    started.append(name)
    await asyncio.Event().wait()


@aio
async def test_stop_cancels_and_ends_every_loop_and_background_task() -> None:
    g = TaskGroup()
    started: list[str] = []
    a = g.start("a", forever(started, "a"))
    b = g.spawn(forever(started, "b"))
    await asyncio.sleep(0)  # let both run to their wait
    assert started == ["a", "b"] and a.get_name() == "relay-region-a"
    await g.stop()
    assert a.cancelled() and b.cancelled() and not g.background
    late = g.spawn(forever(started, "late"))  # nothing starts once stopped
    await asyncio.wait([late], timeout=5)
    assert late.cancelled() and "late" not in started


@aio
async def test_starting_a_loop_again_cancels_the_one_running_under_its_name() -> None:
    g = TaskGroup()
    started: list[str] = []
    old = g.start("tail", forever(started, "old"))
    await asyncio.sleep(0)
    new = g.start("tail", forever(started, "new"))
    await asyncio.wait([old], timeout=5)
    assert old.cancelled() and not new.done() and g.loops["tail"] is new
    g.stop_loop("tail")
    await asyncio.wait([new], timeout=5)
    assert new.cancelled() and "tail" not in g.loops


@aio
async def test_the_tick_loop_waits_through_the_injected_sleeper() -> None:
    clock = FakeClock()
    log = MemorySlotLog("sg")
    r = memory_router("sg/n1", log, clock=clock)
    slept: list[float] = []

    async def sleep(s: float) -> None:  # steps the clock, and stops after one beat
        slept.append(s)
        clock.now += s
        r.stopped = True

    r.sleep = sleep
    answers: list[str | None] = []
    # An ack=remote waiter no link confirms: due to expire within the first beat.
    w = PubWaiter(done=answers.append, level="remote", since=clock.now - REMOTE_WAIT_S + 0.1)
    r.remote_waiters[3] = [((1, 0), w)]
    await asyncio.wait_for(r._tick_loop(), timeout=10)
    assert slept == [0.5] and answers == [None] and not r.remote_waiters
    await log.close()
