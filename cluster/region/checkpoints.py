"""Checkpoints of owned slots in the region's Redis, and the log trims behind them: the
I/O; which slots are due and what to trim the region core decides (cluster/persist.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisError

from cluster.apply import slot_state
from cluster.chain import parse_id
from cluster.checkpoint import (
    encode_checkpoint,
    tombstone_events,
)
from cluster.link import confirmed_key
from cluster.region.snapshots import Snapshots
from cluster.regioncore import CheckpointDue, CheckpointFailed, CheckpointStart, CheckpointWritten
from cluster.slotlog import FencedError
from relay.codec import DEFAULT_MAX_EVENTS
from relay.snapshot import Sealed

log = logging.getLogger(__name__)


class Checkpoints(Snapshots):
    """Checkpoints of owned slots and the trims behind them."""

    def _checkpoint_data(self, slot: int, events: list[Any]) -> tuple[bytes, dict[str, str]]:
        """The checkpoint of ``slot``: ``events`` (its pending messages), its recent acks
        as tombstones and the clock now; and the mirror positions it covers."""
        positions = self.positions.mirrors_of(slot)
        room = DEFAULT_MAX_EVENTS - len(events)
        if self.config.cluster.checkpoint_version >= 3:
            batches, fresh = self._checkpoint_tombstones(slot, room)
        else:  # version 2: the window's newest, all encoded afresh (for earlier builds)
            batches, fresh = [], self.acks.newest(slot, room)
        acks = tombstone_events(fresh, self.region, limit=len(fresh))
        hlc = self.node.clock.tick(self.wall_ms())
        data = encode_checkpoint(
            [*acks, *events],
            {o: {slot: i} for o, i in positions.items()},
            hlc=hlc,
            batches=batches,
        )
        return data, positions

    def _checkpoint_tombstones(
        self, slot: int, room: int
    ) -> tuple[list[bytes], list[tuple[str, str, int]]]:
        """The newest of ``slot``'s tombstones, at most ``room``: the older ones as the
        batches sealed for the snapshots (:class:`relay.snapshot.SealedTombstones`,
        encoded once and reused; whole runs of 500 are sealed here too), the rest to
        encode afresh. Re-encoding the dedupe window (10 minutes of acks: thousands per
        slot when busy) for every changed slot every round was the cost of a busy node's
        checkpoints, growing with its uptime."""
        if room <= 0:
            return [], []
        sealed = self.sealed_tombstones
        start, runs = sealed.runs(slot, self.acks.first(slot))
        new, rest = sealed.to_seal(start, self.acks.since(slot, start), self.region)
        for run in new:
            sealed.seal(slot, run)
        rest = list(rest)[-room:]
        left = room - len(rest)
        kept: list[Sealed] = []
        for run in reversed([*runs, *new]):  # the newest whole runs that fit
            if run.end - run.start > left:
                break
            kept.append(run)
            left -= run.end - run.start
        return [b for run in reversed(kept) for b in run.batches], rest

    async def _checkpoint_loop(self) -> None:
        while not self.stopped:
            # The core keeps the cadence and says which slots are due (cluster/persist.py).
            ready = self.core.step(CheckpointDue(self.clock()))
            slots = ready.checkpoints
            if slots:
                try:
                    floors = await self._link_floors(list(slots))
                except (RedisError, OSError) as e:
                    log.warning("reading the links' positions failed: %s", e)
                    floors = {}  # each checkpoint reads its slot's, or does not trim
                for slot in slots:
                    if slot not in self.releasing:  # a hand-over checkpoints it itself
                        await self._checkpoint(slot, floors.get(slot))
            await self.sleep(max(0.0, ready.due_at - self.clock()))  # the checkpoint period

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

    async def _link_positions(
        self, slot: int, covers: str, floors: list[str] | None
    ) -> list[tuple[str, str | None]] | None:
        """Per link, its confirmed position for ``slot`` (``floors``, read when not
        given) and the first log entry after it where that is behind ``covers`` (what
        the core weighs against ``cluster.link_max_backlog_s``). None: not known."""
        if not self.links:
            return []
        if floors is None:
            floors = (await self._link_floors([slot])).get(slot)
            if floors is None:
                return None
        links: list[tuple[str, str | None]] = []
        for floor in floors:
            oldest = None
            if parse_id(floor) < parse_id(covers):
                oldest = await self.slotlog.first_after(slot, floor)
            links.append((floor, oldest))
        return links

    async def _checkpoint(self, slot: int, floors: list[str] | None = None) -> None:
        """Write ``slot``'s state as its checkpoint, then carry out the trims the core
        decides: the log behind it and behind every link (``floors``: each link's
        confirmed position, read when not given) and our mirrors of other regions behind
        what it covers. One checkpoint of a slot at a time, so what one writes never
        goes back behind another's."""
        lock = self._checkpoint_locks.get(slot)
        if lock is None:
            lock = self._checkpoint_locks[slot] = asyncio.Lock()
        async with lock:
            await self._checkpoint_now(slot, floors)

    async def _checkpoint_now(self, slot: int, floors: list[str] | None) -> None:
        if not self.core.step(CheckpointStart(slot, self.clock())).checkpoints:
            return  # not owned, or no position to cover
        epoch, covers = self.owned[slot], self.applied[slot]
        try:
            events = slot_state(self.node, sorted(self.slot_channels.get(slot, ())), self.wall_ms())
            data, positions = self._checkpoint_data(slot, events)
            if covers == "0-0" and not positions and not events:
                return  # nothing logged, mirrored or held yet: nothing to cover
            await self.slotlog.write_checkpoint(slot, self.me, epoch, data, covers)
            self.counters["checkpoints"] += 1
            links = await self._link_positions(slot, covers, floors) if covers != "0-0" else None
            written = CheckpointWritten(slot, covers, positions, links, self.wall_ms())
            for trim in self.core.step(written).trims:
                if trim.gapped:
                    self.counters["backlog_trims"] += 1
                    log.warning(
                        "slot %d: a link is more than %.0f s behind; trimming past it, it "
                        "will resync the slot from its checkpoint",
                        slot,
                        self.config.cluster.link_max_backlog_s,
                    )
                if trim.log_before is not None:
                    await self.slotlog.trim(slot, trim.log_before)
                for origin, position in trim.mirrors:
                    await self.slotlog.trim_mirror(slot, origin, position)
        except FencedError:
            self._lose(slot)
        except Exception as e:
            log.warning("checkpoint of slot %d failed: %s", slot, e)
            self.core.step(CheckpointFailed(slot))
