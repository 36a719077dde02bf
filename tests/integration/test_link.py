"""One link between two real Redis servers: same ids, resume, leases, gaps."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis as redis_sync

from cluster.link import Link
from cluster.receiver import Receiver
from cluster.slotlog import START_ID, RedisSlotLog
from relay.redis_server import RedisServer
from tests.conftest import aio, until

A = "sg/n1"


@pytest.fixture
def two(redis_server: Any) -> Iterator[tuple[str, str]]:
    """The session's Redis as the origin (sg), a second one as the destination (fra)."""
    with redis_sync.Redis.from_url(redis_server.url) as r:
        r.flushall()
    dest = RedisServer().start()
    yield redis_server.url, dest.url
    dest.stop()


def link(origin: str, dest: str, node: str = A) -> Link:
    return Link(
        region="sg",
        dest="fra",
        dest_url=dest,
        node_id=node,
        local_url=origin,
        slots=8,
        lease_ttl_ms=600,
    )


def receiver(dest: str, node: str = "fra/n1") -> Receiver:
    """The destination's receiver, which writes the link's windows into the mirrors."""
    rx = Receiver(region="fra", origin="sg", url=dest, node_id=node, slots=8, lease_ttl_ms=600)
    rx.start()
    return rx


@asynccontextmanager
async def ends(two: tuple[str, str]) -> AsyncIterator[tuple[RedisSlotLog, RedisSlotLog]]:
    """The origin's slot log and the destination's, its receiver running; all stopped
    and closed on exit."""
    origin_url, dest_url = two
    rx = receiver(dest_url)
    origin = RedisSlotLog.from_url(origin_url, "sg")
    dest = RedisSlotLog.from_url(dest_url, "fra")
    try:
        yield origin, dest
    finally:
        await rx.stop()
        await origin.close()
        await dest.close()


@aio
async def test_entries_are_copied_with_the_same_ids_and_resume_after_restart(two: Any) -> None:
    origin_url, dest_url = two
    async with ends(two) as (origin, dest):
        for s in (1, 2):
            await origin.set_owner(s, A, 1)
        ids = [await origin.append(1, A, 1, b"one-%d" % i) for i in range(3)]
        ids2 = [await origin.append(2, A, 1, b"two")]
        first = link(origin_url, dest_url)
        first.start()
        await until(lambda: first.copied_entries == 4, what="copied")
        assert [e.id for e in await dest.read(1, origin="sg")] == ids
        assert [e.id for e in await dest.read(2, origin="sg")] == ids2
        await first.stop()
        # More entries while no link runs; a new link resumes from the mirrors' tops.
        ids += [await origin.append(1, A, 1, b"later")]
        second = link(origin_url, dest_url)
        second.start()
        await until(lambda: second.copied_entries == 1, what="resumed")
        assert [e.id for e in await dest.read(1, origin="sg")] == ids
        # Copied whole: same ids, bytes and prev (each entry names the one before it).
        assert [e.prev for e in await dest.read(1, origin="sg")] == [START_ID, *ids[:-1]]
        assert await dest.read(1, origin="sg") == await origin.read(1)
        assert second.gaps_total == 0
        await second.stop()


@aio
async def test_only_the_lease_holder_copies(two: Any) -> None:
    origin_url, dest_url = two
    async with ends(two) as (origin, dest):
        a, b = link(origin_url, dest_url, "sg/n1"), link(origin_url, dest_url, "sg/n2")
        a.start()
        await until(lambda: a.holding, what="a holds the lease")
        b.start()
        await origin.set_owner(3, A, 1)
        await origin.append(3, A, 1, b"x")
        await until(lambda: a.copied_entries == 1, what="copied by a")
        assert not b.holding and b.copied_entries == 0
        # The holder goes away: the other takes the lease over and nothing is copied twice.
        await a.stop()
        await origin.append(3, A, 1, b"y")
        await until(lambda: b.holding and b.copied_entries == 1, timeout_s=10, what="b took over")
        assert [e.data for e in await dest.read(3, origin="sg")] == [b"x", b"y"]
        await b.stop()


@aio
async def test_a_trimmed_resume_point_is_resynced_from_the_checkpoint(two: Any) -> None:
    origin_url, dest_url = two
    async with ends(two) as (origin, dest):
        await origin.set_owner(5, A, 1)
        first = link(origin_url, dest_url)
        first.start()
        old = await origin.append(5, A, 1, b"old")
        await until(lambda: first.copied_entries == 1, what="first copy")
        await first.stop()
        # While the link is down the origin checkpoints and trims past the mirror's top.
        mid = [await origin.append(5, A, 1, b"mid-%d" % i) for i in range(3)]
        await origin.write_checkpoint(5, A, 1, b"STATE", mid[-1])
        trimmed = await origin.trim(5, mid[-1])
        assert trimmed.removed >= 2
        after = await origin.append(5, A, 1, b"after")
        second = link(origin_url, dest_url)
        second.start()
        await until(lambda: second.copied_entries >= 1 and second.gaps_total == 1, what="resync")
        mirror = await dest.read(5, origin="sg")
        assert [(e.id, e.data) for e in mirror] == [
            (old, b"old"),
            (mid[-1], b"STATE"),
            (after, b"after"),
        ]
        # The origin's prev is kept: `after` follows mid[-1], whose state the resync copied.
        assert (mirror[0].prev, mirror[2].prev) == (START_ID, mid[-1])
        assert second.status(0)["gaps_total"] == 1
        await second.stop()


@aio
async def test_a_version_3_checkpoint_is_resynced_as_version_2_without_stale_tombstones(
    two: Any,
) -> None:
    import time

    from cluster.checkpoint import MAGIC_V2, decode_checkpoint, encode_checkpoint
    from relay.codec import AckEvent, MessageEvent, encode_batch

    origin_url, dest_url = two
    now_ms = int(time.time() * 1000)
    window_ms = 600_000
    stale = AckEvent("inbox:a", ("old",), (now_ms - window_ms - 60_000) << 16, "sg")
    fresh = AckEvent("inbox:a", ("new",), (now_ms - 1_000) << 16, "sg")
    pending = MessageEvent("kept", "inbox:a", "anon", now_ms << 16, "sg", b"b", 2**50)
    v3 = encode_checkpoint([pending], {}, hlc=now_ms << 16, batches=[encode_batch([stale, fresh])])
    async with ends(two) as (origin, dest):
        await origin.set_owner(5, A, 1)
        first = link(origin_url, dest_url)
        first.start()
        await origin.append(5, A, 1, b"old")
        await until(lambda: first.copied_entries == 1, what="first copy")
        await first.stop()
        mid = [await origin.append(5, A, 1, b"mid-%d" % i) for i in range(3)]
        await origin.write_checkpoint(5, A, 1, v3, mid[-1])
        await origin.trim(5, mid[-1])
        await origin.append(5, A, 1, b"after")
        second = link(origin_url, dest_url)
        second.start()
        await until(lambda: second.copied_entries >= 1 and second.gaps_total == 1, what="resync")
        mirror = await dest.read(5, origin="sg")
        assert [e.id for e in mirror][1] == mid[-1]
        sent = mirror[1].data
        assert sent.startswith(MAGIC_V2)  # what a region of any build reads
        cp = decode_checkpoint(sent)
        assert cp.hlc == now_ms << 16
        assert cp.events == [fresh, pending]  # the tombstone past the window left out
        await second.stop()
