"""What a node holds as a member of its region, and the small views every layer reads.

The region edge is a stack of layers, one concept each (docs/ARCHITECTURE.md): this one
holds the state; :mod:`~cluster.region.reading` applies logs and mirrors,
:mod:`~cluster.region.appends` writes to the slot logs, :mod:`~cluster.region.snapshots`
and :mod:`~cluster.region.checkpoints` persist, :mod:`~cluster.region.claims` moves slots,
:mod:`~cluster.region.members` follows membership, :mod:`~cluster.region.routing` routes
client ops, :mod:`~cluster.region.meshserve` answers peers and
:mod:`~cluster.region.node` starts and stops it all. Slot ownership itself is the pure
table of :mod:`cluster.slots`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from cluster import redisconn
from cluster.commit import GroupCommit
from cluster.errors import ClusterError
from cluster.failure import (
    DetectorConfig,
    FailureDetector,
)
from cluster.interest import Interest
from cluster.link import Link
from cluster.membership import Member, Membership
from cluster.mesh import Mesh
from cluster.ownership import OwnershipCore
from cluster.persist import Persistence
from cluster.positions import Positions, Tombstones
from cluster.rebalance import Placement, RingState
from cluster.receiver import Receiver
from cluster.redisconn import AsyncClient
from cluster.region.tasks import TaskGroup
from cluster.regioncore import (
    RELEASE_GRACE_S,
    REMOTE_WAIT_S,
    PubWaiter,
    Ready,
    RegionCore,
    failure_answer,
    fields_message,
    message_fields,
)
from cluster.ring import slot_of
from cluster.slotlog import RedisSlotLog
from cluster.slots import SlotTable
from cluster.window import bounds_of
from relay.batch import AppendToLog, Batcher
from relay.config import Config
from relay.node import Node
from relay.snapshot import DirtySlots, RunRef
from relay.store import Message

__all__ = [
    "REMOTE_WAIT_S",
    "PubWaiter",
    "RegionState",
    "Unavailable",
    "failure_answer",
    "fields_message",
    "message_fields",
]

log = logging.getLogger(__name__)

TAIL_BLOCK_MS = 500
TOMBSTONES_PER_SLOT = 100_000
SNAPSHOT_SWITCH_INTERVAL_S = 0.0005
# A snapshot tick hands slots to its writer thread in batches of at most about this many
# records and tombstones (cluster/region/snapshots.py).
SNAPSHOT_BATCH_ITEMS = 2_000
# A run file of tombstones is removed once its newest tombstone is this much older than
# the dedupe window (cluster/region/snapshots.py): a snapshot still naming it leaves its
# runs out on load (by the window, or by the record of what was removed).
RUN_FILE_MARGIN_MS = 60_000
DRAIN_TIMEOUT_S = 10.0
AUDIT_S = 1.0
CATCH_UP_COUNT = 1000
CATCH_UP_ATTEMPTS = 5


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


class Unavailable(ClusterError):
    """The channel's owner cannot serve right now; the client may retry (``unavailable``)."""


class RegionState:
    """This node's part in its region: the state every layer shares."""

    def __init__(
        self,
        *,
        config: Config,
        node: Node,
        reactor: Any,
        fan_out: Callable[[Message, tuple[Hashable, ...]], None],
        wall_ms: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        c = config.cluster
        self.config = config
        self.node = node
        self.me = config.node.id
        self.region = config.node.region
        self.reactor = reactor
        self.fan_out = fan_out
        self.wall_ms = wall_ms
        # Monotonic seconds: leases, deadlines, the detector, snapshot ages (tests inject it).
        self.clock = clock
        # How the loops wait (tests inject one that steps the clock instead).
        self.sleep = sleep
        # What to do when ops ask this node to drain (the server shuts down gracefully).
        self.on_drain_requested: Callable[[], None] = lambda: None
        self.slots = c.slots
        self.replicas = c.replicas
        self.weight = c.weight
        self.lease_ttl_s = c.lease_ttl_ms / 1000
        self.batcher = Batcher(window_ms=c.batch_window_ms)
        # Group commit: the next append goes as soon as the previous one returned.
        self.commits = GroupCommit(
            flush=lambda: self._flush(force=True),
            pending=lambda: self.batcher.has_open or bool(self._cut),
            failures=lambda: self.counters["append_errors"],
            window_s=c.batch_window_ms / 1000,
        )
        self.batcher.on_gather = self.commits.wake
        self.detector = FailureDetector(
            DetectorConfig(
                lease_ttl_s=self.lease_ttl_s,
                suspect_after_s=self.lease_ttl_s,
                dead_after_s=math.inf,
            )
        )
        self.client: AsyncClient = redisconn.connect(c.redis_url)
        self.slotlog = RedisSlotLog.from_url(
            c.redis_url,
            self.region,
            wait_replicas=c.log_replicas,
            wait_timeout_ms=c.log_replicas_timeout_ms,
        )
        self.members: dict[str, Member] = {}
        # What ops set of the ring (weights, holds: cluster/ringstore.py).
        self.ring_state = RingState()
        # Reads of the ring state one at a time: a later read never installs older state.
        self._ring_reads = asyncio.Lock()
        self.epoch = 0
        # Slot state (cluster/slots.py: none → replica → claiming → owner → releasing),
        # changed only through the table; these are its live read-only views.
        self.slot_table = SlotTable()
        # What to claim, hand over, lose and audit (cluster/ownership.py, which holds the
        # ring and whether we drain), inside the region's one pure core
        # (cluster/regioncore.py) that the layers step; its Ready they carry out.
        self.core = RegionCore(
            me=self.me,
            region=self.region,
            node=node,
            batcher=self.batcher,
            ownership=OwnershipCore(self.me, self.slot_table, self.slots, self.replicas, AUDIT_S),
            positions=Positions(dict(p.split("=", 1) for p in c.peers)),
            interest=Interest(),
            acks=Tombstones(TOMBSTONES_PER_SLOT),
            persist=Persistence(
                checkpoint_interval_s=c.checkpoint_interval_s,
                max_backlog_s=c.link_max_backlog_s,
                snapshots=DirtySlots(max_age_s=config.node.snapshot_max_age_s),
            ),
            release_wait_s=self.lease_ttl_s + RELEASE_GRACE_S,
        )
        self.owned: Mapping[int, int] = self.slot_table.owned  # slot → epoch we write under
        self.claiming: AbstractSet[int] = self.slot_table.claiming
        self._claim_tasks: dict[int, asyncio.Task[Any]] = {}
        self._catch_up_locks: dict[int, asyncio.Lock] = {}
        self._checkpoint_locks: dict[int, asyncio.Lock] = {}
        self.releasing = self.slot_table.releasing  # owned slots being handed over: not served
        self.replicated = self.slot_table.replicas  # the ring's replica slots of this node
        # Owned slots changed since their last checkpoint (the core's: cluster/persist.py).
        self.dirty: AbstractSet[int] = self.core.persist.dirty
        self.slot_channels = self.core.slot_channels  # slot → its channels held here
        # Owner side: which peers have subscribers for a channel.
        self.subs = self.core.interest  # cluster/interest.py: who subscribes where
        self.interest = self.subs.peers
        # Subscriber side: the owner each locally subscribed channel is registered with.
        self.registered = self.subs.registered
        self._mesh: Mesh | None = None
        self.membership: Membership | None = None
        # False until start() has seen every lease held: a rebalance before that (our
        # own join event comes first, a ring event may too) would build the ring of
        # this node alone and claim every slot, fencing live owners at once.
        self.members_known = False
        self.stopped = False
        # Every background task (loops, readers, one-off tasks), stopped together.
        self.tasks = TaskGroup()
        self._background = self.tasks.background  # the one-off tasks under way
        self._tail_task: asyncio.Task[Any] | None = None
        # Entries whose append failed (Redis error, or a slot being claimed again).
        self._retry: list[AppendToLog] = []
        # Entries the batcher cut early (a full batch), for the group-commit loop's next
        # append; one _flush at a time (the loop's, a release's, a drain's), so a slot's
        # entries reach its log in the order they were cut.
        self._cut: list[AppendToLog] = []
        self._flush_lock = asyncio.Lock()
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
        # Bytes of sub replies to each peer computed this turn (cluster/region/meshserve.py).
        self._sub_reply_bytes: dict[str, int] = {}
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
                dedupe_window_ms=self.config.store.dedupe_window_s * 1000,
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
        self.core.links = bool(self.links)
        # Where this node stands in each slot's log and our mirrors of it (cluster/positions):
        # slot → newest log id applied here; origin → slot → newest mirror id applied.
        self.positions = self.core.positions
        self.applied = self.positions.log
        self.mirror_applied = self.positions.mirrors
        self._mirror_tasks: dict[str, asyncio.Task[Any]] = {}
        # ack=remote: per slot, (entry id, waiter) until a link confirms the entry.
        self.remote_waiters = self.core.remote_waiters
        self.confirmed = self.core.confirmed
        # Snapshots of owned slots on disk (relay/snapshot.py, relay/snapshot_io.py); the
        # core decides which are due (cluster/persist.py), this is its queue's view.
        self.snapshots = self.core.persist.snapshots
        self.snapshot_interval_s = config.node.snapshot_interval_s
        # One tick at a time: a graceful stop's final ticks wait for the loop's (whose
        # slots in flight they could not take).
        self.snapshot_lock = asyncio.Lock()
        self.slots_dir: Path | None = None
        # Recent acks per slot, (ch, id, hlc): a snapshot keeps them as tombstones.
        self.acks = self.core.acks
        self.tombstones = self.acks.by_slot
        self.snapshot_stats = {"written": 0, "failures": 0, "refused": 0, "bytes": 0, "loaded": 0}
        # The runs of tombstones on disk (cluster/region/snapshots.py): (slot, run start)
        # → where; (slot, run file) → the newest hlc it may hold; the next run file's
        # number (never reused: counted on from the clock in µs).
        self._run_refs: dict[tuple[int, int], RunRef] = {}
        self._run_files: dict[tuple[int, int], int] = {}
        self._next_run_file = time.time_ns() // 1000
        self._loaded_slots: set[int] = set()
        self.append_seconds = Buckets((0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
        self.batch_events = Buckets((1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))

    @property
    def mesh(self) -> Mesh | None:
        return self._mesh

    @mesh.setter
    def mesh(self, mesh: Mesh | None) -> None:
        self._mesh = mesh
        self.core.mesh_up = mesh is not None

    @property
    def ring(self) -> Placement | None:
        """Where the slots are: the ring of the live members, with the weights and holds
        ops set (cluster/rebalance.py, cluster/ringstore.py); the core's."""
        return self.core.ownership.ring

    @ring.setter
    def ring(self, ring: Placement | None) -> None:
        self.core.ownership.ring = ring

    @property
    def draining(self) -> bool:
        return self.core.ownership.draining

    @draining.setter
    def draining(self, draining: bool) -> None:
        self.core.ownership.draining = draining

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        return self.tasks.spawn(coro)

    def lease_fresh(self) -> bool:
        """Our lease is surely still ours (a paused process must not serve)."""
        m = self.membership
        return m is not None and self.clock() < m.lease_valid_until

    def _should_own(self, slot: int) -> bool:
        return self.core.ownership.should_own(slot)

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

    def _slot_lock(self, slot: int) -> asyncio.Lock:
        lock = self._catch_up_locks.get(slot)
        if lock is None:
            lock = self._catch_up_locks[slot] = asyncio.Lock()
        return lock

    def _changed(self, slot: int, rebuilt: bool = False) -> None:
        """``slot``'s pending state changed (``rebuilt``: whole): due for a checkpoint
        and a snapshot."""
        self.core.changed(slot, self.clock(), rebuilt)

    def _tombstone(self, slot: int, ch: str, ids: list[str], hlc: int) -> None:
        self.core.tombstone(slot, ch, ids, hlc, self.wall_ms())

    def _answer(self, ready: Ready) -> None:
        """Answer the waiters a step of the core settled (appends, links, ticks)."""
        for w, level in ready.answers:
            w.settle(level)

    # -- carried out by the layers above (cluster/region/claims.py, routing.py)

    def _lose(self, slot: int) -> None:
        raise NotImplementedError

    def _start_claim(self, slot: int) -> asyncio.Task[Any]:
        raise NotImplementedError

    def _deliver(self, message: Message) -> None:
        raise NotImplementedError

    async def _resubscribe(self, ch: str) -> None:
        raise NotImplementedError

    async def _flush(self, force: bool = False) -> None:
        raise NotImplementedError
