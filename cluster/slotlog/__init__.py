"""Slot logs, owner records, checkpoints and mirrors in a region's Redis.

:class:`SlotLog` is the interface; :class:`RedisSlotLog` is the real one (``redis.asyncio``
on the reactor's asyncio loop) and :class:`MemorySlotLog` a fake with the same behaviour
for fast unit tests. One shared test suite (``tests/integration/test_slotlog.py``) runs
the same cases against both, the Redis one against a real server.

Every write to a slot log or checkpoint is *fenced*: a Lua script reads the slot's owner
record (``relay:{<region>:<slot>}:owner``, hash ``{owner, epoch}``) and writes only if it
names the writer and its epoch, else the writer gets :class:`FencedError` and must stop
acting as the slot's owner. The record and the log share a hash tag, so the script runs on
one shard of a Redis Cluster. Layout of the keys: :mod:`cluster.keys`; of the scripts:
``cluster/lua/``; the whole design, with measurements: ``docs/SLOTLOG.md``.

Entry ids are Redis stream ids, ``"<ms>-<seq>"`` strings; :data:`START_ID` (``"0-0"``)
reads from the beginning. A log entry is ``{d: batch, e: epoch, p: id of the entry
before it}``; a mirror entry is ``{d: batch, p: the origin's}`` under the *same id* as in
the origin's log.

The package: :mod:`~cluster.slotlog.api` (the interface, its records, errors and limits),
:mod:`~cluster.slotlog.checks` (the argument checks both implementations share),
:mod:`~cluster.slotlog.rediscalls` (scripts, clients, pipelines), :mod:`~cluster.slotlog.redislog`
(:class:`RedisSlotLog`) and :mod:`~cluster.slotlog.memory` (:class:`MemorySlotLog`). Callers
import every name from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.slotlog.api import (
    DEFAULT_COUNT,
    DEFAULT_MAX_BLOCK_MS,
    MAX_COUNT,
    MAX_EPOCH,
    START_ID,
    TAIL_POLL_MAX_S,
    TAIL_POLL_MIN_S,
    TAIL_TIMEOUT_MARGIN_S,
    Checkpoint,
    Entry,
    FencedError,
    NotReplicatedError,
    Owner,
    SlotLog,
    SlotLogError,
    StaleCheckpointError,
    TailEntry,
    Trimmed,
)
from cluster.slotlog.memory import MemorySlotLog
from cluster.slotlog.redislog import RedisSlotLog

__all__ = [
    "DEFAULT_COUNT",
    "DEFAULT_MAX_BLOCK_MS",
    "MAX_COUNT",
    "MAX_EPOCH",
    "START_ID",
    "TAIL_POLL_MAX_S",
    "TAIL_POLL_MIN_S",
    "TAIL_TIMEOUT_MARGIN_S",
    "Checkpoint",
    "Entry",
    "FencedError",
    "MemorySlotLog",
    "NotReplicatedError",
    "Owner",
    "RedisSlotLog",
    "SlotLog",
    "SlotLogError",
    "StaleCheckpointError",
    "TailEntry",
    "Trimmed",
]


if TYPE_CHECKING:  # mypy checks that both implementations satisfy the interface

    def _implements(redis_log: RedisSlotLog, memory_log: MemorySlotLog) -> list[SlotLog]:
        return [redis_log, memory_log]
