"""Placement and plans of ring changes (cluster/rebalance.py): pure, no I/O.

What a plan must be: deterministic (the same inputs in any order give the same plan),
minimal (exactly the slots whose owner differs between the ring now and the ring the
nodes compute once the change is written, each straight to its final owner), and
readable back from its JSON. What a placement must be: the ring, except where a hold by
a live node keeps a slot at its old owner, with the owner-to-be tailing it as a replica.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cluster.errors import ChangeInProgress, NodeDown, PlanError, RebalanceError
from cluster.rebalance import (
    Placement,
    Plan,
    RingState,
    check_shape,
    effective_weights,
    make_plan,
    placement,
)
from cluster.ring import MAX_WEIGHT, Move, Ring, diff

S = 64
R = 2
SETTINGS = settings(max_examples=60, deadline=None)

nodes = [f"sg/n{i}" for i in range(1, 9)]
weights = st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0])


@dataclass(frozen=True)
class Change:
    """The arguments of one valid change, as ``relay ring plan`` passes them."""

    add: dict[str, float] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        return {"add": self.add, "remove": self.remove, "weights": self.weights}


@st.composite
def regions(draw: st.DrawFn) -> tuple[dict[str, float], RingState]:
    """Live nodes with their lease weights (some 0: standbys), and weights ops set
    (some for nodes that are not live). At least one node is on the ring. The region's
    slots and replicas are recorded (those of the plans), in part, or not yet."""
    live = draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=6, unique=True))
    leases = {n: draw(st.sampled_from([0.0, 1.0, 1.0, 2.0])) for n in live}
    set_by_ops = draw(
        st.dictionaries(st.sampled_from(nodes), st.sampled_from([0.0, 1.0, 2.5]), max_size=3)
    )
    slots, replicas = draw(st.sampled_from([(S, R), (0, 0), (S, 0), (0, R)]))
    state = RingState(
        version=draw(st.integers(0, 50)), weights=set_by_ops, slots=slots, replicas=replicas
    )
    assume(any(w > 0 for w in effective_weights(leases, state).values()))
    return leases, state


@st.composite
def changes(draw: st.DrawFn, leases: Mapping[str, float], state: RingState) -> Change:
    """A change make_plan accepts: adds off the ring, removes that leave someone,
    weights of live nodes or ring members."""
    on_ring = sorted(n for n, w in effective_weights(leases, state).items() if w > 0)
    off_ring = [n for n in nodes if n not in on_ring]
    add = draw(st.dictionaries(st.sampled_from(off_ring), weights, max_size=2)) if off_ring else {}
    remove = draw(st.lists(st.sampled_from(on_ring), max_size=len(on_ring) - 1, unique=True))
    left = [n for n in on_ring if n not in remove]
    reweigh = draw(st.dictionaries(st.sampled_from(left), st.sampled_from([0.5, 1.0, 4.0])))
    standbys = [n for n in leases if n not in on_ring and n not in add]
    if standbys:
        reweigh |= draw(st.dictionaries(st.sampled_from(standbys), weights, max_size=1))
    return Change(add, remove, reweigh)  # maybe no change at all: a plan of no moves


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, float], RingState, Change]:
    leases, state = draw(regions())
    return leases, state, draw(changes(leases, state))


def plan_of(leases: Mapping[str, float], state: RingState, change: Change) -> Plan:
    return make_plan("sg", leases, state, slots=S, replicas=R, **change.kwargs())


def written(leases: Mapping[str, float], state: RingState, plan: Plan) -> Placement:
    """Where the nodes put the slots once the plan's weights are written and its holds
    are gone: added nodes hold a lease by then (weight 0, a standby's)."""
    after_leases = {**dict.fromkeys(plan.set_weights, 0.0), **leases}
    after = RingState(state.version + 1, {**state.weights, **plan.set_weights})
    where = placement(after_leases, after, slots=S, replicas=R)
    assert where is not None
    return where


def shuffled(d: Mapping[Any, Any], rnd: random.Random) -> dict[Any, Any]:
    items = list(d.items())
    rnd.shuffle(items)
    return dict(items)


# -- plans are deterministic ----------------------------------------------------------


@SETTINGS
@given(scenarios(), st.randoms(use_true_random=False))
def test_the_same_change_in_any_order_gives_the_same_plan(
    scenario: tuple[dict[str, float], RingState, Change], rnd: random.Random
) -> None:
    leases, state, change = scenario
    a = plan_of(leases, state, change)
    # The shape recorded or not (it is the plan's): no difference either.
    other_state = RingState(state.version, shuffled(state.weights, rnd))
    remove = list(change.remove)
    rnd.shuffle(remove)
    other = Change(shuffled(change.add, rnd), remove, shuffled(change.weights, rnd))
    b = plan_of(shuffled(leases, rnd), other_state, other)
    assert a.to_doc() == b.to_doc()
    assert json.dumps(a.to_doc()) == json.dumps(b.to_doc())  # the same text, key order too
    assert a == b


# -- plans are minimal ----------------------------------------------------------------


@SETTINGS
@given(scenarios())
def test_moves_are_exactly_the_slots_whose_owner_changes(
    scenario: tuple[dict[str, float], RingState, Change],
) -> None:
    leases, state, change = scenario
    plan = plan_of(leases, state, change)
    now = placement(leases, state, slots=S, replicas=R)
    assert now is not None
    after = written(leases, state, plan)
    assert plan.before == dict(now.members)
    assert plan.after == dict(after.members)
    assert plan.base_version == state.version
    assert (plan.slots, plan.replicas, plan.region) == (S, R, "sg")

    moves = {m.slot: m for m in plan.moves}
    assert len(moves) == len(plan.moves), "a slot moves twice"
    assert [m.slot for m in plan.moves] == sorted(moves), "not in slot order"
    for slot in range(S):
        a, b = now.owner(slot), after.owner(slot)
        if a == b:
            assert slot not in moves
        else:
            # Straight from its owner now to its final owner: no hop through a third node.
            assert moves[slot] == Move(slot, a, b)
    assert list(plan.moves) == diff(now.ring, after.ring)


@SETTINGS
@given(regions(), st.data())
def test_setting_a_node_to_its_own_weight_moves_nothing(
    region: tuple[dict[str, float], RingState], data: st.DataObject
) -> None:
    leases, state = region
    on_ring = {n: w for n, w in effective_weights(leases, state).items() if w > 0}
    node = data.draw(st.sampled_from(sorted(on_ring)))
    plan = make_plan("sg", leases, state, weights={node: on_ring[node]}, slots=S, replicas=R)
    assert plan.moves == ()
    assert plan.after == plan.before == dict(sorted(on_ring.items()))


@SETTINGS
@given(regions(), st.data())
def test_a_removed_node_owns_nothing_after_and_only_the_diff_moves(
    region: tuple[dict[str, float], RingState], data: st.DataObject
) -> None:
    leases, state = region
    on_ring = sorted(n for n, w in effective_weights(leases, state).items() if w > 0)
    assume(len(on_ring) > 1)
    gone = data.draw(st.sampled_from(on_ring))
    plan = make_plan("sg", leases, state, remove=[gone], slots=S, replicas=R)
    now = placement(leases, state, slots=S, replicas=R)
    assert now is not None
    after = written(leases, state, plan)
    assert gone not in plan.after
    assert after.slots_of(gone) == () and after.replicas_of(gone) == ()
    # Every slot it owned leaves it; bounded loads may move a few others too, but only
    # what the two rings disagree on.
    assert {m.slot for m in plan.moves if m.from_node == gone} == set(now.slots_of(gone))
    assert all(m.to_node != gone for m in plan.moves)
    assert list(plan.moves) == diff(now.ring, after.ring)


# -- placement and holds --------------------------------------------------------------


@st.composite
def held_placements(draw: st.DrawFn) -> tuple[Ring, dict[int, str], set[str]]:
    """A ring, holds (some by standbys, some by dead nodes, some out of range), and the
    live nodes."""
    members = draw(st.dictionaries(st.sampled_from(nodes[:5]), weights, min_size=1))
    ring = Ring(members, slots=S, replicas=draw(st.integers(2, 3)))
    standbys = draw(st.lists(st.sampled_from(["sg/s1", "sg/s2"]), unique=True))
    dead = ["sg/dead"]
    live = set(members) | set(standbys)
    holders = sorted(live) + dead
    holds = draw(st.dictionaries(st.integers(-2, S + 2), st.sampled_from(holders), max_size=S // 2))
    return ring, holds, live


@SETTINGS
@given(held_placements())
def test_holds_keep_slots_at_their_holder_with_the_owner_to_be_as_replica(
    case: tuple[Ring, dict[int, str], set[str]],
) -> None:
    ring, holds, live = case
    p = Placement(ring, holds, live=live)
    in_force = {s: n for s, n in holds.items() if 0 <= s < S and n in live and n != ring.owner(s)}
    assert dict(p.holds) == in_force
    for slot in range(S):
        pref = p.preference_list(slot)
        assert pref[0] == p.owner(slot) == p.assignment()[slot]
        assert len(set(pref)) == len(pref)
        if slot in in_force:
            assert p.owner(slot) == in_force[slot]
            assert ring.owner(slot) in pref[1:], "the owner-to-be does not tail the slot"
            # As full as R allows: the holder first, then the ring's nodes for the slot.
            candidates = {in_force[slot], *ring.preference_list(slot)}
            assert len(pref) == min(ring.replicas, len(candidates))
            assert set(pref) <= candidates
        else:
            # Not held, held by its ring owner, or held by a node without a lease.
            assert pref == ring.preference_list(slot)
    assert sum(p.loads().values()) == S
    assert set(p.nodes) == set(ring.nodes) | set(in_force.values())
    for n in [*p.nodes, "sg/dead", "sg/none"]:
        assert p.slots_of(n) == tuple(s for s in range(S) if p.owner(s) == n)
        assert p.replicas_of(n) == tuple(s for s in range(S) if n in p.preference_list(s)[1:])
        assert p.loads().get(n, 0) == len(p.slots_of(n))


def test_a_hold_without_live_nodes_is_ignored() -> None:
    ring = Ring(["sg/n1", "sg/n2"], slots=S, replicas=R)
    slot = ring.slots_of("sg/n1")[0]
    assert Placement(ring, {slot: "sg/n2"}).holds == {}  # live defaults to nobody
    assert Placement(ring, {slot: "sg/n2"}, live=["sg/n1"]).owner(slot) == "sg/n1"
    held = Placement(ring, {slot: "sg/n2"}, live=["sg/n1", "sg/n2"])
    assert held.owner(slot) == "sg/n2"
    assert held.preference_list(slot) == ("sg/n2", "sg/n1")


def test_placement_follows_the_ring_state() -> None:
    leases = {"sg/n1": 1.0, "sg/n2": 1.0, "sg/n3": 0.0}
    assert placement({"sg/n1": 0.0}, RingState(), slots=S, replicas=R) is None
    assert (
        placement(leases, RingState(weights={"sg/n1": 0, "sg/n2": 0}), slots=S, replicas=R) is None
    )
    p = placement(leases, RingState(weights={"sg/n3": 2.0, "sg/n9": 1.0}), slots=S, replicas=R)
    assert p is not None
    # The ops' weight overrides the lease's; a weight for a node without a lease does nothing.
    assert dict(p.members) == {"sg/n1": 1.0, "sg/n2": 1.0, "sg/n3": 2.0}
    slot = p.slots_of("sg/n3")[0]
    state = RingState(weights={"sg/n3": 2.0}, holds={slot: "sg/n1"})
    held = placement(leases, state, slots=S, replicas=R)
    done = placement(leases, state, slots=S, replicas=R, holds=False)
    assert held is not None and done is not None
    assert (held.owner(slot), done.owner(slot)) == ("sg/n1", "sg/n3")
    assert held.holds == {slot: "sg/n1"} and done.holds == {}


# -- plans as JSON --------------------------------------------------------------------


@SETTINGS
@given(scenarios())
def test_a_plan_reads_back_from_its_json(
    scenario: tuple[dict[str, float], RingState, Change],
) -> None:
    plan = plan_of(*scenario)
    back = Plan.from_doc(json.loads(json.dumps(plan.to_doc())))
    assert back == plan
    assert back.to_doc() == plan.to_doc()


# What json.loads can return; the edge cases first, so that few examples find them.
EDGES = [None, True, -1, 2**64, 10**400, -math.inf, math.inf, math.nan, 0.5, "", "x", [], {}]
edge_values = st.sampled_from(EDGES)
json_values = st.recursive(
    edge_values | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


PLAN_KEYS = ["region", "slots", "replicas", "base_version", "before", "after", "set_weights"]
plan_shaped = st.fixed_dictionaries(
    {"format": st.just(1), "moves": st.lists(json_values, max_size=3)},
    optional={k: st.one_of(edge_values, json_values) for k in PLAN_KEYS},
)


@settings(max_examples=100, deadline=None)
@given(json_values | plan_shaped)
def test_garbage_is_never_a_plan(doc: Any) -> None:
    with pytest.raises(PlanError):
        Plan.from_doc(doc)


def _valid_doc() -> dict[str, Any]:
    leases = {"sg/n1": 1.0, "sg/n2": 1.0, "sg/n3": 1.0}
    return make_plan("sg", leases, RingState(), remove=["sg/n3"], slots=S, replicas=R).to_doc()


@st.composite
def damaged_docs(draw: st.DrawFn) -> Any:
    """A real plan's JSON with one value replaced by anything, or deleted."""
    doc = _valid_doc()
    where: dict[str, Any] = doc
    key = draw(st.sampled_from(sorted(doc)))
    if key in ("before", "after", "set_weights") and draw(st.booleans()):
        where, key = doc[key], draw(st.sampled_from(sorted(doc[key])))
    elif key == "moves" and draw(st.booleans()):
        where = draw(st.sampled_from(doc["moves"]))
        key = draw(st.sampled_from(sorted(where)))
    if draw(st.booleans()):
        del where[key]
    else:
        where[key] = draw(st.one_of(edge_values, json_values))  # edges half the time
    return json.loads(json.dumps(doc))


@settings(max_examples=100, deadline=None)
@given(damaged_docs())
def test_a_damaged_plan_is_a_plan_or_a_plan_error(doc: Any) -> None:
    try:
        plan = Plan.from_doc(doc)
    except PlanError:
        return
    assert isinstance(plan, Plan)


def _paths(doc: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where each value of ``doc`` sits: keys and indexes from the top."""
    inner: Any = ()
    if isinstance(doc, dict):
        inner = doc.items()
    elif isinstance(doc, list):
        inner = enumerate(doc)
    return [at, *(p for k, v in inner for p in _paths(v, (*at, k)))]


@pytest.mark.parametrize("value", EDGES, ids=lambda v: "1e400" if v == 10**400 else repr(v))
def test_any_value_of_a_plan_replaced_by_an_odd_one_is_a_plan_or_a_plan_error(
    value: Any,
) -> None:
    for path in _paths(_valid_doc())[1:]:
        doc = _valid_doc()
        where: Any = doc
        for k in path[:-1]:
            where = where[k]
        where[path[-1]] = value
        with contextlib.suppress(PlanError):  # … or a plan, but no other exception
            Plan.from_doc(json.loads(json.dumps(doc)))


def test_plan_errors_say_what_is_wrong() -> None:
    doc = _valid_doc()
    assert Plan.from_doc(doc).moves
    with pytest.raises(PlanError, match="format 2"):
        Plan.from_doc({**doc, "format": 2})
    with pytest.raises(PlanError, match="not a plan"):
        Plan.from_doc({**doc, "before": {"sg/n1": 10**400}})  # no float holds it
    with pytest.raises(PlanError, match="not a plan"):
        Plan.from_doc({**doc, "slots": math.inf})
    with pytest.raises(PlanError, match="not a plan"):
        Plan.from_doc([doc])


# -- what make_plan refuses -----------------------------------------------------------

LEASES = {"sg/n1": 1.0, "sg/n2": 1.0, "sg/n3": 0.0}  # n3: a standby


def plan_sg(state: RingState | None = None, **change: Any) -> Plan:
    return make_plan("sg", LEASES, state or RingState(), slots=S, replicas=R, **change)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"remove": ["sg/n9"]}, "sg/n9 is not on sg's ring"),
        ({"remove": ["sg/n3"]}, "sg/n3 is not on sg's ring"),  # live, but off the ring
        ({"weights": {"sg/n9": 1.0}}, "sg/n9 is not a member of sg"),
        ({"add": {"sg/n1": 1.0}}, "sg/n1 is already on sg's ring"),
        ({"remove": ["sg/n1", "sg/n2"]}, "without a node on the ring"),
        ({"weights": {"sg/n1": 0.0, "sg/n2": 0.0}}, "without a node on the ring"),
        ({"weights": {"sg/n1": -1.0}}, r"weight -1.0 is not in \[0, 64.0\]"),
        ({"weights": {"sg/n1": MAX_WEIGHT + 1}}, "weight 65.0 is not in"),
        ({"weights": {"sg/n1": math.nan}}, "weight nan is not in"),
        ({"add": {"sg/n4": math.inf}}, "weight inf is not in"),
    ],
)
def test_make_plan_refuses_changes_that_make_no_sense(change: dict[str, Any], why: str) -> None:
    with pytest.raises(PlanError, match=why):
        plan_sg(**change)


def test_an_added_node_must_be_up_when_the_plan_is_applied_now() -> None:
    with pytest.raises(NodeDown, match="sg/n4 holds no lease in sg: start it first"):
        plan_sg(add={"sg/n4": 1.0}, live_adds=True)
    assert plan_sg(add={"sg/n4": 1.0}).after["sg/n4"] == 1.0  # planned ahead: fine
    assert plan_sg(add={"sg/n3": 1.0}, live_adds=True).after["sg/n3"] == 1.0  # the standby


def test_make_plan_lists_every_problem_at_once() -> None:
    with pytest.raises(PlanError) as e:
        plan_sg(remove=["sg/n9"], add={"sg/n1": 1.0}, weights={"sg/n2": 99.0})
    assert str(e.value).count("; ") == 2, str(e.value)


def test_make_plan_refuses_while_a_change_holds_slots() -> None:
    state = RingState(version=3, holds={5: "sg/n1"})
    with pytest.raises(ChangeInProgress, match="1 slots still held"):
        plan_sg(state, add={"sg/n4": 1.0})
    # No hold left, but the change is not finished (slots in flight, or a stuck one).
    with pytest.raises(ChangeInProgress, match="0 slots still held"):
        plan_sg(RingState(version=4, plan='{"format": 1}'), add={"sg/n4": 1.0})
    assert issubclass(ChangeInProgress, RebalanceError) and issubclass(PlanError, RebalanceError)


def test_a_removed_node_stays_live_off_the_ring_and_can_come_back() -> None:
    removal = plan_sg(remove=["sg/n2"])
    assert removal.set_weights == {"sg/n2": 0.0}
    assert removal.after == {"sg/n1": 1.0}
    assert {m.from_node for m in removal.moves} == {"sg/n2"}
    assert {m.to_node for m in removal.moves} == {"sg/n1"}
    state = RingState(version=1, weights=removal.set_weights)
    assert effective_weights(LEASES, state) == {"sg/n1": 1.0, "sg/n2": 0.0, "sg/n3": 0.0}
    where = placement(LEASES, state, slots=S, replicas=R)
    assert where is not None and where.nodes == ("sg/n1",)
    with pytest.raises(PlanError, match="sg/n2 is not on sg's ring"):
        plan_sg(state, remove=["sg/n2"])
    back = plan_sg(state, weights={"sg/n2": 1.0})  # live, so ops may weigh it again
    assert back.after == {"sg/n1": 1.0, "sg/n2": 1.0}
    assert {m.slot for m in back.moves} == {m.slot for m in removal.moves}
    assert plan_sg(state, add={"sg/n2": 1.0}).to_doc() == back.to_doc()


def test_a_region_without_a_ring_yet_plans_no_moves() -> None:
    first = make_plan("sg", {"sg/n1": 0.0}, RingState(), add={"sg/n1": 1.0}, slots=S, replicas=R)
    assert first.before == {} and first.after == {"sg/n1": 1.0} and first.moves == ()


# -- the region's slots and replicas ---------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [RingState(), RingState(slots=S), RingState(replicas=R), RingState(slots=S, replicas=R)],
    ids=["unknown", "slots", "replicas", "both"],
)
def test_the_shape_the_region_recorded_or_not_yet_is_accepted(state: RingState) -> None:
    check_shape(state, S, R)
    assert plan_sg(state, add={"sg/n4": 1.0}) == plan_sg(add={"sg/n4": 1.0})


def test_an_unknown_shape_accepts_any() -> None:
    check_shape(RingState(), 2 * S, R + 1)
    check_shape(RingState(slots=S), S, R + 1)  # replicas not recorded: any
    check_shape(RingState(replicas=R), 2 * S, R)  # slots not recorded: any


@pytest.mark.parametrize(
    ("state", "why"),
    [
        (RingState(slots=2 * S, replicas=R), "the region has 128 slots, not 64: pass --slots"),
        (RingState(slots=2 * S), "the region has 128 slots, not 64"),
        (RingState(slots=S, replicas=3), "keeps 3 copies of each slot, not 2: pass --replicas"),
        (RingState(replicas=1), "keeps 1 copies of each slot, not 2"),
        (RingState(slots=S // 2, replicas=3), "the region has 32 slots, not 64"),
    ],
)
def test_make_plan_refuses_another_shape_than_the_regions(state: RingState, why: str) -> None:
    with pytest.raises(PlanError, match=why):
        check_shape(state, S, R)
    with pytest.raises(PlanError, match=why):
        plan_sg(state, add={"sg/n4": 1.0})
    with pytest.raises(PlanError, match=why):  # even a change that moves nothing
        plan_sg(state, weights={"sg/n1": 1.0})
