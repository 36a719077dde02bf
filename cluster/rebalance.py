"""Where slots are, and plans of ring changes: pure (the I/O is :mod:`cluster.ringstore`).

A region's ring comes from its live members and their weights (:mod:`cluster.ring`);
ops reshape it through the *ring state* (:class:`RingState`): weights that override
the nodes' own, and *holds* that keep slots with their old owner until a planned move
reaches them. :class:`Placement` answers "who serves slot s" with both;
:func:`make_plan` computes the exact moves of a change.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import ChangeInProgress, NodeDown, PlanError
from cluster.ring import MAX_WEIGHT, Move, Ring, SlotAssignment

PLAN_FORMAT = 1


@dataclass(frozen=True, slots=True)
class RingState:
    """What ops set of a region's ring (see the module's docstring)."""

    version: int = 0
    weights: Mapping[str, float] = field(default_factory=dict)
    holds: Mapping[int, str] = field(default_factory=dict)
    plan: str = ""  # the JSON of the change being applied, for `relay ring show`
    # The region's slots and replicas, as its nodes recorded them (0: not yet known).
    slots: int = 0
    replicas: int = 0


class Placement(SlotAssignment):
    """Who serves each slot: the ring's owner, unless a planned change holds the slot
    at its old owner. Answers the same questions as :class:`~cluster.ring.Ring`."""

    __slots__ = ("_holds", "ring")

    def __init__(
        self, ring: Ring, holds: Mapping[int, str] | None = None, live: Collection[str] = ()
    ) -> None:
        self.ring = ring
        owners = list(ring.assignment())
        prefs = [ring.preference_list(s) for s in range(ring.slots)]
        self._holds: dict[int, str] = {}
        for slot, node in sorted((holds or {}).items()):
            if 0 <= slot < ring.slots and node in live and owners[slot] != node:
                self._holds[slot] = node
                # The ring's owner-to-be becomes a replica: it tails the log meanwhile.
                prefs[slot] = (node, *(n for n in prefs[slot] if n != node))[: ring.replicas]
        super().__init__(prefs, sorted(set(ring.nodes) | set(self._holds.values())))

    @property
    def holds(self) -> Mapping[int, str]:
        """The holds in force (those naming a live node that is not the ring's owner)."""
        return self._holds

    @property
    def members(self) -> Mapping[str, float]:
        return self.ring.members

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node that owns or replicates something: the ring's, and holders."""
        return tuple(self._by_node)

    @property
    def slots(self) -> int:
        return self.ring.slots

    @property
    def replicas(self) -> int:
        return self.ring.replicas


def effective_weights(leases: Mapping[str, float], state: RingState) -> dict[str, float]:
    """Each live node's weight: the one ops set, else the one in its lease."""
    return {n: float(state.weights.get(n, w)) for n, w in sorted(leases.items())}


def placement(
    leases: Mapping[str, float],
    state: RingState,
    *,
    slots: int,
    replicas: int,
    holds: bool = True,
) -> Placement | None:
    """Where the slots are now, from the live nodes (``{node: lease weight}``) and the
    ring state; None when no live node has a positive weight. ``holds=False``: where
    they go once the change under way is done."""
    weights = {n: w for n, w in effective_weights(leases, state).items() if w > 0}
    if not weights:
        return None
    ring = Ring(weights, slots=slots, replicas=replicas)
    return Placement(ring, state.holds if holds else {}, live=leases)


# -- plans -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """A ring change and the exact slot moves it makes; computed, changes nothing."""

    region: str
    slots: int
    replicas: int
    base_version: int  # the ring state's version it was computed against
    before: Mapping[str, float]  # the ring's members and weights before
    after: Mapping[str, float]  # … and after (weight 0 members are left out)
    set_weights: Mapping[str, float]  # what the change writes into the ring state
    moves: tuple[Move, ...]

    def to_doc(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "region": self.region,
            "slots": self.slots,
            "replicas": self.replicas,
            "base_version": self.base_version,
            "before": dict(self.before),
            "after": dict(self.after),
            "set_weights": dict(self.set_weights),
            "moves": [{"slot": m.slot, "from": m.from_node, "to": m.to_node} for m in self.moves],
        }

    @classmethod
    def from_doc(cls, doc: Any) -> Plan:
        """A plan read back from ``relay ring plan --json``; :class:`PlanError` if it is
        not one."""
        try:
            if doc.get("format") != PLAN_FORMAT:
                raise PlanError(
                    f"plan format {doc.get('format')!r} is not {PLAN_FORMAT}: plan again"
                )
            return cls(
                region=str(doc["region"]),
                slots=int(doc["slots"]),
                replicas=int(doc["replicas"]),
                base_version=int(doc["base_version"]),
                before={str(k): float(v) for k, v in doc["before"].items()},
                after={str(k): float(v) for k, v in doc["after"].items()},
                set_weights={str(k): float(v) for k, v in doc["set_weights"].items()},
                moves=tuple(
                    Move(int(m["slot"]), str(m["from"]), str(m["to"])) for m in doc["moves"]
                ),
            )
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
            raise PlanError(f"not a plan of `relay ring plan --json`: {e!r}") from None


def _check_weight(node: str, w: float) -> None:
    if not (0 <= w <= MAX_WEIGHT):
        raise PlanError(f"{node}: weight {w} is not in [0, {MAX_WEIGHT}]")


def check_shape(state: RingState, slots: int, replicas: int) -> None:
    """:class:`PlanError` unless ``slots`` and ``replicas`` are the region's (when known)."""
    if state.slots and state.slots != slots:
        raise PlanError(f"the region has {state.slots} slots, not {slots}: pass --slots")
    if state.replicas and state.replicas != replicas:
        raise PlanError(
            f"the region keeps {state.replicas} copies of each slot, not {replicas}: "
            "pass --replicas"
        )


def make_plan(
    region: str,
    leases: Mapping[str, float],
    state: RingState,
    *,
    add: Mapping[str, float] | None = None,
    remove: Sequence[str] = (),
    weights: Mapping[str, float] | None = None,
    slots: int,
    replicas: int,
    live_adds: bool = False,
) -> Plan:
    """The plan of a change: ``add`` nodes (with weights), ``remove`` members (weight 0:
    they stay up with no slot, ready to drain), set ``weights``.

    The moves are exactly the slots whose owner differs between the ring now and the
    ring after (each goes straight to its final owner), in slot order; the same inputs
    give the same plan. ``live_adds``: an added node must hold a lease (to apply it).
    """
    add = dict(add or {})
    weights = dict(weights or {})
    check_shape(state, slots, replicas)
    if state.holds or state.plan:
        raise ChangeInProgress(
            f"a change of {region}'s ring is under way or was interrupted "
            f"({len(state.holds)} slots still held): finish it with "
            "`relay ring apply --resume`"
        )
    before_w = {n: w for n, w in effective_weights(leases, state).items() if w > 0}
    problems: list[str] = []
    for n in remove:
        if n not in before_w:
            problems.append(f"{n} is not on {region}'s ring")
    for n in weights:
        if n not in before_w and n not in leases:
            problems.append(f"{n} is not a member of {region}")
    for n in add:
        if n in before_w:
            problems.append(f"{n} is already on {region}'s ring")
    for n, w in [*add.items(), *weights.items()]:
        try:
            _check_weight(n, w)
        except PlanError as e:
            problems.append(str(e))
    if problems:
        raise PlanError("; ".join(problems))
    down = sorted(n for n in add if n not in leases)
    if live_adds and down:
        raise NodeDown(
            f"{', '.join(down)} {'holds' if len(down) == 1 else 'hold'} no lease in {region}: "
            f"start {'it' if len(down) == 1 else 'them'} first "
            "(with cluster.weight = 0 they join with no slot)"
        )
    set_weights = {**add, **weights, **dict.fromkeys(remove, 0.0)}
    after_w = {n: w for n, w in {**before_w, **set_weights}.items() if w > 0}
    if not after_w:
        raise PlanError(f"the change leaves {region} without a node on the ring")
    after = Ring(after_w, slots=slots, replicas=replicas)
    if before_w:
        now = Placement(Ring(before_w, slots=slots, replicas=replicas))
        moves = tuple(
            Move(s, a, b)
            for s, (a, b) in enumerate(zip(now.assignment(), after.assignment(), strict=True))
            if a != b
        )
    else:
        moves = ()
    return Plan(
        region=region,
        slots=slots,
        replicas=replicas,
        base_version=state.version,
        before=dict(sorted(before_w.items())),
        after=dict(after.members),
        set_weights=dict(sorted(set_weights.items())),
        moves=moves,
    )
