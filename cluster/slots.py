"""Which slots this node serves, replicates, claims or hands over: one state per slot.

Everything that decides a slot's ownership state lives here, and every transition sits in
one table, :data:`TRANSITIONS` (as :mod:`cluster.failure` does for members). The table is
pure: the edge (the router) reports what happened — the ring made us a replica, a claim
started or read the log to its end, a hand-over started or ended, the slot was lost — and
reads the views (:attr:`SlotTable.owned`, :attr:`~SlotTable.claiming`, …) it serves from.

States::

    NONE ──replica──▶ REPLICA ──claim──▶ CLAIMING ──claimed──▶ OWNER ──release──▶ RELEASING
      ▲                  ▲                  │                    ▲  │                │
      └──────── rest ────┴──── abandon ─────┘                    │  └──── lose ──▶ rest
                                                                 └──── keep ─────────┘

"Rest" is where a slot goes when it stops being claimed or owned: REPLICA if the ring
makes this node one of the slot's replicas, else NONE. The ring's replica role is a
fact the table records (:meth:`SlotTable.set_replicas`), not a state of its own: a slot
being claimed or owned can be a replica in the newest ring too, and comes to rest there.

A transition the table refuses is a bug in the caller (say, a claim read to its end for a
slot nobody was claiming): it raises :class:`~cluster.errors.SlotStateError`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Set
from typing import Final

from cluster.errors import SlotStateError


class SlotState(enum.Enum):
    """A slot's state on this node."""

    NONE = "none"  # neither served nor replicated here
    REPLICA = "replica"  # its owner's log is tailed and applied here
    CLAIMING = "claiming"  # fencing the old owner and reading the log to its end
    OWNER = "owner"  # served here, appended under ``epoch``
    RELEASING = "releasing"  # still owned, being handed over: not served


class SlotEvent(enum.Enum):
    """What happened to a slot, as the edge reports it."""

    REPLICA_ON = "replica_on"  # the ring makes this node a replica of the slot
    REPLICA_OFF = "replica_off"  # … and no longer does
    CLAIM = "claim"  # a claim starts (or a claim task takes up its slot)
    CLAIMED = "claimed"  # the claim fenced the old owner and read the log: serve
    CLAIM_ENDED = "claim_ended"  # the claim task is over, whatever its outcome
    RELEASE = "release"  # a hand-over starts: stop serving
    RELEASE_ENDED = "release_ended"  # the hand-over is over (a loss may follow)
    LOSE = "lose"  # fenced, lease lost, handed over: the slot is not ours


class _Rest(enum.Enum):
    """A target resolved per slot: REPLICA if the ring makes us a replica, else NONE."""

    REST = "rest"


REST: Final = _Rest.REST
Target = SlotState | _Rest
REFUSED: Final = None

_N, _R, _C, _O, _X = (
    SlotState.NONE,
    SlotState.REPLICA,
    SlotState.CLAIMING,
    SlotState.OWNER,
    SlotState.RELEASING,
)
_E = SlotEvent

# (state, event) -> next state; REFUSED (None) raises. Total over SlotState x SlotEvent:
# a test walks every entry.
TRANSITIONS: Final[Mapping[tuple[SlotState, SlotEvent], Target | None]] = {
    # NONE
    (_N, _E.REPLICA_ON): _R,
    (_N, _E.REPLICA_OFF): _N,
    (_N, _E.CLAIM): _C,
    (_N, _E.CLAIMED): REFUSED,
    (_N, _E.CLAIM_ENDED): _N,  # a claim task that never took its slot up (cancelled)
    (_N, _E.RELEASE): REFUSED,
    (_N, _E.RELEASE_ENDED): _N,  # lost during the hand-over
    (_N, _E.LOSE): _N,
    # REPLICA
    (_R, _E.REPLICA_ON): _R,
    (_R, _E.REPLICA_OFF): _N,
    (_R, _E.CLAIM): _C,
    (_R, _E.CLAIMED): REFUSED,
    (_R, _E.CLAIM_ENDED): _R,
    (_R, _E.RELEASE): REFUSED,
    (_R, _E.RELEASE_ENDED): _R,
    (_R, _E.LOSE): _R,
    # CLAIMING: the replica role is recorded, the claim goes on
    (_C, _E.REPLICA_ON): _C,
    (_C, _E.REPLICA_OFF): _C,
    (_C, _E.CLAIM): _C,  # the claim task starting on a slot marked at its spawn
    (_C, _E.CLAIMED): _O,
    (_C, _E.CLAIM_ENDED): REST,  # gave up, failed, or the ring moved on
    (_C, _E.RELEASE): REFUSED,
    (_C, _E.RELEASE_ENDED): _C,  # lost during a hand-over, then claimed again
    (_C, _E.LOSE): _C,  # nothing owned to lose yet
    # OWNER
    (_O, _E.REPLICA_ON): _O,
    (_O, _E.REPLICA_OFF): _O,
    (_O, _E.CLAIM): REFUSED,
    (_O, _E.CLAIMED): REFUSED,
    (_O, _E.CLAIM_ENDED): _O,  # the claim that just made us owner
    (_O, _E.RELEASE): _X,
    (_O, _E.RELEASE_ENDED): _O,
    (_O, _E.LOSE): REST,
    # RELEASING: owned (its epoch still fences appends) but not served
    (_X, _E.REPLICA_ON): _X,
    (_X, _E.REPLICA_OFF): _X,
    (_X, _E.CLAIM): REFUSED,
    (_X, _E.CLAIMED): REFUSED,
    (_X, _E.CLAIM_ENDED): _X,
    (_X, _E.RELEASE): _X,  # two hand-overs at once (a drain during a rebalance)
    (_X, _E.RELEASE_ENDED): _O,  # kept: the caller loses it next if the ring moved it
    (_X, _E.LOSE): REST,
}

OWNED_STATES: Final = frozenset({SlotState.OWNER, SlotState.RELEASING})


class SlotTable:
    """Every slot's state on this node, changed only through :meth:`fire`.

    The views are live read-only collections the edge may keep and test often (the hot
    path asks ``slot in owned``): they are the table's own, kept in step on every
    transition, so reading them costs nothing.
    """

    def __init__(self) -> None:
        self._states: dict[int, SlotState] = {}
        self._epochs: dict[int, int] = {}
        self._claiming: set[int] = set()
        self._releasing: set[int] = set()
        self._replicas: set[int] = set()

    # -- views

    @property
    def owned(self) -> Mapping[int, int]:
        """Slot → the epoch we append under, for OWNER and RELEASING slots."""
        return self._epochs

    @property
    def claiming(self) -> Set[int]:
        return self._claiming

    @property
    def releasing(self) -> Set[int]:
        """Owned slots being handed over: not served."""
        return self._releasing

    @property
    def replicas(self) -> Set[int]:
        """The slots the newest ring makes this node a replica of (not an owner)."""
        return self._replicas

    def state(self, slot: int) -> SlotState:
        return self._states.get(slot, SlotState.NONE)

    def states(self) -> dict[int, SlotState]:
        """Every slot not at NONE."""
        return dict(self._states)

    # -- transitions

    def fire(self, slot: int, event: SlotEvent, *, epoch: int | None = None) -> SlotState:
        """Apply ``event`` to ``slot``; return its new state. ``epoch``: for CLAIMED, the
        epoch the claim wrote (required there, refused elsewhere)."""
        if (event is SlotEvent.CLAIMED) != (epoch is not None):
            raise SlotStateError(f"slot {slot}: {event.value} needs an epoch, and only it")
        old = self.state(slot)
        target = TRANSITIONS[(old, event)]
        if target is None:
            raise SlotStateError(f"slot {slot}: {event.value} refused in state {old.value}")
        if event is SlotEvent.REPLICA_ON:
            self._replicas.add(slot)
        elif event is SlotEvent.REPLICA_OFF:
            self._replicas.discard(slot)
        new = self._resolve(slot, target)
        if new is not old:
            self._leave(slot, old)
            self._enter(slot, new)
        if epoch is not None:
            self._epochs[slot] = epoch
        return new

    def set_replicas(self, slots: Iterable[int]) -> None:
        """The newest ring makes this node a replica of exactly ``slots``."""
        new = set(slots)
        for slot in sorted(self._replicas - new):
            self.fire(slot, SlotEvent.REPLICA_OFF)
        for slot in sorted(new - self._replicas):
            self.fire(slot, SlotEvent.REPLICA_ON)

    def _resolve(self, slot: int, target: Target) -> SlotState:
        if target is REST:
            return SlotState.REPLICA if slot in self._replicas else SlotState.NONE
        assert isinstance(target, SlotState)
        return target

    def _leave(self, slot: int, old: SlotState) -> None:
        if old is SlotState.CLAIMING:
            self._claiming.discard(slot)
        elif old is SlotState.RELEASING:
            self._releasing.discard(slot)

    def _enter(self, slot: int, new: SlotState) -> None:
        if new is SlotState.NONE:
            self._states.pop(slot, None)
        else:
            self._states[slot] = new
        if new not in OWNED_STATES:
            self._epochs.pop(slot, None)
        if new is SlotState.CLAIMING:
            self._claiming.add(slot)
        elif new is SlotState.RELEASING:
            self._releasing.add(slot)
