"""The region node's ownership and timer decisions as one pure core, stepped like etcd
raft's ``RawNode``: the edge feeds it an event and carries out the :class:`Ready` it
returns.

It decides which slots this node claims, hands over, loses and replicates, when the
periodic audit is due and which owner records it reads, and what a lost lease drops.
It does no I/O and reads no clock: time comes in with :class:`Tick`. The slot states
themselves stay in :class:`cluster.slots.SlotTable`, which the core reads and the edge
changes as it carries a Ready out (a claim started, read to its end, a hand-over over).

Events and what their Ready asks for::

    Members(effects)       -> peers (mesh connections to make, drop), failovers, rebalance
    Rebalance(live, state) -> ring placed; releases (hand these over), replicas (record)
    ReleaseEnded(slots)    -> losses (the hand-overs whose slots the ring moved away)
    HandedOver()           -> claims (start these), joins (claims under way to wait for)
    Tick(now)              -> audit (re-read the ring state, then step AuditDue)
    AuditDue()             -> read_records (the owned slots whose owner records to read)
    OwnerRecords(records)  -> losses (records naming someone else), claims
    LeaseLost()            -> losses (everything owned), rejoin

The edge is :mod:`cluster.region.claims` and :mod:`cluster.region.members`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cluster.failure import DownReason, Effect, MemberDown, MemberUp
from cluster.rebalance import Placement, RingState, placement
from cluster.slots import SlotTable

AUDIT_S = 1.0


# -- events in


@dataclass(frozen=True, slots=True)
class Members:
    """The failure detector's effects (cluster/failure.py) after a membership fact."""

    effects: tuple[Effect, ...]


@dataclass(frozen=True, slots=True)
class Rebalance:
    """Place the slots on these live members (node → lease weight) and ring state."""

    live: Mapping[str, float]
    state: RingState


@dataclass(frozen=True, slots=True)
class ReleaseEnded:
    """The hand-overs of ``slots`` are over (done or failed; drains too)."""

    slots: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class HandedOver:
    """The hand-overs the last Rebalance asked for are over: claim what the ring gives."""


@dataclass(frozen=True, slots=True)
class Tick:
    """The edge's beat, with the monotonic time."""

    now: float


@dataclass(frozen=True, slots=True)
class AuditDue:
    """The audit the last Tick asked for re-read the ring state: what to check now?"""


@dataclass(frozen=True, slots=True)
class OwnerRecords:
    """The owner records read for the audit: slot → (owner node, epoch)."""

    records: Mapping[int, tuple[str, int]]


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """This node's own lease expired (a long pause?)."""


Event = Members | Rebalance | ReleaseEnded | HandedOver | Tick | AuditDue | OwnerRecords | LeaseLost


# -- what to carry out


@dataclass(frozen=True, slots=True)
class Ready:
    """What the edge carries out after a step, in this order: mesh peers, losses,
    releases, replicas, claims; then the rebalance, the audit and the rejoin."""

    # In order, (node, True) for a member up: connect the mesh to it; (node, False) for
    # one down: drop its connection (a restart is a down then an up).
    peers: tuple[tuple[str, bool], ...] = ()
    failovers: int = 0  # members down whose lease ran out (their slots fail over)
    rebalance: bool = False  # the live members changed: step Rebalance with them

    losses: tuple[int, ...] = ()  # stop serving these now (fenced, lease lost)
    releases: tuple[int, ...] = ()  # hand these over (flush, checkpoint, release)
    replicas: frozenset[int] | None = None  # the replica slots to record (None: as they are)
    claims: tuple[int, ...] = ()  # start claiming these (none is being claimed or owned)
    joins: tuple[int, ...] = ()  # ours and being claimed already: wait for those claims
    audit: bool = False  # the audit is due: re-read the ring state, then step AuditDue
    read_records: tuple[int, ...] | None = None  # read these owner records (None: no audit)
    rejoin: bool = False  # take a new lease and epoch

    def __bool__(self) -> bool:
        return self != _EMPTY


_EMPTY = Ready()


@dataclass(slots=True)
class OwnershipCore:
    """This node's ownership decisions; see the module's docstring."""

    me: str
    table: SlotTable
    slots: int
    replicas: int
    audit_s: float = AUDIT_S
    ring: Placement | None = None
    draining: bool = False
    next_audit: float | None = field(default=None)

    def should_own(self, slot: int) -> bool:
        ring = self.ring
        return (
            ring is not None
            and not self.draining
            and self.me in ring.nodes
            and ring.owner(slot) == self.me
        )

    def mine(self) -> tuple[int, ...]:
        """The slots the ring gives this node (none while draining)."""
        ring = self.ring
        if ring is None or self.draining or self.me not in ring.nodes:
            return ()
        return ring.slots_of(self.me)

    def step(self, event: Event) -> Ready:
        if isinstance(event, Members):
            return self._members(event.effects)
        if isinstance(event, Rebalance):
            return self._rebalance(event)
        if isinstance(event, ReleaseEnded):
            # Kept if the ring gives the slot back to us (a drain during a rebalance).
            return Ready(losses=tuple(s for s in event.slots if not self.should_own(s)))
        if isinstance(event, HandedOver):
            return self._claims()
        if isinstance(event, Tick):
            return self._tick(event.now)
        if isinstance(event, AuditDue):
            return self._audit_due()
        if isinstance(event, OwnerRecords):
            return self._owner_records(event.records)
        if isinstance(event, LeaseLost):
            if self.draining:
                return _EMPTY
            return Ready(losses=tuple(sorted(self.table.owned)), rejoin=True)
        raise TypeError(f"not an ownership event: {event!r}")

    def _members(self, effects: tuple[Effect, ...]) -> Ready:
        peers: list[tuple[str, bool]] = []
        failovers = 0
        for e in effects:
            if isinstance(e, MemberUp):
                peers.append((e.node_id, True))
            elif isinstance(e, MemberDown):
                if e.node_id != self.me:
                    peers.append((e.node_id, False))
                if e.reason in (DownReason.LEASE_EXPIRED, DownReason.LEASE_TIMEOUT):
                    failovers += 1
        changed = any(isinstance(e, MemberUp | MemberDown) for e in effects)
        return Ready(peers=tuple(peers), failovers=failovers, rebalance=changed)

    def _rebalance(self, event: Rebalance) -> Ready:
        live = dict(event.live)
        if self.draining:
            live.pop(self.me, None)
        self.ring = ring = placement(live, event.state, slots=self.slots, replicas=self.replicas)
        if ring is None or self.draining:
            return _EMPTY
        in_ring = self.me in ring.nodes
        mine = set(ring.slots_of(self.me)) if in_ring else set()
        replica = set(ring.replicas_of(self.me)) - mine if in_ring else set()
        return Ready(
            releases=tuple(s for s in sorted(self.table.owned) if s not in mine),
            replicas=frozenset(replica),
        )

    def _claims(self, lost: frozenset[int] = frozenset()) -> Ready:
        """Claim what the ring gives us and we neither own (``lost``: about to be lost)
        nor claim; report the claims under way of our slots for the edge to wait on."""
        owned, claiming = self.table.owned, self.table.claiming
        claims, joins = [], []
        for s in sorted(self.mine()):
            if s in claiming:
                joins.append(s)
            elif s not in owned or s in lost:
                claims.append(s)
        return Ready(claims=tuple(claims), joins=tuple(joins))

    def _tick(self, now: float) -> Ready:
        if self.next_audit is None:
            self.next_audit = now + self.audit_s
            return _EMPTY
        if now < self.next_audit:
            return _EMPTY
        self.next_audit = now + self.audit_s
        return _EMPTY if self.draining else Ready(audit=True)

    def _audit_due(self) -> Ready:
        ring = self.ring
        if self.draining or ring is None or self.me not in ring.nodes:
            return _EMPTY
        # Slots being handed over release their records on purpose: not a move to heal.
        releasing = self.table.releasing
        return Ready(read_records=tuple(sorted(s for s in self.table.owned if s not in releasing)))

    def _owner_records(self, records: Mapping[int, tuple[str, int]]) -> Ready:
        """A claim made under an older view of the ring can fence the true owner before
        it wrote anything, and a claim can fail on a Redis error. Both heal here: a slot
        whose record names someone else (or another epoch of ours) is lost and, if the
        ring gives it to us, claimed again; a slot of ours nobody claims is claimed."""
        if self.draining:
            return _EMPTY
        owned = self.table.owned
        losses = tuple(
            slot
            for slot, (owner, epoch) in sorted(records.items())
            if slot in owned and (owner != self.me or epoch != owned[slot])
        )
        claims = self._claims(frozenset(losses))
        return Ready(losses=losses, claims=claims.claims)
