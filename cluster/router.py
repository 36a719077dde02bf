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

import asyncio
import contextlib
import gc
import logging
import math
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cluster import meshops
from cluster.apply import apply_events, slot_state
from cluster.chain import parse_id, split_on_gaps, trim_bound
from cluster.checkpoint import (
    decode_checkpoint,
    encode_checkpoint,
    superseded,
    tombstone_events,
)
from cluster.errors import ClusterError
from cluster.failure import (
    DetectorConfig,
    FailureDetector,
    LeaseExpired,
    LeaseRenewed,
    MemberDown,
    MemberUp,
    PingAnswered,
    Tick,
)
from cluster.failure import Left as DetectorLeft
from cluster.keys import owner_key
from cluster.link import Link, confirmed_key
from cluster.membership import Expired, Joined, Left, Member, Membership, MembershipEvent
from cluster.mesh import Mesh, PeerUnavailable, RemoteError
from cluster.rebalance import Placement, RingState, placement
from cluster.receiver import Receiver
from cluster.ring import slot_of
from cluster.ringstore import read_state, record_shape
from cluster.slotlog import FencedError, RedisSlotLog
from cluster.window import bounds_of
from relay.batch import AppendToLog, Batcher, ack_events
from relay.codec import DEFAULT_MAX_EVENTS, AckEvent, CodecError, MessageEvent, encode_batch
from relay.config import Config
from relay.dedupe import dedupe_key
from relay.errors import Code, InvariantError
from relay.frames import BadObject
from relay.hlc import physical_ms
from relay.node import Node
from relay.snapshot import DirtySlots, encode_snapshot
from relay.snapshot_io import delete_snapshot, load_snapshots, prepare_data_dir, write_snapshot
from relay.store import Message, unpack

log = logging.getLogger(__name__)

TAIL_BLOCK_MS = 500
TOMBSTONES_PER_SLOT = 100_000
SNAPSHOT_SWITCH_INTERVAL_S = 0.0005
RESUBSCRIBE_S = 15.0
DRAIN_TIMEOUT_S = 10.0
REMOTE_WAIT_S = 30.0
AUDIT_S = 1.0
CATCH_UP_COUNT = 1000
CATCH_UP_ATTEMPTS = 5
RELEASE_GRACE_S = 1.0
RELEASE_POLL_S = 0.02


class Buckets:
    """A histogram's cumulative buckets, kept as plain counts (exported at scrape)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for b, n in zip(self.bounds, self.counts, strict=False):
            total += n
            out.append((str(b), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


def _failure(w: PubWaiter | None, moved: str) -> tuple[Code, str]:
    """The code and reason a failed waiter is answered with: ``internal`` when its entry
    could not be encoded, else ``unavailable`` (the slot moved; retry)."""
    if w is not None and w.failed:
        return Code.INTERNAL, w.failed
    return Code.UNAVAILABLE, moved


class Unavailable(ClusterError):
    """The channel's owner cannot serve right now; the client may retry (``unavailable``)."""


@dataclass(slots=True, eq=False)
class PubWaiter:
    """A ``pub`` waiting for its slot-log append (and, for ``remote``, for a link to
    confirm that another region holds it) before it is acknowledged."""

    done: Callable[[str | None], None]  # called with the level reached, or None on failure
    level: str = "log"
    since: float = 0.0
    failed: str = ""  # set before done(None) when the failure is a bug, not a move


def message_fields(m: Message) -> list[Any]:
    return [m.id, m.ch, m.sender, m.hlc, m.origin, m.body, m.expires_ms]


def fields_message(f: list[Any]) -> Message:
    return Message(str(f[0]), str(f[1]), str(f[2]), int(f[3]), str(f[4]), bytes(f[5]), int(f[6]))


class Router:
    """This node's part in its region."""

    def __init__(
        self,
        *,
        config: Config,
        node: Node,
        reactor: Any,
        fan_out: Callable[[Message, tuple[Hashable, ...]], None],
        wall_ms: Callable[[], int],
    ) -> None:
        c = config.cluster
        self.config = config
        self.node = node
        self.me = config.node.id
        self.region = config.node.region
        self.reactor = reactor
        self.fan_out = fan_out
        self.wall_ms = wall_ms
        # What to do when ops ask this node to drain (the server shuts down gracefully).
        self.on_drain_requested: Callable[[], None] = lambda: None
        self.slots = c.slots
        self.replicas = c.replicas
        self.weight = c.weight
        self.lease_ttl_s = c.lease_ttl_ms / 1000
        self.batcher = Batcher(window_ms=c.batch_window_ms)
        self.detector = FailureDetector(
            DetectorConfig(
                lease_ttl_s=self.lease_ttl_s,
                suspect_after_s=self.lease_ttl_s,
                dead_after_s=math.inf,
            )
        )
        self.client: Redis = Redis.from_url(c.redis_url)
        self.slotlog = RedisSlotLog.from_url(c.redis_url, self.region)
        self.members: dict[str, Member] = {}
        # Where the slots are: the ring of the live members, with the weights and holds
        # ops set (cluster/rebalance.py, cluster/ringstore.py).
        self.ring: Placement | None = None
        self.ring_state = RingState()
        # Reads of the ring state one at a time: a later read never installs older state.
        self._ring_reads = asyncio.Lock()
        self.epoch = 0
        # Slot state (cluster/slots: none → replica → claiming → owner).
        self.owned: dict[int, int] = {}  # slot → epoch we write under
        self.claiming: set[int] = set()
        self._claim_tasks: dict[int, asyncio.Task[Any]] = {}
        self._catch_up_locks: dict[int, asyncio.Lock] = {}
        self._checkpoint_locks: dict[int, asyncio.Lock] = {}
        self.releasing: set[int] = set()  # owned slots being handed over: not served
        self.replicated: set[int] = set()
        self.applied: dict[int, str] = {}  # slot → newest log id applied here
        self.dirty: set[int] = set()  # owned slots changed since their last checkpoint
        self.slot_channels: dict[int, set[str]] = {}
        # Owner side: which peers have subscribers for a channel.
        self.interest: dict[str, set[str]] = {}
        # Subscriber side: the owner each locally subscribed channel is registered with.
        self.registered: dict[str, str] = {}
        self.mesh: Mesh | None = None
        self.membership: Membership | None = None
        self.draining = False
        self.stopped = False
        self._tasks: list[asyncio.Task[None]] = []
        self._tail_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Entries whose append failed (Redis error, or a slot being claimed again).
        self._retry: list[AppendToLog] = []
        self._retried: set[int] = set()
        # Claims run a few at a time: each is a handful of Redis round trips.
        self._claims = asyncio.Semaphore(8)
        # Hand-overs and waits for them likewise (the pools hold 100 connections).
        self._handovers = asyncio.Semaphore(8)
        self._rebalancing = asyncio.Lock()
        self.counters = {
            "failovers": 0,
            "fenced": 0,
            "appends": 0,
            "append_errors": 0,
            # Readers that found entries trimmed under them (chain breaks) and rebuilt.
            "log_gaps": 0,
            "mirror_gaps": 0,
            # Slot logs trimmed past a link that fell further behind than allowed.
            "backlog_trims": 0,
            "checkpoints": 0,
        }
        self.mesh_counters = {"bad_requests": 0, "encode_failures": 0}
        # Inter-region: peers (name → Redis URL), links from here to each, and what this
        # node applied of each origin's mirrors.
        self.peers: dict[str, str] = dict(p.split("=", 1) for p in c.peers)
        self.links = [
            Link(
                region=self.region,
                dest=name,
                dest_url=url,
                node_id=self.me,
                local_url=c.redis_url,
                slots=self.slots,
                lease_ttl_ms=c.lease_ttl_ms,
                bounds=bounds_of(c),
            )
            for name, url in sorted(self.peers.items())
        ]
        # Each peer's link writes windows into our inbound stream; one node of this
        # region (the receiver's lease) splits them into our mirrors of that peer.
        self.receivers = [
            Receiver(
                region=self.region,
                origin=name,
                url=c.redis_url,
                node_id=self.me,
                slots=self.slots,
                lease_ttl_ms=c.lease_ttl_ms,
            )
            for name in sorted(self.peers)
        ]
        self.mirror_applied: dict[str, dict[int, str]] = {o: {} for o in self.peers}
        self._mirror_tasks: dict[str, asyncio.Task[None]] = {}
        # ack=remote: per slot, (entry id, waiter) until a link confirms the entry.
        self.remote_waiters: dict[int, list[tuple[tuple[int, int], PubWaiter]]] = {}
        self.confirmed: dict[int, tuple[int, int]] = {}
        # Snapshots of owned slots on disk (relay/snapshot.py, relay/snapshot_io.py).
        self.snapshots = DirtySlots()
        self.snapshot_interval_s = config.node.snapshot_interval_s
        self.slots_dir: Path | None = None
        # Recent acks per slot, (ch, id, hlc): a snapshot keeps them as tombstones.
        self.tombstones: dict[int, deque[tuple[str, str, int]]] = {}
        self.snapshot_stats = {"written": 0, "failures": 0, "refused": 0, "bytes": 0, "loaded": 0}
        self._loaded_slots: set[int] = set()
        self.append_seconds = Buckets((0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
        self.batch_events = Buckets((1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, *, ws: str, admin: str) -> None:
        c = self.config.cluster
        self.mesh = Mesh(
            node_id=self.me,
            epoch=0,
            handler=self,
            reactor=self.reactor,
            clock=time.monotonic,
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
        joined = await self.membership.join()
        self.epoch = joined.epoch
        self.mesh.epoch = joined.epoch
        await self._release_stale_records()
        for m in (await self.membership.snapshot()).values():
            self._observe_member(m)
        self._observe_member(joined)
        self._tasks = [
            asyncio.ensure_future(self._flush_loop()),
            asyncio.ensure_future(self._tick_loop()),
            asyncio.ensure_future(self._checkpoint_loop()),
            asyncio.ensure_future(self._snapshot_loop()),
        ]
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
                await self.slotlog.release(slot, self.me, int(epoch))

    async def stop(self) -> None:
        self.stopped = True
        for t in [
            *self._tasks,
            *([self._tail_task] if self._tail_task else []),
            *self._mirror_tasks.values(),
            *self._background,
        ]:
            t.cancel()
        for link in self.links:
            await link.stop()
        for receiver in self.receivers:
            await receiver.stop()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
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
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while (self.batcher.pending_events or self.batcher.in_flight or self._retry) and (
            time.monotonic() < deadline
        ):
            await self._flush(force=True)
            if self.batcher.in_flight or self._retry:
                await asyncio.sleep(0.05)  # appends under way or to retry
        with contextlib.suppress(Exception):
            await self._snapshot_all()  # the last batch is in the log: save the state
        # Checkpoint and release every slot (draining, each is lost at the end of it):
        # the next owners start from all of it.
        await self._release(list(self.owned))
        if self.membership is not None:
            await self.membership.stop()  # no renewal may re-take the lease
            await self.membership.leave()

    # -- membership and ring -------------------------------------------------------

    def on_membership(self, event: MembershipEvent) -> None:
        now = time.monotonic()
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
        self._effects(self.detector.observe(LeaseRenewed(m.node_id, m.epoch, time.monotonic())))

    def _effects(self, effects: list[Any]) -> None:
        changed = False
        for e in effects:
            if isinstance(e, MemberUp):
                changed = True
                m = self.members.get(e.node_id)
                if m is not None and self.mesh is not None:
                    self.mesh.want(e.node_id, m.mesh)
            elif isinstance(e, MemberDown):
                changed = True
                if e.node_id != self.me and self.mesh is not None:
                    self.mesh.forget(e.node_id)
                if e.reason.value in ("lease_expired", "lease_timeout"):
                    self.counters["failovers"] += 1
        if changed and not self.stopped:
            self._spawn(self._rebalance())

    def on_resync(self, members: dict[str, Member]) -> None:
        """Membership reconnected to Redis (events may have been missed): reconcile with
        the leases held now."""
        now = time.monotonic()
        effects: list[Any] = []
        for m in members.values():
            self.members[m.node_id] = m
            effects += self.detector.observe(LeaseRenewed(m.node_id, m.epoch, now))
        for node_id in self.detector.live() - set(members) - {self.me}:
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
        if self.draining or self.stopped:
            return
        log.error("lease lost: dropping every owned slot; rejoin needed")
        for slot in list(self.owned):
            self._lose(slot)
        if not self.stopped:
            self._spawn(self._rejoin())

    async def _rejoin(self) -> None:
        assert self.membership is not None
        backoff = 0.2
        while True:
            try:
                joined = await self.membership.join()
                break
            except (RedisError, OSError) as e:
                if self.stopped:
                    return
                log.warning("rejoin failed (%s); retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)  # back off before retrying Redis
                backoff = min(5.0, backoff * 2)
        self.epoch = joined.epoch
        if self.mesh is not None:
            self.mesh.epoch = joined.epoch
        await self.membership.stop()
        await self.membership.start()
        self._observe_member(joined)
        await self._rebalance()

    def lease_fresh(self) -> bool:
        """Our lease is surely still ours (a paused process must not serve)."""
        m = self.membership
        return m is not None and time.monotonic() < m.lease_valid_until

    def _live_ring(self) -> Placement | None:
        live = {
            n: self.members[n].weight if n in self.members else 1.0 for n in self.detector.live()
        }
        if self.draining:
            live.pop(self.me, None)
        return placement(live, self.ring_state, slots=self.slots, replicas=self.replicas)

    async def _rebalance(self) -> None:
        # One at a time, each on the newest membership (a burst of joins runs it twice).
        # The claims it starts run outside the lock: a claim may wait for another node
        # to hand its slot over, and that node may be waiting for one of ours.
        async with self._rebalancing:
            claims = await self._rebalance_now()
        if claims:
            await asyncio.gather(*claims, return_exceptions=True)

    def _start_claim(self, slot: int) -> asyncio.Task[Any]:
        self.claiming.add(slot)
        task = self._claim_tasks[slot] = self._spawn(self._claim(slot))
        return task

    async def _rebalance_now(self) -> list[asyncio.Task[Any]]:
        ring = self._live_ring()
        self.ring = ring
        if ring is None or self.draining:
            return []
        mine = set(ring.slots_of(self.me)) if self.me in ring.nodes else set()
        replica = set(ring.replicas_of(self.me)) - mine if self.me in ring.nodes else set()
        await self._release([slot for slot in self.owned if slot not in mine])
        self.replicated = replica
        self._drop_foreign_snapshots()
        self._restart_tail()
        # Re-register subscriptions whose owner moved.
        for ch, owner in list(self.registered.items()):
            if self.owner_of(ch) != owner:
                self._spawn(self._resubscribe(ch))
        # Claims under way count too: whoever asked for a rebalance (start, a rejoin)
        # waits until this node serves what the ring gives it.
        return [
            self._start_claim(s) if s not in self.claiming else self._claim_tasks[s]
            for s in sorted(mine)
            if s not in self.owned and (s not in self.claiming or s in self._claim_tasks)
        ]

    async def _claim(self, slot: int) -> None:
        """Take ``slot`` over: fence the old owner, read the log to its end, serve."""
        self.claiming.add(slot)
        try:
            await self._await_release(slot)
            async with self._claims:
                await self._claim_now(slot)
        except Exception:
            log.exception("claiming slot %d failed", slot)
        finally:
            self.claiming.discard(slot)
            self._claim_tasks.pop(slot, None)

    async def _await_release(self, slot: int) -> None:
        """While ``slot``'s owner record names another live node, give it time to hand
        the slot over (flush, checkpoint, release: :meth:`_release`) before fencing it.

        A planned move, a join or a reweight then loses nothing, not even what that
        node accepted at ``ack=mem``. A dead owner is fenced at once; one that does not
        let go within a lease's time (its view of the ring differs) is fenced anyway.
        """
        deadline = time.monotonic() + self.lease_ttl_s + RELEASE_GRACE_S
        while not self.stopped and time.monotonic() < deadline and self._should_own(slot):
            try:
                async with self._handovers:
                    current = await self.slotlog.get_owner(slot)
            except (RedisError, OSError) as e:
                # Not knowing is no reason to fence a live owner: ask again.
                log.warning("reading slot %d's owner failed: %s", slot, e)
            else:
                holder = current.node_id if current is not None else ""
                if not holder or holder == self.me or holder not in self.detector.live():
                    return
            await asyncio.sleep(RELEASE_POLL_S)  # the owner is flushing the slot

    async def _claim_now(self, slot: int) -> None:
        try:
            for _ in range(10):
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
                    continue
            else:
                log.warning("could not claim slot %d", slot)
                return
            await self._catch_up(slot)
            if self._should_own(slot):
                self.owned[slot] = epoch
                self._changed(slot)
            else:
                # The ring moved on while we read the log: let the next owner have it now
                # rather than after waiting for us.
                await self.slotlog.release(slot, self.me, epoch)
        except (RedisError, OSError, ClusterError) as e:
            log.warning("claiming slot %d failed: %s", slot, e)

    def _slot_lock(self, slot: int) -> asyncio.Lock:
        lock = self._catch_up_locks.get(slot)
        if lock is None:
            lock = self._catch_up_locks[slot] = asyncio.Lock()
        return lock

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
        known = self.applied.get(slot)
        if known is not None and cp is not None and parse_id(cp.covers_id) > parse_id(known):
            # The log may be trimmed past where we are: rebuild from the checkpoint.
            self._forget_slot(slot)
            known = None
        if known is None:
            if cp is not None:
                self._apply(slot, cp.data, now)
                self.applied[slot] = cp.covers_id
            else:
                self.applied[slot] = "0-0"
        while True:
            entries = await self.slotlog.read(slot, self.applied[slot], CATCH_UP_COUNT)
            if not entries:
                break
            for e in entries:
                if e.prev and e.prev != self.applied[slot]:
                    self.counters["log_gaps"] += 1
                    return False
                self._apply(slot, e.data, now)
                self.applied[slot] = e.id
        for origin in self.peers:
            done = self.mirror_applied[origin]
            while True:
                entries = await self.slotlog.read(
                    slot, done.get(slot, "0-0"), CATCH_UP_COUNT, origin=origin
                )
                if not entries:
                    break
                for e in entries:
                    if e.prev and e.prev != done.get(slot, "0-0"):
                        # The mirror was trimmed past where this state stands (a newer
                        # checkpoint covers it): rebuild from that one.
                        self.counters["mirror_gaps"] += 1
                        return False
                    self._apply(slot, e.data, now, origin=origin)
                    done[slot] = e.id
        return True

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
            for o, by_slot in cp.mirrors.items():
                if o in self.mirror_applied and slot in by_slot:
                    known = self.mirror_applied[o].get(slot, "0-0")
                    if parse_id(by_slot[slot]) > parse_id(known):
                        self.mirror_applied[o][slot] = by_slot[slot]
        events = cp.events
        if cp.is_checkpoint:
            if cp.hlc:
                self.node.clock.observe(cp.hlc)
            # A checkpoint is a state from the past: what was acked here since must not
            # come back with it. The dedupe index forgets an id a window after the message
            # was accepted; the slot's tombstones last a window from the ack.
            gone = {(ch, i) for ch, i, _ in self.tombstones.get(slot, ())}
            if gone:
                events = [
                    e for e in events if not (isinstance(e, MessageEvent) and (e.ch, e.id) in gone)
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

    async def _release(self, slots: list[int]) -> None:
        """Hand ``slots`` over on purpose (the ring moved them): stop serving them, append
        what is batched for them, write their checkpoints and release their owner
        records, so that their new owners, waiting for that, start from all of it."""
        if not slots:
            return
        self.releasing.update(slots)
        try:
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            await self._flush(force=True)
            while any(self.batcher.busy(s) for s in slots) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # appends of these slots under way
                await self._flush(force=True)
            results = await asyncio.gather(
                *(self._hand_over(s) for s in slots if s in self.owned), return_exceptions=True
            )
            for r in results:
                if isinstance(r, Exception):
                    log.warning("handing a slot over failed: %s", r)
        finally:
            for s in slots:
                self.releasing.discard(s)
                if not self._should_own(s):
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
        self.owned.pop(slot, None)
        self.dirty.discard(slot)
        for e in self.batcher.take(slot):
            self._not_appended(e, "the slot was lost")
        if slot not in self.replicated:
            self._forget_slot(slot)

    def _forget_slot(self, slot: int) -> None:
        """Drop what RAM holds of ``slot``: its pending messages and log positions."""
        self.applied.pop(slot, None)
        for done in self.mirror_applied.values():
            done.pop(slot, None)
        for ch in self.slot_channels.pop(slot, ()):
            ids = [m.id for m in self.node.store.pending(ch, 0)]
            if ids:
                self.node.store.ack(ch, ids)
            self.interest.pop(ch, None)

    # -- replica tailing -----------------------------------------------------------

    def _restart_tail(self) -> None:
        if self._tail_task is not None:
            self._tail_task.cancel()
            self._tail_task = None
        if self.replicated and not self.stopped:
            self._tail_task = asyncio.ensure_future(self._tail_loop(sorted(self.replicated)))
        for task in self._mirror_tasks.values():
            task.cancel()
        self._mirror_tasks = {}
        slots = (
            sorted(set(self.ring.slots_of(self.me)) | self.replicated)
            if (self.ring is not None and self.me in self.ring.nodes)
            else []
        )
        if slots and not self.stopped:
            for origin in self.peers:
                self._mirror_tasks[origin] = asyncio.ensure_future(self._mirror_loop(origin, slots))

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
                await asyncio.sleep(0.1)  # the slots are being (re)built: look again soon
                continue
            try:
                entries = await self.slotlog.tail(after, TAIL_BLOCK_MS, origin=origin)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.stopped:
                    return  # our own clients closed under the read: not a failure
                log.warning("tailing mirrors of %s failed: %s", origin, e)
                await asyncio.sleep(0.5)  # back off before retrying Redis
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
            good, gapped = split_on_gaps(after, [t for t in entries if t.slot not in stale])
            for t in good:
                added = self._apply(t.slot, t.data, now, origin=origin)
                done[t.slot] = t.id
                if t.slot in self.owned:
                    self._changed(t.slot)
                    for m in added:
                        self._deliver(m)
            for s, missing in sorted(gapped.items()):
                self.counters["mirror_gaps"] += 1
                log.warning(
                    "slot %d: the mirror of %s was trimmed past %s; rebuilding",
                    s,
                    origin,
                    after[s],
                )
                try:
                    if s in self.owned:
                        await self._mirror_gap_owned(s, origin, missing)
                    else:
                        await self._catch_up(s, fresh=True)
                except (RedisError, OSError, ClusterError, CodecError) as e:
                    log.warning("rebuilding slot %d failed: %s", s, e)
            if gapped:
                await asyncio.sleep(0.2)  # a hole no checkpoint covers yet: do not spin

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
            self._changed(slot)

    async def _tail_loop(self, slots: list[int]) -> None:
        for s in slots:
            if s not in self.applied:
                try:
                    await self._catch_up(s)
                except (RedisError, OSError, ClusterError) as e:
                    log.warning("replica catch-up of slot %d failed: %s", s, e)
        while not self.stopped:
            try:
                after = {
                    s: self.applied.get(s, "0-0")
                    for s in slots
                    if s not in self.owned and s not in self.claiming
                }
                if not after:
                    if any(s not in self.owned for s in slots):
                        await asyncio.sleep(0.1)  # slots being claimed: look again soon
                        continue
                    return
                entries = await self.slotlog.tail(after, TAIL_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.stopped:
                    return  # our own clients closed under the read: not a failure
                log.warning("tailing slot logs failed: %s", e)
                await asyncio.sleep(0.5)  # back off before retrying Redis
                continue
            now = self.wall_ms()
            gapped: set[int] = set()
            for t in entries:
                if t.slot in self.owned or t.slot in gapped or self._slot_lock(t.slot).locked():
                    continue
                known = self.applied.get(t.slot)
                if known is not None and parse_id(t.id) <= parse_id(known):
                    continue  # applied meanwhile (a catch-up ran while we waited)
                if t.prev and t.prev != known:
                    # Entries between our position and this one were trimmed (the owner
                    # checkpointed while we lagged): what we hold of the slot is not
                    # complete. Rebuild it from the checkpoint.
                    gapped.add(t.slot)
                    self.counters["log_gaps"] += 1
                    continue
                self._apply(t.slot, t.data, now)
                self.applied[t.slot] = t.id
            for s in sorted(gapped):
                try:
                    await self._catch_up(s, fresh=True)
                except (RedisError, OSError, ClusterError) as e:
                    log.warning("replica catch-up of slot %d failed: %s", s, e)

    # -- flushing to the slot logs ---------------------------------------------------

    async def _flush_loop(self) -> None:
        window = self.batcher.window_ms / 1000
        while not self.stopped:
            # Wake when the oldest open batch's window ends (at most one window away), so
            # an event waits one window for its append, not up to two.
            deadline = self.batcher.deadline_ms()
            wait = window if deadline is None else (deadline - self.wall_ms()) / 1000
            await asyncio.sleep(min(window, max(0.001, wait)))  # until the window ends
            try:
                await self._flush()
            except Exception:
                log.exception("flush failed")

    async def _flush(self, force: bool = False) -> None:
        # Entries that failed before go first, unchanged (same events, same waiters).
        entries, self._retry = self._retry, []
        entries += self.batcher.flush(self.wall_ms(), force=force)
        if entries:
            await self._append(entries)

    async def _append(self, entries: list[AppendToLog]) -> None:
        """Append entries handed out by the batcher; each ends appended, retried later, or
        failed (its waiters answered), never dropped."""
        ready = []
        for e in entries:
            if e.slot in self.owned:
                ready.append(e)
            else:
                self._not_appended(e, "the slot is not ours now")
        if not ready:
            return
        # Each entry is encoded on its own: one that cannot be fails alone.
        entries, items = [], []
        for e in ready:
            try:
                items.append((e.slot, encode_batch(e.events)))
            except InvariantError as err:
                self._not_encoded(e, err)
            else:
                entries.append(e)
        if not entries:
            return
        epochs = {e.slot: self.owned[e.slot] for e in entries}
        started = time.monotonic()
        try:
            results = await self.slotlog.append_many(items, self.me, epochs)
            self.append_seconds.observe(time.monotonic() - started)
            for e in entries:
                self.batch_events.observe(len(e.events))
        except Exception as err:
            self.counters["append_errors"] += 1
            log.warning("slot-log append failed (%s); retrying next window", err)
            self._retry.extend(entries)
            self._retried.update(e.batch_id for e in entries)
            return
        for e, r in zip(entries, results, strict=True):
            if isinstance(r, FencedError):
                self.counters["fenced"] += 1
                self._lose(e.slot)
                self._not_appended(e, f"fenced: {r}")
            else:
                self.counters["appends"] += 1
                self.batcher.appended(e.batch_id)
                self.applied[e.slot] = r
                if e.batch_id in self._retried:
                    # Its slot may have been rebuilt meanwhile: make RAM hold it again.
                    self._retried.discard(e.batch_id)
                    for m in apply_events(self.node, list(e.events), self.wall_ms()):
                        self.slot_channels.setdefault(e.slot, set()).add(m.ch)
                for w in e.waiters:
                    if isinstance(w, PubWaiter):
                        self._logged(e.slot, r, w)

    def _logged(self, slot: int, entry_id: str, w: PubWaiter) -> None:
        """``w``'s entry is in the log: answer it, or wait for a link if it asked remote."""
        if w.level != "remote" or not self.links:
            w.done("log")
            return
        eid = parse_id(entry_id)
        if self.confirmed.get(slot, (0, 0)) >= eid:
            w.done("remote")
            return
        w.since = time.monotonic()
        self.remote_waiters.setdefault(slot, []).append((eid, w))

    def on_confirmed(self, doc: dict[str, Any]) -> None:
        """A link announced entries its destination holds: answer ``ack=remote``."""
        for slot_s, entry_id in dict(doc.get("slots", {})).items():
            slot = int(slot_s)
            eid = parse_id(str(entry_id))
            if eid > self.confirmed.get(slot, (0, 0)):
                self.confirmed[slot] = eid
            waiting = self.remote_waiters.get(slot)
            if not waiting:
                continue
            still = [(i, w) for i, w in waiting if i > eid]
            for i, w in waiting:
                if i <= eid:
                    w.done("remote")
            if still:
                self.remote_waiters[slot] = still
            else:
                del self.remote_waiters[slot]

    def _expire_remote_waiters(self) -> None:
        """Answer ``unavailable`` to ``ack=remote`` publishes no link confirmed in time
        (the message is logged here; the client's retry with the same id waits again)."""
        cutoff = time.monotonic() - REMOTE_WAIT_S
        for slot, waiting in list(self.remote_waiters.items()):
            keep = []
            for i, w in waiting:
                if w.since < cutoff:
                    w.done(None)
                else:
                    keep.append((i, w))
            if keep:
                self.remote_waiters[slot] = keep
            else:
                del self.remote_waiters[slot]

    def _not_encoded(self, e: AppendToLog, err: Exception) -> None:
        """An entry the codec refuses (a bug upstream: every argument was checked). Only
        its own waiters hear of it, with ``internal`` and a correlation id."""
        cid = uuid.uuid4().hex[:12]
        self.mesh_counters["encode_failures"] += 1
        log.error(
            "slot %d: an entry of %d events cannot be encoded (correlation id %s): %s",
            e.slot,
            len(e.events),
            cid,
            err,
        )
        self.batcher.append_failed(e.batch_id)
        self._retried.discard(e.batch_id)
        for w in e.waiters:
            if isinstance(w, PubWaiter):
                w.failed = f"internal error, correlation id {cid}"
                w.done(None)

    def _not_appended(self, e: AppendToLog, why: str) -> None:
        """An entry that cannot be appended under our current epoch."""
        if self._should_own(e.slot):
            # Another node claimed it under an older view of the ring: take it back and
            # append the same entry under the new epoch.
            log.warning("slot %d: %s; claiming it again", e.slot, why)
            self._retry.append(e)
            self._retried.add(e.batch_id)
            if e.slot not in self.claiming:
                self._start_claim(e.slot)
            return
        log.warning("slot %d: %s; %d events not logged", e.slot, why, len(e.events))
        self.batcher.append_failed(e.batch_id)
        for w in e.waiters:
            if isinstance(w, PubWaiter):
                w.done(None)

    def _changed(self, slot: int) -> None:
        """``slot``'s pending state changed: due for a checkpoint and a snapshot."""
        self.dirty.add(slot)
        self.snapshots.mark(slot, time.monotonic())

    def _tombstone(self, slot: int, ch: str, ids: list[str], hlc: int) -> None:
        q = self.tombstones.get(slot)
        if q is None:
            q = self.tombstones[slot] = deque()
        q.extend((ch, i, hlc) for i in ids)
        # Only the dedupe window's worth matters (older ones dedupe nothing).
        cutoff = (self.wall_ms() - self.node.dedupe.window_ms) << 16
        while q and q[0][2] < cutoff:
            q.popleft()
        while len(q) > TOMBSTONES_PER_SLOT:
            q.popleft()

    # -- snapshots -------------------------------------------------------------------

    async def _load_snapshots(self) -> None:
        """Before joining: take back what this node's disk holds (a restart)."""
        was_enabled = gc.isenabled()
        gc.disable()  # loading builds long-lived state: no collection needed meanwhile
        try:
            await self._load_snapshots_now()
        finally:
            if was_enabled:
                gc.enable()

    async def _load_snapshots_now(self) -> None:
        self.slots_dir = await asyncio.to_thread(prepare_data_dir, self.config.node.data_dir)
        loaded, refused = await asyncio.to_thread(load_snapshots, self.slots_dir)
        for slot, reason in refused:
            # Never half-loaded: the slot is rebuilt from the region's checkpoint and logs.
            self.snapshot_stats["refused"] += 1
            log.error(
                "snapshot of slot %d refused (%s); rebuilding it from the region", slot, reason
            )
        now = self.wall_ms()
        for slot, snap in loaded.items():
            if slot >= self.slots:
                continue
            for m in apply_events(self.node, list(snap.events), now):
                self.slot_channels.setdefault(slot, set()).add(m.ch)
            for ch, msg_id, hlc in snap.tombstones:
                self._tombstone(slot, ch, [msg_id], hlc)
            self.applied[slot] = snap.log_id
            for origin, mirror_id in snap.mirrors.items():
                if origin in self.mirror_applied:
                    self.mirror_applied[origin][slot] = mirror_id
            self._loaded_slots.add(slot)
        self.snapshot_stats["loaded"] = len(self._loaded_slots)
        if loaded or refused:
            log.info(
                "loaded %d slot snapshots (%d pending messages), refused %d",
                len(loaded),
                self.node.store.messages,
                len(refused),
            )

    def _capture(self, slot: int) -> tuple[str, dict[str, str], list[Any], list[Any]] | None:
        """What ``slot``'s snapshot holds, taken in one reactor turn (encoded in a thread)."""
        log_id = self.applied.get(slot)
        if log_id is None:
            return None
        # Only pointers are copied here; unpacking happens in the writer's thread.
        store = self.node.store
        records = [(ch, store.records(ch)) for ch in sorted(self.slot_channels.get(slot, ()))]
        mirrors = {o: done[slot] for o, done in self.mirror_applied.items() if slot in done}
        return log_id, mirrors, records, list(self.tombstones.get(slot, ()))

    def _encode_and_write(
        self, slot: int, state: tuple[str, dict[str, str], list[Any], list[Any]]
    ) -> int:
        log_id, mirrors, records, tomb = state
        now = self.wall_ms()
        events: list[Any] = []
        for ch, pairs in records:
            for msg_id, record in pairs:
                m = unpack(ch, msg_id, record)
                if m.expires_ms > now:
                    events.append(
                        MessageEvent(m.id, m.ch, m.sender, m.hlc, m.origin, m.body, m.expires_ms)
                    )
        data = encode_snapshot(slot, log_id, mirrors, events, tomb, region=self.region)
        assert self.slots_dir is not None
        return write_snapshot(self.slots_dir, slot, data)

    async def _snapshot_once(self, budget: int) -> None:
        if self.slots_dir is None:
            return
        # A tick makes one short-lived object per pending message; with the collector
        # on, they trigger full collections that scan the whole heap (the stalls that
        # `relay bench durability` measured). They hold no cycles: refcounting frees them.
        was_enabled = gc.isenabled()
        gc.disable()
        # The writer thread encodes with the GIL held; hand it back to the reactor more
        # often than the default 5 ms while a tick runs.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(SNAPSHOT_SWITCH_INTERVAL_S)
        try:
            await self._snapshot_slots(budget)
        finally:
            sys.setswitchinterval(switch)
            if was_enabled:
                gc.enable()

    async def _snapshot_slots(self, budget: int) -> None:
        assert self.slots_dir is not None
        failed: list[int] = []
        last_error: Exception | None = None
        for job in self.snapshots.take(time.monotonic(), budget):
            slot = job.slot
            state = self._capture(slot) if slot in self.owned else None
            if state is None:
                self.snapshots.discard(slot)
                self.snapshots.written(slot, time.monotonic())
                continue
            try:
                n = await asyncio.to_thread(self._encode_and_write, slot, state)
            except Exception as e:
                # Full disk, I/O error: keep serving; the previous snapshot stays.
                self.snapshot_stats["failures"] += 1
                self.snapshots.failed(slot)
                failed.append(slot)
                last_error = e
                continue
            self.snapshots.written(slot, time.monotonic())
            self.snapshot_stats["written"] += 1
            self.snapshot_stats["bytes"] += n
        if failed:
            log.warning(
                "snapshots of %d slots failed (first: slot %d): %s",
                len(failed),
                failed[0],
                last_error,
            )

    async def _snapshot_loop(self) -> None:
        while not self.stopped:
            await asyncio.sleep(self.snapshot_interval_s)  # the snapshot period
            try:
                # Every dirty slot, one after the other: each capture is one short reactor
                # turn, each encode and write runs in a thread.
                await self._snapshot_once(self.slots)
            except Exception:
                log.exception("snapshot tick failed")

    async def _snapshot_all(self) -> None:
        """Write every changed owned slot now (graceful stop)."""
        for _ in range(3):
            if not self.snapshots.count:
                return
            await self._snapshot_once(max(1, len(self.owned)))

    def _drop_foreign_snapshots(self) -> None:
        """Slots loaded from disk that the ring gives to others: forget them."""
        mine = set(self.owned) | self.claiming | self.replicated
        if self.ring is not None and self.me in self.ring.nodes:
            mine |= set(self.ring.slots_of(self.me))
        for slot in sorted(self._loaded_slots - mine):
            self._loaded_slots.discard(slot)
            self._forget_slot(slot)
            if self.slots_dir is not None and not self.snapshots.in_flight(slot):
                delete_snapshot(self.slots_dir, slot)

    def slot_stats(self) -> dict[int, list[int]]:
        """Owned slot → [pending messages, pending bytes] (for ``relay ring plan``)."""
        now = self.wall_ms()
        out: dict[int, list[int]] = {}
        for slot in sorted(self.owned):
            n = size = 0
            for ch in self.slot_channels.get(slot, ()):
                for m in self.node.store.pending(ch, now):
                    n += 1
                    size += len(m.body)
            out[slot] = [n, size]
        return out

    def data_at_risk(self) -> dict[str, Any]:
        """What a crash right now could lose: events not yet in the slot log, and slots
        changed since their snapshot (``relay_data_at_risk_messages``)."""
        unlogged = self.batcher.pending_events + sum(len(e.events) for e in self._retry)
        return {
            "unlogged_events": unlogged,
            "unsaved_slots": self.snapshots.count,
            "snapshot_age_s": round(self.snapshots.age_s(time.monotonic()), 3),
            "unreplicated_entries": {link.dest: link.backlog_entries for link in self.links},
        }

    def _should_own(self, slot: int) -> bool:
        return (
            self.ring is not None
            and not self.draining
            and self.me in self.ring.nodes
            and self.ring.owner(slot) == self.me
        )

    def _checkpoint_data(self, slot: int, events: list[Any]) -> tuple[bytes, dict[str, str]]:
        """The checkpoint of ``slot``: ``events`` (its pending messages), its recent acks
        as tombstones and the clock now; and the mirror positions it covers."""
        positions = {o: done[slot] for o, done in self.mirror_applied.items() if slot in done}
        room = DEFAULT_MAX_EVENTS - len(events)
        acks = tombstone_events(self.tombstones.get(slot, ()), self.region, limit=room)
        hlc = self.node.clock.tick(self.wall_ms())
        data = encode_checkpoint(
            [*acks, *events], {o: {slot: i} for o, i in positions.items()}, hlc=hlc
        )
        return data, positions

    async def _checkpoint_loop(self) -> None:
        interval = self.config.cluster.checkpoint_interval_s
        due = time.monotonic() + interval
        while not self.stopped:
            # A fixed cadence: the time a round of checkpoints takes does not lengthen
            # the period (the slot logs are trimmed only at checkpoints).
            await asyncio.sleep(max(0.0, due - time.monotonic()))  # the checkpoint period
            due = max(due + interval, time.monotonic())
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

    async def _audit(self) -> None:
        """Make what we serve agree with the owner records and the ring.

        A claim made under an older view of the ring can fence the true owner before
        it has written anything; and a claim can fail on a Redis error. Both heal here:
        a slot whose record names someone else is dropped and, if the ring gives it to
        us, claimed again (reading its log to the end first); a slot the ring gives us
        that we neither own nor are claiming is claimed.
        """
        if self.draining:
            return
        await self._refresh_ring_state()  # a ring event we missed? (then a rebalance runs)
        if self.ring is None or self.me not in self.ring.nodes:
            return
        # Slots being handed over release their records on purpose: not a move to heal.
        slots = sorted(s for s in self.owned if s not in self.releasing)
        if slots:
            pipe = self.client.pipeline(transaction=False)
            for slot in slots:
                pipe.hmget(owner_key(self.region, slot), "owner", "epoch")
            records = await pipe.execute()
            for slot, (owner, epoch) in zip(slots, records, strict=True):
                mine = self.owned.get(slot)
                if mine is None:
                    continue
                if (owner or b"").decode() != self.me or int(epoch or 0) != mine:
                    log.warning("slot %d: owner record moved to %r; re-checking", slot, owner)
                    self._lose(slot)
        for slot in self.ring.slots_of(self.me):
            if slot not in self.owned and slot not in self.claiming:
                self._start_claim(slot)

    async def _tick_loop(self) -> None:
        next_audit = time.monotonic() + AUDIT_S
        while not self.stopped:
            await asyncio.sleep(0.5)  # the detector's beat
            try:
                now = time.monotonic()
                if self.mesh is not None:
                    for peer in list(self.mesh.connections):
                        self._effects(self.detector.observe(PingAnswered(peer, now)))
                self._effects(self.detector.observe(PingAnswered(self.me, now)))
                self._effects(self.detector.observe(Tick(now)))
                self._expire_remote_waiters()
                if now >= next_audit:
                    next_audit = now + AUDIT_S
                    await self._audit()
            except Exception as e:
                log.warning("tick failed: %s", e)

    # -- routing client ops --------------------------------------------------------

    def owner_of(self, ch: str) -> str | None:
        if self.ring is None:
            return None
        return self.ring.owner(slot_of(ch, self.slots))

    def serving(self, slot: int) -> bool:
        return (
            slot in self.owned
            and slot not in self.releasing
            and self.lease_fresh()
            and not self.draining
        )

    def publish(
        self,
        *,
        ch: str,
        msg_id: str,
        body: bytes,
        sender: str,
        ttl_ms: int,
        ack: str,
        reply: Callable[[dict[str, Any] | None, Code | None, str], None],
    ) -> None:
        """Publish; ``reply(puback_fields, None, "")`` or ``reply(None, code, reason)``."""
        slot = slot_of(ch, self.slots)
        owner = self.owner_of(ch)
        if owner == self.me:
            try:
                self._publish_local(slot, ch, msg_id, body, sender, ttl_ms, ack, reply)
            except Unavailable as e:
                reply(None, Code.UNAVAILABLE, str(e))
            return
        if owner is None or self.mesh is None:
            reply(None, Code.UNAVAILABLE, "no owner for this channel right now")
            return
        args = {"ch": ch, "id": msg_id, "body": body, "from": sender, "ttl_ms": ttl_ms, "ack": ack}
        self._spawn(self._forward(owner, "pub", args, reply))

    async def _forward(
        self,
        owner: str,
        op: str,
        args: dict[str, Any],
        reply: Callable[[Any, Code | None, str], None],
        *,
        at_once: bool = False,
    ) -> None:
        """Send ``op`` to ``owner``; ``reply`` with its result or error. ``at_once``: reply
        in the same turn as the reply frame, before any delivery that follows it."""
        assert self.mesh is not None
        on_result = (lambda r: reply(r, None, "")) if at_once else None
        try:
            result = await self.mesh.request(owner, op, args, on_result=on_result)
        except RemoteError as e:
            code = Code(e.code) if e.code in Code.__members__.values() else Code.UNAVAILABLE
            reply(None, code, e.reason)
            return
        except PeerUnavailable as e:
            reply(None, Code.UNAVAILABLE, str(e))
            return
        if not at_once:
            reply(result, None, "")

    def _publish_local(
        self,
        slot: int,
        ch: str,
        msg_id: str,
        body: bytes,
        sender: str,
        ttl_ms: int,
        ack: str,
        reply: Callable[[dict[str, Any] | None, Code | None, str], None],
    ) -> None:
        if not self.serving(slot):
            raise Unavailable(f"slot {slot} is moving; retry")
        now = self.wall_ms()
        acc = self.node.publish(ch, msg_id, body, sender=sender, ttl_ms=ttl_ms, now_ms=now)
        fields = {"ts": physical_ms(acc.hlc), "origin": acc.origin, "dup": acc.dup}
        if acc.dup:
            if ack != "mem" and self.batcher.busy(slot):
                # The first copy may still be on its way to the log: answer with it.
                def dup_done(level: str | None) -> None:
                    if level is None:
                        reply(None, *_failure(dup_w, "the slot moved before it was logged"))
                    else:
                        reply({**fields, "ack": level}, None, "")

                dup_w = PubWaiter(dup_done, level=ack)
                self.batcher.add_waiter(slot, dup_w, now)
            elif ack == "remote" and self.links and slot in self.applied:
                # Confirmed once the slot's newest entry (at or after the first copy's)
                # is in another region.
                def remote_done(level: str | None) -> None:
                    if level is None:
                        reply(None, Code.UNAVAILABLE, "no region confirmed it in time")
                    else:
                        reply({**fields, "ack": level}, None, "")

                self._logged(slot, self.applied[slot], PubWaiter(remote_done, level="remote"))
            else:
                reply({**fields, "ack": "mem" if ack == "mem" else "log"}, None, "")
            return
        self.slot_channels.setdefault(slot, set()).add(ch)
        self._changed(slot)
        event = MessageEvent(msg_id, ch, sender, acc.hlc, acc.origin, body, now + ttl_ms)
        waiter = None
        if ack == "mem":
            reply({**fields, "ack": "mem"}, None, "")
        else:

            def done(level: str | None) -> None:
                if level is None:
                    reply(None, *_failure(waiter, "the slot moved before the message was logged"))
                else:
                    reply({**fields, "ack": level}, None, "")

            waiter = PubWaiter(done, level=ack)
        for entry in self.batcher.add(slot, event, now, waiter):
            self._spawn(self._append([entry]))
        if acc.message is not None or ch in self.interest:
            # Someone listens (here or on a peer): only then build the message to send.
            self._deliver(
                acc.message or Message(msg_id, ch, sender, acc.hlc, acc.origin, body, now + ttl_ms)
            )

    def _deliver(self, message: Message) -> None:
        local = self.node.subscribers.get(message.ch)
        if local:
            self.fan_out(message, tuple(local))
        peers = self.interest.get(message.ch)
        if peers and self.mesh is not None:
            fields = message_fields(message)
            for peer in list(peers):
                if not self.mesh.deliver(peer, message.ch, fields):
                    peers.discard(peer)

    def subscribe(
        self,
        handle: Hashable,
        ch: str,
        reply: Callable[[list[Message] | None, Code | None, str], None],
    ) -> None:
        owner = self.owner_of(ch)
        slot = slot_of(ch, self.slots)
        if owner == self.me:
            if not self.serving(slot):
                reply(None, Code.UNAVAILABLE, f"slot {slot} is moving; retry")
                return
            self.registered[ch] = self.me
            reply(self.node.subscribe(handle, ch, self.wall_ms()), None, "")
            return
        if owner is None or self.mesh is None:
            reply(None, Code.UNAVAILABLE, "no owner for this channel right now")
            return

        def registered(result: Any, code: Code | None, reason: str) -> None:
            if code is not None:
                reply(None, code, reason)
                return
            # Registered now, in the same turn as the reply: deliveries that follow on
            # this connection are exactly the messages after the pending ones.
            self.node.subscribers.setdefault(ch, set()).add(handle)
            self.registered[ch] = owner
            reply([fields_message(f) for f in result], None, "")

        self._spawn(self._forward(owner, "sub", {"ch": ch}, registered, at_once=True))

    def unsubscribe(self, handle: Hashable, ch: str) -> None:
        self.node.unsubscribe(handle, ch)
        if ch not in self.node.subscribers:
            owner = self.registered.pop(ch, None)
            if owner is not None and owner != self.me and self.mesh is not None:
                self.mesh.interest(owner, ch, False)

    def ack(
        self, ch: str, ids: list[str], reply: Callable[[int | None, Code | None, str], None]
    ) -> None:
        owner = self.owner_of(ch)
        slot = slot_of(ch, self.slots)
        if owner == self.me:
            if not self.serving(slot):
                reply(None, Code.UNAVAILABLE, f"slot {slot} is moving; retry")
                return
            self._ack_logged(slot, ch, ids, reply)
            return
        if owner is None or self.mesh is None:
            reply(None, Code.UNAVAILABLE, "no owner for this channel right now")
            return
        self._spawn(
            self._forward(
                owner,
                "ack",
                {"ch": ch, "ids": ids},
                lambda r, c, s: reply(None if c else int(r), c, s),
            )
        )

    def _ack_logged(
        self,
        slot: int,
        ch: str,
        ids: list[str],
        reply: Callable[[int | None, Code | None, str], None],
    ) -> None:
        """Ack, and answer once the ack is in the slot log: an acknowledged ack survives
        a crash of this node (the message never comes back)."""
        n = self._ack_local(slot, ch, ids)

        def done(level: str | None) -> None:
            if level is None:
                reply(None, *_failure(w, "the slot moved before the ack was logged"))
            else:
                reply(n, None, "")

        w = PubWaiter(done)
        self.batcher.add_waiter(slot, w, self.wall_ms())

    def _ack_local(self, slot: int, ch: str, ids: list[str]) -> int:
        now = self.wall_ms()
        n = self.node.ack(ch, ids, now)
        hlc = self.node.clock.tick(now)
        for ev in ack_events(ch, ids, hlc, self.region):
            for entry in self.batcher.add(slot, ev, now):
                self._spawn(self._append([entry]))
        self._tombstone(slot, ch, ids, hlc)
        self._changed(slot)
        return n

    async def _resubscribe(self, ch: str) -> None:
        """The owner of ``ch`` moved: register with the new one and replay its pending
        messages to our subscribers (clients drop what they already have, by id).

        Retried until it works, the subscribers leave or the ring moves again: the new
        owner answers ``unavailable`` until its claim has read the log.
        """
        self.registered.pop(ch, None)
        deadline = time.monotonic() + RESUBSCRIBE_S
        while not self.stopped and time.monotonic() < deadline:
            handles = tuple(self.node.subscribers.get(ch, ()))
            owner = self.owner_of(ch)
            if not handles or owner is None or self.registered.get(ch) is not None:
                return
            if owner == self.me:
                if self.serving(slot_of(ch, self.slots)):
                    self.registered[ch] = self.me
                    for m in self.node.store.pending(ch, self.wall_ms()):
                        self.fan_out(m, handles)
                    return
            elif self.mesh is not None:

                def registered(result: Any, owner: str = owner) -> None:
                    # In the same turn as the reply: the deliveries that follow it on the
                    # connection are the messages after these pending ones.
                    self.registered[ch] = owner
                    handles = tuple(self.node.subscribers.get(ch, ()))
                    for m in (fields_message(f) for f in result):
                        self.fan_out(m, handles)

                try:
                    await self.mesh.request(owner, "sub", {"ch": ch}, on_result=registered)
                except (PeerUnavailable, RemoteError) as e:
                    log.debug("re-subscribing %s with %s: %s", ch, owner, e)
                else:
                    if self.owner_of(ch) != owner:
                        self.registered.pop(ch, None)
                        continue  # the ring moved during the request: follow it
                    return
            await asyncio.sleep(0.1)  # the new owner is still claiming the slot
        log.warning("could not re-subscribe %s with its new owner", ch)

    # -- mesh handler --------------------------------------------------------------

    def on_request(self, peer: str, op: str, args: Any) -> Any:
        # A peer's arguments pass the same checks as a client's (cluster/meshops.py).
        try:
            if op == "pub":
                c = self.config
                return self._serve_pub(
                    meshops.parse_pub(
                        args, max_body=c.client.max_body, max_ttl_ms=c.store.max_ttl_s * 1000
                    )
                )
            if op == "sub":
                ch, ids = meshops.parse_sub(args), None
            elif op == "ack":
                ch, ids = meshops.parse_ack(args)
            else:
                raise BadObject(Code.BAD_REQUEST, f"unknown mesh op {str(op)[:40]!r}")
        except BadObject as e:
            self.mesh_counters["bad_requests"] += 1
            log.warning("mesh: %s's %s refused: %s", peer, str(op)[:40], e.reason)
            raise RemoteError(e.code.value, e.reason) from None
        slot = slot_of(ch, self.slots)
        if not self.serving(slot):
            raise RemoteError("unavailable", f"{self.me} does not serve slot {slot} now")
        if ids is None:
            self.interest.setdefault(ch, set()).add(peer)
            return [message_fields(m) for m in self.node.store.pending(ch, self.wall_ms())]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def acked(n: int | None, code: Code | None, reason: str) -> None:
            if fut.done():
                return
            if code is not None:
                fut.set_exception(RemoteError(code.value, reason))
            else:
                fut.set_result(n)

        self._ack_logged(slot, ch, ids, acked)
        return fut

    def _serve_pub(self, p: meshops.MeshPub) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def reply(result: dict[str, Any] | None, code: Code | None, reason: str) -> None:
            if fut.done():
                return
            if code is not None:
                fut.set_exception(RemoteError(code.value, reason))
            else:
                fut.set_result(result)

        try:
            self._publish_local(
                slot_of(p.ch, self.slots), p.ch, p.id, p.body, p.sender, p.ttl_ms, p.ack, reply
            )
        except Unavailable as e:
            raise RemoteError("unavailable", str(e)) from None
        return fut

    def on_deliver(self, peer: str, ch: str, fields: list[Any]) -> None:
        if self.registered.get(ch) != peer:
            return  # from an owner we no longer follow for this channel
        local = self.node.subscribers.get(ch)
        if local:
            try:
                message = meshops.parse_delivery(ch, fields)
            except BadObject as e:
                self.mesh_counters["bad_requests"] += 1
                log.warning("mesh: %s delivered a bad message on %r: %s", peer, ch, e.reason)
                return
            self.fan_out(message, tuple(local))

    def on_interest(self, peer: str, ch: str, on: bool) -> None:
        if on:
            try:
                meshops.parse_sub({"ch": ch})
            except BadObject:
                self.mesh_counters["bad_requests"] += 1
                return
            self.interest.setdefault(ch, set()).add(peer)
        else:
            peers = self.interest.get(ch)
            if peers is not None:
                peers.discard(peer)
                if not peers:
                    del self.interest[ch]

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
        for ch, peers in list(self.interest.items()):
            peers.discard(peer)
            if not peers:
                del self.interest[ch]
        for ch, owner in list(self.registered.items()):
            if owner == peer:
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
                self._effects(self.detector.observe(LeaseExpired(peer, time.monotonic())))

    # -- views ---------------------------------------------------------------------

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
