"""The ring store (cluster/rebalance.py): one suite run against MemoryRingStore and
against RedisRingStore on a real Redis server, then what only Redis has (the lock's TTL,
the announcements on the members channel) and a whole apply with the nodes played by a
task that follows the ring state as the routers do.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
import redis.asyncio
from twisted.internet.defer import Deferred

from cluster.errors import ChangeInProgress, MoveStuck, StalePlan
from cluster.keys import lease_key, members_channel, owner_key, ring_key
from cluster.membership import Member
from cluster.placement import Plan, RingState, make_plan, placement
from cluster.rebalance import (
    LockLost,
    MemoryRingStore,
    RedisRingStore,
    RingStore,
    apply_plan,
    read_state,
)
from cluster.ring import Ring
from tests.conftest import aio

S = 32
R = 2


def _run(coro: Awaitable[Any]) -> Any:
    return pytest_twisted.blockon(Deferred.fromFuture(asyncio.ensure_future(coro)))


async def eventually(
    cond: Callable[[], Awaitable[Any]], timeout_s: float = 5.0, what: str = "condition"
) -> Any:
    """Poll an async ``cond`` until it returns something truthy; fail after a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = await cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)  # poll interval


@dataclass
class Backend:
    """One RingStore under test, and how a test sets up the region around it."""

    name: str
    region: str
    store: RingStore
    add_lease: Callable[[str, float], Awaitable[None]]  # a node joins with this weight
    set_owner: Callable[[int, str], Awaitable[None]]  # a node claims a slot
    client: redis.asyncio.Redis | None = None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def node(self, name: str) -> str:
        return f"{self.region}/{name}"


def _memory(region: str) -> Backend:
    store = MemoryRingStore({}, {})

    async def add_lease(node: str, weight: float) -> None:
        store.lease_weights[node] = weight

    async def set_owner(slot: int, node: str) -> None:
        store.owner_records[slot] = node

    return Backend("memory", region, store, add_lease, set_owner)


def _redis(region: str, url: str) -> Backend:
    client = redis.asyncio.Redis.from_url(url)
    epochs = iter(range(1, 1_000_000))

    async def add_lease(node: str, weight: float) -> None:
        me = Member(node, next(epochs), "127.0.0.1:1", weight=weight)
        await client.set(lease_key(region, node), me.encode(), px=60_000)

    async def set_owner(slot: int, node: str) -> None:
        await client.hincrby(owner_key(region, slot), "epoch", 1)
        await client.hset(owner_key(region, slot), "owner", node)

    b = Backend("redis", region, RedisRingStore(client, region), add_lease, set_owner, client)
    b.closers.append(client.aclose)
    return b


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    region = f"rb-{uuid.uuid4().hex[:10]}"  # nothing of another test's region in sight
    if request.param == "memory":
        b = _memory(region)
    else:
        b = _redis(region, request.getfixturevalue("redis_url"))
    yield b
    for close in b.closers:
        _run(close())


@pytest.fixture
def redis_backend(redis_url: str) -> Iterator[Backend]:
    b = _redis(f"rb-{uuid.uuid4().hex[:10]}", redis_url)
    yield b
    for close in b.closers:
        _run(close())


# -- the lock -------------------------------------------------------------------------------


@aio
async def test_the_lock_is_one_token_at_a_time(backend: Backend) -> None:
    s = backend.store
    assert await s.lock("a", 10_000)
    assert await s.lock("a", 10_000)  # ours: extended
    assert not await s.lock("b", 10_000)
    await s.unlock("b")  # not b's: nothing happens
    assert not await s.lock("b", 10_000)
    await s.unlock("a")
    await s.unlock("a")  # twice: harmless
    assert await s.lock("b", 10_000)
    assert not await s.lock("a", 10_000)


@aio
async def test_the_lock_of_a_dead_apply_expires(redis_backend: Backend) -> None:
    s, client = redis_backend.store, redis_backend.client
    assert client is not None
    key = ring_key(redis_backend.region, "lock")
    assert await s.lock("dead", 200)
    assert not await s.lock("next", 10_000)
    assert await s.lock("dead", 60_000)  # ours: the TTL is set anew
    assert 50_000 < await client.pttl(key) <= 60_000
    assert await s.lock("dead", 200)  # … the apply dies right after this renewal
    await eventually(lambda: s.lock("next", 10_000), 3.0, "the dead apply's lock to expire")
    assert 9_000 < await client.pttl(key) <= 10_000


# -- the ring state ------------------------------------------------------------------------


@aio
async def test_begin_writes_weights_holds_and_plan_at_once(backend: Backend) -> None:
    s, n1, n2, n3 = backend.store, backend.node("n1"), backend.node("n2"), backend.node("n3")
    assert await s.read() == RingState()
    assert await s.lock("me", 10_000)
    plan = json.dumps({"a": "plan"})
    assert await s.begin("me", 0, {n1: 2.0, n2: 0.0, n3: 0.5}, {3: n1, 17: n2}, plan) == 1
    assert await s.read() == RingState(1, {n1: 2.0, n2: 0.0, n3: 0.5}, {3: n1, 17: n2}, plan)
    # Released holds; then a second change adds to the weights, holds nothing.
    assert await s.unhold("me", [3, 17]) == 2
    assert await s.begin("me", 2, {n1: 1.0, n2: 64.0}, {}, "second") == 3
    assert await s.read() == RingState(3, {n1: 1.0, n2: 64.0, n3: 0.5}, {}, "second")


@aio
async def test_begin_refuses_without_the_lock_a_stale_version_or_holds_left(
    backend: Backend,
) -> None:
    s, n1 = backend.store, backend.node("n1")
    with pytest.raises(LockLost):
        await s.begin("me", 0, {n1: 1.0}, {1: n1}, "p")
    assert await s.lock("me", 10_000)
    with pytest.raises(StalePlan):
        await s.begin("me", 7, {n1: 1.0}, {1: n1}, "p")
    assert await s.read() == RingState()  # refused: nothing written
    assert await s.begin("me", 0, {n1: 1.0}, {1: n1, 2: n1}, "p") == 1
    with pytest.raises(ChangeInProgress):
        await s.begin("me", 1, {n1: 3.0}, {5: n1}, "q")
    with pytest.raises(StalePlan):  # the version is checked first
        await s.begin("me", 0, {n1: 3.0}, {5: n1}, "q")
    await s.unlock("me")
    assert await s.lock("other", 10_000)
    with pytest.raises(LockLost):
        await s.begin("me", 1, {n1: 3.0}, {}, "q")
    assert await s.read() == RingState(1, {n1: 1.0}, {1: n1, 2: n1}, "p")


@aio
async def test_unhold_releases_slots_under_the_lock(backend: Backend) -> None:
    s, n1, n2 = backend.store, backend.node("n1"), backend.node("n2")
    assert await s.lock("me", 10_000)
    await s.begin("me", 0, {}, {1: n1, 2: n2, 3: n1}, "p")
    assert await s.unhold("me", [2]) == 2
    assert (await s.read()).holds == {1: n1, 3: n1}
    assert await s.unhold("me", [9, 1]) == 3  # a slot not held: fine
    assert (await s.read()).holds == {3: n1}
    await s.unlock("me")
    with pytest.raises(LockLost):
        await s.unhold("me", [3])
    assert await s.read() == RingState(3, {}, {3: n1}, "p")


@aio
async def test_finish_forgets_the_plan_only_for_the_lock_holder(backend: Backend) -> None:
    s, n1 = backend.store, backend.node("n1")
    assert await s.lock("me", 10_000)
    await s.begin("me", 0, {n1: 2.0}, {4: n1}, "p")
    await s.finish("other")
    assert (await s.read()).plan == "p"
    await s.finish("me")
    # The plan goes; nothing else changes (the holds, if any, stay for --resume).
    assert await s.read() == RingState(1, {n1: 2.0}, {4: n1}, "")


@aio
async def test_leases_and_owner_records(backend: Backend) -> None:
    s, n1, n2 = backend.store, backend.node("n1"), backend.node("n2")
    assert await s.leases() == {}
    assert await s.owners([0, 5]) == {0: "", 5: ""}
    await backend.add_lease(n1, 1.0)
    await backend.add_lease(n2, 0.0)
    assert await s.leases() == {n1: 1.0, n2: 0.0}
    await backend.set_owner(5, n2)
    assert await s.owners([5, 0]) == {5: n2, 0: ""}
    assert await s.owners([]) == {}


@aio
async def test_redis_reads_skip_what_they_cannot_parse(redis_backend: Backend) -> None:
    client, region = redis_backend.client, redis_backend.region
    assert client is not None
    n1 = redis_backend.node("n1")
    await redis_backend.add_lease(n1, 2.0)
    await client.set(lease_key(region, redis_backend.node("junk")), b"not json")
    await client.hset(ring_key(region, "weights"), mapping={n1: "1.5", "x": "heavy", "y": "99"})
    await client.hset(ring_key(region, "holds"), mapping={"7": n1, "seven": n1})
    assert await redis_backend.store.leases() == {n1: 2.0}
    state = await read_state(client, region)
    assert (state.weights, state.holds) == ({n1: 1.5}, {7: n1})


@aio
async def test_begin_and_unhold_announce_the_ring_on_the_members_channel(
    redis_backend: Backend,
) -> None:
    client, s = redis_backend.client, redis_backend.store
    assert client is not None
    pubsub = client.pubsub()
    await pubsub.subscribe(members_channel(redis_backend.region))
    heard: list[dict[str, Any]] = []

    async def hear(count: int) -> bool:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if msg is not None:
            heard.append(json.loads(msg["data"]))
        return len(heard) >= count

    try:
        assert await s.lock("me", 10_000)
        n1 = redis_backend.node("n1")
        await s.begin("me", 0, {n1: 1.0}, {1: n1, 2: n1}, "p")
        await eventually(lambda: hear(1), 3.0, "the begin's announcement")
        await s.unhold("me", [1])
        await s.unhold("me", [2])
        await eventually(lambda: hear(3), 3.0, "the unholds' announcements")
        await s.finish("me")  # forgets the plan: nodes need not hear of it
        await s.lock("me", 10_000)
        await s.unlock("me")
        assert not await hear(4)
        assert heard == [{"event": "ring", "version": v} for v in (1, 2, 3)]
    finally:
        await pubsub.aclose()


# -- a whole apply, the nodes played alongside ---------------------------------------------


async def play_nodes(b: Backend, stop: asyncio.Event) -> None:
    """What the routers do about ownership, reduced to owner records: follow the ring
    state (told on the members channel, re-read at least every 50 ms) and claim each
    slot the placement gives to someone else than its owner record names."""
    pubsub = None
    if b.client is not None:
        pubsub = b.client.pubsub()
        await pubsub.subscribe(members_channel(b.region))
    try:
        while not stop.is_set():
            where = placement(await b.store.leases(), await b.store.read(), slots=S, replicas=R)
            assert where is not None
            records = await b.store.owners(range(S))
            for slot, owner in enumerate(where.assignment()):
                if records[slot] != owner:
                    await b.set_owner(slot, owner)
            if pubsub is not None:
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            else:
                await asyncio.sleep(0.01)
    finally:
        if pubsub is not None:
            await pubsub.aclose()


async def seed(b: Backend) -> Plan:
    """Three nodes on the ring with their slots claimed, a fourth started as a standby;
    the plan: the fourth joins with weight 2, the first leaves."""
    n1, n2, n3, n4 = (b.node(f"n{i}") for i in range(1, 5))
    for n in (n1, n2, n3):
        await b.add_lease(n, 1.0)
    await b.add_lease(n4, 0.0)
    start = placement(await b.store.leases(), RingState(), slots=S, replicas=R)
    assert start is not None
    for slot, owner in enumerate(start.assignment()):
        await b.set_owner(slot, owner)
    plan = make_plan(
        b.region,
        await b.store.leases(),
        await b.store.read(),
        add={n4: 2.0},
        remove=[n1],
        slots=S,
        replicas=R,
    )
    assert len(plan.moves) > 4
    return plan


async def assert_planned_ring(s: RingStore, plan: Plan) -> RingState:
    want = Ring(plan.after, slots=S, replicas=R).assignment()
    assert await s.owners(range(S)) == dict(enumerate(want))
    state = await s.read()
    assert (state.holds, state.plan) == ({}, "")
    assert state.weights == plan.set_weights
    assert await s.lock("next", 1000)  # the apply let its lock go
    await s.unlock("next")
    return state


@aio
async def test_apply_moves_the_slots_with_the_nodes_following(backend: Backend) -> None:
    s = backend.store
    plan = await seed(backend)
    released: list[int] = []
    if isinstance(s, MemoryRingStore):
        s.on_unhold = released.extend
    stop = asyncio.Event()
    nodes = asyncio.ensure_future(play_nodes(backend, stop))
    try:
        result = await apply_plan(
            s, plan, max_moving=2, move_timeout_s=5.0, poll_s=0.01, slots=S, replicas=R
        )
        assert sorted(result.moved, key=lambda m: m.slot) == list(plan.moves)
        state = await assert_planned_ring(s, plan)
        # begin, then one unhold per batch released (at most 2 slots each, as they land).
        assert len(plan.moves) // 2 + 1 <= state.version <= len(plan.moves) + 1
        # Resuming a change that is done does nothing.
        again = await apply_plan(s, None, poll_s=0.01, slots=S, replicas=R)
        assert again.moved == () and again.resumed
        assert (await s.read()).version == state.version
    finally:
        stop.set()
        await nodes
    if isinstance(s, MemoryRingStore):
        assert sorted(released) == [m.slot for m in plan.moves]


@aio
async def test_a_stuck_apply_is_resumed_once_the_nodes_follow(backend: Backend) -> None:
    s = backend.store
    plan = await seed(backend)
    # Nobody claims what is released: the first two moves time out.
    with pytest.raises(MoveStuck):
        await apply_plan(
            s, plan, max_moving=2, move_timeout_s=0.1, poll_s=0.01, slots=S, replicas=R
        )
    state = await s.read()
    assert sorted(state.holds) == [m.slot for m in plan.moves[2:]]
    assert state.plan and state.weights == plan.set_weights
    with pytest.raises(ChangeInProgress):  # another change must wait for this one
        await apply_plan(s, plan, slots=S, replicas=R)
    stop = asyncio.Event()
    nodes = asyncio.ensure_future(play_nodes(backend, stop))
    try:
        result = await apply_plan(s, None, max_moving=2, move_timeout_s=5.0, poll_s=0.01)
        # The two released before, waited for; the rest released now. Each once.
        assert sorted(result.moved, key=lambda m: m.slot) == list(plan.moves)
        assert result.resumed
        await assert_planned_ring(s, plan)
    finally:
        stop.set()
        await nodes
