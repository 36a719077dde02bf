"""Links: this region's slot logs pushed into another region's mirrors.

For each destination region one node of the origin holds the link's lease
(``relay:{<origin>}:link:<dest>``) and runs the copy loop: a blocking ``XREAD`` of the
origin's own slot logs (local, fast), then an ``XADD`` of every entry into the
destination's mirror ``relay:{<dest>:<slot>}:mirror:<origin>`` with the **same id and
bytes**, pipelined on one connection so a batch pays the WAN round trip once. A repeated
copy is refused by Redis (the id is not above the mirror's top), so retries and restarts
are safe; a (re)started link resumes from the destination's mirror tops.

**Chains.** Every log entry names the one before it (``p``). The link checks that chain
as it copies: an entry whose ``p`` is not the link's position for its slot means entries
were trimmed under the link (it fell further behind than ``cluster.link_max_backlog_s``,
or it resumes after a long cut). That is a *gap*: the link copies the origin's
checkpoint of the slot (pending messages, ack tombstones, the clock it was taken at) into
the mirror under the checkpoint's id — with ``p`` set to the link's position, so the
mirror's own chain stays whole — and carries on after it. Gaps are counted and logged;
nothing is ever skipped.

**Lease.** The lease is renewed by a task of its own every third of its TTL, whatever the
copy loop is waiting on; a node holds the link only while its last renewal was *sent*
less than a TTL ago, so a holder stuck on a cut WAN stops calling itself the holder
before another node can take the lease. A renewal that finds the lease gone stops the
copy at once.

**Health.** Lag is the age of the oldest entry the destination has not confirmed; a link
with entries waiting that has made no progress for :data:`STALL_AFTER_S` is ``stalled``.

What each destination confirmed is kept in a hash (``relay:{<origin>}:link:<dest>:
confirmed``, slot → id; the trim floor of the origin's slot logs) and published on
``relay:{<origin>}:confirmed`` (what ``ack=remote`` waits for).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from cluster import redisconn
from cluster.chain import parse_id, split_on_gaps
from cluster.checkpoint import without_clock
from cluster.errors import ClusterError
from cluster.keys import PREFIX, confirmed_channel, link_lease_key, region_tag
from cluster.lease import Lease, stop_leased
from cluster.receiver import cancel_task, done_key, inbound_key, last_done, retry_forever
from cluster.slotlog import RedisSlotLog, TailEntry
from cluster.window import WindowBounds, WindowPlan, WindowTuner, batch_events, pack_window

log = logging.getLogger(__name__)

TAIL_BLOCK_MS = 500
COPY_COUNT = 200
STALL_AFTER_S = 2.0
# With nothing to copy, the destination is still asked this often whether it answers
# (a cut WAN shows as an error even when no entry waits), and must answer within this.
PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 2.5
# A window's XADD must be answered within this (a blackholed WAN ends in an error).
REPLY_TIMEOUT_S = 10.0


class LinkGap(ClusterError):
    """Entries of a slot were trimmed under the link and no checkpoint covers them yet."""


class LeaseLost(ClusterError):
    """The link's lease is no longer surely ours: stop writing to the destination."""


# A slot whose resync must wait (no checkpoint covers its hole yet) is left out of the
# copy for this long; the other slots go on.
PARK_S = 1.0


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


def _events(data: bytes) -> int:
    return batch_events(data)


def confirmed_key(region: str, dest: str) -> str:
    """Hash slot → newest entry id confirmed in ``dest``'s mirror."""
    return f"{PREFIX}:{region_tag(region)}:link:{dest}:confirmed"


class Link:
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
    ) -> None:
        self.region = region
        self.dest = dest
        self.node_id = node_id
        self.slots = slots
        self.lease_ttl_ms = lease_ttl_ms
        self.local = RedisSlotLog.from_url(local_url, region, max_block_ms=TAIL_BLOCK_MS * 4)
        # A blackholed WAN must end in an error, not a hang: bounded socket timeouts.
        self.remote = RedisSlotLog.from_url(
            dest_url,
            dest,
            max_block_ms=TAIL_BLOCK_MS * 4,
            socket_timeout=10,
            socket_connect_timeout=5,
        )
        # Windows go out on one connection of their own, several in flight; the
        # receiver's progress comes back on another (a blocking read).
        self.remote_client = redisconn.connect(
            dest_url, socket_timeout=REPLY_TIMEOUT_S, socket_connect_timeout=5
        )
        self.done_client = redisconn.connect(
            dest_url, socket_timeout=REPLY_TIMEOUT_S, socket_connect_timeout=5
        )
        self.bounds = bounds or WindowBounds()
        self.tuner = WindowTuner(self.bounds)
        self.plan = self.tuner.plan(0)
        self._inflight: deque[_Window] = deque()
        self._replies: deque[_Window] = deque()
        self._reply_ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._failure: Exception | None = None
        self._done_wid: tuple[int, int] = (0, 0)
        self._pack_raw = False  # True once the receiver could not rebuild a batch
        self._backlog_hint = 0
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
    def holding(self) -> bool:
        """This node surely holds the link's lease now (its last renewal was sent less
        than a TTL ago and found the lease ours)."""
        return self.lease.holding

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
            "window_entries": self.plan.entries,
            "inflight_limit": self.plan.inflight,
            "windows_total": self.windows_total,
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

    async def _measure_waiting(self) -> None:
        """While the copy is failing or stuck, find the oldest entry not yet in the
        destination from our own Redis, so lag grows truthfully through a cut that
        began while nothing was waiting."""
        try:
            positions = self.position
            if not positions:
                confirmed = await self.client.hgetall(confirmed_key(self.region, self.dest))
                positions = {
                    int(k): v.decode() if isinstance(v, bytes) else v for k, v in confirmed.items()
                }
            if not positions:
                return
            firsts = await self.local.first_after_many(positions)
        except (RedisError, OSError) as e:
            log.warning("link %s→%s: reading the backlog: %s", self.region, self.dest, e)
            return
        if firsts:
            oldest = min(parse_id(i)[0] for i in firsts.values())
            if self.waiting_oldest_ms is None or oldest < self.waiting_oldest_ms:
                self.waiting_oldest_ms = oldest
            self.backlog_entries = max(self.backlog_entries, len(firsts))

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
        # Windows an earlier holder left in the inbound stream go in first: the mirrors'
        # tops are only the destination's state once the receiver has caught up.
        self.state = "waiting for the receiver"
        await self._await_receiver()
        slots = list(range(self.slots))
        tops = await self.remote.mirror_tops(slots, self.region)
        self.position = {s: tops[s] or "0-0" for s in slots}
        # What the destination holds is the trim floor of our logs: say so at once.
        await self._announce(dict(self.position))
        done_from = await self._done_top()
        conn = await self._open_sender()
        self._inflight.clear()
        self._replies.clear()
        self._done_counts.clear()
        self._done_wid = (0, 0)  # the destination may have failed over: confirm anew
        self._failure = None
        helpers = [
            asyncio.ensure_future(self._read_replies(conn)),
            asyncio.ensure_future(self._read_done(done_from)),
        ]
        self.state = "running"
        probed = time.monotonic()
        try:
            while not self._stopped:
                self._raise_failure()
                plan = self.tuner.plan(self._backlog_hint)
                self.plan = plan
                if (
                    len(self._inflight) >= plan.inflight
                    or self.inflight_bytes >= self.bounds.max_inflight_bytes
                ):
                    await self._wait_wake(1.0)  # a confirmation frees room
                    continue
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
                await self._send(conn, entries, plan)
        finally:
            for h in helpers:
                await self._cancel(h)
            await conn.disconnect()
            self._inflight.clear()

    async def _await_receiver(self) -> None:
        """Until the destination's receiver has finished every window in the inbound
        stream (a link restarted, or taken over, must not read stale mirror tops)."""
        key = inbound_key(self.dest, self.region)
        while not self._stopped:
            rows: Any = await self.remote_client.xrevrange(key, count=1)
            if not rows:
                return
            done = await last_done(self.remote_client, self.dest, self.region)
            if parse_id(done) >= parse_id(rows[0][0].decode()):
                return
            await asyncio.sleep(0.05)  # the receiver is writing them: look again soon

    async def _done_top(self) -> str:
        rows: Any = await self.remote_client.xrevrange(done_key(self.dest, self.region), count=1)
        return rows[0][0].decode() if rows else "0-0"

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

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _wait_wake(self, timeout_s: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout_s)

    async def _read_window(self, plan: WindowPlan) -> list[TailEntry]:
        """The next entries of every slot (chain-checked), gathered for up to a window:
        until ``plan.entries`` are read or ``window_ms`` has passed since the first."""
        now = time.monotonic()
        after = {s: p for s, p in self.position.items() if self._parked.get(s, 0) <= now}
        if not after:
            await asyncio.sleep(PARK_S)  # every slot waits for a checkpoint
            return []
        entries = await self.local.tail(after, TAIL_BLOCK_MS, COPY_COUNT)
        if not entries:
            self._backlog_hint = 0
            return []
        deadline = time.monotonic() + self.bounds.window_ms / 1000
        while len(entries) < plan.entries:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            for e in entries:
                if e.slot in after:
                    after[e.slot] = e.id
            more = await self.local.tail(after, left_ms, COPY_COUNT)
            if not more:
                break
            entries.extend(more)
        # Twice what this window read: windows grow while reads keep filling them.
        self._backlog_hint = 2 * len(entries)
        self.backlog_entries = len(entries) + self.inflight_entries
        oldest = min(parse_id(e.id)[0] for e in entries)
        if self.waiting_oldest_ms is None or oldest < self.waiting_oldest_ms:
            self.waiting_oldest_ms = oldest
        good, gaps = split_on_gaps(self.position, entries)
        for e in good:
            self.position[e.slot] = e.id
        for slot, missing in gaps.items():
            try:
                good.append(await self._resync(slot, missing))
            except LinkGap as e:
                log.warning("link %s→%s: %s; retrying it shortly", self.region, self.dest, e)
                self._parked[slot] = time.monotonic() + PARK_S
        return good

    async def _send(self, conn: Any, entries: list[TailEntry], plan: WindowPlan) -> None:
        """Send ``entries`` as windows of up to ``plan.entries`` and ``max_bytes``; their
        replies and confirmations are read by the helpers as they come."""
        key = inbound_key(self.dest, self.region)
        chunk: list[TailEntry] = []
        size = 0
        for i, e in enumerate(entries):
            chunk.append(e)
            size += len(e.data)
            last = i == len(entries) - 1
            if last or len(chunk) >= plan.entries or size >= self.bounds.max_bytes:
                self._check_lease()
                frame = pack_window(chunk, plan.level, raw=self._pack_raw)
                w = _Window(
                    positions={c.slot: c.id for c in chunk},
                    oldest_ms=min(parse_id(c.id)[0] for c in chunk),
                    entries=len(chunk),
                    data_bytes=size,
                    events=sum(_events(c.data) for c in chunk),
                    frame_bytes=len(frame),
                    sent=time.monotonic(),
                    resyncs=sum(1 for c in chunk if (c.slot, c.id) in self._resyncs),
                )
                self._resyncs.difference_update((c.slot, c.id) for c in chunk)
                self._inflight.append(w)
                self._replies.append(w)
                self._reply_ready.set()
                await conn.send_command("XADD", key, "*", "w", frame, check_health=False)
                self.windows_total += 1
                self.wan_bytes_total += len(frame)
                self.window_data_bytes_total += size
                self.events_total += w.events
                chunk, size = [], 0

    async def _read_replies(self, conn: Any) -> None:
        """The XADD replies, in the order the windows went: each gives its window's id
        and a round-trip sample."""
        try:
            while True:
                if not self._replies:
                    self._reply_ready.clear()
                    await self._reply_ready.wait()
                    continue
                reply = await conn.read_response(timeout=REPLY_TIMEOUT_S)
                w = self._replies.popleft()
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

    async def _probe(self) -> None:
        """Ask the destination for one mirror top, bounded: a cut WAN becomes an error."""
        try:
            await asyncio.wait_for(self.remote.mirror_top(0, self.region), PROBE_TIMEOUT_S)
        except TimeoutError:
            raise ClusterError(f"{self.dest}'s Redis does not answer") from None

    def _check_lease(self) -> None:
        if not self.holding:
            raise LeaseLost("the link's lease is not surely ours: not writing")

    def _progressed(self) -> None:
        self.last_progress = time.monotonic()
        self.backlog_entries = 0
        self.waiting_oldest_ms = None

    async def _resync(self, slot: int, missing: str) -> TailEntry:
        """Entries of ``slot`` after our position, up to ``missing`` at least, were
        trimmed: copy the slot's checkpoint in their place and go on after it.

        The checkpoint goes into the mirror above its top, so the mirror's chain stays
        whole. It proves the origin's own messages gone (``superseded``) only when the
        hole is a trim of the same log after our position; when the log went back or
        began again (``missing`` at or below our position: the origin's Redis lost
        entries) it is merged as a plain state, its clock left out."""
        position = self.position[slot]
        cp = await self.local.read_checkpoint(slot)
        if cp is None or parse_id(cp.covers_id) < parse_id(missing):
            raise LinkGap(
                f"slot {slot}: entries after {position} were trimmed and no checkpoint "
                "covers them yet"
            )
        if parse_id(cp.covers_id) <= parse_id(position):
            raise LinkGap(
                f"slot {slot}: its log went back behind the copied {position}; waiting for "
                "a checkpoint above it"
            )
        data = cp.data
        if parse_id(missing) <= parse_id(position):
            data = without_clock(data)
        self.gaps_total += 1
        log.warning(
            "link %s→%s: slot %d was trimmed past %s; resyncing from its checkpoint at %s",
            self.region,
            self.dest,
            slot,
            self.position[slot],
            cp.covers_id,
        )
        self.position[slot] = cp.covers_id
        self._resyncs.add((slot, cp.covers_id))
        # Sent in the window, in the slot's place: the receiver writes it above the
        # mirror's top, its ``p`` our position, so the mirror's chain stays whole.
        return TailEntry(slot, cp.covers_id, data, position)

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
