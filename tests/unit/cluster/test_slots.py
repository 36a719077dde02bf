"""Slot states: every entry of the transition table, the views, the replica role."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.errors import ClusterError, SlotStateError
from cluster.slots import (
    OWNED_STATES,
    REST,
    TRANSITIONS,
    SlotEvent,
    SlotState,
    SlotTable,
)
from tests.unit.test_boundaries import FORBIDDEN, imported

ROOT = Path(__file__).resolve().parents[3]
S = 7
EPOCH = 4


def _none(replica: bool) -> SlotTable:
    return SlotTable()


def _replica(replica: bool) -> SlotTable:
    t = SlotTable()
    t.set_replicas([S])
    return t


def _claiming(replica: bool) -> SlotTable:
    t = SlotTable()
    t.fire(S, SlotEvent.CLAIM)
    if replica:
        t.set_replicas([S])
    return t


def _owner(replica: bool) -> SlotTable:
    t = _claiming(replica)
    t.fire(S, SlotEvent.CLAIMED, epoch=EPOCH)
    return t


def _releasing(replica: bool) -> SlotTable:
    t = _owner(replica)
    t.fire(S, SlotEvent.RELEASE)
    return t


SETUPS: dict[SlotState, Callable[[bool], SlotTable]] = {
    SlotState.NONE: _none,
    SlotState.REPLICA: _replica,
    SlotState.CLAIMING: _claiming,
    SlotState.OWNER: _owner,
    SlotState.RELEASING: _releasing,
}


def test_the_table_is_total() -> None:
    assert set(TRANSITIONS) == {(s, e) for s in SlotState for e in SlotEvent}


def check_views(t: SlotTable) -> None:
    """The views say exactly what the states say."""
    states = t.states()
    assert SlotState.NONE not in states.values()
    assert set(t.owned) == {s for s, st in states.items() if st in OWNED_STATES}
    assert set(t.claiming) == {s for s, st in states.items() if st is SlotState.CLAIMING}
    assert set(t.releasing) == {s for s, st in states.items() if st is SlotState.RELEASING}
    assert {s for s, st in states.items() if st is SlotState.REPLICA} <= set(t.replicas)


# NONE never holds the replica role and REPLICA always does; the other states may or not.
ROLES = {SlotState.NONE: [False], SlotState.REPLICA: [True]}
CASES = [
    pytest.param(state, event, replica, id=f"{state.value}-{event.value}-{replica}")
    for state, event in sorted(TRANSITIONS, key=lambda k: (k[0].value, k[1].value))
    for replica in ROLES.get(state, [False, True])
]


@pytest.mark.parametrize(("state", "event", "replica"), CASES)
def test_every_transition(state: SlotState, event: SlotEvent, replica: bool) -> None:
    t = SETUPS[state](replica)
    assert t.state(S) is state
    check_views(t)
    target = TRANSITIONS[(state, event)]
    epoch = 9 if event is SlotEvent.CLAIMED else None
    if target is None:
        with pytest.raises(SlotStateError, match=f"{event.value} refused in state {state.value}"):
            t.fire(S, event, epoch=epoch)
        assert t.state(S) is state  # refused: nothing changed
        check_views(t)
        return
    new = t.fire(S, event, epoch=epoch)
    role = (replica or event is SlotEvent.REPLICA_ON) and event is not SlotEvent.REPLICA_OFF
    if target is REST:
        assert new is (SlotState.REPLICA if role else SlotState.NONE)
    else:
        assert new is target
    assert t.state(S) is new
    assert (S in t.replicas) is role
    check_views(t)
    if new in OWNED_STATES:
        # The epoch is the claim's, kept through a hand-over and back.
        assert t.owned[S] == (9 if event is SlotEvent.CLAIMED else EPOCH)
    else:
        assert S not in t.owned


def test_claimed_needs_an_epoch_and_only_it_takes_one() -> None:
    t = _claiming(False)
    with pytest.raises(SlotStateError, match="needs an epoch"):
        t.fire(S, SlotEvent.CLAIMED)
    with pytest.raises(SlotStateError, match="needs an epoch"):
        t.fire(S, SlotEvent.LOSE, epoch=3)
    assert t.state(S) is SlotState.CLAIMING
    assert issubclass(SlotStateError, ClusterError)


def test_a_claim_ends_where_the_newest_ring_leaves_the_slot() -> None:
    """A replica claimed, the ring moved back: the failed claim rests as a replica."""
    t = SlotTable()
    t.set_replicas([1, 2])
    t.fire(1, SlotEvent.CLAIM)
    t.fire(2, SlotEvent.CLAIM)
    t.set_replicas([1])  # 2 is no longer a replica here, 1 still is
    assert t.fire(1, SlotEvent.CLAIM_ENDED) is SlotState.REPLICA
    assert t.fire(2, SlotEvent.CLAIM_ENDED) is SlotState.NONE
    assert t.states() == {1: SlotState.REPLICA}


def test_a_full_life_and_the_live_views() -> None:
    t = SlotTable()
    owned, claiming, releasing = t.owned, t.claiming, t.releasing  # kept by the edge
    t.set_replicas([3])
    t.fire(3, SlotEvent.CLAIM)
    assert 3 in claiming and 3 not in owned
    t.fire(3, SlotEvent.CLAIMED, epoch=2)
    t.fire(3, SlotEvent.CLAIM_ENDED)
    t.set_replicas([])
    assert dict(owned) == {3: 2} and not claiming
    t.fire(3, SlotEvent.RELEASE)
    assert 3 in releasing and owned[3] == 2
    t.fire(3, SlotEvent.RELEASE_ENDED)
    assert t.state(3) is SlotState.OWNER and not releasing
    t.fire(3, SlotEvent.LOSE)
    assert t.state(3) is SlotState.NONE and not owned and t.states() == {}


def test_pure() -> None:
    names = imported(ROOT / "cluster/slots.py")
    assert not {n for n in names if n.split(".")[0] in FORBIDDEN}
