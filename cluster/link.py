"""Links: this region's slot logs pushed into another region's mirrors.

For each destination region one node of the origin holds the link's lease
(``relay:{<origin>}:link:<dest>``) and runs the copy loop: a blocking ``XREAD`` of the
origin's own slot logs (local, fast), then an ``XADD`` of every entry into the
destination's mirror ``relay:{<dest>:<slot>}:mirror:<origin>`` with the **same id and
bytes**, pipelined on one connection so a batch pays the WAN round trip once. A repeated
copy is refused by Redis (the id is not above the mirror's top), so retries and restarts
are safe; a (re)started link resumes from the destination's mirror tops.

When the origin has trimmed a slot's log past the resume point (``max-deleted-entry-id``
above it), that is a *gap*: the link copies the origin's checkpoint of the slot into the
mirror under the checkpoint's id and carries on after it (counted and reported).

What each destination confirmed is published on ``relay:{<origin>}:confirmed`` (and kept
in a hash), which is what ``ack=remote`` waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cluster.keys import PREFIX, confirmed_channel, link_lease_key, log_key, region_tag
from cluster.lease import RELEASE_IF_OURS, RENEW_IF_OURS
from cluster.slotlog import RedisSlotLog, TailEntry

log = logging.getLogger(__name__)

TAIL_BLOCK_MS = 500
COPY_COUNT = 200
STALL_AFTER_S = 3.0
MAX_BACKOFF_S = 5.0


def confirmed_key(region: str, dest: str) -> str:
    """Hash slot → newest entry id confirmed in ``dest``'s mirror."""
    return f"{PREFIX}:{region_tag(region)}:link:{dest}:confirmed"


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


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
        self.client = Redis.from_url(local_url)
        self.lease_key = link_lease_key(region, dest)
        self.lease_value = node_id
        self.state = "standby"
        self.holding = False
        self.copied_entries = 0
        self.bytes_total = 0
        self.gaps_total = 0
        self.errors_total = 0
        self.newest_copied_ms = 0
        self.backlog_entries = 0
        self.copy_started: float | None = None
        self.last_error = ""
        self.position: dict[int, str] = {}
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
        if self.holding:
            with contextlib.suppress(RedisError, OSError):
                await self.client.eval(RELEASE_IF_OURS, 1, self.lease_key, self.lease_value)
        for c in (self.local, self.remote):
            with contextlib.suppress(Exception):
                await c.close()
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # -- views ---------------------------------------------------------------------

    @property
    def stalled(self) -> bool:
        """A copy has been under way for longer than STALL_AFTER_S (the WAN is stuck)."""
        return self.copy_started is not None and time.monotonic() - self.copy_started > (
            STALL_AFTER_S
        )

    def lag_s(self, now_ms: int) -> float:
        if not self.holding or (self.backlog_entries == 0 and not self.stalled):
            return 0.0
        return max(0.0, (now_ms - self.newest_copied_ms) / 1000) if self.newest_copied_ms else 0.0

    def status(self, now_ms: int) -> dict[str, Any]:
        return {
            "dest": self.dest,
            "state": "stalled" if self.holding and self.stalled else self.state,
            "holder": self.holding,
            "lag_s": round(self.lag_s(now_ms), 3),
            "backlog_entries": self.backlog_entries,
            "copied_entries": self.copied_entries,
            "bytes_total": self.bytes_total,
            "gaps_total": self.gaps_total,
            "errors_total": self.errors_total,
            "last_error": self.last_error,
        }

    # -- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.2
        while not self._stopped:
            try:
                if not await self._acquire():
                    self.state = "standby"
                    await asyncio.sleep(self.lease_ttl_ms / 3000)  # retry the lease
                    continue
                self.holding = True
                self.state = "running"
                await self._copy_while_leased()
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, ValueError) as e:
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
            finally:
                self.copy_started = None

    async def _acquire(self) -> bool:
        if self.holding:
            renewed = await self.client.eval(
                RENEW_IF_OURS, 1, self.lease_key, self.lease_value, str(self.lease_ttl_ms)
            )
            self.holding = bool(renewed)
            if self.holding:
                return True
        got = await self.client.set(self.lease_key, self.lease_value, nx=True, px=self.lease_ttl_ms)
        self.holding = bool(got)
        return self.holding

    async def _copy_while_leased(self) -> None:
        slots = list(range(self.slots))
        tops = await self.remote.mirror_tops(slots, self.region)
        self.position = {s: tops[s] or "0-0" for s in slots}
        await self._heal_gaps(slots)
        renew_every = self.lease_ttl_ms / 3000
        renewed_at = time.monotonic()
        while not self._stopped:
            if time.monotonic() - renewed_at >= renew_every:
                if not await self._acquire():
                    self.state = "standby"
                    return
                renewed_at = time.monotonic()
            entries = await self.local.tail(self.position, TAIL_BLOCK_MS, COPY_COUNT)
            if not entries:
                self.backlog_entries = 0
                continue
            self.backlog_entries = len(entries)
            await self._copy(entries)

    async def _copy(self, entries: list[TailEntry]) -> None:
        self.copy_started = time.monotonic()
        results = await self.remote.mirror_append_many(self.region, entries)
        self.copy_started = None
        confirmed: dict[int, str] = {}
        for e, copied in zip(entries, results, strict=True):
            self.position[e.slot] = e.id
            confirmed[e.slot] = e.id
            if copied:
                self.copied_entries += 1
                self.bytes_total += len(e.data)
        self.newest_copied_ms = max(parse_id(e.id)[0] for e in entries)
        self.backlog_entries = 0
        await self._announce(confirmed)

    async def _announce(self, confirmed: dict[int, str]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(
                confirmed_key(self.region, self.dest),
                mapping={str(s): i for s, i in confirmed.items()},
            )
            pipe.publish(
                confirmed_channel(self.region),
                json.dumps({"dest": self.dest, "slots": {str(s): i for s, i in confirmed.items()}}),
            )
            await pipe.execute()

    async def _heal_gaps(self, slots: list[int]) -> None:
        """Slots whose log was trimmed past the resume point: copy the checkpoint."""
        async with self.client.pipeline(transaction=False) as pipe:
            for s in slots:
                pipe.xinfo_stream(log_key(self.region, s))
            infos = await pipe.execute(raise_on_error=False)
        for s, info in zip(slots, infos, strict=True):
            if isinstance(info, Exception):
                continue  # no log yet for this slot
            removed = int(info.get("entries-added", 0)) - int(info.get("length", 0))
            if removed <= 0:
                continue
            first = info.get("first-entry")
            first_id = _text(first[0]) if first else _text(info["last-generated-id"])
            if parse_id(first_id) <= parse_id(self.position[s]):
                continue  # the resume point is still in the log
            # Entries below the log's first were trimmed and some may be newer than the
            # resume point (conservatively: a resync is idempotent, just more bytes).
            cp = await self.local.read_checkpoint(s)
            if cp is None or parse_id(cp.covers_id) <= parse_id(self.position[s]):
                continue
            self.gaps_total += 1
            log.warning(
                "link %s→%s: slot %d was trimmed past %s; resyncing from its checkpoint at %s",
                self.region,
                self.dest,
                s,
                self.position[s],
                cp.covers_id,
            )
            await self.remote.mirror_append(s, self.region, cp.covers_id, cp.data)
            self.position[s] = cp.covers_id
            await self._announce({s: cp.covers_id})


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
