"""The ring store (cluster/ringstore.py): one suite run against MemoryRingStore and
against RedisRingStore on a real Redis server, then what only Redis has (the lock's TTL,
the announcements on the members channel, the shape the nodes record) and a whole apply
with the nodes played by a task that follows the ring state as the routers do.
"""

from __future__ import annotations

import asyncio
import dataclasses
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

from cluster.errors import ChangeInProgress, MoveStuck, PlanError, StalePlan
from cluster.keys import lease_key, members_channel, owner_key, ring_key
from cluster.membership import Member
from cluster.rebalance import Plan, RingState, make_plan, placement
from cluster.ring import Ring
from cluster.ringstore import (
    LockLost,
    MemoryRingStore,
    RedisRingStore,
    RingStore,
    apply_plan,
    read_state,
    record_shape,
)
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
    record_shape: Callable[[int, int], Awaitable[RingState]]  # a node starts: its slots…
    expire_lock: Callable[[], Awaitable[None]]  # whoever holds the lock stalled past its TTL
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

    async def record(slots: int, replicas: int) -> RingState:
        s = store.state
        store.state = dataclasses.replace(
            s, slots=s.slots or slots, replicas=s.replicas or replicas
        )
        return store.state

    async def expire_lock() -> None:
        store.lock_holder = ""

    return Backend("memory", region, store, add_lease, set_owner, record, expire_lock)


def _redis(region: str, url: str) -> Backend:
    client = redis.asyncio.Redis.from_url(url)
    epochs = iter(range(1, 1_000_000))

    async def add_lease(node: str, weight: float) -> None:
        me = Member(node, next(epochs), "127.0.0.1:1", weight=weight)
        await client.set(lease_key(region, node), me.encode(), px=60_000)

    async def set_owner(slot: int, node: str) -> None:
        await client.hincrby(owner_key(region, slot), "epoch", 1)
        await client.hset(owner_key(region, slot), "owner", node)

    async def record(slots: int, replicas: int) -> RingState:
        return await record_shape(client, region, slots, replicas)

    async def expire_lock() -> None:
        key = ring_key(region, "lock")
        if await client.pexpire(key, 1):  # a tiny TTL left: it lapses (on Redis's clock)
            await eventually(lambda: gone(client, key), 3.0, "the lock to expire")

    store = RedisRingStore(client, region)
    b = Backend("redis", region, store, add_lease, set_owner, record, expire_lock, client)
    b.closers.append(client.aclose)
    return b


async def gone(client: redis.asyncio.Redis, key: str) -> bool:
    return not await client.exists(key)


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


@aio
async def test_renew_extends_only_the_holders_lock(backend: Backend) -> None:
    s = backend.store
    assert not await s.renew("a", 10_000)  # nobody holds it: renew does not take it
    assert await s.lock("b", 10_000)  # … so another may
    await s.unlock("b")
    assert await s.lock("a", 10_000)
    assert await s.renew("a", 10_000)
    assert await s.renew("a", 10_000)
    assert not await s.renew("b", 10_000)  # not b's
    assert not await s.lock("b", 10_000)  # and renewing did not change hands
    await s.unlock("a")
    assert not await s.renew("a", 10_000)  # let go: not taken back either
    assert await s.lock("b", 10_000)
    assert not await s.renew("a", 10_000)
    assert await s.renew("b", 10_000)


@aio
async def test_renew_after_the_lock_expired_fails_and_takes_nothing(
    redis_backend: Backend,
) -> None:
    s, client = redis_backend.store, redis_backend.client
    assert client is not None
    key = ring_key(redis_backend.region, "lock")
    assert await s.lock("me", 200)
    assert await s.renew("me", 60_000)  # the TTL is set anew
    assert 50_000 < await client.pttl(key) <= 60_000
    assert await s.renew("me", 30)  # a tiny TTL: the apply stalls right after this renewal
    await eventually(lambda: gone(client, key), 3.0, "the lock to expire")
    assert not await s.renew("me", 60_000)
    assert await gone(client, key)  # not taken back: someone else may change the ring now
    assert await s.lock("next", 10_000)
    assert not await s.renew("me", 60_000)
    assert await client.get(key) == b"next" and 9_000 < await client.pttl(key) <= 10_000


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
    assert await s.read() == RingState(1, {n1: 2.0}, {4: n1}, "p")  # not its lock: nothing
    await s.finish("me")
    # The plan goes, in a new version; the rest stays (the holds, if any, for --resume).
    assert await s.read() == RingState(2, {n1: 2.0}, {4: n1}, "")
    await s.finish("me")  # nothing left to forget: no new version
    assert await s.read() == RingState(2, {n1: 2.0}, {4: n1}, "")
    await s.unlock("me")
    await s.finish("me")
    assert (await s.read()).version == 2


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
    await client.hset(ring_key(region), mapping={"slots": "many", "replicas": "2"})
    assert await redis_backend.store.leases() == {n1: 2.0}
    state = await read_state(client, region)
    assert (state.weights, state.holds) == ({n1: 1.5}, {7: n1})
    assert (state.slots, state.replicas) == (0, 2)  # not a number: not known


@aio
async def test_begin_unhold_and_finish_announce_the_ring_on_the_members_channel(
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
        await s.finish("other")  # not the lock holder's: nothing written, nothing said
        await s.finish("me")  # the change is done: a version, announced like the others
        await eventually(lambda: hear(4), 3.0, "the finish's announcement")
        assert (await s.read()).version == 4
        # The lock's own traffic and a refused finish say nothing.
        await s.lock("me", 10_000)
        await s.renew("me", 10_000)
        await s.unlock("me")
        await s.finish("me")
        await record_shape(client, redis_backend.region, S, R)  # no ring change either
        assert not await hear(5)
        assert heard == [{"event": "ring", "version": v} for v in (1, 2, 3, 4)]
        assert (await s.read()).version == 4
    finally:
        await pubsub.aclose()


@aio
async def test_record_shape_keeps_what_the_first_node_recorded(redis_backend: Backend) -> None:
    client, region, s = redis_backend.client, redis_backend.region, redis_backend.store
    assert client is not None
    assert await s.read() == RingState()  # nothing recorded: not known
    first = await record_shape(client, region, 64, 2)
    assert first == RingState(slots=64, replicas=2)  # recording is no ring change: version 0
    later = await record_shape(client, region, 128, 3)  # a node configured otherwise
    assert later == first
    assert await s.read() == first == await read_state(client, region)
    # The ring state's writes keep it.
    n1 = redis_backend.node("n1")
    assert await s.lock("me", 10_000)
    await s.begin("me", 0, {n1: 1.0}, {3: n1}, "p")
    await s.unhold("me", [3])
    await s.finish("me")
    assert await s.read() == RingState(3, {n1: 1.0}, {}, "", slots=64, replicas=2)
    assert await record_shape(client, region, 16, 1) == await s.read()
    # Nodes starting at once: one of them is first, all are told its values (both).
    racing = f"{region}-race"
    got = await asyncio.gather(*(record_shape(client, racing, n, r) for n, r in [(64, 2), (32, 3)]))
    assert got[0] == got[1] and (got[0].slots, got[0].replicas) in {(64, 2), (32, 3)}


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
                await asyncio.sleep(0.01)  # the simulated nodes poll the ring state
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
    assert await b.record_shape(S, R) == RingState(slots=S, replicas=R)  # as the nodes start
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
    assert (state.slots, state.replicas) == (S, R)
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
        # begin, one unhold per batch released (at most 2 slots each, as they land), finish.
        assert len(plan.moves) // 2 + 2 <= state.version <= len(plan.moves) + 2
        # Resuming a change that is done moves nothing and writes nothing.
        again = await apply_plan(s, None, poll_s=0.01, slots=S, replicas=R)
        assert again.moved == () and again.resumed
        assert await s.read() == state
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


@pytest.mark.parametrize("then", ["nobody", "another apply"])
@aio
async def test_an_apply_whose_lock_expired_stops_and_does_not_take_it_back(
    backend: Backend, then: str
) -> None:
    s = backend.store
    plan = await seed(backend)
    polls = 0

    async def stall(seconds: float) -> None:
        """The apply's poll: at the first, it stalls past its lock's TTL (a GC pause, a
        partition); meanwhile ``then`` takes the lock."""
        nonlocal polls
        polls += 1
        if polls == 1:
            await backend.expire_lock()
            if then == "another apply":
                assert await s.lock("thief", 10_000)
        await asyncio.sleep(0)  # the poll itself: yield once

    # Nobody claims what is released: the apply polls with two slots in flight.
    with pytest.raises(LockLost):
        await apply_plan(
            s, plan, max_moving=2, move_timeout_s=5.0, poll_s=0.01, sleep=stall, slots=S, replicas=R
        )
    assert polls == 1  # the renewal after the stall failed: stopped at once
    state = await s.read()
    assert state.version == 2  # begin, one unhold; no more, no finish
    assert sorted(state.holds) == [m.slot for m in plan.moves[2:]] and state.plan
    if then == "nobody":
        assert await s.lock("next", 10_000)  # not taken back: free
        await s.unlock("next")
        if backend.client is not None:
            assert await gone(backend.client, ring_key(backend.region, "lock"))
    else:
        assert not await s.lock("next", 10_000)  # the other's, left alone
        assert await s.renew("thief", 10_000)
        await s.unlock("thief")
    # The rest is for --resume, as after any interruption.
    stop = asyncio.Event()
    nodes = asyncio.ensure_future(play_nodes(backend, stop))
    try:
        result = await apply_plan(s, None, max_moving=2, move_timeout_s=5.0, poll_s=0.01)
        assert sorted(result.moved, key=lambda m: m.slot) == list(plan.moves)
        await assert_planned_ring(s, plan)
    finally:
        stop.set()
        await nodes


@aio
async def test_a_plan_for_another_shape_than_the_regions_is_refused(backend: Backend) -> None:
    s = backend.store
    await seed(backend)
    leases, state = await s.leases(), await s.read()
    assert state == RingState(slots=S, replicas=R)  # as the nodes recorded it
    for slots, replicas, why in [
        (2 * S, R, "has 32 slots, not 64"),
        (S, R + 1, "keeps 2 copies of each slot, not 3"),
    ]:
        with pytest.raises(PlanError, match=why):
            make_plan(
                backend.region,
                leases,
                state,
                remove=[backend.node("n1")],
                slots=slots,
                replicas=replicas,
            )
        # A plan made without knowing the shape (before the nodes started, by hand).
        other = make_plan(
            backend.region,
            leases,
            RingState(),
            add={backend.node("n4"): 2.0},
            remove=[backend.node("n1")],
            slots=slots,
            replicas=replicas,
        )
        with pytest.raises(PlanError, match=why):
            await apply_plan(s, other, slots=slots, replicas=replicas)
        assert await s.read() == state  # nothing written
        assert await s.lock("next", 1000)  # the lock let go
        await s.unlock("next")
