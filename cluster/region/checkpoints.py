"""Checkpoints of owned slots in the region's Redis, and the log trims behind them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisError

from cluster.apply import slot_state
from cluster.chain import parse_id, trim_bound
from cluster.checkpoint import (
    encode_checkpoint,
    tombstone_events,
)
from cluster.link import confirmed_key
from cluster.region.snapshots import Snapshots
from cluster.slotlog import FencedError
from relay.codec import DEFAULT_MAX_EVENTS

log = logging.getLogger(__name__)


class Checkpoints(Snapshots):
    """Checkpoints of owned slots and the trims behind them."""

    def _checkpoint_data(self, slot: int, events: list[Any]) -> tuple[bytes, dict[str, str]]:
        """The checkpoint of ``slot``: ``events`` (its pending messages), its recent acks
        as tombstones and the clock now; and the mirror positions it covers."""
        positions = self.positions.mirrors_of(slot)
        room = DEFAULT_MAX_EVENTS - len(events)
        # Only the newest ``room``: copying the whole window (a long-running node holds
        # millions) for every changed slot was the cost of a checkpoint round.
        acks = tombstone_events(self.acks.newest(slot, room), self.region, limit=room)
        hlc = self.node.clock.tick(self.wall_ms())
        data = encode_checkpoint(
            [*acks, *events], {o: {slot: i} for o, i in positions.items()}, hlc=hlc
        )
        return data, positions

    async def _checkpoint_loop(self) -> None:
        interval = self.config.cluster.checkpoint_interval_s
        due = self.clock() + interval
        while not self.stopped:
            # A fixed cadence: the time a round of checkpoints takes does not lengthen
            # the period (the slot logs are trimmed only at checkpoints).
            await self.sleep(max(0.0, due - self.clock()))  # the checkpoint period
            due = max(due + interval, self.clock())
            slots = [s for s in sorted(self.dirty) if s not in self.releasing]
            try:
                floors = await self._link_floors(slots)
            except (RedisError, OSError) as e:
                log.warning("reading the links' positions failed: %s", e)
                floors = {}  # each checkpoint reads its slot's, or does not trim
            for slot in slots:
                if slot not in self.releasing:  # a hand-over checkpoints it itself
                    await self._checkpoint(slot, floors.get(slot))

    async def _link_floors(self, slots: list[int]) -> dict[int, list[str]]:
        """Per slot, the position each link out of this region has confirmed ("0-0"
        where it has confirmed nothing): the slot log is kept after them."""
        if not slots or not self.links:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for link in self.links:
                pipe.hmget(confirmed_key(self.region, link.dest), [str(s) for s in slots])
            rows = await pipe.execute()
        return {
            slot: [row[i].decode() if row[i] is not None else "0-0" for row in rows]
            for i, slot in enumerate(slots)
        }

    async def _trim_bound(self, slot: int, covers: str, floors: list[str] | None) -> str | None:
        """Where ``slot``'s log may be trimmed: behind the checkpoint and behind every
        link, unless the oldest entry a link still needs is older than
        ``cluster.link_max_backlog_s``: that link is then declared gapped for the slot
        (it resyncs it from the checkpoint) rather than pinning the log for ever.
        None: the links' positions are unknown (not read), so nothing is trimmed."""
        if not self.links:
            return covers
        if floors is None:
            return None
        links: list[tuple[str, str | None]] = []
        for floor in floors:
            oldest = None
            if parse_id(floor) < parse_id(covers):
                oldest = await self.slotlog.first_after(slot, floor)
            links.append((floor, oldest))
        max_backlog_s = self.config.cluster.link_max_backlog_s
        bound = trim_bound(
            covers=covers, links=links, now_ms=self.wall_ms(), max_backlog_ms=max_backlog_s * 1000
        )
        if bound.gapped:
            self.counters["backlog_trims"] += 1
            log.warning(
                "slot %d: a link is more than %.0f s behind; trimming past it, it will "
                "resync the slot from its checkpoint",
                slot,
                max_backlog_s,
            )
        return bound.before_id

    async def _checkpoint(self, slot: int, floors: list[str] | None = None) -> None:
        """Write ``slot``'s state as its checkpoint, then trim the log behind it and
        behind every link (``floors``: each link's confirmed position, read when not
        given) and our mirrors of other regions behind what it covers. One checkpoint
        of a slot at a time, so what one writes never goes back behind another's."""
        lock = self._checkpoint_locks.get(slot)
        if lock is None:
            lock = self._checkpoint_locks[slot] = asyncio.Lock()
        async with lock:
            await self._checkpoint_now(slot, floors)

    async def _checkpoint_now(self, slot: int, floors: list[str] | None) -> None:
        epoch = self.owned.get(slot)
        covers = self.applied.get(slot)
        if epoch is None or covers is None:
            return
        self.dirty.discard(slot)
        try:
            events = slot_state(self.node, sorted(self.slot_channels.get(slot, ())), self.wall_ms())
            data, positions = self._checkpoint_data(slot, events)
            if covers == "0-0" and not positions:
                return  # nothing logged or mirrored yet: nothing to cover
            await self.slotlog.write_checkpoint(slot, self.me, epoch, data, covers)
            self.counters["checkpoints"] += 1
            if covers != "0-0":
                if floors is None and self.links:
                    floors = (await self._link_floors([slot])).get(slot)
                bound = await self._trim_bound(slot, covers, floors)
                if bound is not None:
                    await self.slotlog.trim(slot, bound)
            for origin, position in positions.items():
                await self.slotlog.trim_mirror(slot, origin, position)
        except FencedError:
            self._lose(slot)
        except Exception as e:
            log.warning("checkpoint of slot %d failed: %s", slot, e)
            self.dirty.add(slot)
