"""Reading the region's logs: catch-ups, the replica tail loop and the mirror loops.

Every read goes on from this node's position in the slot's log (or mirror) and checks
the chain (an entry's ``prev`` is our position); a hole means a trim under us, and the
slot is rebuilt from its checkpoint.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from cluster.apply import apply_events
from cluster.chain import parse_id
from cluster.checkpoint import (
    decode_checkpoint,
    superseded,
)
from cluster.errors import ClusterError
from cluster.region.state import CATCH_UP_ATTEMPTS, CATCH_UP_COUNT, TAIL_BLOCK_MS, RegionState
from cluster.regioncore import LogRead
from cluster.slotlog import TailEntry
from relay.codec import AckEvent, CodecError, MessageEvent
from relay.dedupe import dedupe_key
from relay.store import Message

log = logging.getLogger(__name__)


class Reading(RegionState):
    """Catch-ups and the read loops of slot logs (replicas) and mirrors (other regions)."""

    async def _catch_up(self, slot: int, *, fresh: bool = False) -> None:
        """Bring ``slot`` up to the end of its log and of every mirror of it; ``fresh``:
        first forget what RAM holds of it (a replica that missed entries), unless a
        claim took it meanwhile. One catch-up of a slot at a time (the tail loop leaves
        a slot alone while one runs)."""
        async with self._slot_lock(slot):
            if fresh:
                if slot in self.owned or slot in self.claiming:
                    return
                self._forget_slot(slot)
            for _ in range(CATCH_UP_ATTEMPTS):
                if await self._catch_up_once(slot):
                    return
                # Entries were trimmed under us (a newer checkpoint): start from that one.
                log.info("slot %d: the log was trimmed past our position; rebuilding", slot)
                self._forget_slot(slot)
        raise ClusterError(f"slot {slot}: its log keeps being trimmed under the catch-up")

    async def _catch_up_once(self, slot: int) -> bool:
        """:meth:`_catch_up`; False when it found entries missing (trimmed under it)."""
        now = self.wall_ms()
        cp = await self.slotlog.read_checkpoint(slot)
        known = self.positions.at(slot)
        if known is not None and cp is not None and parse_id(cp.covers_id) > parse_id(known):
            # The log may be trimmed past where we are: rebuild from the checkpoint.
            self._forget_slot(slot)
            known = None
        if known is None:
            if cp is not None:
                self._apply(slot, cp.data, now)
            self.positions.start(slot, cp.covers_id if cp is not None else None)
        # The log, then every mirror of the slot: each read on to its end, chain checked.
        for origin in ("", *self.peers):
            if not await self._read_to_end(slot, now, origin):
                # Trimmed past where this state stands (a newer checkpoint covers it).
                self.counters["mirror_gaps" if origin else "log_gaps"] += 1
                return False
        return True

    async def _read_to_end(self, slot: int, now_ms: int, origin: str) -> bool:
        """Apply ``slot``'s log (``origin`` empty) or our mirror of ``origin``'s, from our
        position to its end; False at a hole in the chain (nothing past it applied)."""
        while True:
            after = self.positions.at(slot, origin)
            assert after is not None  # the catch-up started the slot's state
            entries = await self.slotlog.read(slot, after, CATCH_UP_COUNT, origin=origin)
            if not entries:
                return True
            # The core checks the chain and moves our position; we apply what it says.
            read = [TailEntry(slot, e.id, e.data, e.prev) for e in entries]
            ready = self.core.step(LogRead(origin, read))
            for t, _ in ready.applies:
                self._apply(slot, t.data, now_ms, origin=origin)
            if ready.catch_ups:
                return False

    def _apply(self, slot: int, data: bytes, now_ms: int, *, origin: str = "") -> list[Message]:
        """Apply a log entry, mirror entry or checkpoint; return the messages it added.

        ``origin``: the entry came from the mirror of that region's log. A checkpoint
        there is a resync (the link found entries trimmed under it): its mirror
        positions are the origin's, not ours, and it proves which of the origin's
        messages are gone there (``superseded``)."""
        try:
            cp = decode_checkpoint(data)
        except CodecError as e:
            log.error("slot %d: undecodable entry skipped: %s", slot, e)
            return []
        if not origin:
            self.positions.merge_mirrors(slot, cp.mirrors)
        events = cp.events
        if cp.is_checkpoint:
            if cp.hlc:
                self.node.clock.observe(cp.hlc)
            # A checkpoint is a state from the past: what was acked here since must not
            # come back with it. The dedupe index forgets an id a window after the message
            # was accepted; the slot's tombstones last a window from the ack.
            gone = self.acks.gone(slot)
            # Tombstones older than the dedupe window dedupe nothing, and one could name
            # a message published again with the same id since: not applied (a sealed
            # run of them may carry up to 500 such; the snapshot loader drops them too).
            cutoff = (now_ms - self.node.dedupe.window_ms) << 16
            events = [
                e
                for e in events
                if not (isinstance(e, MessageEvent) and (e.ch, e.id) in gone)
                and not (isinstance(e, AckEvent) and e.hlc < cutoff)
            ]
        else:
            gone = set()
        added = apply_events(self.node, events, now_ms)
        for m in added:
            self.slot_channels.setdefault(slot, set()).add(m.ch)
        for ev in events:
            if isinstance(ev, AckEvent):
                new = [i for i in ev.ids if (ev.ch, i) not in gone]
                if new:
                    self._tombstone(slot, ev.ch, new, ev.hlc)
        if origin and cp.is_checkpoint:
            held = [
                (m.ch, m.id, m.origin, m.hlc)
                for ch in sorted(self.slot_channels.get(slot, ()))
                for m in self.node.store.pending(ch, now_ms)
            ]
            for ch, msg_id in superseded(cp, origin, held):
                for m in self.node.store.ack(ch, [msg_id]):
                    self.node.dedupe.remember(dedupe_key(ch, msg_id), m.hlc, now_ms)
                    # Gone there by the checkpoint's time: a tombstone from then on.
                    self._tombstone(slot, ch, [msg_id], cp.hlc)
        return added

    def _forget_slot(self, slot: int) -> None:
        """Drop what RAM holds of ``slot``: its pending messages and log positions.

        The peers' interest in its channels is dropped only if the ring gives the slot
        to another node: peers register with the ring's owner, so while the ring still
        names us (an owner record taken by a node whose view was behind, then given
        back) they do not register again, and deliveries must reach them once we own
        the slot again."""
        self.positions.forget(slot)
        channels = self.slot_channels.pop(slot, ())
        for ch in channels:
            ids = [m.id for m in self.node.store.pending(ch, 0)]
            if ids:
                self.node.store.ack(ch, ids)
        if self.ring is None or self.ring.owner(slot) != self.me:
            self.subs.drop_channels(channels)

    def _restart_tail(self) -> None:
        # The readers are loops of the node's task group, restarted on the newest ring.
        self.tasks.stop_loop("tail")
        self._tail_task = None
        if self.replicated and not self.stopped:
            self._tail_task = self.tasks.start("tail", self._tail_loop(sorted(self.replicated)))
        for origin in self._mirror_tasks:
            self.tasks.stop_loop(f"mirror-{origin}")
        self._mirror_tasks = {}
        slots = (
            sorted(set(self.ring.slots_of(self.me)) | self.replicated)
            if (self.ring is not None and self.me in self.ring.nodes)
            else []
        )
        if slots and not self.stopped:
            for origin in self.peers:
                self._mirror_tasks[origin] = self.tasks.start(
                    f"mirror-{origin}", self._mirror_loop(origin, slots)
                )

    async def _tail(self, after: dict[int, str], origin: str = "") -> list[TailEntry] | None:
        """The one blocking read of the replica tail and the mirror loops: entries of the
        slots' logs (``origin`` empty) or of our mirrors of ``origin``'s, after the
        positions in ``after``. None after a failure (backed off already): read again."""
        try:
            return await self.slotlog.tail(after, TAIL_BLOCK_MS, origin=origin)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self.stopped:  # else our own clients closed under the read
                what = f"mirrors of {origin}" if origin else "slot logs"
                log.warning("tailing %s failed: %s", what, e)
                await self.sleep(0.5)  # back off before retrying Redis
            return None

    async def _mirror_loop(self, origin: str, slots: list[int]) -> None:
        """Apply what the link from ``origin`` copies into our mirrors of its logs.

        Only slots whose state is loaded (owned, or a replica caught up) are read, each
        from exactly where that state stands, and the chain is checked: a mirror entry
        whose ``p`` is not our position means entries were trimmed under us, and the
        slot is rebuilt from its checkpoint, never read on past the hole."""
        done = self.mirror_applied[origin]
        while not self.stopped:
            after = {
                s: done.get(s, "0-0")
                for s in slots
                if s in self.applied and not self._slot_lock(s).locked()
            }
            if not after:
                await self.sleep(0.1)  # the slots are being (re)built: look again soon
                continue
            entries = await self._tail(after, origin)
            if entries is None:
                continue
            now = self.wall_ms()
            # Slots rebuilt or caught up while we waited are read again next time.
            stale = {
                s
                for s in after
                if done.get(s, "0-0") != after[s]
                or s not in self.applied
                or self._slot_lock(s).locked()
            }
            # The core checks the chain from our positions and moves them on.
            ready = self.core.step(LogRead(origin, entries, frozenset(stale), deliver=True))
            for t, owned in ready.applies:
                added = self._apply(t.slot, t.data, now, origin=origin)
                if owned:
                    self._changed(t.slot)
                    for m in added:
                        self._deliver(m)
            gapped = sorted([*ready.catch_ups, *(s for s, _ in ready.resyncs)])
            missing = dict(ready.resyncs)
            for s in gapped:
                self.counters["mirror_gaps"] += 1
                log.warning(
                    "slot %d: the mirror of %s was trimmed past %s; rebuilding",
                    s,
                    origin,
                    after[s],
                )
                try:
                    if s in missing:
                        await self._mirror_gap_owned(s, origin, missing[s])
                    else:
                        await self._catch_up(s, fresh=True)
                except (RedisError, OSError, ClusterError, CodecError) as e:
                    log.warning("rebuilding slot %d failed: %s", s, e)
            if gapped:
                await self.sleep(0.2)  # a hole no checkpoint covers yet: do not spin

    async def _mirror_gap_owned(self, slot: int, origin: str, missing: str) -> None:
        """An owned slot's mirror of ``origin`` was trimmed past our position (only a
        checkpoint of this slot trims it): merge that checkpoint, which covers the hole.
        Its acks since are remembered here, so merging brings back nothing acked."""
        async with self._slot_lock(slot):
            cp = await self.slotlog.read_checkpoint(slot)
            if cp is None:
                return
            covered = decode_checkpoint(cp.data).mirrors.get(origin, {}).get(slot, "0-0")
            if parse_id(covered) < parse_id(missing):
                log.error("slot %d: no checkpoint covers the mirror of %s yet", slot, origin)
                return
            self._apply(slot, cp.data, self.wall_ms())
            self._changed(slot, rebuilt=True)

    async def _tail_loop(self, slots: list[int]) -> None:
        for s in slots:
            if s not in self.applied:
                try:
                    await self._catch_up(s)
                except (RedisError, OSError, ClusterError) as e:
                    log.warning("replica catch-up of slot %d failed: %s", s, e)
        while not self.stopped:
            after = {
                s: self.applied.get(s, "0-0")
                for s in slots
                if s not in self.owned and s not in self.claiming
            }
            if not after:
                if any(s not in self.owned for s in slots):
                    await self.sleep(0.1)  # slots being claimed: look again soon
                    continue
                return
            entries = await self._tail(after)
            if entries is None:
                continue
            now = self.wall_ms()
            # Owned slots and slots being rebuilt are left alone; the core checks the
            # chain, skips what a catch-up applied meanwhile and names the gaps: entries
            # between our position and the next were trimmed (the owner checkpointed
            # while we lagged), so the slot is rebuilt from its checkpoint.
            skip = frozenset(
                t.slot for t in entries if t.slot in self.owned or self._slot_lock(t.slot).locked()
            )
            ready = self.core.step(LogRead("", entries, skip))
            for t, _ in ready.applies:
                self._apply(t.slot, t.data, now)
            self.counters["log_gaps"] += len(ready.catch_ups)
            for s in ready.catch_ups:
                try:
                    await self._catch_up(s, fresh=True)
                except (RedisError, OSError, ClusterError) as e:
                    log.warning("replica catch-up of slot %d failed: %s", s, e)
