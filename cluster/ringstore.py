"""Planned ring changes carried out: the ring state in Redis, and applying plans slot by slot.

The ring of a region is computed from its live members (their leases) and their weights
(:mod:`cluster.ring`). Ops change it on purpose through the *ring state* kept in the
region's Redis (:func:`cluster.keys.ring_key`):

- ``weights``: node → weight set by ops, overriding the weight in the node's lease.
  Weight 0 keeps a live node off the ring (a standby, or a node being removed).
- ``holds``: slot → node. While a planned change is applied, each slot it moves stays
  with its old owner until its turn comes; the nodes route it there
  (:class:`Placement`). A hold naming a node without a lease is ignored, so a failure
  mid-change still fails over.
- ``version``: bumped by every write; each write is announced on the members channel
  (``{"event": "ring"}``) and the nodes re-read the state (and every second anyway).

Applying a plan (:func:`apply_plan`), under a lock so that one change runs at a time:

1. In one script: check the lock and that the ring has not moved since the plan was made,
   write the new weights and hold every moving slot at its old owner. Nothing moves yet.
2. Release the holds a few slots at a time (``max_moving``). For each released slot the
   old owner stops serving it, flushes its batches to the slot log, writes a checkpoint
   and marks its owner record released; the new owner, which tailed the log as a replica
   meanwhile, waits for that release, claims the slot under a new epoch (fencing) and
   reads the checkpoint and the log to the end before it serves (:mod:`cluster.router`).
3. A slot is done when its owner record names its new owner. Then the next one goes.

Everything needed to go on lives in Redis, so an apply that was interrupted (the CLI
killed, a timeout) is finished by ``relay ring apply --resume``: it releases the holds
left, moving each slot to its owner on the planned ring, and waits as well for the slots
released before the interruption that have not landed yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cluster.errors import (
    ChangeInProgress,
    MoveStuck,
    NodeDown,
    PlanError,
    RebalanceError,
    StalePlan,
)
from cluster.keys import members_channel, owner_key, ring_key
from cluster.membership import leases
from cluster.rebalance import (
    Placement,
    Plan,
    RingState,
    check_shape,
    effective_weights,
    placement,
)
from cluster.redisconn import AsyncClient
from cluster.ring import DEFAULT_REPLICAS, DEFAULT_SLOTS, MAX_WEIGHT, Move

RETARGET_S = 1.0  # how often an apply checks its moves' targets against the live ring
LOCK_TTL_MS = 10_000  # renewed at every poll; a killed apply frees it this soon
POLL_S = 0.05
DEFAULT_MAX_MOVING = 4
DEFAULT_MOVE_TIMEOUT_S = 60.0


# -- where the ring state lives ----------------------------------------------------------


class RingStore(Protocol):
    """The ring state, the slots' owner records and the lock (Redis, or a fake)."""

    async def read(self) -> RingState: ...

    async def leases(self) -> dict[str, float]:
        """Live nodes (holding a lease) and the weights in their leases."""
        ...

    async def owners(self, slots: Sequence[int]) -> dict[int, str]:
        """The node each slot's owner record names ("" when none or released)."""
        ...

    async def lock(self, token: str, ttl_ms: int) -> bool:
        """Take the lock, or extend it if ``token`` holds it; False if another does."""
        ...

    async def renew(self, token: str, ttl_ms: int) -> bool:
        """Extend the lock only while ``token`` still holds it (never take it back
        after it expired: someone else may have changed the ring meanwhile)."""
        ...

    async def unlock(self, token: str) -> None: ...

    async def begin(
        self,
        token: str,
        base_version: int,
        set_weights: Mapping[str, float],
        holds: Mapping[int, str],
        plan: str,
    ) -> int:
        """Write the weights and the holds at once if the version is still
        ``base_version`` and no hold is left; the new version."""
        ...

    async def unhold(self, token: str, slots: Sequence[int]) -> int:
        """Release the holds of ``slots``; the new version."""
        ...

    async def finish(self, token: str) -> None:
        """The change is done: forget its plan (a new version, announced, if there was
        one to forget)."""
        ...


class LockLost(ChangeInProgress):
    """Our lock expired and someone else took it: stop at once."""


_BEGIN = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0, 'lock'} end
local v = redis.call('HGET', KEYS[2], 'version') or '0'
if v ~= ARGV[2] then return {0, 'stale', v} end
if redis.call('HLEN', KEYS[4]) > 0 then return {0, 'holds'} end
local i = 6
for _ = 1, tonumber(ARGV[5]) do
  if ARGV[i + 1] == '0' then
    redis.call('HSET', KEYS[3], ARGV[i], '0')
  else
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
local n = tonumber(ARGV[i])
i = i + 1
for _ = 1, n do
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('SET', KEYS[5], ARGV[4])
local nv = redis.call('HINCRBY', KEYS[2], 'version', 1)
redis.call('PUBLISH', ARGV[3], '{"event":"ring","version":' .. nv .. '}')
return {1, nv}
"""

_UNHOLD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0, 'lock'} end
for i = 3, #ARGV do redis.call('HDEL', KEYS[3], ARGV[i]) end
local nv = redis.call('HINCRBY', KEYS[2], 'version', 1)
redis.call('PUBLISH', ARGV[2], '{"event":"ring","version":' .. nv .. '}')
return {1, nv}
"""

_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('DEL', KEYS[2]) == 0 then return 1 end
local nv = redis.call('HINCRBY', KEYS[3], 'version', 1)
redis.call('PUBLISH', ARGV[2], '{"event":"ring","version":' .. nv .. '}')
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_LOCK = """
local cur = redis.call('GET', KEYS[1])
if cur == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _weights_of(raw: Mapping[Any, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in raw.items():
        try:
            w = float(_text(v))
        except ValueError:
            continue
        if 0 <= w <= MAX_WEIGHT:
            out[_text(k)] = w
    return out


def _holds_of(raw: Mapping[Any, Any]) -> dict[int, str]:
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            out[int(_text(k))] = _text(v)
        except ValueError:
            continue
    return out


def queue_state(pipe: Any, region: str) -> None:
    """Queue the reads of the ring state on a (sync or async) MULTI pipeline."""
    pipe.hmget(ring_key(region), ["version", "slots", "replicas"])
    pipe.hgetall(ring_key(region, "weights"))
    pipe.hgetall(ring_key(region, "holds"))
    pipe.get(ring_key(region, "plan"))


def parse_state(replies: Sequence[Any]) -> RingState:
    """The ring state from the replies of :func:`queue_state`."""
    (version, slots, replicas), weights, holds, plan = replies[:4]
    return RingState(
        version=int(version or 0),
        weights=_weights_of(weights),
        holds=_holds_of(holds),
        plan=_text(plan) if plan else "",
        slots=_int_or_0(slots),
        replicas=_int_or_0(replicas),
    )


def _int_or_0(v: Any) -> int:
    try:
        return int(v or 0)
    except ValueError:
        return 0


async def record_shape(client: AsyncClient, region: str, slots: int, replicas: int) -> RingState:
    """Record the region's slots and replicas (a node's, at start) unless recorded;
    returns the ring state, with what was recorded first."""
    pipe = client.pipeline(transaction=True)
    pipe.hsetnx(ring_key(region), "slots", str(slots))
    pipe.hsetnx(ring_key(region), "replicas", str(replicas))
    queue_state(pipe, region)
    return parse_state((await pipe.execute())[2:])


async def read_state(client: AsyncClient, region: str) -> RingState:
    """The ring state of ``region``, read atomically (one MULTI)."""
    pipe = client.pipeline(transaction=True)
    queue_state(pipe, region)
    return parse_state(await pipe.execute())


class RedisRingStore:
    """The ring state in a region's Redis."""

    def __init__(self, client: AsyncClient, region: str) -> None:
        self.client = client
        self.region = region
        self._keys = [
            ring_key(region, "lock"),
            ring_key(region),
            ring_key(region, "weights"),
            ring_key(region, "holds"),
            ring_key(region, "plan"),
        ]

    async def read(self) -> RingState:
        return await read_state(self.client, self.region)

    async def leases(self) -> dict[str, float]:
        return {n: m.weight for n, m in (await leases(self.client, self.region)).items()}

    async def owners(self, slots: Sequence[int]) -> dict[int, str]:
        pipe = self.client.pipeline(transaction=False)
        for s in slots:
            pipe.hget(owner_key(self.region, s), "owner")
        return {s: _text(o) if o else "" for s, o in zip(slots, await pipe.execute(), strict=True)}

    async def lock(self, token: str, ttl_ms: int) -> bool:
        return bool(await self.client.eval(_LOCK, 1, self._keys[0], token, str(ttl_ms)))

    async def renew(self, token: str, ttl_ms: int) -> bool:
        return bool(await self.client.eval(_RENEW, 1, self._keys[0], token, str(ttl_ms)))

    async def unlock(self, token: str) -> None:
        await self.client.eval(_UNLOCK, 1, self._keys[0], token)

    def _check(self, reply: list[Any]) -> int:
        if int(reply[0]) == 1:
            return int(reply[1])
        why = _text(reply[1])
        if why == "lock":
            raise LockLost("the ring lock was lost (expired?): another change may run")
        if why == "holds":
            raise ChangeInProgress("an interrupted change remains: `relay ring apply --resume`")
        raise StalePlan(
            f"the ring changed since the plan was made (version {_text(reply[2])}): plan again"
        )

    async def begin(
        self,
        token: str,
        base_version: int,
        set_weights: Mapping[str, float],
        holds: Mapping[int, str],
        plan: str,
    ) -> int:
        args: list[str] = [token, str(base_version), members_channel(self.region), plan]
        args.append(str(len(set_weights)))
        for n, w in sorted(set_weights.items()):
            args += [n, "0" if w == 0 else repr(float(w))]
        args.append(str(len(holds)))
        for s, n in sorted(holds.items()):
            args += [str(s), n]
        return self._check(await self.client.eval(_BEGIN, 5, *self._keys, *args))

    async def unhold(self, token: str, slots: Sequence[int]) -> int:
        keys = [*self._keys[:2], self._keys[3]]
        args = [token, members_channel(self.region), *(str(s) for s in slots)]
        return self._check(await self.client.eval(_UNHOLD, 3, *keys, *args))

    async def finish(self, token: str) -> None:
        keys = (self._keys[0], self._keys[4], self._keys[1])
        await self.client.eval(_FINISH, 3, *keys, token, members_channel(self.region))


class MemoryRingStore:
    """The same in RAM, for model tests. ``on_unhold`` plays the nodes: it is told the
    slots whose holds went, and moves their owner records (now, or later)."""

    def __init__(self, leases: Mapping[str, float], owners: Mapping[int, str]) -> None:
        self.state = RingState()
        self.lease_weights = dict(leases)
        self.owner_records = dict(owners)
        self.lock_holder = ""
        self.on_unhold: Callable[[Sequence[int]], None] = lambda slots: None

    async def read(self) -> RingState:
        return self.state

    async def leases(self) -> dict[str, float]:
        return dict(self.lease_weights)

    async def owners(self, slots: Sequence[int]) -> dict[int, str]:
        return {s: self.owner_records.get(s, "") for s in slots}

    async def lock(self, token: str, ttl_ms: int) -> bool:
        if self.lock_holder in ("", token):
            self.lock_holder = token
            return True
        return False

    async def renew(self, token: str, ttl_ms: int) -> bool:
        return self.lock_holder == token

    async def unlock(self, token: str) -> None:
        if self.lock_holder == token:
            self.lock_holder = ""

    def _bump(
        self,
        weights: Mapping[str, float] | None = None,
        holds: Mapping[int, str] | None = None,
        plan: str | None = None,
    ) -> int:
        s = self.state
        self.state = dataclasses.replace(
            s,
            version=s.version + 1,
            weights=s.weights if weights is None else weights,
            holds=s.holds if holds is None else holds,
            plan=s.plan if plan is None else plan,
        )
        return self.state.version

    async def begin(
        self,
        token: str,
        base_version: int,
        set_weights: Mapping[str, float],
        holds: Mapping[int, str],
        plan: str,
    ) -> int:
        if self.lock_holder != token:
            raise LockLost("the ring lock was lost")
        if self.state.version != base_version:
            raise StalePlan("the ring changed since the plan was made")
        if self.state.holds:
            raise ChangeInProgress("an interrupted change remains")
        weights = {**self.state.weights, **set_weights}
        return self._bump(weights=weights, holds=dict(holds), plan=plan)

    async def unhold(self, token: str, slots: Sequence[int]) -> int:
        if self.lock_holder != token:
            raise LockLost("the ring lock was lost")
        holds = {s: n for s, n in self.state.holds.items() if s not in set(slots)}
        version = self._bump(holds=holds)
        self.on_unhold(slots)
        return version

    async def finish(self, token: str) -> None:
        if self.lock_holder == token and self.state.plan:
            self._bump(plan="")


# -- applying --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """Where an apply stands: ``done`` of ``total`` slots moved; ``move`` the last one."""

    done: int
    total: int
    move: Move | None


@dataclass(frozen=True, slots=True)
class ApplyResult:
    moved: tuple[Move, ...]
    resumed: bool
    seconds: float


async def apply_plan(
    store: RingStore,
    plan: Plan | None,
    *,
    max_moving: int = DEFAULT_MAX_MOVING,
    move_timeout_s: float = DEFAULT_MOVE_TIMEOUT_S,
    on_progress: Callable[[Progress], None] = lambda p: None,
    slots: int = DEFAULT_SLOTS,
    replicas: int = DEFAULT_REPLICAS,
    poll_s: float = POLL_S,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> ApplyResult:
    """Carry ``plan`` out slot by slot, or (``plan=None``) finish the change left
    interrupted. Raises :class:`ChangeInProgress` when another change holds the lock
    (or, for a new plan, when one was interrupted), :class:`StalePlan` when the ring
    moved since the plan was made, :class:`MoveStuck` when a slot does not reach its
    new owner in ``move_timeout_s`` (what is left stays held: resume later).

    ``slots`` and ``replicas`` describe the region when resuming (a plan has its own).
    """
    if max_moving < 1:
        raise PlanError(f"max_moving must be at least 1, not {max_moving}")
    started = clock()
    token = uuid.uuid4().hex
    if not await store.lock(token, LOCK_TTL_MS):
        raise ChangeInProgress("another change of the ring is being applied (its lock is held)")
    try:
        state = await store.read()
        leases = await store.leases()
        if plan is not None:
            check_shape(state, plan.slots, plan.replicas)
            if state.holds or state.plan:  # no holds left, but maybe slots in flight
                raise ChangeInProgress(
                    f"an interrupted change is not finished ({len(state.holds)} slots still "
                    "held): finish it with `relay ring apply --resume` first"
                )
            now_w = {n: w for n, w in effective_weights(leases, state).items() if w > 0}
            if state.version != plan.base_version or now_w != dict(plan.before):
                raise StalePlan(
                    f"the ring changed since the plan was made (version {state.version}, "
                    f"members {sorted(now_w)}): plan again"
                )
            missing = sorted(n for n, w in plan.set_weights.items() if w > 0 and n not in leases)
            if missing:
                raise NodeDown(f"{', '.join(missing)} hold no lease: start them first")
            holds = {m.slot: m.from_node for m in plan.moves}
            await store.begin(
                token, plan.base_version, plan.set_weights, holds, json.dumps(plan.to_doc())
            )
            state = await store.read()
        released: list[Move] = []
        if plan is not None:
            slots, replicas = plan.slots, plan.replicas
        elif state.slots:
            slots, replicas = state.slots, state.replicas or replicas
        if plan is None and state.plan:
            with contextlib.suppress(ValueError, PlanError):
                stored = Plan.from_doc(json.loads(state.plan))
                slots, replicas = stored.slots, stored.replicas
                # Released before the interruption (or a MoveStuck), maybe not landed yet.
                released = [m for m in stored.moves if m.slot not in state.holds]

        def where(leases_now: Mapping[str, float], state_now: RingState) -> Placement | None:
            # The ring as the nodes compute it, holds aside: where the moves must land.
            return placement(leases_now, state_now, slots=slots, replicas=replicas, holds=False)

        async def where_now() -> Placement | None:
            state_now = await store.read()
            return where(await store.leases(), state_now)

        target = where(leases, state)
        if target is None:
            raise PlanError("no live node has a positive weight: nothing can own the slots")
        todo = [Move(s, n, target.owner(s)) for s, n in sorted(state.holds.items())]
        records = await store.owners([m.slot for m in released]) if released else {}
        landing = [
            Move(m.slot, m.from_node, target.owner(m.slot))
            for m in released
            if records.get(m.slot) != target.owner(m.slot)
        ]

        moved = await _move(
            store,
            token,
            todo,
            landing,
            max_moving,
            move_timeout_s,
            on_progress,
            poll_s,
            sleep,
            clock,
            where_now,
        )
        await store.finish(token)
        return ApplyResult(tuple(moved), plan is None, clock() - started)
    finally:
        await store.unlock(token)


async def _move(
    store: RingStore,
    token: str,
    todo: list[Move],
    landing: list[Move],
    max_moving: int,
    move_timeout_s: float,
    on_progress: Callable[[Progress], None],
    poll_s: float,
    sleep: Callable[[float], Awaitable[None]],
    clock: Callable[[], float],
    where_now: Callable[[], Awaitable[Placement | None]],
) -> list[Move]:
    """Release the holds of ``todo`` and wait for them and for ``landing`` (released
    already) to reach their new owners. Once a second the targets are checked against
    the ring of the nodes alive now: a target that died or left (its slot fails over
    elsewhere) or a node that joined changes where a move lands."""
    total = len(todo) + len(landing)
    on_progress(Progress(0, total, None))
    pending = list(todo)
    moving = {m.slot: (m, clock()) for m in landing}
    done: list[Move] = []
    next_check = clock() + RETARGET_S
    while pending or moving:
        if not await store.renew(token, LOCK_TTL_MS):
            raise LockLost("the ring lock was lost (expired?): another change may run")
        if clock() >= next_check:
            next_check = clock() + RETARGET_S
            target = await where_now()
            if target is not None:
                pending = [Move(m.slot, m.from_node, target.owner(m.slot)) for m in pending]
                for slot, (m, _since) in list(moving.items()):
                    if target.owner(slot) != m.to_node:
                        moving[slot] = (Move(slot, m.from_node, target.owner(slot)), clock())
        start = pending[: max(0, max_moving - len(moving))]
        del pending[: len(start)]
        if start:
            await store.unhold(token, [m.slot for m in start])
            now = clock()
            for m in start:
                moving[m.slot] = (m, now)
        records = await store.owners(sorted(moving))
        now = clock()
        for slot, (m, since) in sorted(moving.items()):
            if records.get(slot) == m.to_node:
                del moving[slot]
                done.append(m)
                on_progress(Progress(len(done), total, m))
            elif now - since > move_timeout_s:
                raise MoveStuck(
                    f"slot {slot} did not reach {m.to_node} in {move_timeout_s:g} s "
                    f"(its owner record names {records.get(slot) or 'nobody'}); "
                    "`relay ring apply --resume` goes on"
                )
        if moving:
            await sleep(poll_s)  # poll the owner records until the moving slots land
    return done


__all__ = [
    "ApplyResult",
    "LockLost",
    "MemoryRingStore",
    "Progress",
    "RebalanceError",
    "RedisRingStore",
    "RingStore",
    "apply_plan",
    "parse_state",
    "queue_state",
    "read_state",
    "record_shape",
]
