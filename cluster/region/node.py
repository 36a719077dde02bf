"""A node as a member of its region: routes channel ops to slot owners, owns its slots.

Every node runs one :class:`Router`. Client ops on a channel go to the owner of the
channel's slot: this node (its :class:`~relay.node.Node` core) or, over the mesh, another.
For the slots it owns, the router batches what changed into fenced slot-log appends every
``batch_window_ms`` and answers ``ack=log`` publishes once their entry is in Redis. For
the slots it replicates, it tails the owners' logs and applies them, so that when an owner
dies the next node on the ring claims the slot under a new epoch, reads the log to its
end and serves it with every logged message.

Membership comes from leases in Redis (:mod:`cluster.membership`), judged by the pure
failure detector (:mod:`cluster.failure`); the ring (:mod:`cluster.ring`) is computed
from the live members, the same on every node.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from cluster.keys import owner_key
from cluster.membership import Member, Membership
from cluster.mesh import Mesh
from cluster.region.meshserve import MeshServe
from cluster.region.state import DRAIN_TIMEOUT_S
from cluster.ringstore import record_shape
from cluster.slotlog import NotReplicatedError
from cluster.wire import max_frame_for

log = logging.getLogger(__name__)


class Router(MeshServe):
    """This node's part in its region."""

    async def start(self, *, ws: str, admin: str) -> None:
        c, store = self.config.cluster, self.config.store
        self.mesh = Mesh(
            node_id=self.me,
            epoch=0,
            handler=self,
            reactor=self.reactor,
            clock=self.clock,
            # A sub's reply carries the channel's pending messages whole.
            max_frame=max_frame_for(store.channel_max_bytes, store.channel_max_messages),
            secrets=(c.mesh_secret, *c.mesh_accept_secrets),
        )
        port = self.mesh.listen(c.mesh_host, c.mesh_port)
        host = c.advertise_host or c.mesh_host
        me = Member(self.me, 0, f"{host}:{port}", ws, admin, self.weight)
        self.membership = Membership(
            client=self.client,
            region=self.region,
            me=me,
            lease_ttl_ms=c.lease_ttl_ms,
            renew_ms=c.lease_renew_ms,
            on_event=self.on_membership,
            on_lease_lost=self.on_lease_lost,
            on_command=self.on_command,
            on_confirmed=self.on_confirmed,
            on_resync=self.on_resync,
            on_ring=self.on_ring,
        )
        await self._load_snapshots()
        self.ring_state = await record_shape(self.client, self.region, self.slots, self.replicas)
        if (self.ring_state.slots, self.ring_state.replicas) != (self.slots, self.replicas):
            log.error(
                "this node has cluster.slots = %d and cluster.replicas = %d, but region %s "
                "was started with %d and %d: every node of a region must agree",
                self.slots,
                self.replicas,
                self.region,
                self.ring_state.slots,
                self.ring_state.replicas,
            )
        await self.membership.start()
        # Above the epoch of our last run (the region's Redis may have lost its counter).
        joined = await self.membership.join(
            floor=await self._last_epoch(), record=self._record_epoch
        )
        self.epoch = joined.epoch
        self.mesh.epoch = joined.epoch
        await self._release_stale_records()
        for m in (await self.membership.snapshot()).values():
            self._observe_member(m)
        self._observe_member(joined)
        self.members_known = True  # the rebalance below is the first
        # The loops, in the node's one task group (cluster/region/tasks.py).
        self.tasks.start("flush", self._flush_loop())
        self.tasks.start("tick", self._tick_loop())
        self.tasks.start("checkpoints", self._checkpoint_loop())
        self.tasks.start("snapshots", self._snapshot_loop())
        for link in self.links:
            link.start()
        for receiver in self.receivers:
            receiver.start()
        await self._rebalance()

    async def _release_stale_records(self) -> None:
        """A restart: owner records still naming this node are an earlier incarnation's.
        Release them, so the nodes the ring now gives them to need not wait for us."""
        pipe = self.client.pipeline(transaction=False)
        for slot in range(self.slots):
            pipe.hmget(owner_key(self.region, slot), "owner", "epoch")
        for slot, (owner, epoch) in enumerate(await pipe.execute()):
            if owner is not None and owner.decode() == self.me and epoch is not None:
                try:
                    await self.slotlog.release(slot, self.me, int(epoch))
                except NotReplicatedError as e:
                    # Released on the primary, its replicas not confirmed in time (one
                    # resyncing after a failover). A courtesy, not a condition of
                    # joining: should a failover bring the record back, it names an
                    # earlier epoch of ours and is claimed over as any stale owner's is.
                    log.warning("slot %d: releasing our earlier record: %s", slot, e)

    async def stop(self) -> None:
        self.stopped = True
        # Loops, readers and one-off tasks all live in the one group: cancel them all.
        self.tasks.cancel()
        for link in self.links:
            await link.stop()
        for receiver in self.receivers:
            await receiver.stop()
        await self.tasks.stop()
        if self.membership is not None:
            await self.membership.stop()
        if self.mesh is not None:
            await self.mesh.stop()
        await self.slotlog.close()
        await self.client.aclose()

    async def drain(self) -> None:
        """Leave on purpose: flush every owned slot, release the lease, announce it.

        The other nodes take the slots over at once (they read the log to its end), so
        nothing logged is lost and the ring changes without waiting for a timeout.
        """
        if self.draining:
            return
        self.draining = True
        deadline = self.clock() + DRAIN_TIMEOUT_S
        while (
            self.batcher.pending_events or self.batcher.in_flight or self._retry or self._cut
        ) and (self.clock() < deadline):
            await self._flush(force=True)
            if self.batcher.in_flight or self._retry or self._cut:
                await self.sleep(0.05)  # appends under way or to retry
        with contextlib.suppress(Exception):
            await self._snapshot_all()  # the last batch is in the log: save the state
        # Checkpoint and release every slot (draining, each is lost at the end of it):
        # the next owners start from all of it.
        await self._release(list(self.owned))
        if self.membership is not None:
            await self.membership.stop()  # no renewal may re-take the lease
            await self.membership.leave()

    def status(self) -> dict[str, Any]:
        ring = self.ring
        return {
            "epoch": self.epoch,
            "members": {n: s.name.lower() for n, s in self.detector.members().items()},
            "owned_slots": len(self.owned),
            "replica_slots": len(self.replicated),
            "slots_per_node": ring.loads() if ring is not None else {},
            "draining": self.draining,
            "lease_fresh": self.lease_fresh(),
            "batcher": {
                "pending": self.batcher.pending_events,
                "in_flight": self.batcher.in_flight,
            },
            "counters": dict(self.counters),
            "links": [link.status(self.wall_ms()) for link in self.links],
            "receivers": [r.status() for r in self.receivers],
            "snapshots": dict(self.snapshot_stats),
            "data_at_risk": self.data_at_risk(),
            "remote_waiting": sum(len(w) for w in self.remote_waiters.values()),
        }
