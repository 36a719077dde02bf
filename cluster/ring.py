"""The ring: which node of a region owns each slot, and which nodes replicate it.

A channel belongs to slot ``slot_of(channel) = blake2b-64(channel) mod S``; slots are what
moves. The ring maps each slot to a *preference list*: the owner, then ``R - 1`` replicas,
all distinct. It is a pure function of the members (``{node_id: weight}``) and its
parameters, so every node that sees the same live members computes the same ring, with
no coordination.

How a slot finds its nodes (docs/RING.md has the reasons and the figures):

1. **Vnodes.** Each node puts ``round(vnodes_per_weight * weight)`` points on a 64-bit
   circle (blake2b of the node id and the vnode index). Each slot has its own fixed point.
2. **Bounded loads.** A node's *share* is ``S * weight / W`` (``W`` the sum of weights);
   it may own at most ``floor(load_factor * share)`` slots. A slot walks clockwise from
   its point and takes the first node with room. The walks advance together, nearest
   (slot, vnode) pair first, which moves fewer slots when members change than walking
   one slot after another.
3. **Floor.** A node whose vnodes lie where few slots do may still end up with almost
   nothing; it then takes the slots nearest to it from nodes above their own floor,
   until it owns ``floor(min_load_factor * share)``.
4. **Replicas.** Rank ``r`` (``1 … R-1``) is filled like step 2, skipping the nodes the
   slot already has, with the same bound, so replicas are as balanced as owners. Rank 1
   is the node most likely to own the slot if its owner dies.

The upper bound is exact while ``N <= (load_factor - 1) * S`` (64 nodes at the
defaults); beyond, capacities are topped up by one slot, largest remainder first, so
that every slot still has an owner.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from hashlib import blake2b
from types import MappingProxyType

from cluster.errors import RingError

DEFAULT_SLOTS = 256
DEFAULT_REPLICAS = 2
DEFAULT_VNODES_PER_WEIGHT = 100
DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_MIN_LOAD_FACTOR = 0.5
MAX_SLOTS = 1 << 16
MAX_WEIGHT = 64.0
MAX_VNODES_PER_WEIGHT = 1000

_CIRCLE = 1 << 64


def slot_of(channel: str, slots: int = DEFAULT_SLOTS) -> int:
    """The slot of ``channel``: the first 8 bytes of its blake2b digest, modulo ``slots``.

    Stable across processes, machines and Python versions (unlike ``hash()``): slot
    numbers are part of Redis key names and snapshots, so this function must never change.
    About 0.6 µs per call uncached (docs/RING.md); busy channels hit a bounded cache.
    """
    if slots < 1:
        raise RingError(f"slots must be positive, not {slots}")
    return _slot_of(channel, slots)


@lru_cache(maxsize=1 << 16)
def _slot_of(channel: str, slots: int) -> int:
    return int.from_bytes(blake2b(channel.encode(), digest_size=8).digest(), "big") % slots


@dataclass(frozen=True, slots=True)
class Move:
    """Slot ``slot`` changes owner from ``from_node`` to ``to_node``."""

    slot: int
    from_node: str
    to_node: str


@dataclass(frozen=True, slots=True)
class ReplicaChange:
    """Slot ``slot``'s replicas (its preference list after the owner) change."""

    slot: int
    before: tuple[str, ...]
    after: tuple[str, ...]


def _point(data: bytes, person: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8, person=person).digest(), "big")


@lru_cache(maxsize=1024)  # a few MB at most; members change rarely
def _vnode_points(node_id: str, count: int) -> tuple[int, ...]:
    key = node_id.encode()
    return tuple(_point(i.to_bytes(4, "big") + key, b"relay.vnode") for i in range(count))


@lru_cache(maxsize=8)
def _slot_points(slots: int) -> tuple[int, ...]:
    return tuple(_point(s.to_bytes(4, "big"), b"relay.slot") for s in range(slots))


def _capacities(
    weights: Mapping[str, Fraction], slots: int, load_factor: Fraction
) -> dict[str, int]:
    total = sum(weights.values())
    share = {n: load_factor * slots * w / total for n, w in weights.items()}
    caps = {n: math.floor(x) for n, x in share.items()}
    short = slots - sum(caps.values())
    if short > 0:  # many nodes, few slots: floor() left too little room for every slot
        for n in sorted(share, key=lambda n: (caps[n] - share[n], n))[:short]:
            caps[n] += 1
    return caps


def _validated(
    members: Mapping[str, float] | Iterable[str],
    slots: int,
    replicas: int,
    vnodes_per_weight: int,
    load_factor: float,
    min_load_factor: float,
) -> dict[str, float]:
    problems: list[str] = []
    weights: dict[object, object]
    if isinstance(members, str):
        problems.append("members must be {node_id: weight} or node ids, not one string")
        weights = {}
    elif isinstance(members, Mapping):
        weights = dict[object, object](members.items())
    else:
        ids = list(members)
        weights = dict.fromkeys(ids, 1.0)
        if len(weights) != len(ids):
            problems.append("node ids must be distinct")
    if not weights and not problems:
        problems.append("a ring needs at least one member")
    for node_id, weight in weights.items():
        if not isinstance(node_id, str) or not node_id:
            problems.append(f"node id {node_id!r} must be a non-empty string")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            problems.append(f"weight of {node_id!r} must be a number, not {weight!r}")
        elif not 0.0 < weight <= MAX_WEIGHT:  # also refuses NaN
            problems.append(f"weight of {node_id!r} must be in (0, {MAX_WEIGHT}], not {weight}")
    if not 1 <= slots <= MAX_SLOTS:
        problems.append(f"slots must be in [1, {MAX_SLOTS}], not {slots}")
    if replicas < 1:
        problems.append(f"replicas must be at least 1, not {replicas}")
    if not 1 <= vnodes_per_weight <= MAX_VNODES_PER_WEIGHT:
        problems.append(
            f"vnodes_per_weight must be in [1, {MAX_VNODES_PER_WEIGHT}], not {vnodes_per_weight}"
        )
    if not 1.0 <= load_factor <= 4.0:
        problems.append(f"load_factor must be in [1, 4], not {load_factor}")
    if not 0.0 <= min_load_factor < 1.0:
        problems.append(f"min_load_factor must be in [0, 1), not {min_load_factor}")
    if problems:
        raise RingError(problems)
    checked = {
        n: float(w) for n, w in weights.items() if isinstance(n, str) and isinstance(w, int | float)
    }
    return {n: checked[n] for n in sorted(checked)}


def _fill_rank(
    points: list[int],
    nodes: list[str],
    slot_points: tuple[int, ...],
    starts: list[int],
    capacity: Mapping[str, int],
    chosen: list[list[str]],
) -> None:
    """Append one node to every ``chosen[slot]``: the first clockwise with room, not chosen.

    All walks advance together, nearest (slot, vnode) pair first. A node that is full
    stays full, so a walk skips full nodes at once instead of queueing them.
    """
    size = len(points)
    load = dict.fromkeys(capacity, 0)

    def advance(slot: int, i: int, steps: int) -> tuple[int, int, int, int] | None:
        taken = chosen[slot]
        while steps < size:
            node = nodes[i]
            if load[node] < capacity[node] and node not in taken:
                return ((points[i] - slot_points[slot]) % _CIRCLE, slot, i, steps)
            i = (i + 1) % size
            steps += 1
        return None

    def overflow(slot: int) -> None:
        # A whole turn found no room: greedy filling can strand a replica rank even
        # though room exists. Take the nearest allowed node and exceed its bound by one.
        i = starts[slot]
        while nodes[i] in chosen[slot]:
            i = (i + 1) % size
        load[nodes[i]] += 1
        chosen[slot].append(nodes[i])

    heap: list[tuple[int, int, int, int]] = []
    for slot, start in enumerate(starts):
        entry = advance(slot, start, 0)
        if entry is None:
            overflow(slot)
        else:
            heap.append(entry)
    heapq.heapify(heap)
    while heap:
        _, slot, i, steps = heapq.heappop(heap)
        node = nodes[i]
        if load[node] < capacity[node]:
            load[node] += 1
            chosen[slot].append(node)
            continue
        entry = advance(slot, (i + 1) % size, steps + 1)
        if entry is None:
            overflow(slot)
        else:
            heapq.heappush(heap, entry)


def _lift(
    weights: Mapping[str, Fraction],
    points_of: Mapping[str, list[int]],
    slot_points: tuple[int, ...],
    min_load_factor: Fraction,
    owners: list[str],
) -> None:
    """Give every node at least ``floor(min_load_factor * share)`` slots, nearest first.

    Bounded loads cap the top; a node whose vnodes happen to lie where few slots do can
    still end up with almost nothing. It takes the slots nearest to it (the ones whose
    walk reaches it soonest) from owners that stay above their own floor.
    """
    total = sum(weights.values())
    slots = len(owners)
    floors = {n: math.floor(min_load_factor * slots * w / total) for n, w in weights.items()}
    loads = dict.fromkeys(weights, 0)
    for n in owners:
        loads[n] += 1
    for node in sorted(weights):
        if loads[node] >= floors[node]:
            continue
        mine = points_of[node]
        near = sorted(
            ((mine[bisect.bisect_left(mine, sp) % len(mine)] - sp) % _CIRCLE, slot)
            for slot, sp in enumerate(slot_points)
        )
        for _, slot in near:
            if loads[node] >= floors[node]:
                break
            victim = owners[slot]
            if victim != node and loads[victim] > floors[victim]:
                owners[slot] = node
                loads[victim] -= 1
                loads[node] += 1


class SlotAssignment:
    """Owner and replicas of every slot, and the lookups on them that routing makes: what
    a :class:`Ring` and a planned change's ``cluster.rebalance.Placement`` share. Built from
    every slot's preference list (owner first) and the nodes to index, in their order."""

    __slots__ = ("_by_node", "_owners", "_preference", "_replicas_by_node")

    def __init__(self, preference: Sequence[tuple[str, ...]], nodes: Iterable[str]) -> None:
        self._preference = tuple(preference)
        self._owners = tuple(p[0] for p in self._preference)
        by_node: dict[str, list[int]] = {n: [] for n in nodes}
        replicas_by_node: dict[str, list[int]] = {n: [] for n in by_node}
        for slot, pref in enumerate(self._preference):
            by_node[pref[0]].append(slot)
            for n in pref[1:]:
                replicas_by_node[n].append(slot)
        self._by_node = {n: tuple(s) for n, s in by_node.items()}
        self._replicas_by_node = {n: tuple(s) for n, s in replicas_by_node.items()}

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < len(self._owners):
            raise RingError(f"slot {slot} is not in [0, {len(self._owners)})")

    def owner(self, slot: int) -> str:
        """The node that owns ``slot`` (on every routed op: one check, one index)."""
        self._check_slot(slot)
        return self._owners[slot]

    def preference_list(self, slot: int) -> tuple[str, ...]:
        """Owner, then replicas of ``slot``: ``min(R, N)`` distinct nodes."""
        self._check_slot(slot)
        return self._preference[slot]

    def assignment(self) -> tuple[str, ...]:
        """The owner of every slot, indexed by slot."""
        return self._owners

    def slots_of(self, node_id: str) -> tuple[int, ...]:
        """The slots ``node_id`` owns, ascending; empty for a node that owns none."""
        return self._by_node.get(node_id, ())

    def replicas_of(self, node_id: str) -> tuple[int, ...]:
        """The slots ``node_id`` replicates (not owns), ascending."""
        return self._replicas_by_node.get(node_id, ())

    def loads(self) -> dict[str, int]:
        """Slots owned per node, every indexed node included."""
        return {n: len(s) for n, s in self._by_node.items()}


class Ring(SlotAssignment):
    """A region's ring: owner and replicas of every slot, from the members alone.

    ``members`` is ``{node_id: weight}`` (positive weights up to :data:`MAX_WEIGHT`) or an
    iterable of node ids (weight 1.0 each). Build a new ring whenever the live members
    change (:meth:`with_member`, :meth:`without_member`), then :func:`diff` the two to
    learn which slots to hand over. Raises :class:`RingError` listing every problem.
    """

    __slots__ = (
        "_capacity",
        "_load_factor",
        "_members",
        "_min_load_factor",
        "_replicas",
        "_slots",
        "_vnodes_per_weight",
    )

    def __init__(
        self,
        members: Mapping[str, float] | Iterable[str],
        *,
        slots: int = DEFAULT_SLOTS,
        replicas: int = DEFAULT_REPLICAS,
        vnodes_per_weight: int = DEFAULT_VNODES_PER_WEIGHT,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        min_load_factor: float = DEFAULT_MIN_LOAD_FACTOR,
    ) -> None:
        weights = _validated(
            members, slots, replicas, vnodes_per_weight, load_factor, min_load_factor
        )
        self._members: Mapping[str, float] = MappingProxyType(weights)
        self._slots = slots
        self._replicas = replicas
        self._vnodes_per_weight = vnodes_per_weight
        self._load_factor = load_factor
        self._min_load_factor = min_load_factor

        points_of = {
            n: sorted(_vnode_points(n, max(1, round(vnodes_per_weight * w))))
            for n, w in weights.items()
        }
        vnodes = sorted((p, n) for n, ps in points_of.items() for p in ps)
        points = [p for p, _ in vnodes]
        nodes = [n for _, n in vnodes]
        slot_points = _slot_points(slots)
        starts = [bisect.bisect_left(points, sp) % len(points) for sp in slot_points]
        exact = {n: Fraction(w) for n, w in weights.items()}
        self._capacity = _capacities(exact, slots, Fraction(load_factor))

        chosen: list[list[str]] = [[] for _ in range(slots)]
        _fill_rank(points, nodes, slot_points, starts, self._capacity, chosen)
        owners = [c[0] for c in chosen]
        _lift(exact, points_of, slot_points, Fraction(min_load_factor), owners)
        chosen = [[o] for o in owners]
        for _rank in range(1, min(replicas, len(weights))):
            _fill_rank(points, nodes, slot_points, starts, self._capacity, chosen)

        super().__init__([tuple(c) for c in chosen], weights)

    # -- what the ring was built from

    @property
    def members(self) -> Mapping[str, float]:
        """``{node_id: weight}``, sorted by node id, read-only."""
        return self._members

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, sorted."""
        return tuple(self._members)

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def replicas(self) -> int:
        """R: the length of a full preference list (owner included)."""
        return self._replicas

    @property
    def vnodes_per_weight(self) -> int:
        return self._vnodes_per_weight

    @property
    def load_factor(self) -> float:
        """A node owns at most ``floor(load_factor * share)`` slots."""
        return self._load_factor

    @property
    def min_load_factor(self) -> float:
        """A node owns at least ``floor(min_load_factor * share)`` slots."""
        return self._min_load_factor

    # -- queries (and those of SlotAssignment)

    def capacity(self, node_id: str) -> int:
        """The most slots ``node_id`` may own (and replicate, per rank)."""
        try:
            return self._capacity[node_id]
        except KeyError:
            raise RingError(f"{node_id!r} is not on the ring") from None

    # -- derived rings

    def _rebuilt(self, members: Mapping[str, float]) -> Ring:
        return Ring(
            members,
            slots=self._slots,
            replicas=self._replicas,
            vnodes_per_weight=self._vnodes_per_weight,
            load_factor=self._load_factor,
            min_load_factor=self._min_load_factor,
        )

    def with_member(self, node_id: str, weight: float = 1.0) -> Ring:
        """This ring with ``node_id`` added, or reweighted if it is a member."""
        return self._rebuilt({**self._members, node_id: weight})

    def without_member(self, node_id: str) -> Ring:
        """This ring without ``node_id``. Raises :class:`RingError` if it is not a member."""
        if node_id not in self._members:
            raise RingError(f"{node_id!r} is not on the ring")
        return self._rebuilt({n: w for n, w in self._members.items() if n != node_id})

    def _key(self) -> tuple[object, ...]:
        return (
            tuple(self._members.items()),
            self._slots,
            self._replicas,
            self._vnodes_per_weight,
            self._load_factor,
            self._min_load_factor,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Ring({dict(self._members)!r}, slots={self._slots}, replicas={self._replicas}, "
            f"vnodes_per_weight={self._vnodes_per_weight}, load_factor={self._load_factor}, "
            f"min_load_factor={self._min_load_factor})"
        )


def _check_comparable(old: Ring, new: Ring) -> None:
    if old.slots != new.slots:
        raise RingError(f"rings of {old.slots} and {new.slots} slots cannot be compared")


def diff(old: Ring, new: Ring) -> list[Move]:
    """The slots whose owner differs from ``old`` to ``new``, ascending by slot.

    Each move is a handoff to plan (DESIGN.md, "Rebalancing"). Replica changes are
    :func:`replica_diff`.
    """
    _check_comparable(old, new)
    return [
        Move(slot, a, b)
        for slot, (a, b) in enumerate(zip(old.assignment(), new.assignment(), strict=True))
        if a != b
    ]


def replica_diff(old: Ring, new: Ring) -> list[ReplicaChange]:
    """The slots whose replicas differ from ``old`` to ``new``, ascending by slot."""
    _check_comparable(old, new)
    out: list[ReplicaChange] = []
    for slot in range(old.slots):
        before = old.preference_list(slot)[1:]
        after = new.preference_list(slot)[1:]
        if before != after:
            out.append(ReplicaChange(slot, before, after))
    return out
