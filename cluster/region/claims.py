"""Moving slots: claims, hand-overs and losses, as the ring of live members says.

Every change of a slot's ownership goes through :class:`cluster.slots.SlotTable`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisError

from cluster.chain import parse_id
from cluster.errors import ClusterError
from cluster.ownership import HandedOver, Rebalance, ReleaseEnded
from cluster.region.checkpoints import Checkpoints
from cluster.region.state import DRAIN_TIMEOUT_S
from cluster.regioncore import ClaimFenced, ReleaseWait
from cluster.slotlog import FencedError
from cluster.slots import SlotEvent

log = logging.getLogger(__name__)


class Claims(Checkpoints):
    """Rebalances, claims, hand-overs and losses of slots."""

    def _live(self) -> dict[str, float]:
        """The live members and their lease weights, as the failure detector sees them."""
        return {
            n: self.members[n].weight if n in self.members else 1.0 for n in self.detector.live()
        }

    async def _rebalance(self) -> None:
        # One at a time, each on the newest membership (a burst of joins runs it twice).
        # The claims it starts run outside the lock: a claim may wait for another node
        # to hand its slot over, and that node may be waiting for one of ours.
        if not self.members_known:
            return  # starting: start() runs the first once it has seen every lease
        async with self._rebalancing:
            claims = await self._rebalance_now()
        if claims:
            await asyncio.gather(*claims, return_exceptions=True)

    def _start_claim(self, slot: int) -> asyncio.Task[Any]:
        self.slot_table.fire(slot, SlotEvent.CLAIM)
        task = self._claim_tasks[slot] = self._spawn(self._claim(slot))
        return task

    async def _rebalance_now(self) -> list[asyncio.Task[Any]]:
        """Step the core with the live members (cluster/ownership.py) and carry its
        Ready out: hand over what the ring moved, record the replicas, then claim."""
        ready = self.core.step(Rebalance(self._live(), self.ring_state)).own
        if self.ring is None or self.draining:
            return []
        await self._release(list(ready.releases))
        if ready.replicas is not None:
            self.slot_table.set_replicas(ready.replicas)
        self._drop_foreign_snapshots()
        self._restart_tail()
        # Re-register subscriptions whose owner moved.
        for ch in self.subs.moved(self.owner_of):
            self._spawn(self._resubscribe(ch))
        # Peers' interest in channels the ring no longer gives us: they register with
        # the new owner (a slot lost while the ring still named us kept it).
        self.subs.drop_channels([ch for ch in self.interest if self.owner_of(ch) != self.me])
        # Claims under way count too: whoever asked for a rebalance (start, a rejoin)
        # waits until this node serves what the ring gives it.
        ready = self.core.step(HandedOver()).own
        return [self._start_claim(s) for s in ready.claims] + [
            self._claim_tasks[s] for s in ready.joins if s in self._claim_tasks
        ]

    async def _claim(self, slot: int) -> None:
        """Take ``slot`` over: fence the old owner, read the log to its end, serve."""
        self.slot_table.fire(slot, SlotEvent.CLAIM)
        try:
            await self._await_release(slot)
            async with self._claims:
                await self._claim_now(slot)
        except Exception:
            log.exception("claiming slot %d failed", slot)
        finally:
            self.slot_table.fire(slot, SlotEvent.CLAIM_ENDED)
            self._claim_tasks.pop(slot, None)

    async def _await_release(self, slot: int) -> None:
        """Give ``slot``'s old owner time to hand it over (flush, checkpoint, release:
        :meth:`_release`) before fencing it; how long, and whom to fence at once, the
        core decides (``ReleaseWait``). This reads the owner record and waits."""
        since = self.clock()
        ev = ReleaseWait(slot, since, since)
        while not self.stopped:
            step = self.core.step(ev).claim
            if step is None or step.fence:
                return
            if not step.read:
                await self.sleep(step.wait_s)  # the owner is flushing the slot
                ev = ReleaseWait(slot, since, self.clock())
                continue
            holder: str | None = None
            try:
                async with self._handovers:
                    current = await self.slotlog.get_owner(slot)
            except (RedisError, OSError) as e:
                log.warning("reading slot %d's owner failed: %s", slot, e)
            else:
                holder = current.node_id if current is not None else ""
            live = holder in self.detector.live() if holder else False
            ev = ReleaseWait(slot, since, self.clock(), read=True, holder=holder, live=live)

    async def _claim_now(self, slot: int) -> None:
        try:
            attempts = 0
            while True:
                if not self._should_own(slot):
                    return  # the ring moved on while we waited
                current = await self.slotlog.get_owner(slot)
                seen = current.epoch if current is not None else 0
                if current is not None and current.node_id == self.me and slot in self.owned:
                    return
                try:
                    epoch = await self.slotlog.claim(slot, self.me, seen)
                    break
                except FencedError:
                    attempts += 1
                    if self.core.step(ClaimFenced(slot, attempts)).claim is None:
                        log.warning("could not claim slot %d", slot)
                        return
            await self._catch_up(slot)
            rebased = await self._rebase_if_the_log_lost_its_end(slot)
            if self._should_own(slot):
                self.slot_table.fire(slot, SlotEvent.CLAIM)  # called alone too (tests)
                self.slot_table.fire(slot, SlotEvent.CLAIMED, epoch=epoch)
                self._changed(slot, rebuilt=True)
                if rebased:
                    # What we hold, as the slot's state, for whoever reads the log next.
                    await self._checkpoint(slot)
            else:
                # The ring moved on while we read the log: let the next owner have it now
                # rather than after waiting for us.
                await self.slotlog.release(slot, self.me, epoch)
        except (RedisError, OSError, ClusterError) as e:
            log.warning("claiming slot %d failed: %s", slot, e)

    async def _rebase_if_the_log_lost_its_end(self, slot: int) -> bool:
        """If the region's Redis no longer holds our position in ``slot``'s log (it came
        back empty, or from an older backup, and we hold the slot from our snapshot),
        go on from where its log ends instead: our appends chain from there (the append
        script links each entry to the log's newest), and the checkpoint the claim then
        writes carries what we hold to the replicas and the next owner. Else every
        reader would find a hole at our first entry, and the slot would stay
        unavailable once we lost it. True if rebased."""
        at = self.applied.get(slot, "0-0")
        if at == "0-0":
            return False
        end = await self.slotlog.last_id(slot) or "0-0"
        if parse_id(end) >= parse_id(at):
            return False
        log.warning(
            "slot %d: the region's Redis lost its log past %s (it ends at %s); serving "
            "what this node holds (its snapshot) and checkpointing it",
            slot,
            at,
            end,
        )
        self.applied[slot] = end
        return True

    async def _release(self, slots: list[int]) -> None:
        """Hand ``slots`` over on purpose (the ring moved them): stop serving them, append
        what is batched for them, write their checkpoints and release their owner
        records, so that their new owners, waiting for that, start from all of it."""
        if not slots:
            return
        for s in slots:
            if s in self.owned:
                self.slot_table.fire(s, SlotEvent.RELEASE)
        try:
            deadline = self.clock() + DRAIN_TIMEOUT_S
            await self._flush(force=True)
            while any(self.batcher.busy(s) for s in slots) and self.clock() < deadline:
                await self.sleep(0.01)  # appends of these slots under way
                await self._flush(force=True)
            results = await asyncio.gather(
                *(self._hand_over(s) for s in slots if s in self.owned), return_exceptions=True
            )
            for r in results:
                if isinstance(r, Exception):
                    log.warning("handing a slot over failed: %s", r)
        finally:
            for s in slots:
                self.slot_table.fire(s, SlotEvent.RELEASE_ENDED)
            for s in self.core.step(ReleaseEnded(tuple(slots))).own.losses:
                self._lose(s)

    async def _hand_over(self, slot: int) -> None:
        async with self._handovers:
            epoch = self.owned.get(slot)
            if epoch is None:
                return  # fenced or lost meanwhile
            if slot in self.dirty:
                await self._checkpoint(slot)
            await self.slotlog.release(slot, self.me, epoch)

    def _lose(self, slot: int) -> None:
        """Stop serving ``slot``. Its events still batched are failed (or kept for our
        claim, when the ring gives the slot back to us); its in-RAM state is dropped, to
        be rebuilt from checkpoint and log if it comes back."""
        self.slot_table.fire(slot, SlotEvent.LOSE)
        self.core.persist.lose(slot)
        for e in self.batcher.take(slot):
            self._not_appended(e, "the slot was lost")
        if slot not in self.replicated:
            self._forget_slot(slot)
