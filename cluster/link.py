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
import secrets
import time
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from cluster import redisconn
from cluster.chain import parse_id, split_on_gaps
from cluster.checkpoint import without_clock
from cluster.errors import ClusterError
from cluster.keys import PREFIX, confirmed_channel, link_lease_key, region_tag
from cluster.lease import RELEASE_IF_OURS, RENEW_IF_OURS
from cluster.slotlog import RedisSlotLog, TailEntry

log = logging.getLogger(__name__)

TAIL_BLOCK_MS = 500
COPY_COUNT = 200
STALL_AFTER_S = 2.0
MAX_BACKOFF_S = 5.0
# With nothing to copy, the destination is still asked this often whether it answers
# (a cut WAN shows as an error even when no entry waits), and must answer within this.
PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 2.5


class LinkGap(ClusterError):
    """Entries of a slot were trimmed under the link and no checkpoint covers them yet."""


class LeaseLost(ClusterError):
    """The link's lease is no longer surely ours: stop writing to the destination."""


# A slot whose resync must wait (no checkpoint covers its hole yet) is left out of the
# copy for this long; the other slots go on.
PARK_S = 1.0


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
        self.client = redisconn.connect(local_url, socket_timeout=max(1.0, lease_ttl_ms / 1000))
        self.lease_key = link_lease_key(region, dest)
        # The node id, then this incarnation: a restarted process with the same id does
        # not renew (or release) the lease of the one before it.
        self.lease_value = f"{node_id}#{secrets.token_hex(6)}"
        self.state = "standby"
        # The lease is ours until this (monotonic): last renewal sent + TTL.
        self.lease_valid_until = 0.0
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.lease_valid_until:
            with contextlib.suppress(RedisError, OSError):
                await self.client.eval(RELEASE_IF_OURS, 1, self.lease_key, self.lease_value)
            self.lease_valid_until = 0.0
        for c in (self.local, self.remote):
            with contextlib.suppress(Exception):
                await c.close()
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # -- views ---------------------------------------------------------------------

    @property
    def holding(self) -> bool:
        """This node surely holds the link's lease now (its last renewal was sent less
        than a TTL ago and found the lease ours)."""
        return time.monotonic() < self.lease_valid_until

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
        }

    # -- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        """Keep the lease (take it when free, renew it every third of its TTL) and run
        the copy while it is ours; a renewal that finds it gone stops the copy at once."""
        copier: asyncio.Task[None] | None = None
        renew_every = self.lease_ttl_ms / 3000
        try:
            while not self._stopped:
                try:
                    ours = await self._acquire()
                except (RedisError, OSError) as e:
                    # The local Redis did not answer: the lease runs out on its own time.
                    log.warning("link %s→%s: renewing the lease: %s", self.region, self.dest, e)
                    ours = self.holding
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
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _acquire(self) -> bool:
        """Take the lease if it is free or renew it if it is ours."""
        sent = time.monotonic()
        got = await self.client.set(self.lease_key, self.lease_value, nx=True, px=self.lease_ttl_ms)
        if not got:
            got = await self.client.eval(
                RENEW_IF_OURS, 1, self.lease_key, self.lease_value, str(self.lease_ttl_ms)
            )
        self.lease_valid_until = sent + self.lease_ttl_ms / 1000 if got else 0.0
        return bool(got)

    async def _copy_forever(self) -> None:
        """The copy loop, restarted with a backoff after each failure (while leased)."""
        backoff = 0.2
        while not self._stopped:
            try:
                await self._copy_loop()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, ValueError, ClusterError) as e:
                self.errors_total += 1
                self.last_error = f"{type(e).__name__}: {e}"
                self.state = "error"
                log.warning(
                    "link %s→%s: %s; retrying in %.1fs",
                    self.region,
                    self.dest,
                    self.last_error,
                    backoff,
                )
                await asyncio.sleep(backoff)  # back off before retrying the WAN
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            else:
                backoff = 0.2

    async def _copy_loop(self) -> None:
        slots = list(range(self.slots))
        tops = await self.remote.mirror_tops(slots, self.region)
        self.position = {s: tops[s] or "0-0" for s in slots}
        # What the destination holds is the trim floor of our logs: say so at once.
        await self._announce(dict(self.position))
        self.state = "running"
        probed = time.monotonic()
        while not self._stopped:
            now = time.monotonic()
            after = {s: p for s, p in self.position.items() if self._parked.get(s, 0) <= now}
            if not after:
                await asyncio.sleep(PARK_S)  # every slot waits for a checkpoint
                continue
            entries = await self.local.tail(after, TAIL_BLOCK_MS, COPY_COUNT)
            if not entries:
                self.backlog_entries = 0
                self.waiting_oldest_ms = None
                self.last_progress = time.monotonic()
                if time.monotonic() - probed >= PROBE_EVERY_S:
                    probed = time.monotonic()
                    await self._probe()
                continue
            self.backlog_entries = len(entries)
            oldest = min(parse_id(e.id)[0] for e in entries)
            if self.waiting_oldest_ms is None or oldest < self.waiting_oldest_ms:
                self.waiting_oldest_ms = oldest
            good, gaps = split_on_gaps(self.position, entries)
            if good:
                await self._copy(good)
            for slot, missing in gaps.items():
                try:
                    await self._resync(slot, missing)
                except LinkGap as e:
                    log.warning("link %s→%s: %s; retrying it shortly", self.region, self.dest, e)
                    self._parked[slot] = time.monotonic() + PARK_S
            self._progressed()
            probed = time.monotonic()

    async def _probe(self) -> None:
        """Ask the destination for one mirror top, bounded: a cut WAN becomes an error."""
        try:
            await asyncio.wait_for(self.remote.mirror_top(0, self.region), PROBE_TIMEOUT_S)
        except TimeoutError:
            raise ClusterError(f"{self.dest}'s Redis does not answer") from None

    def _check_lease(self) -> None:
        if not self.holding:
            raise LeaseLost("the link's lease is not surely ours: not writing")

    async def _copy(self, entries: list[TailEntry]) -> None:
        self._check_lease()
        results = await self.remote.mirror_append_many(self.region, entries)
        confirmed: dict[int, str] = {}
        for e, copied in zip(entries, results, strict=True):
            self.position[e.slot] = e.id
            confirmed[e.slot] = e.id
            if copied:
                self.copied_entries += 1
                self.bytes_total += len(e.data)
        await self._announce(confirmed)

    def _progressed(self) -> None:
        self.last_progress = time.monotonic()
        self.backlog_entries = 0
        self.waiting_oldest_ms = None

    async def _resync(self, slot: int, missing: str) -> None:
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
        resync = TailEntry(slot, cp.covers_id, data, position)
        self._check_lease()
        (copied,) = await self.remote.mirror_append_many(self.region, [resync])
        if not copied:
            # Someone else wrote above our position: our view of the mirror is stale.
            raise ClusterError(f"slot {slot}: the mirror moved under the link; re-reading")
        self.bytes_total += len(data)
        self.position[slot] = cp.covers_id
        await self._announce({slot: cp.covers_id})

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
