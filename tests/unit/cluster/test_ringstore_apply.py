"""Applying ring plans (cluster/ringstore.py) against MemoryRingStore, with the nodes
played by its ``on_unhold`` hook: no Redis, no event loop, no real time.

The store contract itself (the same cases against MemoryRingStore and RedisRingStore) is
tests/integration/test_ringstore.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.errors import ChangeInProgress, MoveStuck, NodeDown, PlanError, StalePlan
from cluster.rebalance import Placement, Plan, RingState, make_plan, placement
from cluster.ring import Ring
from cluster.ringstore import (
    LOCK_TTL_MS,
    ApplyResult,
    LockLost,
    MemoryRingStore,
    Progress,
    RingStore,
    apply_plan,
)

S = 64
R = 2
POLL_S = 0.05
T = TypeVar("T")
Weights = tuple[tuple[str, float], ...]  # a hashable {node: weight}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits (the memory store, a fake sleep) to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the coroutine waited for something: only fakes may run here")


class Nodes:
    """The nodes of a region, played against a MemoryRingStore: when a slot's hold goes,
    its owner record moves to its owner on the ring, ``delay(slot)`` polls later (0: at
    once). Slots in ``stuck`` never land. ``sleep`` is the poll, ``clock`` its time."""

    def __init__(
        self,
        store: MemoryRingStore,
        delay: Callable[[int], int] = lambda slot: 0,
        stuck: Sequence[int] = (),
    ) -> None:
        self.store = store
        self.delay = delay
        self.stuck = set(stuck)
        self.landing: dict[int, int] = {}  # released, not landed: slot → polls left
        self.releases: Counter[int] = Counter()
        self.changes: Counter[int] = Counter()
        self.most_in_flight = 0
        self.now = 0.0
        store.on_unhold = self.on_unhold

    def target(self) -> Placement:
        s = self.store
        return _target(tuple(s.lease_weights.items()), tuple(s.state.weights.items()))

    def on_unhold(self, slots: Sequence[int]) -> None:
        for slot in slots:
            assert slot not in self.store.state.holds, "told of a slot still held"
            self.releases[slot] += 1
            self.landing[slot] = self.delay(slot)
        self.most_in_flight = max(self.most_in_flight, len(self.landing))
        self._land()

    def _land(self) -> None:
        for slot, left in sorted(self.landing.items()):
            if slot in self.stuck:
                continue
            if left > 0:
                continue
            del self.landing[slot]
            owner = self.target().owner(slot)
            if self.store.owner_records.get(slot) != owner:
                self.changes[slot] += 1
                self.store.owner_records[slot] = owner

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.landing = {s: left - 1 for s, left in self.landing.items()}
        self._land()

    def clock(self) -> float:
        return self.now


@functools.lru_cache(maxsize=256)  # rings are immutable; building one takes ~1 ms
def _target(leases: Weights, weights: Weights) -> Placement:
    where = placement(dict(leases), RingState(weights=dict(weights)), slots=S, replicas=R)
    assert where is not None
    return where


def region(
    on_ring: Mapping[str, float], standbys: Sequence[str] = ()
) -> tuple[MemoryRingStore, Nodes]:
    """A region whose owner records follow the ring of ``on_ring``; ``standbys`` hold a
    lease of weight 0 (started, no slot)."""
    leases = {**dict(on_ring), **dict.fromkeys(standbys, 0.0)}
    where = _target(tuple(leases.items()), ())
    store = MemoryRingStore(leases, dict(enumerate(where.assignment())))
    return store, Nodes(store)


def plan_for(store: MemoryRingStore, **change: Any) -> Plan:
    return make_plan("sg", store.lease_weights, store.state, slots=S, replicas=R, **change)


def apply(store: RingStore, plan: Plan | None, nodes: Nodes, **kwargs: Any) -> ApplyResult:
    return run(
        apply_plan(
            store,
            plan,
            slots=S,
            replicas=R,
            poll_s=POLL_S,
            sleep=nodes.sleep,
            clock=nodes.clock,
            **kwargs,
        )
    )


def planned(plan: Plan) -> dict[int, str]:
    return dict(enumerate(_ring(tuple(plan.after.items())).assignment()))


@functools.lru_cache(maxsize=64)
def _ring(members: Weights) -> Ring:
    return Ring(dict(members), slots=S, replicas=R)


def assert_done(
    store: MemoryRingStore, nodes: Nodes, plan: Plan, weights: Mapping[str, float]
) -> None:
    """The region is on the planned ring, and got there the short way."""
    assert store.owner_records == planned(plan)
    assert store.state.holds == {}
    assert store.state.weights == {**weights, **plan.set_weights}
    assert store.state.plan == ""
    assert store.lock_holder == ""
    moved = {m.slot for m in plan.moves}
    # Each planned slot was handed over once, and no other slot was touched.
    assert nodes.releases == Counter(moved)
    assert set(nodes.changes) == moved and set(nodes.changes.values()) <= {1}
    assert nodes.landing == {}


THREE = {"sg/n1": 1.0, "sg/n2": 1.0, "sg/n3": 1.0}


# -- a plan applied in one go ----------------------------------------------------------


@pytest.mark.parametrize("delay", [0, 1, 3])
def test_apply_moves_each_planned_slot_once_and_reports_progress(delay: int) -> None:
    store, nodes = region(THREE, standbys=["sg/n4"])
    nodes.delay = lambda slot: delay
    plan = plan_for(store, add={"sg/n4": 1.0}, remove=["sg/n1"])
    assert len(plan.moves) > 10
    progress: list[Progress] = []
    result = apply(store, plan, nodes, on_progress=progress.append)
    assert_done(store, nodes, plan, {})
    assert sorted(result.moved, key=lambda m: m.slot) == list(plan.moves)
    assert not result.resumed
    total = len(plan.moves)
    assert [(p.done, p.total) for p in progress] == [(i, total) for i in range(total + 1)]
    assert progress[0].move is None
    assert {p.move for p in progress[1:]} == set(plan.moves)
    assert result.seconds == pytest.approx(nodes.now)
    assert (nodes.now > 0) == (delay > 0)  # it polled only while something was landing


@pytest.mark.parametrize("max_moving", [1, 2, 5])
def test_max_moving_bounds_the_slots_released_but_not_landed(max_moving: int) -> None:
    store, nodes = region(THREE, standbys=["sg/n4", "sg/n5"])
    nodes.delay = lambda slot: 1 + slot % 3
    plan = plan_for(store, add={"sg/n4": 2.0, "sg/n5": 1.0})
    assert len(plan.moves) > 2 * max_moving
    apply(store, plan, nodes, max_moving=max_moving)
    assert_done(store, nodes, plan, {})
    # Counted by the nodes each time a hold goes: the bound is reached, never passed.
    assert nodes.most_in_flight == max_moving


def test_a_plan_without_moves_only_writes_weights() -> None:
    store, nodes = region(THREE)
    plan = plan_for(store, weights={"sg/n2": 1.0})
    progress: list[Progress] = []
    result = apply(store, plan, nodes, on_progress=progress.append)
    assert result.moved == () and progress == [Progress(0, 0, None)]
    # Two versions: the begin (weights written), the finish (plan forgotten).
    assert store.state.version == 2 and store.state.weights == {"sg/n2": 1.0}
    assert_done(store, nodes, plan, {})


def test_resume_with_nothing_to_do_moves_nothing() -> None:
    store, nodes = region(THREE)
    result = apply(store, None, nodes)
    assert result.moved == () and result.resumed and result.nothing_to_resume
    # Nothing to forget: no new version (a plan made meanwhile stays good).
    assert store.state == RingState(version=0)
    assert store.lock_holder == ""
    assert nodes.releases == Counter() and nodes.now == 0


# -- what apply refuses ------------------------------------------------------------------


def test_another_change_holding_the_lock_refuses_both_apply_and_resume() -> None:
    store, nodes = region(THREE, standbys=["sg/n4"])
    plan = plan_for(store, add={"sg/n4": 1.0})
    store.lock_holder = "someone-else"
    for p in (plan, None):
        with pytest.raises(
            ChangeInProgress,
            match="lock is held; the lock of an apply that was killed expires within 10 s",
        ):
            apply(store, p, nodes)
    assert store.state == RingState() and store.lock_holder == "someone-else"
    assert nodes.releases == Counter()


def test_a_stale_plan_is_refused() -> None:
    store, nodes = region(THREE, standbys=["sg/n4"])
    plan = plan_for(store, add={"sg/n4": 1.0})
    store.state = RingState(version=1)  # someone wrote the ring state meanwhile
    with pytest.raises(StalePlan, match="version 1"):
        apply(store, plan, nodes)
    store.state = RingState()
    store.lease_weights["sg/n5"] = 1.0  # a node joined (with a weight)
    with pytest.raises(StalePlan, match="sg/n5"):
        apply(store, plan, nodes)
    del store.lease_weights["sg/n5"]
    del store.lease_weights["sg/n3"]  # a node left
    with pytest.raises(StalePlan):
        apply(store, plan, nodes)
    store.lease_weights["sg/n3"] = 1.0
    assert store.state == RingState() and store.lock_holder == ""
    apply(store, plan, nodes)  # as it was planned: fine
    assert_done(store, nodes, plan, {})


def test_a_node_the_plan_adds_must_hold_a_lease() -> None:
    store, nodes = region(THREE)
    plan = plan_for(store, add={"sg/n4": 1.0})
    with pytest.raises(NodeDown, match="sg/n4"):
        apply(store, plan, nodes)
    assert store.state == RingState() and store.lock_holder == ""


def test_max_moving_must_be_positive() -> None:
    store, nodes = region(THREE)
    with pytest.raises(PlanError, match="max_moving"):
        apply(store, None, nodes, max_moving=0)
    assert store.lock_holder == ""


def test_a_lost_lock_stops_the_apply_at_once() -> None:
    store, nodes = region(THREE, standbys=["sg/n4"])
    plan = plan_for(store, add={"sg/n4": 1.0})

    def thief(slots: Sequence[int]) -> None:
        Nodes.on_unhold(nodes, slots)
        store.lock_holder = "thief"  # ours expired; another apply took it

    store.on_unhold = thief
    with pytest.raises(LockLost):
        apply(store, plan, nodes, max_moving=2)
    assert sum(nodes.releases.values()) == 2  # nothing released after the loss
    assert store.lock_holder == "thief"  # and the thief's lock is left alone
    assert len(store.state.holds) == len(plan.moves) - 2


@pytest.mark.parametrize("delay", [0, 2])
def test_an_expired_lock_stops_the_apply_and_is_not_taken_back(delay: int) -> None:
    store, nodes = region(THREE, standbys=["sg/n4"])
    nodes.delay = lambda slot: delay
    plan = plan_for(store, add={"sg/n4": 1.0})

    def stall(slots: Sequence[int]) -> None:
        Nodes.on_unhold(nodes, slots)
        store.lock_holder = ""  # the apply stalled past LOCK_TTL_MS: its lock expired

    store.on_unhold = stall
    with pytest.raises(LockLost, match="lost"):
        apply(store, plan, nodes, max_moving=2)
    # The next renewal failed: nothing more released, the lock not taken again (someone
    # may have changed the ring in between), the rest left for --resume.
    assert sum(nodes.releases.values()) == 2
    assert store.lock_holder == ""
    assert len(store.state.holds) == len(plan.moves) - 2 and store.state.plan
    store.on_unhold = nodes.on_unhold
    resumed = apply(store, None, nodes, max_moving=2)
    assert resumed.resumed and not resumed.nothing_to_resume
    assert_done(store, nodes, plan, {})


def test_the_lock_is_taken_once_then_renewed_at_every_poll() -> None:
    store, nodes = region(THREE, standbys=["sg/n4"])
    nodes.delay = lambda slot: 2
    plan = plan_for(store, add={"sg/n4": 1.0})
    counted = Interrupted(store, 0, after=False, dead=False)
    apply(counted, plan, nodes, max_moving=3)
    assert_done(store, nodes, plan, {})
    calls = counted.names
    assert (calls["lock"], calls["unlock"], calls["begin"], calls["finish"]) == (1, 1, 1, 1)
    # One renewal per turn of the move loop: each turn reads the owner records once.
    assert calls["renew"] == calls["owners"] > len(plan.moves) // 3
    # Each renewal asks for the whole TTL again, under the apply's token.
    assert {ttl for _, ttl in counted.renewals} == {LOCK_TTL_MS}
    assert len({token for token, _ in counted.renewals}) == 1
    assert LOCK_TTL_MS == 10_000


# -- the region's slots and replicas -----------------------------------------------------


def test_apply_refuses_a_plan_for_another_shape_than_the_regions() -> None:
    store, nodes = region(THREE, standbys=["sg/n4"])
    plan = plan_for(store, add={"sg/n4": 1.0})  # made before the nodes recorded the shape
    for slots, replicas, why in [(2 * S, R, "128 slots, not 64"), (S, 3, "keeps 3 copies")]:
        # Nodes record the shape when they start; that is no ring change (same version).
        store.state = RingState(slots=slots, replicas=replicas)
        with pytest.raises(PlanError, match=why):
            apply(store, plan, nodes)
        assert store.state == RingState(slots=slots, replicas=replicas)  # nothing written
        assert store.lock_holder == "" and nodes.releases == Counter()
    store.state = RingState(slots=S, replicas=R)  # the plan's: fine
    apply(store, plan, nodes)
    assert_done(store, nodes, plan, {})
    assert (store.state.slots, store.state.replicas) == (S, R)


@pytest.mark.parametrize("recorded", [True, False])
def test_a_resume_without_its_plan_goes_by_the_recorded_shape(recorded: bool) -> None:
    store, nodes = region(THREE, standbys=["sg/n4"])
    plan = plan_for(store, add={"sg/n4": 1.0}, remove=["sg/n2"])
    # An interrupted change whose plan is gone (or unreadable): weights and holds only.
    holds = {m.slot: m.from_node for m in plan.moves}
    store.state = RingState(1, plan.set_weights, holds, "", slots=S if recorded else 0)
    store.state = dataclasses.replace(store.state, replicas=R if recorded else 0)
    # The CLI's defaults are not the region's: the recorded shape wins (fewer slots would
    # put other owners on the ring, and some held slots off it); else they are used.
    run_as = (S // 2, R + 1) if recorded else (S, R)
    result = run(
        apply_plan(
            store,
            None,
            slots=run_as[0],
            replicas=run_as[1],
            move_timeout_s=1.0,
            sleep=nodes.sleep,
            clock=nodes.clock,
        )
    )
    assert result.resumed
    assert sorted(result.moved, key=lambda m: m.slot) == list(plan.moves)
    assert store.owner_records == planned(plan)
    assert store.state.holds == {} and store.lock_holder == ""


# -- stuck moves, interrupted applies, resume -----------------------------------------------


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_stuck_slot_stops_the_apply_and_resume_finishes_it(which: str) -> None:
    store, nodes = region(THREE, standbys=["sg/n4"])
    plan = plan_for(store, add={"sg/n4": 1.0})
    stuck = plan.moves[0 if which == "first" else -1].slot
    nodes.stuck = {stuck}
    with pytest.raises(MoveStuck, match=f"slot {stuck} did not reach sg/n4 in 1 s"):
        apply(store, plan, nodes, max_moving=1, move_timeout_s=1.0)
    assert 1.0 < nodes.now < 1.0 + 3 * POLL_S  # gave up on time, polling meanwhile
    # What was not released stays held; the plan stays for --resume; the lock is free.
    left = [m.slot for m in plan.moves if m.slot > stuck]
    assert sorted(store.state.holds) == left
    assert store.state.plan and store.lock_holder == ""
    with pytest.raises(ChangeInProgress):
        apply(store, plan_for_anything(), nodes)
    with pytest.raises(MoveStuck):  # still stuck: resume does not pretend it is done
        apply(store, None, nodes, move_timeout_s=1.0)
    nodes.stuck = set()  # the node came back to its senses: it lands on the next poll
    result = apply(store, None, nodes, move_timeout_s=1.0)
    assert result.resumed and stuck in {m.slot for m in result.moved}
    assert_done(store, nodes, plan, {})


def test_moves_follow_the_live_ring_when_their_target_dies() -> None:
    store, nodes = region(THREE, standbys=["sg/n4"])
    plan = plan_for(store, add={"sg/n4": 1.0})
    nodes.delay = lambda slot: 2

    def on_progress(p: Progress) -> None:
        if p.done == 1:  # sg/n4 dies after its first slot: its lease goes
            del store.lease_weights["sg/n4"]

    result = apply(store, plan, nodes, max_moving=2, move_timeout_s=5.0, on_progress=on_progress)
    # No MoveStuck: within a second the moves left were sent where the live ring says.
    assert len(result.moved) == len(plan.moves)
    assert result.moved[0].to_node == "sg/n4"
    # The two in flight when it died may have landed on it; every later one lands on
    # the live ring (here: stays where it was, as sg/n4 is gone).
    live = nodes.target()
    later = result.moved[2:]
    assert later and all(m.to_node != "sg/n4" for m in later)
    assert all(store.owner_records[m.slot] == live.owner(m.slot) for m in later)
    assert store.state.holds == {} and store.state.plan == ""
    assert nodes.now < 5.0


def plan_for_anything() -> Plan:
    other, _ = region(THREE)
    return plan_for(other, remove=["sg/n3"])


class Crash(Exception):
    """The CLI died mid-apply (killed, its connection to Redis lost)."""


class Interrupted:
    """A RingStore whose ``k``-th call fails: before it takes effect, or after it (its
    reply lost). With ``dead``, every later call fails too: the process is gone."""

    def __init__(self, inner: MemoryRingStore, k: int, *, after: bool, dead: bool) -> None:
        self.inner = inner
        self.k = k
        self.after = after
        self.dead = dead
        self.calls = 0
        self.names: Counter[str] = Counter()  # calls made, by name
        self.renewals: list[tuple[str, int]] = []  # (token, ttl_ms) of each renew

    async def _call(self, name: str, *args: Any) -> Any:
        self.calls += 1
        self.names[name] += 1
        if (self.calls == self.k and not self.after) or (self.dead and self.calls > self.k):
            raise Crash(f"call {self.calls} ({name})")
        result = await getattr(self.inner, name)(*args)
        if self.calls == self.k:
            raise Crash(f"call {self.calls} ({name}), after it took effect")
        return result

    async def read(self) -> RingState:
        return await self._call("read")  # type: ignore[no-any-return]

    async def leases(self) -> dict[str, float]:
        return await self._call("leases")  # type: ignore[no-any-return]

    async def owners(self, slots: Sequence[int]) -> dict[int, str]:
        return await self._call("owners", slots)  # type: ignore[no-any-return]

    async def lock(self, token: str, ttl_ms: int) -> bool:
        return await self._call("lock", token, ttl_ms)  # type: ignore[no-any-return]

    async def renew(self, token: str, ttl_ms: int) -> bool:
        self.renewals.append((token, ttl_ms))
        return await self._call("renew", token, ttl_ms)  # type: ignore[no-any-return]

    async def unlock(self, token: str) -> None:
        await self._call("unlock", token)

    async def begin(self, *args: Any) -> int:
        return await self._call("begin", *args)  # type: ignore[no-any-return]

    async def unhold(self, token: str, slots: Sequence[int]) -> int:
        return await self._call("unhold", token, slots)  # type: ignore[no-any-return]

    async def finish(self, token: str) -> None:
        await self._call("finish", token)


ALL_WAYS = ((False, False), (False, True), (True, False), (True, True))


def interrupt_everywhere(
    on_ring: Mapping[str, float],
    standbys: Sequence[str],
    change: Mapping[str, Any],
    *,
    max_moving: int,
    delay: Callable[[int], int],
    ways: Sequence[tuple[bool, bool]] = ALL_WAYS,
) -> int:
    """Apply the change once through, then once interrupted at each store call in each
    of the ``ways`` ((after, dead) of :class:`Interrupted`), resumed each time; every run
    must end on the planned ring. Returns the number of calls of a run through."""
    store, nodes = region(on_ring, standbys)
    nodes.delay = delay
    plan = plan_for(store, **change)
    whole = Interrupted(store, 0, after=False, dead=False)
    apply(whole, plan, nodes, max_moving=max_moving)
    assert_done(store, nodes, plan, {})
    assert whole.names["lock"] == 1  # taken once; renewed (if anything moves) at each poll
    assert (whole.names["renew"] > 0) == bool(plan.moves)
    for k in range(1, whole.calls + 1):
        for after, dead in ways:
            store, nodes = region(on_ring, standbys)
            nodes.delay = delay
            cut = Interrupted(store, k, after=after, dead=dead)
            try:
                apply(cut, plan, nodes, max_moving=max_moving)
            except Crash:
                pass
            else:
                raise AssertionError(f"call {k} of {whole.calls} did not fail")
            store.lock_holder = ""  # the dead CLI's lock expires (LOCK_TTL_MS)
            apply(store, None, nodes, max_moving=max_moving)  # relay ring apply --resume
            done = plan
            if store.state.version == plan.base_version:
                # It died before writing anything (else begin made a version); the
                # resume found nothing to do and wrote nothing: the plan still holds.
                assert store.state == RingState(version=plan.base_version)
                apply(store, plan, nodes, max_moving=max_moving)
            why = f"interrupted at call {k} ({'after' if after else 'before'}, dead={dead})"
            try:
                assert_done(store, nodes, done, {})
            except AssertionError as e:
                raise AssertionError(f"{why}: {e}") from e
    return whole.calls


@pytest.mark.parametrize("delay", [0, 2])
def test_an_apply_interrupted_at_any_call_and_resumed_ends_on_the_planned_ring(
    delay: int,
) -> None:
    calls = interrupt_everywhere(
        THREE,
        ["sg/n4"],
        {"add": {"sg/n4": 1.5}, "remove": ["sg/n2"]},
        max_moving=3,
        delay=lambda slot: delay,
    )
    assert calls > 10  # lock, read, leases, begin, read, … unhold, owners …, finish, unlock


@st.composite
def changes(draw: st.DrawFn) -> tuple[dict[str, float], list[str], dict[str, Any]]:
    names = [f"sg/n{i}" for i in range(1, 7)]
    on = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    on_ring = {n: draw(st.sampled_from([0.5, 1.0, 2.0])) for n in on}
    standbys = [n for n in names if n not in on_ring]
    add = draw(st.dictionaries(st.sampled_from(standbys), st.sampled_from([1.0, 2.0]), max_size=2))
    remove = draw(st.lists(st.sampled_from(on), max_size=len(on) - 1 + len(add), unique=True))
    if len(remove) == len(on) and not add:
        remove = remove[1:]
    keep = [n for n in on if n not in remove]
    weights = (
        draw(st.dictionaries(st.sampled_from(keep), st.sampled_from([1.0, 3.0]), max_size=1))
        if keep
        else {}
    )
    return on_ring, standbys, {"add": add, "remove": remove, "weights": weights}


@settings(max_examples=25, deadline=None)
@given(
    changes(),
    st.integers(2, 4),
    st.lists(st.integers(0, 2), min_size=S, max_size=S),
    st.tuples(st.booleans(), st.booleans()),
)
def test_any_change_interrupted_anywhere_and_resumed_ends_on_the_planned_ring(
    change: tuple[dict[str, float], list[str], dict[str, Any]],
    max_moving: int,
    delays: list[int],
    way: tuple[bool, bool],
) -> None:
    on_ring, standbys, kwargs = change
    interrupt_everywhere(
        on_ring, standbys, kwargs, max_moving=max_moving, delay=delays.__getitem__, ways=[way]
    )
