"""A link's sending side: windows out to the destination's inbound stream, several in
flight (on one connection, or a backlog split by slot over several), and what comes
back — the XADD replies (each a window's id and a round-trip sample) and the receiver's
progress (``done``), which confirms whole windows.

What the destination confirmed is kept in a hash (``relay:{<origin>}:link:<dest>:
confirmed``, slot → id; the trim floor of the origin's slot logs) and published on
``relay:{<origin>}:confirmed`` (what ``ack=remote`` waits for).

:class:`WindowSender` is a part of :class:`cluster.link.Link` (a mixin): it uses the
link's connections, lease, tuner and counters, declared below.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from cluster.chain import parse_id
from cluster.errors import ClusterError
from cluster.keys import PREFIX, confirmed_channel, region_tag
from cluster.lease import Lease
from cluster.receiver import done_key, inbound_key
from cluster.redisconn import AsyncClient
from cluster.slotlog import TailEntry
from cluster.window import (
    WindowBounds,
    WindowPlan,
    WindowTuner,
    batch_events,
    pack_window,
    window_level,
)

# A window's XADD must be answered within this (a blackholed WAN ends in an error).
REPLY_TIMEOUT_S = 10.0

# A backlog's window goes raw (the log's bytes as they are: no decompressing and
# recompressing, nothing for the receiver to rebuild) when its entries are already
# batches of several messages (at least this many bytes each, on average) and
# flattening them measured less than RAW_BELOW_GAIN (entry bytes ÷ window bytes);
# every RAW_REMEASURE-th such window is flattened again to measure the gain anew.
RAW_MIN_ENTRY_BYTES = 512
RAW_BELOW_GAIN = 1.6
RAW_REMEASURE = 8


class LeaseLost(ClusterError):
    """The link's lease is no longer surely ours: stop writing to the destination."""


@dataclass(slots=True)
class _Window:
    """A window sent and not yet confirmed by the destination's receiver."""

    positions: dict[int, str]  # slot → its last entry in the window
    oldest_ms: int
    entries: int
    data_bytes: int
    events: int
    frame_bytes: int
    sent: float
    resyncs: int  # checkpoints sent in place of trimmed entries (not copies)
    wid: tuple[int, int] | None = field(default=None)  # its id in the inbound stream


def oldest_ms(entries: Iterable[TailEntry]) -> int:
    """The time part of the oldest id among ``entries`` (each slot's entries in order:
    only each slot's first is parsed)."""
    firsts: dict[int, str] = {}
    for e in entries:
        firsts.setdefault(e.slot, e.id)
    return min(parse_id(i)[0] for i in firsts.values())


@dataclass(slots=True)
class _Pipe:
    """One connection windows go out on, and the windows whose XADD reply it owes."""

    conn: Any
    replies: deque[_Window] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    windows: int = 0  # sent on it


def stripes(entries: Sequence[TailEntry], n: int) -> list[list[TailEntry]]:
    """``entries`` split over ``n`` connections by slot (slot ``s`` to part ``s % n``,
    some parts maybe empty), each in the order given: every slot's entries stay on one
    connection, in order, so windows of different connections may land in any order
    without breaking a chain."""
    if n == 1:
        return [list(entries)]
    parts: list[list[TailEntry]] = [[] for _ in range(n)]
    for e in entries:
        parts[e.slot % n].append(e)
    return parts


async def gather_all(*calls: Awaitable[Any]) -> list[Any]:
    """Await ``calls`` together; the first failure is raised once every call has ended
    (none is left running behind the link's retry)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def confirmed_key(region: str, dest: str) -> str:
    """Hash slot → newest entry id confirmed in ``dest``'s mirror."""
    return f"{PREFIX}:{region_tag(region)}:link:{dest}:confirmed"


class WindowSender:
    """Sends windows and reads their replies and confirmations (part of a Link)."""

    region: str
    dest: str
    client: AsyncClient
    remote_client: AsyncClient
    done_client: AsyncClient
    lease: Lease
    bounds: WindowBounds
    tuner: WindowTuner
    _inflight: deque[_Window]
    _pipes: list[_Pipe]
    _stripes: int  # connections the windows go over now (1 unless a backlog drains)
    _wake: asyncio.Event
    _failure: Exception | None
    _done_wid: tuple[int, int]
    _pack_raw: bool
    _flat_gain: float | None
    _raw_run: int
    raw_windows_total: int
    _last_sent: float
    wan_full: bool  # the socket refused most of the last window at once
    _hard_left: int  # windows still compressed hard (cluster.window.window_level)
    _resyncs: set[tuple[int, str]]
    _done_counts: dict[tuple[int, int], tuple[int, int]]
    windows_total: int
    wan_bytes_total: int
    window_data_bytes_total: int
    events_total: int
    copied_entries: int
    bytes_total: int
    backlog_entries: int
    waiting_oldest_ms: int | None
    last_progress: float

    @property
    def holding(self) -> bool:
        """This node surely holds the link's lease now (its last renewal was sent less
        than a TTL ago and found the lease ours)."""
        return self.lease.holding

    async def _open_sender(self) -> Any:
        remote = self.remote_client
        if isinstance(remote, RedisCluster):
            # Windows go to the one shard that serves the inbound stream's hash tag.
            await remote.initialize()
            node = remote.get_node_from_key(inbound_key(self.dest, self.region))
            if node is None:
                raise ClusterError(f"no node of {self.dest}'s cluster serves its inbound stream")
            conn = node.connection_class(**node.connection_kwargs)
            await conn.connect()  # type: ignore[no-untyped-call]
            return conn
        pool = remote.connection_pool
        conn = pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()
        return conn

    async def _send(self, entries: list[TailEntry], plan: WindowPlan) -> None:
        """Send ``entries`` as windows of up to ``plan.entries`` and ``max_bytes``, over
        the connections in use (:func:`stripes`), each connection's in turn and the
        connections side by side; their replies and confirmations are read by the
        helpers as they come."""
        if self._stripes == 1:
            await self._send_all(self._pipes[0], entries, plan)
            return
        # One sender per connection (part i on connection i, always): one whose WAN is
        # full must not hold the others back.
        parts = stripes(entries, self._stripes)
        await gather_all(
            *(self._send_all(self._pipes[i], part, plan) for i, part in enumerate(parts) if part)
        )

    async def _send_all(self, pipe: _Pipe, entries: list[TailEntry], plan: WindowPlan) -> None:
        try:
            for chunk in self._chunks(entries, plan):
                self._raise_failure()  # another connection failed: stop here too
                while not self._room(plan):  # a read may hold many windows: bounded still
                    await self._wait_wake(1.0)  # a confirmation frees room
                    self._raise_failure()
                await self._send_window(pipe, chunk, plan)
        except Exception as e:
            self._fail(e)
            raise

    def _room(self, plan: WindowPlan) -> bool:
        """Whether another window may go: fewer than ``plan.inflight`` windows and
        ``max_inflight_bytes`` in flight, per connection in use. A backlog over n
        connections keeps n times as much in flight: its confirmations come a round
        trip or two after each window, and the link would otherwise sit idle waiting
        for them."""
        n = self._stripes
        return (
            len(self._inflight) < plan.inflight * n
            and self.inflight_bytes < self.bounds.max_inflight_bytes * n
        )

    async def _wait_wake(self, timeout_s: float) -> None:
        """Until something changed (a confirmation, a failure), at most ``timeout_s``."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout_s)

    def _chunks(self, entries: list[TailEntry], plan: WindowPlan) -> list[list[TailEntry]]:
        """``entries`` cut into windows of up to ``plan.entries`` and ``max_bytes``."""
        out: list[list[TailEntry]] = []
        chunk: list[TailEntry] = []
        size = 0
        for e in entries:
            chunk.append(e)
            size += len(e.data)
            if len(chunk) >= plan.entries or size >= self.bounds.max_bytes:
                out.append(chunk)
                chunk, size = [], 0
        if chunk:
            out.append(chunk)
        return out

    async def _send_window(self, pipe: _Pipe, chunk: list[TailEntry], plan: WindowPlan) -> None:
        key = inbound_key(self.dest, self.region)
        size = sum(len(e.data) for e in chunk)
        self._check_lease()
        level, self._hard_left = window_level(plan.level, self.wan_full, self._hard_left)
        big = level == 0 and size >= RAW_MIN_ENTRY_BYTES * len(chunk)
        raw = self._pack_raw or (big and self._raw_pays())
        frame = pack_window(chunk, level, raw=raw)
        if big:
            self._measured(raw, size, len(frame))
        w = _Window(
            positions={c.slot: c.id for c in chunk},
            oldest_ms=oldest_ms(chunk),
            entries=len(chunk),
            data_bytes=size,
            events=sum(batch_events(c.data) for c in chunk),
            frame_bytes=len(frame),
            sent=time.monotonic(),
            resyncs=self._take_resyncs(chunk) if self._resyncs else 0,
        )
        self._inflight.append(w)
        pipe.replies.append(w)
        pipe.ready.set()
        pipe.windows += 1
        self.wan_full = await self._write(pipe.conn, key, frame)
        self._last_sent = time.monotonic()
        self.tuner.observe_sent(self._last_sent)
        self.windows_total += 1
        self.wan_bytes_total += len(frame)
        self.window_data_bytes_total += size
        self.events_total += w.events

    def _take_resyncs(self, chunk: list[TailEntry]) -> int:
        """How many of ``chunk`` are checkpoints sent in place of trimmed entries."""
        sent = {(c.slot, c.id) for c in chunk} & self._resyncs
        self._resyncs -= sent
        return len(sent)

    async def _write(self, conn: Any, key: str, frame: bytes) -> bool:
        """XADD one window; whether the socket refused at once more than half of it.

        That is the WAN holding the link back (TCP's window is full), as opposed to a
        busy event loop: only what the kernel would not take counts, never time."""
        writer = getattr(conn, "_writer", None)
        transport = getattr(writer, "transport", None)
        if writer is None or transport is None:
            # Closed under us (its reply reader failed): never reconnect here, the replies
            # of what went before are lost with the old socket.
            raise RedisConnectionError(f"writing a window to {self.dest}: connection closed")
        try:
            writer.writelines(conn.pack_command("XADD", key, "*", "w", frame))
            refused: int = transport.get_write_buffer_size()
            await asyncio.wait_for(writer.drain(), REPLY_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            await conn.disconnect(nowait=True)
            raise RedisConnectionError(f"writing a window to {self.dest}: {e}") from e
        return 2 * refused >= len(frame)

    def _raw_pays(self) -> bool:
        """Whether a backlog window of big entries goes raw (see RAW_BELOW_GAIN)."""
        if self._flat_gain is None or self._raw_run >= RAW_REMEASURE:
            return False  # flatten this one: its gain is measured
        return self._flat_gain < RAW_BELOW_GAIN

    def _measured(self, raw: bool, size: int, frame_bytes: int) -> None:
        if raw:
            self._raw_run += 1
            self.raw_windows_total += 1
            return
        self._raw_run = 0
        self._flat_gain = size / max(1, frame_bytes)

    async def _read_replies(self, pipe: _Pipe) -> None:
        """One connection's XADD replies, in the order its windows went: each gives its
        window's id and a round-trip sample."""
        try:
            while True:
                if not pipe.replies:
                    pipe.ready.clear()
                    await pipe.ready.wait()
                    continue
                reply = await pipe.conn.read_response(timeout=REPLY_TIMEOUT_S)
                if reply is None:  # redis-py's answer to a read that timed out
                    raise RedisConnectionError(
                        f"no reply from {self.dest} to a window within {REPLY_TIMEOUT_S:g}s"
                    )
                w = pipe.replies.popleft()
                if isinstance(reply, Exception):
                    raise reply
                w.wid = parse_id(reply.decode() if isinstance(reply, bytes) else str(reply))
                self.tuner.observe_rtt(time.monotonic() - w.sent)
                await self._confirm()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail(e)

    async def _read_done(self, after: str) -> None:
        """The receiver's progress, as it comes: confirmations of whole windows."""
        key = done_key(self.dest, self.region)
        try:
            while True:
                reply: Any = await self.done_client.xread({key: after}, count=1000, block=500)
                if not reply:
                    continue
                pairs = reply.items() if isinstance(reply, dict) else reply
                for _, rows in pairs:
                    for rid, fields in rows:
                        after = rid.decode()
                        bad = fields.get(b"bad")
                        if bad is not None:
                            if b"does not rebuild" in bad:
                                # The destination's lz4 compresses differently: send the
                                # log's bytes as they are from now on (less compression).
                                self._pack_raw = True
                            raise ClusterError(f"the receiver refused a window: {bad.decode()}")
                        done = parse_id(fields[b"w"].decode())
                        self._done_counts[done] = (int(fields[b"n"]), int(fields[b"b"]))
                        if done > self._done_wid:
                            self._done_wid = done
                await self._confirm()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail(e)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, e: Exception) -> None:
        self._failure = e
        self._wake.set()

    async def _confirm(self) -> None:
        """Windows the receiver has finished: their entries are in the mirrors."""
        confirmed: dict[int, str] = {}
        while self._inflight and self._inflight[0].wid is not None:
            w = self._inflight[0]
            assert w.wid is not None
            if w.wid > self._done_wid:
                break
            self._inflight.popleft()
            self.tuner.observe_confirm(time.monotonic() - w.sent)
            confirmed.update(w.positions)
            n, nbytes = self._done_counts.pop(w.wid, (0, 0))
            self.copied_entries += max(0, n - w.resyncs)
            self.bytes_total += nbytes
        if not confirmed:
            return
        self.last_progress = time.monotonic()
        self.waiting_oldest_ms = (
            min(w.oldest_ms for w in self._inflight) if self._inflight else None
        )
        self.backlog_entries = self.inflight_entries
        self._wake.set()
        await self._announce(confirmed)

    @property
    def inflight_bytes(self) -> int:
        return sum(w.frame_bytes for w in self._inflight)

    @property
    def inflight_entries(self) -> int:
        return sum(w.entries for w in self._inflight)

    def _check_lease(self) -> None:
        if not self.holding:
            raise LeaseLost("the link's lease is not surely ours: not writing")

    async def _announce(self, confirmed: dict[int, str]) -> None:
        if not confirmed:
            return
        key = confirmed_key(self.region, self.dest)
        mapping = {str(s): i for s, i in confirmed.items()}
        doc = json.dumps({"dest": self.dest, "slots": mapping})
        if isinstance(self.client, RedisCluster):
            # A cluster pipeline refuses PUBLISH: two round trips (the hash first).
            await self.client.hset(key, mapping=mapping)  # type: ignore[arg-type]
            await self.client.publish(confirmed_channel(self.region), doc)
            return
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            pipe.publish(confirmed_channel(self.region), doc)
            await pipe.execute()
