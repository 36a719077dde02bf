"""The region node's background tasks in one group: its loops (flush, tick, checkpoints,
snapshots), the log and mirror readers and the one-off tasks it spawns, started here and
stopped together by :meth:`TaskGroup.stop`.

Unlike :class:`asyncio.TaskGroup` it lives as long as the node (started in
``Router.start``, stopped in ``Router.stop``) rather than one ``async with`` block, and a
failing task does not cancel the others: each loop handles its own errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

STOP_WAIT_S = 5.0


class TaskGroup:
    """Every background task of one node; see the module's docstring."""

    def __init__(self, prefix: str = "relay-region") -> None:
        self.prefix = prefix
        self.loops: dict[str, asyncio.Task[Any]] = {}
        self.background: set[asyncio.Task[Any]] = set()
        self.stopped = False

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run the loop ``coro`` under ``name`` until :meth:`stop` (or until started
        again: the loop running under ``name`` is cancelled)."""
        old = self.loops.get(name)
        if old is not None:
            old.cancel()
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.prefix}-{name}")
        if self.stopped:
            task.cancel()
        self.loops[name] = task
        return task

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(f"{self.prefix}-task")
        if self.stopped:
            task.cancel()  # nothing starts once the group is stopping
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def stop_loop(self, name: str) -> None:
        task = self.loops.pop(name, None)
        if task is not None:
            task.cancel()

    def tasks(self) -> list[asyncio.Task[Any]]:
        return [*self.loops.values(), *self.background]

    def cancel(self) -> list[asyncio.Task[Any]]:
        """Cancel every task; return them (to wait for)."""
        self.stopped = True
        tasks = self.tasks()
        for t in tasks:
            t.cancel()
        return tasks

    async def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        """Cancel every task and wait (at most ``timeout_s``) until they have ended."""
        tasks = self.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for t in pending:
            log.warning("task %s did not stop within %.1fs", t.get_name(), timeout_s)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                log.debug("task %s ended with %r", t.get_name(), t.exception())
