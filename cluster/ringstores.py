"""Where a region's ring state lives: :class:`RedisRingStore` (the weights, holds and plan
in Redis, changed only by Lua scripts that check the apply's lock, each write announced
on the members channel), the reads of that state the nodes and the CLI share
(:func:`read_state`, :func:`record_shape`, :func:`queue_state`, :func:`parse_state`), and
:class:`MemoryRingStore`, the fake that passes the same suite. Both satisfy
:class:`~cluster.ringstore.RingStore`; :mod:`cluster.ringstore` applies plans with them
and re-exports its public names."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cluster.errors import ChangeInProgress, StalePlan
from cluster.keys import members_channel, owner_key, ring_key
from cluster.membership import leases
from cluster.rebalance import RingState
from cluster.redisconn import AsyncClient
from cluster.ring import MAX_WEIGHT


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
