"""The slot-log adapter: one suite run against MemorySlotLog and against RedisSlotLog on a
real Redis server (started once for this module, FLUSHALL before each test).

Run the throughput figure of docs/SLOTLOG.md with::

    .venv/bin/pytest tests/integration/test_slotlog.py -k throughput -s
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import redis
import redis.asyncio
from redis.crc import key_slot
from twisted.internet.defer import Deferred

from cluster import keys, redisconn
from cluster.slotlog import (
    START_ID,
    Checkpoint,
    Entry,
    FencedError,
    MemorySlotLog,
    Owner,
    RedisSlotLog,
    SlotLog,
    StaleCheckpointError,
    TailEntry,
    Trimmed,
)
from relay.redis_server import (
    RedisClusterServers,
    RedisServer,
    RedisServerError,
    find_server_binary,
    free_cluster_port,
    free_port,
)
from tests.certs import write_cert_files
from tests.conftest import aio, until

A = "sg/n1"
B = "sg/n2"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@dataclass
class Backend:
    """One implementation under test, and what the tests need to look inside it."""

    name: str
    open: Callable[[str], SlotLog]  # a SlotLog of a region; every one is closed at the end
    blocked_readers: Callable[[], int]  # tail calls blocked right now
    flush_scripts: Callable[[], None]  # forget the loaded Lua scripts (SCRIPT FLUSH)
    opened: list[SlotLog] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log = self.open("sg")


def flush_scripts(admin: redis.Redis) -> None:
    admin.script_flush()


def _run(coro: Any) -> Any:
    return pytest_twisted.blockon(Deferred.fromFuture(asyncio.ensure_future(coro)))


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(primaries=3, replicas=1).start()
    yield servers
    servers.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    opened: list[SlotLog] = []
    if request.param == "memory":
        memory_logs: list[MemorySlotLog] = []

        def open_memory(region: str) -> SlotLog:
            log = MemorySlotLog(region)
            memory_logs.append(log)
            opened.append(log)
            return log

        b = Backend(
            "memory",
            open_memory,
            lambda: sum(m.blocked_readers for m in memory_logs),
            lambda: None,
            opened,
        )
    elif request.param == "cluster":
        servers: RedisClusterServers = request.getfixturevalue("redis_cluster")
        admin = redisconn.connect_sync(servers.url)
        admin.flushall()  # every primary
        cluster_logs: list[RedisSlotLog] = []

        def open_cluster(region: str) -> SlotLog:
            log = RedisSlotLog.from_url(servers.url, region)
            cluster_logs.append(log)
            opened.append(log)
            return log

        b = Backend(
            "cluster",
            open_cluster,
            lambda: sum(c.waiting_tails for c in cluster_logs),
            lambda: admin.script_flush(),  # every primary
            opened,
        )
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        admin = redis.Redis.from_url(server.url)
        admin.flushall()

        def open_redis(region: str) -> SlotLog:
            # The first through the constructor (tail client derived), the rest by URL.
            log = (
                RedisSlotLog(redis.asyncio.Redis.from_url(server.url), region)
                if not opened
                else RedisSlotLog.from_url(server.url, region)
            )
            opened.append(log)
            return log

        b = Backend(
            "redis",
            open_redis,
            lambda: int(admin.info("clients")["blocked_clients"]),
            lambda: flush_scripts(admin),
            opened,
        )
    yield b
    for log in opened:
        _run(log.close())
    if request.param != "memory":
        admin.close()


# ---- keys ----------------------------------------------------------------------------------


def test_key_names() -> None:
    assert keys.log_key("sg", 17) == "relay:{sg:17}:log"
    assert keys.owner_key("sg", 17) == "relay:{sg:17}:owner"
    assert keys.checkpoint_key("sg", 17) == "relay:{sg:17}:checkpoint"
    assert keys.mirror_key("sg", 17, "fra") == "relay:{sg:17}:mirror:fra"
    assert keys.lease_key("sg", "sg/n1") == "relay:{sg}:lease:sg/n1"
    assert keys.link_lease_key("sg", "fra") == "relay:{sg}:link:fra"
    assert keys.members_channel("sg") == "relay:{sg}:members"
    for bad in ("", "SG", "s}g", "s{g", "s:g", "-sg", "x" * 33):
        with pytest.raises(ValueError):
            keys.log_key(bad, 1)
    for bad_slot in (-1, True, 1.0):
        with pytest.raises(ValueError):
            keys.log_key("sg", bad_slot)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        keys.lease_key("sg", "n1")


def test_keys_of_a_slot_share_one_cluster_hash_slot() -> None:
    crc16_slots = set()
    for region in ("sg", "fra", "iad-2"):
        for slot in range(256):
            tag_slot = key_slot(f"{region}:{slot}".encode())
            names = [
                keys.log_key(region, slot),
                keys.owner_key(region, slot),
                keys.checkpoint_key(region, slot),
                keys.mirror_key(region, slot, "fra"),
                keys.mirror_key(region, slot, "zz-origin"),
            ]
            assert {key_slot(n.encode()) for n in names} == {tag_slot}, names
            crc16_slots.add(tag_slot)
    # ... and slots spread over the cluster's hash slots rather than piling onto a few.
    assert len(crc16_slots) > 700
    region_keys = [keys.lease_key("sg", "sg/n1"), keys.link_lease_key("sg", "fra")]
    assert {key_slot(k.encode()) for k in region_keys} == {key_slot(b"sg")}


# ---- owner records -------------------------------------------------------------------------


@aio
async def test_set_owner_only_moves_epochs_up(backend: Backend) -> None:
    log = backend.log
    assert await log.get_owner(3) is None
    assert await log.set_owner(3, A, 5)
    assert await log.get_owner(3) == Owner(A, 5)
    assert not await log.set_owner(3, B, 5)  # same epoch: refused
    assert not await log.set_owner(3, B, 4)  # lower: refused
    assert await log.get_owner(3) == Owner(A, 5)
    assert await log.set_owner(3, B, 6)
    assert await log.get_owner(3) == Owner(B, 6)
    # Compared as numbers, not strings ("10" < "9" as text).
    assert await log.set_owner(3, A, 10)
    assert not await log.set_owner(3, B, 9)
    assert await log.set_owner(3, B, 2**63 - 1)
    assert await log.get_owner(3) == Owner(B, 2**63 - 1)
    assert await log.get_owner(4) is None
    for bad in (0, -1, 2**63, True):
        with pytest.raises(ValueError):
            await log.set_owner(4, A, bad)
    with pytest.raises(ValueError):
        await log.set_owner(4, "nobody", 1)


@aio
async def test_claim_is_compare_and_set_on_the_epoch(backend: Backend) -> None:
    log = backend.log
    assert await log.claim(7, A, 0) == 1
    # B saw the same (empty) record: A got there first.
    with pytest.raises(FencedError) as lost:
        await log.claim(7, B, 0)
    assert (lost.value.slot, lost.value.epoch, lost.value.current, lost.value.owner) == (7, 0, 1, A)
    # A's retry (its reply was lost) is answered with the epoch it already holds.
    assert await log.claim(7, A, 0) == 1
    assert await log.claim(7, B, 1) == 2
    assert await log.get_owner(7) == Owner(B, 2)
    with pytest.raises(FencedError):
        await log.claim(7, A, 0)  # A is now two epochs behind
    assert await log.get_owner(7) == Owner(B, 2)


@aio
async def test_release_empties_the_owner_and_fences_it(backend: Backend) -> None:
    log = backend.log
    assert not await log.release(8, A, 1)  # no record: nothing to release
    assert await log.claim(8, A, 0) == 1
    assert not await log.release(8, B, 1)  # not B's
    assert not await log.release(8, A, 2)  # not at that epoch
    assert await log.get_owner(8) == Owner(A, 1)
    assert await log.release(8, A, 1)
    assert await log.get_owner(8) == Owner("", 1)
    assert not await log.release(8, A, 1)  # already released
    # The released owner's writes are refused; the next owner claims at the same epoch.
    with pytest.raises(FencedError):
        await log.append(8, A, 1, b"late")
    assert await log.claim(8, B, 1) == 2
    assert await log.get_owner(8) == Owner(B, 2)
    assert await log.append(8, B, 2, b"first") != ""
    with pytest.raises(ValueError):
        await log.release(8, "nobody", 1)


# ---- fenced appends ------------------------------------------------------------------------


@aio
async def test_append_is_fenced_by_the_owner_record(backend: Backend) -> None:
    log = backend.log
    with pytest.raises(FencedError) as no_owner:
        await log.append(1, A, 1, b"before any owner")
    assert no_owner.value == FencedError(1, 1, 0, "")

    epoch_a = await log.claim(1, A, 0)
    first = await log.append(1, A, epoch_a, b"a1")
    with pytest.raises(FencedError):
        await log.append(1, A, epoch_a + 1, b"a at an epoch it does not hold")
    with pytest.raises(FencedError):
        await log.append(1, B, epoch_a, b"b under a's epoch")

    # B takes the slot over (A is paused, say); A's writes are refused from now on.
    epoch_b = await log.claim(1, B, epoch_a)
    with pytest.raises(FencedError) as stale:
        await log.append(1, A, epoch_a, b"a, stale")
    assert stale.value == FencedError(1, epoch_a, epoch_b, B)
    second = await log.append(1, B, epoch_b, b"b1")

    # Each entry names the one before it (START_ID: the first), whoever wrote it.
    assert await log.read(1) == [Entry(first, b"a1", START_ID), Entry(second, b"b1", first)]
    assert await log.read(1, first) == [Entry(second, b"b1", first)]
    assert await log.read(1, second) == []
    assert await log.read(1, count=1) == [Entry(first, b"a1", START_ID)]
    assert await log.read(2) == []


@aio
async def test_entry_ids_increase_and_bytes_round_trip(backend: Backend) -> None:
    log = backend.log
    await log.set_owner(0, A, 1)
    payloads = [bytes([i]) * i for i in range(1, 50)] + [b"", b"\x00\xff" * 4096]
    ids = [await log.append(0, A, 1, p) for p in payloads]
    parsed = [tuple(int(x) for x in i.split("-")) for i in ids]
    assert parsed == sorted(parsed) and len(set(parsed)) == len(parsed)
    assert [e.data for e in await log.read(0, count=1000)] == payloads


@aio
async def test_append_many_gives_an_answer_per_item(backend: Backend) -> None:
    log = backend.log
    for slot in (10, 11, 13):
        await log.set_owner(slot, A, 3)
    await log.set_owner(12, B, 4)  # slot 12 belongs to B; slot 14 to no one
    items = [(10, b"x10"), (11, b"x11"), (12, b"x12"), (13, b"x13a"), (14, b"x14"), (13, b"x13b")]
    results = await log.append_many(items, A, {10: 3, 11: 3, 12: 4, 13: 2, 14: 1})
    assert [type(r) for r in results] == [
        str,
        str,
        FencedError,
        FencedError,
        FencedError,
        FencedError,
    ]
    assert results[2] == FencedError(12, 4, 4, B)
    assert results[3] == FencedError(13, 2, 3, A)
    assert results[4] == FencedError(14, 1, 0, "")
    assert await log.read(10) == [Entry(str(results[0]), b"x10", START_ID)]
    assert await log.read(12) == await log.read(13) == await log.read(14) == []

    # Items of one slot keep their order.
    again = await log.append_many([(13, b"1"), (13, b"2"), (10, b"3")], A, {13: 3, 10: 3})
    assert all(isinstance(r, str) for r in again)
    assert [e.data for e in await log.read(13)] == [b"1", b"2"]
    assert await log.append_many([], A, {}) == []
    with pytest.raises(ValueError):
        await log.append_many([(15, b"x")], A, {})


@aio
async def test_append_many_is_one_round_trip_and_survives_script_flush(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.name == "memory":
        pytest.skip("round trips are a property of the Redis transport")
    # One server: one round trip. A cluster: one per shard (the 64 slots cover all 3).
    trips = 3 if backend.name == "cluster" else 1
    from redis.asyncio.connection import AbstractConnection

    log = backend.log
    slots = list(range(64))
    for slot in slots:
        await log.set_owner(slot, A, 1)
    items = [(s, b"warm") for s in slots]
    await log.append_many(items, A, dict.fromkeys(slots, 1))  # connects, loads the script

    writes: list[int] = []
    original = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        writes.append(1)
        await original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    # One server: the appends go over the lean connection (cluster/slotlog/leanpipe.py).
    from cluster.slotlog import leanpipe

    lean_send = leanpipe._Replies.send

    def counting_lean(self: Any, data: bytes, loop: Any) -> Any:
        writes.append(1)
        return lean_send(self, data, loop)

    monkeypatch.setattr(leanpipe._Replies, "send", counting_lean)
    results = await log.append_many(items, A, dict.fromkeys(slots, 1))
    assert all(isinstance(r, str) for r in results)
    assert len(writes) == trips

    # A restarted (or failed-over) Redis has forgotten the scripts: NOSCRIPT, load, redo.
    backend.flush_scripts()
    writes.clear()
    results = await log.append_many(items, A, dict.fromkeys(slots, 1))
    assert all(isinstance(r, str) for r in results)
    assert len(writes) == 3 * trips
    assert [len(await log.read(s)) for s in slots] == [3] * len(slots)

    backend.flush_scripts()
    assert await log.set_owner(1000, B, 1)  # single calls recover the same way


# ---- tailing -------------------------------------------------------------------------------


@aio
async def test_tail_returns_new_entries(backend: Backend) -> None:
    log = backend.log
    for slot in (1, 2, 3):
        await log.set_owner(slot, A, 1)
    first = await log.append(1, A, 1, b"old")
    assert await log.tail({1: START_ID}, None) == [TailEntry(1, first, b"old", START_ID)]
    assert await log.tail({1: first, 2: START_ID}, None) == []
    assert await log.tail({1: first, 2: START_ID}, 20) == []  # waits 20 ms, then nothing

    task = asyncio.ensure_future(log.tail({1: first, 2: START_ID}, block_ms=5000))
    await until(lambda: backend.blocked_readers() == 1, what="tail to block")
    await log.append(3, A, 1, b"not watched")
    started = time.monotonic()
    new = await log.append(2, A, 1, b"new")
    got = await asyncio.wait_for(task, 2)
    woke_ms = (time.monotonic() - started) * 1000
    assert got == [TailEntry(2, new, b"new", START_ID)]
    print(f"\n[{backend.name}] blocked tail woke {woke_ms:.2f} ms after the append")

    # count is per slot; results are grouped by slot in the order asked.
    ids = {s: [await log.append(s, A, 1, f"{s}.{i}".encode()) for i in range(3)] for s in (1, 2)}
    got = await log.tail({2: new, 1: first}, None, count=2)
    assert [(e.slot, e.id, e.prev) for e in got] == [
        (2, ids[2][0], new),
        (2, ids[2][1], ids[2][0]),
        (1, ids[1][0], first),
        (1, ids[1][1], ids[1][0]),
    ]
    with pytest.raises(ValueError):
        await log.tail({}, None)
    with pytest.raises(ValueError):
        await log.tail({1: first}, 0)


@aio
async def test_blocked_tail_is_cancelled_promptly(backend: Backend) -> None:
    log = backend.log
    await log.set_owner(1, A, 1)
    task = asyncio.ensure_future(log.tail({1: START_ID}, block_ms=10_000))
    await until(lambda: backend.blocked_readers() == 1, what="tail to block")
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancel_ms = (time.monotonic() - started) * 1000
    print(f"\n[{backend.name}] blocked tail cancelled in {cancel_ms:.2f} ms")
    assert cancel_ms < 200
    # The server lets go of the reader, and the next tail works on a fresh connection.
    await until(lambda: backend.blocked_readers() == 0, what="the blocked reader to go")
    entry_id = await log.append(1, A, 1, b"after")
    assert await log.tail({1: START_ID}, 1000) == [TailEntry(1, entry_id, b"after", START_ID)]


# ---- checkpoints and trimming --------------------------------------------------------------


@aio
async def test_checkpoints_round_trip_and_are_fenced(backend: Backend) -> None:
    log = backend.log
    assert await log.read_checkpoint(5) is None
    with pytest.raises(FencedError):
        await log.write_checkpoint(5, A, 1, b"state", START_ID)
    epoch = await log.claim(5, A, 0)
    ids = [await log.append(5, A, epoch, b"e%d" % i) for i in range(3)]
    await log.write_checkpoint(5, A, epoch, b"state@1", ids[1])
    assert await log.read_checkpoint(5) == Checkpoint(b"state@1", ids[1])

    with pytest.raises(StaleCheckpointError) as stale:
        await log.write_checkpoint(5, A, epoch, b"state@0", ids[0])
    assert stale.value.newest == ids[1]
    await log.write_checkpoint(5, A, epoch, b"state@1 again", ids[1])  # same id: fine

    new_epoch = await log.claim(5, B, epoch)
    with pytest.raises(FencedError) as fenced:
        await log.write_checkpoint(5, A, epoch, b"old owner", ids[2])
    assert fenced.value == FencedError(5, epoch, new_epoch, B)
    await log.write_checkpoint(5, B, new_epoch, b"\x00" * 70_000, ids[2])
    assert await log.read_checkpoint(5) == Checkpoint(b"\x00" * 70_000, ids[2])
    with pytest.raises(ValueError):
        await log.write_checkpoint(5, B, new_epoch, b"x", "01-1")


@aio
async def test_trim_never_passes_the_checkpoint(backend: Backend) -> None:
    log = backend.log
    await log.set_owner(9, A, 1)
    ids = [await log.append(9, A, 1, b"%d" % i) for i in range(10)]
    end = "18446744073709551615-18446744073709551615"

    # No checkpoint: nothing may go.
    assert await log.trim(9, end) == Trimmed(0, START_ID, True)
    assert len(await log.read(9)) == 10

    await log.write_checkpoint(9, A, 1, b"cp", ids[6])
    # Below the checkpoint: trimmed exactly as asked.
    assert await log.trim(9, ids[2]) == Trimmed(2, ids[2], False)
    assert [e.id for e in await log.read(9)] == ids[2:]
    # Past it: held at the newest covered entry plus `margin` before it.
    assert await log.trim(9, end, margin=2) == Trimmed(2, ids[4], True)
    assert [e.id for e in await log.read(9)] == ids[4:]
    assert await log.trim(9, ids[9]) == Trimmed(2, ids[6], True)
    assert [e.id for e in await log.read(9)] == ids[6:]
    assert await log.trim(9, end) == Trimmed(0, ids[6], True)
    # Too few entries left for the margin: nothing goes.
    assert await log.trim(9, end, margin=5) == Trimmed(0, START_ID, True)
    assert [e.id for e in await log.read(9)] == ids[6:]

    # A newer checkpoint lets the trim move on.
    await log.write_checkpoint(9, A, 1, b"cp2", ids[9])
    assert await log.trim(9, end) == Trimmed(3, ids[9], True)
    assert [e.id for e in await log.read(9)] == ids[9:]
    # The log keeps its top id: new entries still go above the trimmed ones.
    later = await log.append(9, A, 1, b"later")
    assert [e.id for e in await log.read(9)] == [ids[9], later]
    with pytest.raises(ValueError):
        await log.trim(9, "x")


# ---- prev: the entry before ----------------------------------------------------------------


@aio
async def test_prev_chains_within_and_across_append_many_calls(backend: Backend) -> None:
    log = backend.log
    for slot in (20, 21):
        await log.set_owner(slot, A, 1)
    await log.set_owner(22, B, 1)
    epochs = {20: 1, 21: 1, 22: 1}
    first = await log.append_many([(20, b"a"), (21, b"b"), (20, b"c"), (22, b"no")], A, epochs)
    assert isinstance(first[3], FencedError)  # slot 22 is B's: nothing written there
    second = await log.append_many([(21, b"d"), (20, b"e"), (20, b"f")], A, epochs)
    single = await log.append(20, A, 1, b"g")
    a, b, c = (str(r) for r in first[:3])
    d, e, f = (str(r) for r in second)

    # One chain per slot, from START_ID, through every call and a plain append.
    assert await log.read(20) == [
        Entry(a, b"a", START_ID),
        Entry(c, b"c", a),
        Entry(e, b"e", c),
        Entry(f, b"f", e),
        Entry(single, b"g", f),
    ]
    assert await log.read(21) == [Entry(b, b"b", START_ID), Entry(d, b"d", b)]
    # The fenced items left no trace: B's first entry of slot 22 starts its chain.
    b22 = await log.append(22, B, 1, b"b's")
    assert await log.read(22) == [Entry(b22, b"b's", START_ID)]
    # tail gives the same prev as read.
    assert await log.tail({20: c, 21: START_ID}, None) == [
        TailEntry(20, e, b"e", c),
        TailEntry(20, f, b"f", e),
        TailEntry(20, single, b"g", f),
        TailEntry(21, b, b"b", START_ID),
        TailEntry(21, d, b"d", b),
    ]


@aio
async def test_prev_after_a_trim_is_the_newest_entry_left(backend: Backend) -> None:
    log = backend.log
    end = "18446744073709551615-18446744073709551615"
    await log.set_owner(9, A, 1)
    ids = [await log.append(9, A, 1, b"%d" % i) for i in range(5)]
    await log.write_checkpoint(9, A, 1, b"cp", ids[2])
    assert await log.trim(9, end) == Trimmed(2, ids[2], True)

    # The next entry follows the last one appended, not the trim bound.
    after = await log.append(9, A, 1, b"after")
    assert await log.read(9) == [
        Entry(ids[2], b"2", ids[1]),
        Entry(ids[3], b"3", ids[2]),
        Entry(ids[4], b"4", ids[3]),
        Entry(after, b"after", ids[4]),
    ]
    # A reader at ids[0] missed ids[1]: the first entry it gets does not follow its
    # position. A reader at ids[1] (its own entry trimmed) missed nothing.
    assert (await log.tail({9: ids[0]}, None, count=1))[0].prev == ids[1]
    assert (await log.tail({9: ids[1]}, None, count=1))[0].prev == ids[1]

    # Trimmed down to one entry: the chain still goes on from it.
    await log.write_checkpoint(9, A, 1, b"cp2", after)
    assert await log.trim(9, end) == Trimmed(3, after, True)
    last = await log.append(9, A, 1, b"last")
    assert await log.read(9) == [Entry(after, b"after", ids[4]), Entry(last, b"last", after)]
    assert await log.tail({9: ids[0]}, None) == [
        TailEntry(9, after, b"after", ids[4]),
        TailEntry(9, last, b"last", after),
    ]
    assert await log.tail({9: after}, None) == [TailEntry(9, last, b"last", after)]


@aio
async def test_prev_chain_continues_across_owners(backend: Backend) -> None:
    log = backend.log
    epoch_a = await log.claim(30, A, 0)
    a1 = await log.append(30, A, epoch_a, b"a1")
    a2 = await log.append(30, A, epoch_a, b"a2")
    epoch_b = await log.claim(30, B, epoch_a)  # B takes over
    b1, b2 = await log.append_many([(30, b"b1"), (30, b"b2")], B, {30: epoch_b})
    with pytest.raises(FencedError):
        await log.append(30, A, epoch_a, b"a, stale")  # refused: not in the chain
    assert await log.release(30, B, epoch_b)
    epoch_a = await log.claim(30, A, epoch_b)  # and back to A
    a3 = await log.append(30, A, epoch_a, b"a3")
    assert await log.read(30) == [
        Entry(a1, b"a1", START_ID),
        Entry(a2, b"a2", a1),
        Entry(str(b1), b"b1", a2),
        Entry(str(b2), b"b2", str(b1)),
        Entry(a3, b"a3", str(b2)),
    ]


# ---- mirrors -------------------------------------------------------------------------------


@aio
async def test_mirror_append_keeps_ids_and_is_idempotent(backend: Backend) -> None:
    origin = backend.log  # sg
    dest = backend.open("fra")
    await origin.set_owner(4, A, 1)
    await origin.set_owner(5, A, 1)
    for i in range(3):
        await origin.append(4, A, 1, b"four-%d" % i)
    await origin.append(5, A, 1, b"five")
    batch = await origin.tail({4: START_ID, 5: START_ID}, None)
    assert len(batch) == 4
    assert await dest.mirror_top(4, "sg") is None

    assert await dest.mirror_append_many("sg", batch[:2]) == [True, True]
    # A link that restarts resumes from the mirror's top, and a repeat is refused.
    assert await dest.mirror_top(4, "sg") == batch[1].id
    assert await dest.mirror_append_many("sg", batch) == [False, False, True, True]
    assert await dest.mirror_append(batch[0].slot, "sg", batch[0].id, batch[0].data) is False
    assert await dest.mirror_top(4, "sg") == batch[2].id
    assert await dest.mirror_top(5, "sg") == batch[3].id
    assert await dest.mirror_tops([4, 5, 6], "sg") == {4: batch[2].id, 5: batch[3].id, 6: None}
    # The origin log's oldest entry: where a reader below it has a gap.
    assert await origin.first_id(4) == batch[0].id
    assert await origin.first_id(6) is None
    # Its newest: below a node's position, the region's Redis lost the log's end.
    assert await origin.last_id(4) == batch[2].id
    assert await origin.last_id(6) is None

    # Same ids, same bytes, same prev; readable and tailable like a log.
    origin_4 = await origin.read(4)
    assert [e.prev for e in origin_4] == [START_ID, batch[0].id, batch[1].id]
    assert await dest.read(4, origin="sg") == origin_4
    assert await dest.read(4) == []  # fra's own log 4 is another stream
    assert await dest.tail({4: origin_4[0].id}, None, origin="sg") == [
        TailEntry(4, e.id, e.data, e.prev) for e in origin_4[1:]
    ]
    with pytest.raises(ValueError):
        await dest.mirror_top(4, "fra")  # a region does not mirror itself
    with pytest.raises(ValueError):
        await dest.mirror_append(4, "sg", START_ID, b"x")


@aio
async def test_mirror_keeps_the_origins_prev(backend: Backend) -> None:
    origin = backend.log  # sg
    dest = backend.open("fra")
    end = "18446744073709551615-18446744073709551615"
    await origin.set_owner(6, A, 1)
    ids = [await origin.append(6, A, 1, b"%d" % i) for i in range(4)]
    head = await origin.tail({6: START_ID}, None, count=1)
    assert head == [TailEntry(6, ids[0], b"0", START_ID)]
    assert await dest.mirror_append_many("sg", head) == [True]
    # The origin trims past the mirror's top (ids[0]) before the rest is copied.
    await origin.write_checkpoint(6, A, 1, b"cp", ids[2])
    assert (await origin.trim(6, end)).removed == 2
    top = await dest.mirror_top(6, "sg")
    assert top == ids[0]
    rest = await origin.tail({6: top}, None)
    assert rest == [TailEntry(6, ids[2], b"2", ids[1]), TailEntry(6, ids[3], b"3", ids[2])]
    assert await dest.mirror_append_many("sg", rest) == [True, True]

    # The mirror holds the origin's prev, not its own previous entry: a mirror reader at
    # ids[0] sees that ids[1] is missing.
    assert await dest.read(6, origin="sg") == [
        Entry(ids[0], b"0", START_ID),
        Entry(ids[2], b"2", ids[1]),
        Entry(ids[3], b"3", ids[2]),
    ]
    assert await dest.tail({6: ids[0]}, None, origin="sg") == rest
    # An entry whose prev is unknown ("") is copied without one.
    unknown = TailEntry(7, "1700000000000-0", b"x")
    assert await dest.mirror_append_many("sg", [unknown]) == [True]
    assert await dest.tail({7: START_ID}, None, origin="sg") == [unknown]


@aio
async def test_mirror_tail_wakes_on_mirror_append(backend: Backend) -> None:
    dest = backend.open("fra")
    task = asyncio.ensure_future(dest.tail({8: START_ID}, 5000, origin="iad"))
    await until(lambda: backend.blocked_readers() == 1, what="tail to block")
    assert await dest.mirror_append(8, "iad", "1700000000000-0", b"from iad")
    assert await asyncio.wait_for(task, 2) == [TailEntry(8, "1700000000000-0", b"from iad")]


# ---- Redis only: connections ---------------------------------------------------------------


def test_refuses_decoding_clients(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="decode"):
        RedisSlotLog(redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True), "sg")
    short = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=1)
    with pytest.raises(ValueError, match="socket_timeout"):
        RedisSlotLog(short, "sg", tail_client=short, max_block_ms=5000)
    implicit = redis.asyncio.Redis.from_url(redis_server.url)  # redis-py's 5 s default
    with pytest.raises(ValueError, match="socket_timeout"):
        RedisSlotLog(implicit, "sg", tail_client=implicit)
    long = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=None)
    RedisSlotLog(short, "sg", tail_client=long, max_block_ms=60_000)
    with pytest.raises(ValueError, match="region"):
        RedisSlotLog(short, "S G")


@aio
async def test_entry_fields_in_redis(redis_server: RedisServer) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    admin.flushall()
    origin = RedisSlotLog.from_url(redis_server.url, "sg")
    dest = RedisSlotLog.from_url(redis_server.url, "fra")
    try:
        await origin.set_owner(1, A, 3)
        first = await origin.append(1, A, 3, b"one")
        second = await origin.append(1, A, 3, b"two")
        raw = dict(admin.xrange(keys.log_key("sg", 1)))
        assert raw[first.encode()] == {b"d": b"one", b"e": b"3", b"p": b"0-0"}
        assert raw[second.encode()] == {b"d": b"two", b"e": b"3", b"p": first.encode()}

        # Mirrors store p only when the origin's entry has one.
        copied = await origin.tail({1: START_ID}, None)
        assert await dest.mirror_append_many("sg", copied) == [True, True]
        assert await dest.mirror_append(2, "sg", "1700000000000-0", b"no prev")
        mirror = dict(admin.xrange(keys.mirror_key("fra", 1, "sg")))
        assert mirror[second.encode()] == {b"d": b"two", b"p": first.encode()}
        assert admin.xrange(keys.mirror_key("fra", 2, "sg")) == [
            (b"1700000000000-0", {b"d": b"no prev"})
        ]

        # An entry written before prev was recorded reads as prev "" (unknown); the next
        # append still names it.
        old = admin.xadd(keys.log_key("sg", 4), {"d": b"old", "e": b"3"}).decode()
        await origin.set_owner(4, A, 3)
        new = await origin.append(4, A, 3, b"new")
        assert await origin.read(4) == [Entry(old, b"old"), Entry(new, b"new", old)]
    finally:
        await origin.close()
        await dest.close()
        admin.close()


@pytest.fixture
def tls_acl_server(tmp_path: Path) -> Iterator[str]:
    """A redis-server with TLS only and an ACL user limited to the relay's keys."""
    certs = write_cert_files(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [
            find_server_binary(),
            *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
            *("--tls-cert-file", str(certs.cert_path), "--tls-key-file", str(certs.key_path)),
            *("--tls-ca-cert-file", str(certs.ca_path), "--tls-auth-clients", "no"),
            *("--save", "", "--appendonly", "no", "--dir", str(tmp_path)),
            *("--user", "default", "off"),
            *("--user", "relay", "on", ">s3cret", "~relay:*", "&relay:*", "-@all", "+@connection"),
            *ACL_COMMANDS.split(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"rediss://relay:s3cret@localhost:{port}/0?ssl_ca_certs={certs.ca_path}"
    probe = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.skip(f"this server cannot run TLS with ACL users: {err.strip()[-300:]}")
        try:
            if probe.ping():
                break
        except redis.exceptions.ConnectionError:
            assert time.monotonic() < deadline, "TLS server did not come up"
            time.sleep(0.02)  # poll interval while the server starts
    probe.close()
    yield url
    proc.terminate()
    proc.wait(timeout=5)
    if proc.stderr:
        proc.stderr.close()


# The commands the adapter needs, for an ACL user (docs/SLOTLOG.md). Commands that the Lua
# scripts run are checked against the user too.
ACL_COMMANDS = (
    "+evalsha +script|load +hmget +hget +hset +xadd +xrange +xrevrange +xread +xtrim +xinfo|stream"
)


@pytest.fixture
def tls_acl_cluster(tmp_path: Path) -> Iterator[str]:
    """A 3-primary Redis Cluster (a replica each) whose clients speak TLS only, and an
    ACL user limited to the relay's keys (the harness forms it over plain loopback)."""
    certs = write_cert_files(tmp_path)
    # Twelve distinct ports; with tls-cluster the bus listens on the TLS port + 10000.
    chosen: list[int] = []
    while len(chosen) < 12:
        p = free_cluster_port()
        if all(p not in (q, q + 10000, q - 10000) for q in chosen):
            chosen.append(p)
    ports, tls_ports = chosen[:6], chosen[6:]

    def node_args(i: int) -> list[str]:
        return [
            *("--tls-port", str(tls_ports[i]), "--tls-cluster", "yes"),
            # The bus where the harness's CLUSTER MEET (plain port + 10000) looks for it.
            *("--cluster-port", str(ports[i] + 10000)),
            *("--tls-replication", "yes", "--tls-auth-clients", "no"),
            *("--tls-cert-file", str(certs.cert_path), "--tls-key-file", str(certs.key_path)),
            *("--tls-ca-cert-file", str(certs.ca_path)),
            *("--user", "relay", "on", ">s3cret", "~relay:*", "&relay:*", "-@all"),
            *("+@connection", "+cluster|slots", "+cluster|shards", "+command", "+readonly"),
            *ACL_COMMANDS.split(),
        ]

    try:
        servers = RedisClusterServers(
            primaries=3, replicas=1, ports=ports, node_args=node_args
        ).start()
    except RedisServerError as e:
        pytest.skip(f"this server cannot run a TLS cluster with ACL users: {e}")
    nodes = ",".join(f"localhost:{p}" for p in tls_ports[:2])
    yield f"rediss+cluster://relay:s3cret@{nodes}?ssl_ca_certs={certs.ca_path}"
    servers.stop()


@aio
async def test_tls_and_acl_user(tls_acl_server: str) -> None:
    await tls_and_acl_user(tls_acl_server)


@aio
async def test_tls_and_acl_user_on_a_cluster(tls_acl_cluster: str) -> None:
    await tls_and_acl_user(tls_acl_cluster)


async def tls_and_acl_user(url: str) -> None:
    log = RedisSlotLog.from_url(url, "sg", max_block_ms=2000)
    dest = RedisSlotLog.from_url(url, "fra")
    try:
        assert await log.claim(1, A, 0) == 1
        task = asyncio.ensure_future(log.tail({1: START_ID}, 2000))
        entry_id = await log.append(1, A, 1, b"over tls")
        got = await asyncio.wait_for(task, 3)
        assert got == [TailEntry(1, entry_id, b"over tls", START_ID)]
        # The append script reads the log's last entry (XREVRANGE) for the next prev.
        (again,) = await log.append_many([(1, b"again")], A, {1: 1})
        assert await log.read(1, entry_id) == [Entry(str(again), b"again", entry_id)]
        await log.write_checkpoint(1, A, 1, b"cp", entry_id)
        assert (await log.trim(1, entry_id)).removed == 0
        assert await dest.mirror_append(1, "sg", entry_id, b"over tls")
        assert await dest.mirror_top(1, "sg") == entry_id
    finally:
        await log.close()
        await dest.close()


# ---- measurement ---------------------------------------------------------------------------


@aio
async def test_append_many_throughput(redis_server: RedisServer) -> None:
    """Prints appends/s of pipelined batches of 256 slots × one ~2 KB entry (not asserted)."""
    admin = redis.Redis.from_url(redis_server.url)
    admin.flushall()
    log = RedisSlotLog.from_url(redis_server.url, "sg")

    def server_cpu_s() -> float:
        cpu = admin.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    try:
        slots = list(range(256))
        epochs = dict.fromkeys(slots, 1)
        for slot in slots:
            await log.set_owner(slot, A, 1)
        items = [(slot, os.urandom(2048)) for slot in slots]
        for _ in range(5):  # warm up: connect, load the script
            await log.append_many(items, A, epochs)
        rounds = 200
        latencies = []
        server_cpu, client_cpu = server_cpu_s(), time.process_time()
        started = time.perf_counter()
        for _ in range(rounds):
            t = time.perf_counter()
            results = await log.append_many(items, A, epochs)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu
        server_cpu = server_cpu_s() - server_cpu
        assert all(isinstance(r, str) for r in results)
        one_by_one = 1024
        t = time.perf_counter()
        for i in range(one_by_one):
            await log.append(slots[i % 256], A, 1, items[0][1])
        single = time.perf_counter() - t
        print(
            f"\nappend_many, 256 slots x 2048 B, {rounds} batches: "
            f"{rounds * 256 / elapsed:,.0f} appends/s, "
            f"{rounds * 256 * 2048 / elapsed / 1e6:,.0f} MB/s, batch p50 "
            f"{statistics.median(latencies) * 1000:.2f} ms, p99 "
            f"{statistics.quantiles(latencies, n=100)[98] * 1000:.2f} ms, CPU per append: "
            f"client {client_cpu / (rounds * 256) * 1e6:.1f} us, "
            f"server {server_cpu / (rounds * 256) * 1e6:.1f} us; "
            f"one append per round trip: {one_by_one / single:,.0f} appends/s"
        )
    finally:
        await log.close()
        admin.close()


# ---- ack=log waiting for replicas (WAIT) ----------------------------------------------------


@aio
async def test_wait_replicas_confirms_on_a_cluster_and_refuses_without_replicas(
    redis_server: RedisServer, redis_cluster: RedisClusterServers
) -> None:
    from cluster.slotlog import NotReplicatedError

    clustered = RedisSlotLog.from_url(redis_cluster.url, "sg", wait_replicas=1)
    lone = RedisSlotLog.from_url(redis_server.url, "iad", wait_replicas=1, wait_timeout_ms=50)
    try:
        slots = [0, 1, 2, 3, 4, 5]  # several shards
        for s in slots:
            assert await clustered.set_owner(s, A, 1)
        ids = await clustered.append_many([(s, b"x") for s in slots], A, dict.fromkeys(slots, 1))
        assert all(isinstance(i, str) for i in ids)
        assert isinstance(await clustered.append(0, A, 1, b"y"), str)
        # One server has no replica to confirm: neither the fence nor the append holds.
        with pytest.raises(NotReplicatedError):
            await lone.set_owner(0, "iad/n1", 1)
        assert await lone.get_owner(0) == Owner("iad/n1", 1)  # written, not confirmed
        with pytest.raises(NotReplicatedError):
            await lone.claim(0, "iad/n2", 1)
        with pytest.raises(NotReplicatedError):
            await lone.append(0, "iad/n2", 2, b"z")
        assert await clustered.claim(0, B, 1) == 2  # a cluster's replica confirms it
        with pytest.raises(FencedError):  # fencing still answers first
            await clustered.append(0, A, 1, b"y")
    finally:
        await clustered.close()
        await lone.close()
    with pytest.raises(ValueError, match="wait_replicas"):
        RedisSlotLog.from_url(redis_server.url, "sg", wait_replicas=-1)
