"""Following the region's membership: leases through the failure detector, the ring
state, the periodic tick and audit, peers coming and going on the mesh."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from redis.exceptions import RedisError

from cluster.failure import (
    LeaseExpired,
    LeaseRenewed,
    PingAnswered,
    Tick,
)
from cluster.failure import Left as DetectorLeft
from cluster.keys import owner_key
from cluster.membership import Expired, Joined, Left, Member, MembershipEvent
from cluster.ownership import AuditDue, LeaseLost, OwnerRecords
from cluster.ownership import Members as CoreMembers
from cluster.ownership import Tick as CoreTick
from cluster.region.claims import Claims
from cluster.ringstore import read_state

log = logging.getLogger(__name__)


class Members(Claims):
    """Membership, ring state, the tick, the audit, mesh peers up and down."""

    def on_membership(self, event: MembershipEvent) -> None:
        now = self.clock()
        effects: list[Any] = []
        if isinstance(event, Joined):
            self.members[event.member.node_id] = event.member
            effects = self.detector.observe(
                LeaseRenewed(event.member.node_id, event.member.epoch, now)
            )
        elif isinstance(event, Left):
            effects = self.detector.observe(DetectorLeft(event.node_id, event.epoch))
        elif isinstance(event, Expired):
            effects = self.detector.observe(LeaseExpired(event.node_id, now))
        self._effects(effects)

    def _observe_member(self, m: Member) -> None:
        self.members[m.node_id] = m
        self._effects(self.detector.observe(LeaseRenewed(m.node_id, m.epoch, self.clock())))

    def _effects(self, effects: list[Any]) -> None:
        """Carry out what the core makes of the detector's effects (cluster/ownership.py)."""
        if not effects:
            return
        ready = self.core.step(CoreMembers(tuple(effects))).own
        if self.mesh is not None:
            for node_id, up in ready.peers:
                m = self.members.get(node_id)
                if not up:
                    self.mesh.forget(node_id)
                elif m is not None:
                    self.mesh.want(node_id, m.mesh)
        self.counters["failovers"] += ready.failovers
        if ready.rebalance and not self.stopped:
            self._spawn(self._rebalance())

    def on_resync(
        self, members: dict[str, Member], since: dict[str, int | None] | None = None
    ) -> None:
        """Membership reconnected to Redis (events may have been missed): reconcile with
        the leases held now. ``since``: each peer's incarnation when the leases were
        read; a peer whose incarnation changed since is not expired (it joined after the
        read passed its key, and its join reached us first)."""
        now = self.clock()
        effects: list[Any] = []
        for m in members.values():
            self.members[m.node_id] = m
            effects += self.detector.observe(LeaseRenewed(m.node_id, m.epoch, now))
        for node_id in self.detector.live() - set(members) - {self.me}:
            if since is None or self.detector.epoch(node_id) == since.get(node_id):
                effects += self.detector.observe(LeaseExpired(node_id, now))
        self._effects(effects)

    def on_ring(self, version: int) -> None:
        """Ops changed the ring state (a planned change): re-read it."""
        if version != self.ring_state.version and not self.stopped:
            self._spawn(self._refresh_ring_state())

    async def _refresh_ring_state(self) -> bool:
        """Re-read the ring state; True (and a rebalance under way) if it changed."""
        async with self._ring_reads:
            state = await read_state(self.client, self.region)
            if state == self.ring_state:
                return False
            self.ring_state = state
        if not self.stopped:
            self._spawn(self._rebalance())
        return True

    def on_command(self, doc: dict[str, Any]) -> None:
        """An ops command for this node arrived on the region's control channel."""
        if doc.get("cmd") == "drain":
            log.info("drain requested")
            self.on_drain_requested()

    def on_lease_lost(self) -> None:
        # Our lease expired (a long pause?): anything we owned has been given away.
        if self.stopped:
            return
        ready = self.core.step(LeaseLost()).own
        if not ready:
            return  # draining: we are leaving anyway
        log.error("lease lost: dropping every owned slot; rejoin needed")
        for slot in ready.losses:
            self._lose(slot)
        if ready.rejoin:
            self._spawn(self._rejoin())

    def _highest_epoch(self) -> int:
        """The highest epoch this node has seen: its own, its peers' (leases and the
        detector's record of each, dead or alive)."""
        seen = [self.epoch, *(m.epoch for m in self.members.values())]
        seen += [self.detector.epoch(n) or 0 for n in self.members]
        return max(seen)

    async def _rejoin(self) -> None:
        assert self.membership is not None
        backoff = 0.2
        while True:
            try:
                # Above every epoch seen: the region's Redis may have lost its counter
                # (restarted empty), and our peers rejoin too.
                joined = await self.membership.join(
                    floor=self._highest_epoch(), record=self._record_epoch
                )
                self.epoch = joined.epoch
                if self.mesh is not None:
                    self.mesh.epoch = joined.epoch
                await self.membership.stop()
                await self.membership.start()
                # Joins published while we were not subscribed (our peers rejoin too
                # when the region's Redis lost its data) are in the leases held now.
                await self._reconcile_after_rejoin()
                break
            except (RedisError, OSError) as e:
                if self.stopped:
                    return
                log.warning("rejoin failed (%s); retrying in %.1fs", e, backoff)
                await self.sleep(backoff)  # back off before retrying Redis
                backoff = min(5.0, backoff * 2)
        self._observe_member(joined)
        await self._rebalance()

    async def _reconcile_after_rejoin(self) -> None:
        """Read the leases held now; a peer whose lease is not among them expires, unless
        its incarnation changed while they were read: the listener, already running,
        may have seen it join after the read passed its key (it is alive, at a new
        epoch, and nothing would bring it back)."""
        assert self.membership is not None
        before = {n: self.detector.epoch(n) for n in self.members}
        self.on_resync(await self.membership.snapshot(), since=before)

    async def _audit(self) -> None:
        """Make what we serve agree with the owner records and the ring (the core
        decides: cluster/ownership.py, ``OwnerRecords``); the edge reads the records."""
        if self.draining:
            return
        await self._refresh_ring_state()  # a ring event we missed? (then a rebalance runs)
        slots = self.core.step(AuditDue()).own.read_records
        if slots is None:
            return
        records: dict[int, tuple[str, int]] = {}
        if slots:
            pipe = self.client.pipeline(transaction=False)
            for slot in slots:
                pipe.hmget(owner_key(self.region, slot), "owner", "epoch")
            for slot, (owner, epoch) in zip(slots, await pipe.execute(), strict=True):
                records[slot] = ((owner or b"").decode(), int(epoch or 0))
        ready = self.core.step(OwnerRecords(records)).own
        for slot in ready.losses:
            log.warning("slot %d: owner record moved to %r; re-checking", slot, records[slot][0])
            self._lose(slot)
        for slot in ready.claims:
            self._start_claim(slot)

    async def _tick_loop(self) -> None:
        self._answer(self.core.step(CoreTick(self.clock())))  # arms the audit timer
        while not self.stopped:
            await self.sleep(0.5)  # the detector's beat
            try:
                now = self.clock()
                if self.mesh is not None:
                    for peer in list(self.mesh.connections):
                        self._effects(self.detector.observe(PingAnswered(peer, now)))
                self._effects(self.detector.observe(PingAnswered(self.me, now)))
                self._effects(self.detector.observe(Tick(now)))
                # The region core's tick: ack=remote waits expired, the audit when due.
                ready = self.core.step(CoreTick(now))
                self._answer(ready)
                if ready.own.audit:
                    await self._audit()
            except Exception as e:
                log.warning("tick failed: %s", e)

    async def admit_peer(self, peer: str, epoch: int) -> bool:
        """A mesh peer proved the region's secret: admit it only if ``peer`` holds a live
        lease at ``epoch`` (asks Redis when our view has not heard of it yet)."""
        m = self.members.get(peer)
        if m is not None and m.epoch == epoch and peer in self.detector.live():
            return True
        if self.membership is None:
            return False
        try:
            m = (await self.membership.snapshot()).get(peer)
        except (RedisError, OSError) as e:
            log.warning("mesh: cannot check %s's lease: %s", peer, e)
            return False
        return m is not None and m.epoch == epoch

    def on_peer_up(self, peer: str, epoch: int) -> None:
        pass

    def on_peer_down(self, peer: str, reason: str) -> None:
        for ch in self.subs.peer_down(peer):
            self._spawn(self._resubscribe(ch))
        if not self.stopped:
            self._spawn(self._check_lease(peer))

    async def _check_lease(self, peer: str) -> None:
        """A dropped mesh connection: is the peer's lease gone too? (Expiry
        notifications can come late; this asks at once.)"""
        if self.membership is None:
            return
        with contextlib.suppress(RedisError, OSError):
            members = await self.membership.snapshot()
            if peer not in members:
                self._effects(self.detector.observe(LeaseExpired(peer, self.clock())))
