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

This module holds the interface (:class:`RingStore`) and the apply (:func:`apply_plan`);
the two stores and the ring state's reads live in :mod:`cluster.ringstores`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from cluster.errors import (
    ChangeInProgress,
    MoveStuck,
    NodeDown,
    PlanError,
    RebalanceError,
    StalePlan,
)
from cluster.rebalance import (
    Placement,
    Plan,
    RingState,
    check_shape,
    effective_weights,
    placement,
)
from cluster.ring import DEFAULT_REPLICAS, DEFAULT_SLOTS, Move
from cluster.ringstores import (
    LockLost,
    MemoryRingStore,
    RedisRingStore,
    parse_state,
    queue_state,
    read_state,
    record_shape,
)

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
    nothing_to_resume: bool = False  # resumed, but no change was left interrupted


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
        raise ChangeInProgress(
            "another change of the ring is being applied (its lock is held; the lock of "
            f"an apply that was killed expires within {LOCK_TTL_MS // 1000} s: retry then)"
        )
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
                one = len(missing) == 1
                raise NodeDown(
                    f"{', '.join(missing)} {'holds' if one else 'hold'} no lease: "
                    f"start {'it' if one else 'them'} first"
                )
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
        idle = plan is None and not state.plan and not state.holds and not moved
        return ApplyResult(tuple(moved), plan is None, clock() - started, idle)
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
