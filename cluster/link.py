"""Links: this region's slot logs pushed into another region's mirrors.

For each destination region one node of the origin holds the link's lease
(``relay:{<origin>}:link:<dest>``) and runs the copy loop: it reads every slot's new
entries from the origin's own slot logs (cluster/linkread.py: chain-checked, a trimmed
hole resynced from the slot's checkpoint), cuts them into windows — one compressed unit
across all slots (cluster/window.py) — and appends each to the destination's inbound
stream, several in flight (cluster/linksend.py). The destination's receiver
(cluster/receiver.py) writes every entry into its slot's mirror
``relay:{<dest>:<slot>}:mirror:<origin>`` with the **same id and bytes**; a repeated copy
is refused (the id is not above the mirror's top), so retries and restarts are safe; a
(re)started link waits for the receiver to finish what is in the inbound stream, then
resumes from the destination's mirror tops.

**Lease.** The lease is renewed by a task of its own every third of its TTL, whatever the
copy loop is waiting on; a node holds the link only while its last renewal was *sent*
less than a TTL ago, so a holder stuck on a cut WAN stops calling itself the holder
before another node can take the lease. A renewal that finds the lease gone stops the
copy at once.

**Health.** Lag is the age of the oldest entry the destination has not confirmed; a link
with entries waiting that has made no progress for :data:`STALL_AFTER_S` is ``stalled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from redis.asyncio.cluster import RedisCluster

from cluster import redisconn
from cluster.chain import parse_id
from cluster.errors import ClusterError
from cluster.keys import link_lease_key
from cluster.lease import Lease, stop_leased
from cluster.linkread import (
    COPY_COUNT,
    PARK_S,
    TAIL_BLOCK_MS,
    LinkGap,
    LogReader,
    ReadAhead,
    ahead_from,
)
from cluster.linksend import (
    REPLY_TIMEOUT_S,
    LeaseLost,
    WindowSender,
    _Pipe,
    _Window,
    confirmed_key,
    gather_all,
)
from cluster.receiver import cancel_task, done_key, inbound_key, last_done_of, retry_forever
from cluster.slotlog import RedisSlotLog
from cluster.slotlog.redislog import mirror_tops_of
from cluster.window import WindowBounds, WindowTuner
from relay.config import LINK_WINDOW_MS_MAX

__all__ = [
    "COPY_COUNT",
    "PARK_S",
    "REPLY_TIMEOUT_S",
    "TAIL_BLOCK_MS",
    "LeaseLost",
    "Link",
    "LinkGap",
    "confirmed_key",
]

log = logging.getLogger(__name__)

STALL_AFTER_S = 2.0
# With nothing to copy, the destination is still asked this often whether it answers
# (a cut WAN shows as an error even when no entry waits), and must answer within this.
PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 2.5
# A link back from a backlog's several connections to one after this many reads in a
# row that were no backlog (reads come at least every window: a few hundred ms).
SMALL_READS = 3
# Connections across the WAN speak RESP2 and skip redis-py's CLIENT SETINFO: no HELLO,
# no CLIENT MAINT_NOTIFICATIONS, no SETINFO, so a (re)connect costs no round trip of its
# own beyond AUTH and SELECT when the URL asks for them (the destination's CLIENT LIST
# then shows no library name for them). Every reply the link reads has the same shape
# in both protocols once redis-py has parsed it.
_WAN_KWARGS: dict[str, Any] = {"driver_info": None, "protocol": 2}

# A starting link waiting for the receiver looks every RECEIVER_LOOK_S for
# RECEIVER_LOOK_FAST_S, then twice as far apart each time, up to RECEIVER_LOOK_MAX_S.
RECEIVER_LOOK_S = 0.05
RECEIVER_LOOK_FAST_S = 1.0
RECEIVER_LOOK_MAX_S = 1.0
# What a starting link read of its log ahead is used only if the receiver was caught up
# at the first look and connecting took no longer than this.
AHEAD_MAX_AGE_S = 10.0
# Where a copy starts: every mirror's top (None: empty) and the receiver's last progress.
_Start = tuple[dict[int, str | None], str]


class Link(WindowSender, LogReader):
    """The link from this node's region to ``dest`` (runs while this node holds its lease)."""

    def __init__(
        self,
        *,
        region: str,
        dest: str,
        dest_url: str,
        node_id: str,
        local_url: str,
        slots: int,
        lease_ttl_ms: int = 3000,
        bounds: WindowBounds | None = None,
        dedupe_window_ms: int = 600_000,
    ) -> None:
        self.region = region
        self.dedupe_window_ms = dedupe_window_ms
        self.dest = dest
        self.node_id = node_id
        self.slots = slots
        self.lease_ttl_ms = lease_ttl_ms
        self.local = RedisSlotLog.from_url(local_url, region, max_block_ms=LINK_WINDOW_MS_MAX)
        # A blackholed WAN must end in an error, not a hang: bounded socket timeouts.
        self.remote = RedisSlotLog.from_url(
            dest_url,
            dest,
            max_block_ms=LINK_WINDOW_MS_MAX,
            socket_timeout=REPLY_TIMEOUT_S,
            socket_connect_timeout=5,
            **_WAN_KWARGS,
        )
        # Windows go out on connections of their own (one, or several while a backlog
        # drains), several in flight; the receiver's progress comes back on another (a
        # blocking read); the start-up questions go on a third.
        self.remote_client = redisconn.connect(
            dest_url, socket_timeout=REPLY_TIMEOUT_S, socket_connect_timeout=5, **_WAN_KWARGS
        )
        self.done_client = redisconn.connect(
            dest_url, socket_timeout=REPLY_TIMEOUT_S, socket_connect_timeout=5, **_WAN_KWARGS
        )
        self.bounds = bounds or WindowBounds()
        self.tuner = WindowTuner(self.bounds)
        self.plan = self.tuner.plan(0)
        self._inflight: deque[_Window] = deque()
        self._pipes: list[_Pipe] = []
        self._stripes = 1
        self._small_reads = 0  # reads in a row that were no backlog
        self._wake = asyncio.Event()
        self._failure: Exception | None = None
        self._done_wid: tuple[int, int] = (0, 0)
        self._pack_raw = False  # True once the receiver could not rebuild a batch
        self._flat_gain: float | None = None  # last backlog window's measured gain
        self._raw_run = 0  # backlog windows sent raw since the gain was measured
        self.raw_windows_total = 0
        self._backlog_hint = 0
        self._last_sent = 0.0  # monotonic time the last window went
        self.wan_full = False  # the socket refused most of the last window at once
        self._hard_left = 0
        self._read_end: float | None = None
        self._ahead: ReadAhead | None = None
        self._receiver_waited = False  # the last start waited for the receiver
        self._resyncs: set[tuple[int, str]] = set()
        self._done_counts: dict[tuple[int, int], tuple[int, int]] = {}
        self.windows_total = 0
        self.wan_bytes_total = 0
        self.window_data_bytes_total = 0
        self.events_total = 0
        self.client = redisconn.connect(local_url, socket_timeout=max(1.0, lease_ttl_ms / 1000))
        self.lease = Lease(self.client, link_lease_key(region, dest), node_id, lease_ttl_ms)
        self.state = "standby"
        self.copied_entries = 0
        self.bytes_total = 0
        self.gaps_total = 0
        self.errors_total = 0
        self.backlog_entries = 0
        # Time part (ms) of the oldest entry read but not confirmed by the destination.
        self.waiting_oldest_ms: int | None = None
        self.last_progress = time.monotonic()
        self.last_error = ""
        self.position: dict[int, str] = {}
        self._parked: dict[int, float] = {}  # slot → monotonic time it is copied again
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stopped = True
        await stop_leased(self._task, self.lease)
        for c in (self.local, self.remote):
            with contextlib.suppress(Exception):
                await c.close()
        for r in (self.client, self.remote_client, self.done_client):
            with contextlib.suppress(Exception):
                await r.aclose()

    # -- views ---------------------------------------------------------------------

    @property
    def stalled(self) -> bool:
        """Entries wait and the link has made no progress for STALL_AFTER_S."""
        return (
            self.waiting_oldest_ms is not None
            and time.monotonic() - self.last_progress > STALL_AFTER_S
        )

    def lag_s(self, now_ms: int) -> float:
        """Age of the oldest entry the destination has not confirmed (0: none waits)."""
        if not self.holding or self.waiting_oldest_ms is None:
            return 0.0
        return max(0.0, (now_ms - self.waiting_oldest_ms) / 1000)

    def status(self, now_ms: int) -> dict[str, Any]:
        holding = self.holding
        if not holding:
            state = "standby"
        elif self.stalled:
            state = "stalled"
        else:
            state = self.state
        return {
            "dest": self.dest,
            "state": state,
            "holder": holding,
            "lag_s": round(self.lag_s(now_ms), 3),
            "backlog_entries": self.backlog_entries if holding else 0,
            "copied_entries": self.copied_entries,
            "bytes_total": self.bytes_total,
            "gaps_total": self.gaps_total,
            "errors_total": self.errors_total,
            "last_error": self.last_error,
            "rtt_ms": round(self.tuner.srtt_s * 1000, 1) if self.tuner.srtt_s is not None else None,
            "inflight_windows": len(self._inflight) if holding else 0,
            "connections": self._stripes if holding else 0,
            "window_entries": self.plan.entries,
            "inflight_limit": self.plan.inflight * self._stripes,
            "windows_total": self.windows_total,
            "raw_windows_total": self.raw_windows_total,
            "wan_bytes_total": self.wan_bytes_total,
            "bytes_per_message": (
                round(self.wan_bytes_total / self.events_total, 1) if self.events_total else None
            ),
            "compression_ratio": (
                round(self.window_data_bytes_total / self.wan_bytes_total, 2)
                if self.wan_bytes_total
                else None
            ),
        }

    # -- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        """Keep the lease (take it when free, renew it every third of its TTL) and run
        the copy while it is ours; a renewal that finds it gone stops the copy at once."""
        copier: asyncio.Task[None] | None = None
        renew_every = self.lease_ttl_ms / 3000
        try:
            while not self._stopped:
                # When the local Redis does not answer the lease runs out on its own time.
                ours = await self.lease.renew(log, f"link {self.region}→{self.dest}")
                if ours and copier is None:
                    self.last_progress = time.monotonic()
                    copier = asyncio.ensure_future(self._copy_forever())
                elif not ours and copier is not None:
                    log.warning("link %s→%s: lease lost; stopping", self.region, self.dest)
                    await self._cancel(copier)
                    copier = None
                if not ours:
                    self.state = "standby"
                    self._progressed()
                elif self.state != "running" or self.stalled:
                    await self._measure_waiting()
                await asyncio.sleep(renew_every)  # the lease's renewal period
        finally:
            if copier is not None:
                await self._cancel(copier)

    @staticmethod
    async def _cancel(task: asyncio.Task[None]) -> None:
        await cancel_task(task)

    async def _copy_forever(self) -> None:
        """The copy loop, restarted with a backoff after each failure (while leased)."""
        await retry_forever(self._copy_loop, lambda: self._stopped, self._failed, 0.2)

    def _failed(self, error: str, backoff_s: float) -> None:
        self.errors_total += 1
        self.last_error = error
        self.state = "error"
        log.warning("link %s→%s: %s; retrying in %.1fs", self.region, self.dest, error, backoff_s)

    async def _copy_loop(self) -> None:
        if self.state != "error":
            # After a failure the link stays "error" until the destination answers
            # again: a cut WAN fails every attempt, each one only after its timeout.
            self.state = "waiting for the receiver"
        # Our log read meanwhile (local): what to send is ready once the tops are known.
        early = asyncio.ensure_future(self._read_ahead())
        began = time.monotonic()
        try:
            conns, start = await self._connect()
        except BaseException:
            await _drop_ahead(self, early)
            raise
        self._pipes = [_Pipe(c) for c in conns]
        self._stripes = 1
        helpers: list[asyncio.Task[None]] = []
        try:
            slots = list(range(self.slots))
            if start is None:
                # Both on connections already open: one round trip for the two.
                tops, done_from = await gather_all(
                    self.remote.mirror_tops(slots, self.region), self._done_top()
                )
            else:
                tops, done_from = start
            self.position = {s: tops[s] or "0-0" for s in slots}
            # What the destination holds is the trim floor of our logs: say so at once.
            await self._announce(dict(self.position))
            self.wan_full, self._hard_left = False, 0  # a new connection: measured anew
            self._inflight.clear()
            self._done_counts.clear()
            self._done_wid = (0, 0)  # the destination may have failed over: confirm anew
            self._failure = None
            helpers = [asyncio.ensure_future(self._read_replies(p)) for p in self._pipes]
            helpers.append(asyncio.ensure_future(self._read_done(done_from)))
            self.state = "running"
            await early
            if self._receiver_waited or time.monotonic() - began > AHEAD_MAX_AGE_S:
                # Read before a wait for the receiver, or a slow connect: the log may
                # have moved under it (an origin failover): read anew.
                self._ahead = None
            await self._copy()
        finally:
            await _drop_ahead(self, early)
            for h in helpers:
                await self._cancel(h)
            await _close_all(conns)
            self._inflight.clear()
            self._stripes = 1

    async def _copy(self) -> None:
        """Copy until stopped, beginning with what was read ahead (``_ahead``) that a
        read from the mirrors' tops gives too."""
        first = ahead_from(self._ahead, self.position) if self._ahead is not None else []
        self._ahead = None
        probed = time.monotonic()
        while not self._stopped:
            self._raise_failure()
            plan = self.tuner.plan(self._backlog_hint)
            self.plan = plan
            if first:
                entries, first = await self._taken(first), []
            elif not self._room(plan):
                await self._wait_wake(1.0)  # a confirmation frees room
                continue
            else:
                entries = await self._read_window(plan)
            self._raise_failure()
            if not entries:
                if not self._inflight:
                    self._progressed()
                if time.monotonic() - probed >= PROBE_EVERY_S:
                    probed = time.monotonic()
                    await self._probe()
                continue
            probed = time.monotonic()
            # What was read may be a backlog: cut it by the plan it calls for.
            self.plan = plan = self.tuner.plan(max(self._backlog_hint, len(entries)))
            stripes = self._stripes_for(len(entries))
            if stripes != self._stripes:
                await self._restripe(stripes)
            await self._send(entries, plan)
            entries = []  # sent: not held while the next read waits

    def _stripes_for(self, read: int) -> int:
        """How many connections the windows of a read of ``read`` entries go over: all
        of them for a backlog (a read over ``max_entries``), back to one after
        :data:`SMALL_READS` reads in a row that were not (one window holding every
        slot's messages is what the compressor needs)."""
        if read > self.bounds.max_entries:
            self._small_reads = 0
            return len(self._pipes)
        self._small_reads += 1
        return 1 if self._small_reads >= SMALL_READS else self._stripes

    async def _restripe(self, stripes: int) -> None:
        """Go over ``stripes`` connections from the next window on. First every window
        in flight is confirmed: then none sent after the change can land before one
        sent before it, whichever connection each went on. Connections unused since
        the last backlog are opened anew (the destination may have closed them)."""
        while self._inflight and not self._stopped:
            self._raise_failure()
            await self._wait_wake(1.0)  # a confirmation frees room
        self._raise_failure()
        if stripes > self._stripes:
            await gather_all(*(_reopen(p.conn) for p in self._pipes[self._stripes : stripes]))
        self._stripes = stripes

    async def _connect(self) -> tuple[list[Any], _Start | None]:
        """Open every connection the copy uses to the destination, all at once, wait
        for the destination's receiver to catch up (on the control client), and return
        the windows' own connections (``bounds.connections`` of them) and, on one Redis
        server, where the copy starts (:meth:`_await_receiver`). Each connection
        costs round trips over the WAN before it carries anything (AUTH and SELECT when
        the URL asks for them; RESP2, so no HELLO): one after the other they held a
        (re)started link back ~2 s at 80 ms one way. The progress client is opened by a
        command on a key of the destination's tag, so on a Redis Cluster it is the
        shard it will use."""
        senders = [
            asyncio.ensure_future(self._open_sender()) for _ in range(self.bounds.connections)
        ]
        try:
            start, *_ = await gather_all(
                # Windows an earlier holder left in the inbound stream go in first: the
                # mirrors' tops are only the destination's state once the receiver has
                # caught up.
                self._await_receiver(),
                self.done_client.exists(done_key(self.dest, self.region)),
                self.remote.mirror_top(0, self.region),
                *senders,
            )
        except BaseException:
            opened = []
            for sender in senders:
                if not sender.done():
                    sender.cancel()  # redis-py closes a connection cancelled while opening
                elif not sender.cancelled() and sender.exception() is None:
                    opened.append(sender.result())
            await _close_all(opened)
            raise
        return [sender.result() for sender in senders], start

    async def _await_receiver(self) -> _Start | None:
        """Until the destination's receiver has finished every window in the inbound
        stream (a link restarted, or taken over, must not read stale mirror tops).

        On one Redis server the first look also asks for the mirrors' tops and the
        receiver's last progress, in the same round trip, after the check (a server
        runs a pipeline's commands in order): when the receiver is caught up (as it
        usually is) they are returned, and the copy starts a round trip sooner. Else,
        and on a Redis Cluster (whose mirrors live on every shard, where nothing orders
        them after the check), None: the copy asks for them after. Only the first look
        asks: the tops carry every mirror's first and last entry, too much to ask again
        and again while a receiver catches up (or is down); the looks themselves come
        50 ms apart for a second, then twice as far each time, up to a second."""
        key = inbound_key(self.dest, self.region)
        dkey = done_key(self.dest, self.region)
        with_tops = not isinstance(self.remote_client, RedisCluster)
        slots = list(range(self.slots))
        pause = RECEIVER_LOOK_S
        began = time.monotonic()
        self._receiver_waited = False
        while not self._stopped:
            # Both keys carry the destination's tag: one round trip, also on a cluster.
            async with self.remote_client.pipeline(transaction=False) as pipe:
                pipe.xrevrange(key, count=1)
                pipe.xrevrange(dkey, count=1)
                if with_tops:
                    self.remote.queue_mirror_tops(pipe, slots, self.region)
                rows, done_rows, *tops = await pipe.execute(raise_on_error=False)
            for r in (rows, done_rows):
                if isinstance(r, Exception):
                    raise r
            if not rows or parse_id(last_done_of(done_rows)) >= parse_id(rows[0][0].decode()):
                if not with_tops:
                    return None
                done_from = done_rows[0][0].decode() if done_rows else "0-0"
                return mirror_tops_of(slots, tops), done_from
            with_tops = False
            self._receiver_waited = True
            self.state = "waiting for the receiver"  # the destination answers
            # The receiver is writing them: look again soon, then less often (each look
            # carries the newest window across the WAN; a receiver may be down for long).
            await asyncio.sleep(pause)
            if time.monotonic() - began >= RECEIVER_LOOK_FAST_S:
                pause = min(RECEIVER_LOOK_MAX_S, 2 * pause)
        return None

    async def _done_top(self) -> str:
        # On the connection the receiver's progress is read on, opened by _connect
        # before the first window waits for its confirmation.
        rows: Any = await self.done_client.xrevrange(done_key(self.dest, self.region), count=1)
        return rows[0][0].decode() if rows else "0-0"

    async def _probe(self) -> None:
        """Ask the destination for one mirror top, bounded: a cut WAN becomes an error."""
        try:
            await asyncio.wait_for(self.remote.mirror_top(0, self.region), PROBE_TIMEOUT_S)
        except TimeoutError:
            raise ClusterError(f"{self.dest}'s Redis does not answer") from None

    def _progressed(self) -> None:
        self.last_progress = time.monotonic()
        self.backlog_entries = 0
        self.waiting_oldest_ms = None


async def _drop_ahead(link: Link, early: asyncio.Task[None]) -> None:
    """End the read-ahead and drop what it read, whatever interrupts the ending."""
    try:
        await cancel_task(early)
    finally:
        link._ahead = None


async def _close_all(conns: list[Any]) -> None:
    """Close ``conns`` at once, whatever each close does: one that fails or takes long
    (TLS, a cut WAN) must not leave the others open."""
    await asyncio.gather(*(c.disconnect(nowait=True) for c in conns), return_exceptions=True)


async def _reopen(conn: Any) -> None:
    await conn.disconnect(nowait=True)
    await conn.connect()
