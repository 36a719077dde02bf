"""What only the in-memory fake has: an injected clock for its entry ids.

The behaviour it shares with the Redis adapter is tested against both in
tests/integration/test_slotlog.py.
"""

from __future__ import annotations

import pytest

from cluster.slotlog import START_ID, Entry, MemorySlotLog
from tests.conftest import aio


@aio
async def test_ids_follow_the_clock_and_never_go_back() -> None:
    now = [1_700_000_000_000]
    log = MemorySlotLog("sg", clock_ms=lambda: now[0])
    await log.set_owner(1, "sg/n1", 1)
    ids = [await log.append(1, "sg/n1", 1, b"a"), await log.append(1, "sg/n1", 1, b"b")]
    now[0] -= 5_000  # the wall clock steps back, as Redis's may
    ids.append(await log.append(1, "sg/n1", 1, b"c"))
    now[0] += 60_000
    ids.append(await log.append(1, "sg/n1", 1, b"d"))
    assert ids == [
        "1700000000000-0",
        "1700000000000-1",
        "1700000000000-2",
        "1700000055000-0",
    ]
    # Ids are per stream, as in Redis.
    await log.set_owner(2, "sg/n1", 1)
    assert await log.append(2, "sg/n1", 1, b"x") == "1700000055000-0"
    assert await log.read(1, ids[2]) == [Entry(ids[3], b"d", ids[2])]
    # Each entry names the one before it, also when the clock stepped back.
    assert [e.prev for e in await log.read(1)] == [START_ID, *ids[:3]]
    assert [e.prev for e in await log.read(2)] == [START_ID]


@aio
async def test_closed_log_refuses_use() -> None:
    log = MemorySlotLog("sg")
    await log.close()
    with pytest.raises(RuntimeError):
        await log.read(1, START_ID)
