"""The windowed link through the WAN proxy, with its receiver (cluster/receiver.py)
killed mid-window: nothing lost, nothing doubled, the inbound stream bounded."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import pytest_twisted
import redis as redis_sync

import cluster.link as link_mod
from cluster.faultproxy import FaultProxy
from cluster.keys import mirror_key
from cluster.link import Link, confirmed_key
from cluster.receiver import Receiver, done_key, inbound_key
from cluster.slotlog import RedisSlotLog, TailEntry
from cluster.window import WindowBounds, pack_window, unpack_window
from relay.codec import MessageEvent, encode_batch
from relay.redis_server import RedisServer
from tests.conftest import aio, until

A = "sg/n1"
SLOTS = 8
# Leases short enough that a killed receiver's runs out quickly, long enough that a
# busy shared machine does not make a live holder lose it.
TTL_MS = 1500


@pytest.fixture
def wan(redis_server: Any) -> Iterator[tuple[str, str, FaultProxy]]:
    """The session's Redis as sg; fra's Redis behind a WAN proxy (20 ms one-way, 5 ms
    of jitter, 2 MB/s): the link's URL goes through it, fra's own nodes do not."""
    from twisted.internet import reactor

    with redis_sync.Redis.from_url(redis_server.url) as r:
        r.flushall()
    dest = RedisServer().start()
    proxy = FaultProxy(
        reactor,
        "127.0.0.1",
        0,
        "127.0.0.1",
        dest.port,
        latency_ms=20,
        jitter_ms=5,
        bandwidth_bytes_per_s=2_000_000,
        seed=7,
    )
    proxy.start()
    yield redis_server.url, dest.url, proxy
    pytest_twisted.blockon(proxy.stop())
    dest.stop()


def batch(n: int) -> bytes:
    body = b"lunch at the usual place? bring the slides %d" % n
    return encode_batch([MessageEvent(f"m{n}", f"room:{n % 5}", "ann", n + 1, "sg", body, 1)])


async def slot_logs(
    origin_url: str, dest_url: str, entries: int = 0
) -> tuple[RedisSlotLog, RedisSlotLog]:
    """sg's log (every slot owned by ``A``; ``entries`` batches appended round the slots)
    and fra's mirrors."""
    origin = RedisSlotLog.from_url(origin_url, "sg")
    dest = RedisSlotLog.from_url(dest_url, "fra")
    for s in range(SLOTS):
        await origin.set_owner(s, A, 1)
    for n in range(entries):
        await origin.append(n % SLOTS, A, 1, batch(n))
    return origin, dest


def start_link(origin_url: str, proxy: FaultProxy, bounds: WindowBounds | None = None) -> Link:
    """``A``'s link from sg to fra, through the WAN proxy."""
    link = Link(
        region="sg",
        dest="fra",
        dest_url=f"redis://127.0.0.1:{proxy.port}/0",
        node_id=A,
        local_url=origin_url,
        slots=SLOTS,
        lease_ttl_ms=TTL_MS,
        bounds=bounds,
    )
    link.start()
    return link


def receiver(url: str, node: str) -> Receiver:
    rx = Receiver(
        region="fra", origin="sg", url=url, node_id=node, slots=SLOTS, lease_ttl_ms=TTL_MS
    )
    rx.start()
    return rx


async def kill(rx: Receiver) -> None:
    """As ``kill -9`` would: the task dies wherever it is; the lease is not released and
    no progress is written after what it had written."""
    assert rx._task is not None
    rx._task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await rx._task
    await rx.mirrors.close()
    if rx._lean is not None:
        await rx._lean.close()
    for c in (rx.client, rx.reader):
        await c.aclose()


def wrote_some(rx: Receiver) -> bool:
    return rx.entries_total > 100


async def mirrors_equal_logs(origin: RedisSlotLog, dest: RedisSlotLog) -> bool:
    for s in range(SLOTS):
        if await dest.read(s, origin="sg", count=100_000) != await origin.read(s, count=100_000):
            return False
    return True


async def mirrored_then_stopped(
    origin: RedisSlotLog, dest: RedisSlotLog, link: Link, rx: Receiver
) -> None:
    """The mirrors hold exactly the logs (same ids, bytes and chains); then every part
    stops."""
    assert await mirrors_equal_logs(origin, dest)
    await link.stop()
    await rx.stop()
    await origin.close()
    await dest.close()


@aio
async def test_receivers_killed_mid_window_lose_and_double_nothing(wan: Any) -> None:
    origin_url, dest_url, proxy = wan
    origin, dest = await slot_logs(origin_url, dest_url)
    link = start_link(origin_url, proxy, WindowBounds(window_ms=20, min_entries=8, max_entries=200))
    rx = receiver(dest_url, "fra/n1")
    total = 3000

    async def publish() -> None:
        for n in range(total):
            await origin.append(n % SLOTS, A, 1, batch(n))
            if n % 20 == 0:
                await asyncio.sleep(0.02)  # a steady stream for some seconds, not one burst

    publisher = asyncio.ensure_future(publish())
    # Kill the receiver three times while windows stream in, each time once it has
    # written more; another node's receiver takes the lease over after its TTL.
    for i in range(3):
        await until(partial(wrote_some, rx), timeout_s=15, what="receiving")
        assert not publisher.done()  # killed mid-stream
        await kill(rx)
        rx = receiver(dest_url, f"fra/n{i + 2}")
    await publisher
    tops = {str(s): (await origin.read(s, count=100_000))[-1].id for s in range(SLOTS)}
    with redis_sync.Redis.from_url(origin_url, decode_responses=True) as r:
        await until(
            lambda: r.hgetall(confirmed_key("sg", "fra")) == tops,
            timeout_s=40,
            what="the receiver's progress confirming every slot's last entry",
        )
    # Written once each (a window written again after a kill is refused, not counted).
    assert link.copied_entries <= total
    assert await mirrors_equal_logs(origin, dest)  # same ids, bytes and chain: nothing lost
    status = link.status(0)
    assert status["windows_total"] > 10 and status["rtt_ms"] is not None
    assert status["compression_ratio"] > 1.5
    # The inbound stream is trimmed as the receiver confirms.
    with redis_sync.Redis.from_url(dest_url) as r:
        await until(lambda: r.xlen(inbound_key("fra", "sg")) == 0, what="inbound trimmed")
        assert r.xlen(done_key("fra", "sg")) <= 1100
    await link.stop()
    await rx.stop()
    await origin.close()
    await dest.close()


@aio
async def test_a_starting_link_dials_every_connection_to_the_destination_at_once(
    wan: Any,
) -> None:
    # Each connection to the destination costs round trips over the WAN before it
    # carries anything. A (re)started link opens them together: while the WAN carries
    # nothing at all, every one of them is already dialled (one after the other, only
    # the first would be), and once it carries again the link copies as usual.
    origin_url, dest_url, proxy = wan
    origin, dest = await slot_logs(origin_url, dest_url)
    rx = receiver(dest_url, "fra/n1")
    for n in range(40):
        await origin.append(n % SLOTS, A, 1, batch(n))
    proxy.blackhole(True)
    link = start_link(origin_url, proxy)
    # The windows', the control client's, the confirmations' and the mirrors' client's.
    await until(
        lambda: proxy.stats.connections_total >= 4,
        timeout_s=10,
        what="four connections dialled while none has answered",
    )
    assert link.copied_entries == 0 and link.state == "waiting for the receiver"
    proxy.blackhole(False)
    await until(lambda: link.copied_entries == 40, timeout_s=20, what="copied")
    await mirrored_then_stopped(origin, dest, link, rx)


@aio
async def test_an_idle_link_cut_from_its_destination_shows_an_error_until_it_answers(
    wan: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing waits, so no stall: the once-a-second probe turns the cut into an error,
    # and every reconnection that fails meanwhile (each only after its reply timeout,
    # shortened here) leaves it an error rather than "waiting for the receiver".
    monkeypatch.setattr(link_mod, "REPLY_TIMEOUT_S", 2.5)
    origin_url, dest_url, proxy = wan
    origin, dest = await slot_logs(origin_url, dest_url, entries=8)
    rx = receiver(dest_url, "fra/n1")
    link = start_link(origin_url, proxy)
    await until(lambda: link.copied_entries == 8, timeout_s=20, what="copied")
    await until(lambda: link.state == "running" and not link._inflight, timeout_s=10)
    proxy.blackhole(True)
    await until(lambda: link.state == "error", timeout_s=10, what="the cut seen")
    failures = link.errors_total
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while link.errors_total < failures + 2:  # two reconnections failed meanwhile
        seen.add(link.state)
        assert time.monotonic() < deadline, f"no two failures in 30 s: {seen}"
        await asyncio.sleep(0.02)  # poll the state while the cut lasts
    assert seen == {"error"}, seen
    assert link.status(0)["state"] == "error" and link.last_error
    proxy.blackhole(False)
    await until(lambda: link.state == "running", timeout_s=20, what="running again")
    await origin.append(0, A, 1, batch(99))
    await until(lambda: link.copied_entries == 9, timeout_s=20, what="copied after the heal")
    await mirrored_then_stopped(origin, dest, link, rx)


@aio
async def test_a_backlog_goes_over_several_connections_split_by_slot(wan: Any) -> None:
    # A backlog goes over several connections, each slot's entries always on the same
    # one. With jitter on the WAN their windows land in the inbound stream in any
    # order across connections; every chain still holds: nothing lost, doubled or
    # refused. Once the backlog is gone, windows go over one connection again while
    # traffic goes on; a second backlog, arriving while windows are in flight, goes
    # over all of them again.
    origin_url, dest_url, proxy = wan
    origin, dest = await slot_logs(origin_url, dest_url)
    n = 0

    async def append(count: int) -> None:
        nonlocal n
        items = [(k % SLOTS, batch(k)) for k in range(n, n + count)]
        n += count
        await origin.append_many(items, A, dict.fromkeys(range(SLOTS), 1))

    async def steadily() -> None:
        while True:
            await append(1)
            await asyncio.sleep(0.02)  # a steady trickle beside the backlogs

    await append(1200)
    rx = receiver(dest_url, "fra/n1")
    bounds = WindowBounds(window_ms=20, min_entries=8, max_entries=40, connections=3)
    link = start_link(origin_url, proxy, bounds)
    steady = asyncio.ensure_future(steadily())
    await until(lambda: link.copied_entries >= 1200, timeout_s=30, what="the backlog copied")
    assert [p.windows > 3 for p in link._pipes] == [True, True, True]
    await until(
        lambda: link.status(0)["connections"] == 1, timeout_s=20, what="back to one connection"
    )
    before = [p.windows for p in link._pipes]
    await until(lambda: link._pipes[0].windows > before[0] + 5, timeout_s=20, what="steady")
    assert [p.windows for p in link._pipes[1:]] == before[1:]  # one connection for traffic
    await append(600)  # a second backlog, while windows of the trickle are in flight
    await until(
        lambda: all(p.windows > b for p, b in zip(link._pipes, before, strict=True)),
        timeout_s=20,
        what="the second backlog over every connection",
    )
    steady.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await steady
    await until(lambda: link.copied_entries == n, timeout_s=30, what="everything copied")
    assert rx.refused_total == 0 and link.errors_total == 0
    await mirrored_then_stopped(origin, dest, link, rx)


@aio
async def test_a_half_written_window_is_finished_by_the_next_receiver(wan: Any) -> None:
    origin_url, dest_url, proxy = wan
    origin, dest = await slot_logs(origin_url, dest_url, entries=200)
    link = start_link(origin_url, proxy)
    # No receiver yet: the window waits in fra's inbound stream.
    with redis_sync.Redis.from_url(dest_url) as r:
        await until(lambda: r.xlen(inbound_key("fra", "sg")) >= 1, what="a window sent")
        ((_, fields),) = r.xrange(inbound_key("fra", "sg"), count=1)
    window = unpack_window(fields[b"w"], slots=SLOTS)
    # A receiver died after writing the first half of it into the mirrors.
    half = window[: len(window) // 2]
    assert await dest.mirror_append_many("sg", half) == [True] * len(half)
    rx = receiver(dest_url, "fra/n1")
    await until(lambda: link.copied_entries >= 200 - len(half), timeout_s=20, what="confirmed")
    assert rx.skipped_total == len(half)  # refused as already there, not written twice
    await mirrored_then_stopped(origin, dest, link, rx)


@aio
async def test_a_mirror_that_lost_entries_under_the_receiver_refuses_the_window(
    redis_server: Any,
) -> None:
    # The receiver checks a window's chain against the mirror as Redis holds it, not only
    # against the tops it remembers: a mirror shard that failed over and lost its newest
    # entries must not get the next ones written above the hole (and confirmed).
    with redis_sync.Redis.from_url(redis_server.url) as r:
        r.flushall()
        rx = receiver(redis_server.url, "fra/n1")
        inbound, mirror = inbound_key("fra", "sg"), mirror_key("fra", 1, "sg")

        def send(*entries: TailEntry) -> None:
            r.xadd(inbound, {"w": pack_window(list(entries))})

        def mirror_ids() -> list[str]:
            return [i.decode() for i, _ in r.xrange(mirror)]

        def done_rows() -> list[dict[bytes, bytes]]:
            return [f for _, f in r.xrange(done_key("fra", "sg"))]

        send(TailEntry(1, "1-0", batch(1), ""), TailEntry(1, "2-0", batch(2), "1-0"))
        await until(lambda: mirror_ids() == ["1-0", "2-0"], what="the first window written")
        # The mirror's shard fails over to a replica that had only 1-0.
        r.delete(mirror)
        r.xadd(mirror, {"d": batch(1)}, id="1-0")
        send(TailEntry(1, "3-0", batch(3), "2-0"))
        await until(lambda: len(done_rows()) == 2, what="the second window answered")
        assert b"bad" in done_rows()[-1] and b"not the top" in done_rows()[-1][b"bad"]
        assert mirror_ids() == ["1-0"]  # nothing written above the hole
        # The link resends from the mirror's real top: the hole is filled, in order.
        send(TailEntry(1, "2-0", batch(2), "1-0"), TailEntry(1, "3-0", batch(3), "2-0"))
        await until(lambda: mirror_ids() == ["1-0", "2-0", "3-0"], what="the hole filled")
        assert b"bad" not in done_rows()[-1]
        assert rx.refused_total == 1
    await rx.stop()


@aio
async def test_a_backlog_of_big_batches_goes_raw_and_mirrors_the_same_bytes(wan: Any) -> None:
    # Batches of 8 messages with incompressible bodies: flattening them gains nothing, so
    # after the first (measured) window the link ships them as the log holds them, and
    # the mirrors hold the same ids and bytes whichever way each window went.
    origin_url, dest_url, proxy = wan
    origin, dest = await slot_logs(origin_url, dest_url)
    rng = random.Random(5)
    for n in range(400):
        events = [
            MessageEvent(f"m{n}.{i}", f"room:{i}", "ann", n + 1, "sg", rng.randbytes(120), 1)
            for i in range(8)
        ]
        await origin.append(n % SLOTS, A, 1, encode_batch(events))
    link = start_link(origin_url, proxy, WindowBounds(min_entries=8, max_entries=20))
    rx = receiver(dest_url, "fra/n1")
    await until(lambda: link.copied_entries >= 400, timeout_s=30, what="the backlog confirmed")
    status = link.status(0)
    assert 0 < status["raw_windows_total"] < status["windows_total"]  # both kinds went
    assert await mirrors_equal_logs(origin, dest)
    assert link.copied_entries == 400 and rx.skipped_total == 0
    await link.stop()
    await rx.stop()
    await origin.close()
    await dest.close()


@aio
async def test_the_in_flight_bound_holds_per_connection_even_within_one_read(wan: Any) -> None:
    # At most link_inflight_max windows per connection in use are unconfirmed, however
    # much one read of the log brought: a backlog over 3 connections keeps up to 3 × 2
    # in flight (it would sit idle waiting for confirmations with 2), and no more, even
    # while the receiver is away and nothing is confirmed.
    origin_url, dest_url, proxy = wan
    origin, dest = await slot_logs(origin_url, dest_url)
    items = [(k % SLOTS, batch(k)) for k in range(1200)]
    await origin.append_many(items, A, dict.fromkeys(range(SLOTS), 1))
    bounds = WindowBounds(
        window_ms=20, min_entries=8, max_entries=40, min_inflight=1, max_inflight=2, connections=3
    )
    link = start_link(origin_url, proxy, bounds)
    most = 0

    async def sample() -> None:
        nonlocal most
        while True:
            most = max(most, len(link._inflight))
            await asyncio.sleep(0.002)  # sample the link's windows in flight

    sampler = asyncio.ensure_future(sample())
    with redis_sync.Redis.from_url(dest_url) as r:
        await until(lambda: r.xlen(inbound_key("fra", "sg")) == 6, what="six windows sent")
        await until(lambda: link.status(0)["inflight_limit"] == 6, what="the limit shown")
        rx = receiver(dest_url, "fra/n1")
        await until(lambda: link.copied_entries == 1200, timeout_s=30, what="copied")
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    assert most == 6
    await mirrored_then_stopped(origin, dest, link, rx)


@aio
async def test_a_restarted_link_starts_after_the_windows_waiting_and_resends_nothing(
    wan: Any,
) -> None:
    # A link stopped while its windows wait in the inbound stream (no receiver runs).
    # The next holder waits for the receiver to finish them; on one Redis server it
    # learns the mirrors' tops in the same round trip as that check, and they already
    # hold those windows: it sends only what is new, nothing twice.
    origin_url, dest_url, proxy = wan
    origin, dest = await slot_logs(origin_url, dest_url, entries=200)
    first = start_link(origin_url, proxy)
    with redis_sync.Redis.from_url(dest_url) as r:

        def waiting_entries() -> int:
            rows = r.xrange(inbound_key("fra", "sg"))
            return sum(len(unpack_window(f[b"w"], slots=SLOTS)) for _, f in rows)

        await until(lambda: waiting_entries() == 200, what="every entry sent")
        await first.stop()
        waiting = r.xlen(inbound_key("fra", "sg"))
    assert waiting >= 1
    link = start_link(origin_url, proxy)
    await until(lambda: link.state == "waiting for the receiver", what="the next holder waits")
    with redis_sync.Redis.from_url(dest_url) as r:

        def calls(command: str) -> int:
            stats: dict[str, dict[str, int]] = r.info("commandstats")
            return stats.get(f"cmdstat_{command}", {}).get("calls", 0)

        looks = calls("xrevrange")
        await until(lambda: calls("xrevrange") >= looks + 4, what="it looks again")
        tops_asked, looks = calls("xinfo|stream"), calls("xrevrange")
        await until(
            lambda: calls("xrevrange") >= looks + 8, timeout_s=10, what="it looks again and again"
        )
        assert calls("xinfo|stream") == tops_asked  # the tops only with the first look
        # Each look carries the newest window across the WAN: 50 ms apart for a second
        # (21 looks take that long at least), then further apart as it waits.
        await until(lambda: calls("xrevrange") >= 2 * 21, timeout_s=10, what="a second of looks")
        began, looks = time.monotonic(), calls("xrevrange")
        await until(lambda: calls("xrevrange") >= looks + 8, timeout_s=10, what="four more")
        assert time.monotonic() - began >= 1.0
    for n in range(200, 240):
        await origin.append(n % SLOTS, A, 1, batch(n))
    rx = receiver(dest_url, "fra/n1")
    await until(lambda: rx.entries_total == 240, timeout_s=30, what="everything written")
    assert rx.skipped_total == 0 and rx.refused_total == 0  # nothing was sent twice
    # The start's answer is the mirrors' tops and the receiver's progress.
    start = await link._await_receiver()
    assert start is not None
    tops, done_from = start
    assert tops == await dest.mirror_tops(list(range(SLOTS)), "sg")
    with redis_sync.Redis.from_url(dest_url) as r:
        assert done_from == r.xrevrange(done_key("fra", "sg"), count=1)[0][0].decode()
    await mirrored_then_stopped(origin, dest, link, rx)


@aio
async def test_one_script_call_checks_each_of_several_mirrors_on_its_own(
    redis_server: Any,
) -> None:
    # On one server a call writes several slots' mirrors: a chain broken in one mirror
    # stops that mirror's entries only; an entry already there is skipped; the others
    # are written.
    with redis_sync.Redis.from_url(redis_server.url) as r:
        r.flushall()
        r.xadd(mirror_key("fra", 2, "sg"), {"d": batch(1)}, id="5-0")  # 2's top: 5-0
        r.xadd(mirror_key("fra", 3, "sg"), {"d": batch(1)}, id="7-0")
        rx = Receiver(region="fra", origin="sg", url=redis_server.url, node_id="n", slots=SLOTS)
        entries = [
            TailEntry(1, "1-0", batch(1), ""),
            TailEntry(2, "6-0", batch(2), "4-0"),  # follows 4-0, the top is 5-0: refused
            TailEntry(3, "7-0", batch(3), "6-0"),  # there already
            TailEntry(1, "2-0", batch(4), "1-0"),
            TailEntry(2, "7-0", batch(5), "6-0"),  # after the break: not written
            TailEntry(3, "8-0", batch(6), "7-0"),
        ]
        assert await rx._write(entries) == [1, -1, 0, 1, -2, 1]
        ids = {s: [i.decode() for i, _ in r.xrange(mirror_key("fra", s, "sg"))] for s in (1, 2, 3)}
        assert ids == {1: ["1-0", "2-0"], 2: ["5-0"], 3: ["7-0", "8-0"]}
        await rx.stop()


@aio
async def test_what_a_starting_link_read_ahead_is_not_kept_once_sent(wan: Any) -> None:
    # A (re)starting link reads its log ahead while it connects; a read may be hundreds
    # of MB. Once sent, nothing holds it any more: the link copies on with a few
    # entries at most alive.
    origin_url, dest_url, proxy = wan
    origin, dest = await slot_logs(origin_url, dest_url)
    payload = b"x" * 4093  # a size nothing else here has
    items = [(k % SLOTS, payload) for k in range(200)]
    await origin.append_many(items, A, dict.fromkeys(range(SLOTS), 1))
    rx = receiver(dest_url, "fra/n1")
    link = start_link(origin_url, proxy)
    await until(lambda: link.copied_entries == 200, timeout_s=20, what="copied")
    await origin.append(0, A, 1, batch(1))  # the copy reads on
    await until(lambda: link.copied_entries == 201, timeout_s=20, what="copied on")
    gc.collect()
    alive = sum(1 for o in gc.get_objects() if isinstance(o, TailEntry) and o.data == payload)
    assert alive <= SLOTS
    await mirrored_then_stopped(origin, dest, link, rx)


@aio
async def test_a_link_that_cannot_connect_keeps_nothing_it_read_ahead(wan: Any) -> None:
    # The read-ahead is done long before a connect to a blackholed WAN fails: what it
    # read is dropped with the failed start, not kept until the next one.
    origin_url, dest_url, proxy = wan
    origin, dest = await slot_logs(origin_url, dest_url, entries=100)
    proxy.blackhole(True)
    link = start_link(origin_url, proxy)
    await until(lambda: link.errors_total >= 1, timeout_s=20, what="the start failed")
    assert link._ahead is None
    await link.stop()
    await origin.close()
    await dest.close()
