"""Lua for leases held as ``SET key value PX ttl``: extend or release only if still ours.

A lease that expired and was taken by someone else (a newer incarnation of a node, another
node running a link) must not be extended or deleted by the old holder. :class:`Lease`
takes, renews and releases one (the WAN link's and the receiver's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Final

from redis.exceptions import RedisError

from cluster.redisconn import AsyncClient

# KEYS[1] the lease, ARGV[1] our value, ARGV[2] the TTL in ms. Returns 1 if extended.
RENEW_IF_OURS: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] the lease, ARGV[1] our value. Returns 1 if deleted.
RELEASE_IF_OURS: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """One lease, ``SET key value NX PX ttl``, taken or renewed by :meth:`acquire` (the
    holder's renewal task calls it every third of the TTL) and released by
    :meth:`release`. The value is ``node_id#nonce``: a restarted process with the same
    node id does not renew (or release) the lease of the one before it."""

    def __init__(self, client: AsyncClient, key: str, node_id: str, ttl_ms: int) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.value = f"{node_id}#{secrets.token_hex(6)}"
        # The lease is ours until this (monotonic): last renewal sent + TTL.
        self.valid_until = 0.0

    @property
    def holding(self) -> bool:
        """Surely ours now: the last renewal was sent less than a TTL ago and found the
        lease ours."""
        return time.monotonic() < self.valid_until

    async def acquire(self) -> bool:
        """Take the lease if it is free or renew it if it is ours."""
        sent = time.monotonic()
        got = await self.client.set(self.key, self.value, nx=True, px=self.ttl_ms)
        if not got:
            got = await self.client.eval(RENEW_IF_OURS, 1, self.key, self.value, str(self.ttl_ms))
        self.valid_until = sent + self.ttl_ms / 1000 if got else 0.0
        return bool(got)

    async def renew(self, log: logging.Logger, holder: str) -> bool:
        """:meth:`acquire`, for the holder's renewal task: when Redis does not answer
        (logged as ``<holder>: renewing the lease: …``) the lease runs out on its own
        time, so it stays ours while :attr:`holding`."""
        try:
            return await self.acquire()
        except (RedisError, OSError) as e:
            log.warning("%s: renewing the lease: %s", holder, e)
            return self.holding

    async def release(self) -> None:
        """Delete the lease if it is still ours (once held; errors ignored: it then runs
        out on its own time)."""
        if self.valid_until:
            with contextlib.suppress(RedisError, OSError):
                await self.client.eval(RELEASE_IF_OURS, 1, self.key, self.value)
            self.valid_until = 0.0


async def stop_leased(task: asyncio.Task[None] | None, lease: Lease) -> None:
    """End a lease holder's task (cancelled, awaited, whatever it raised) and then
    release its lease (the WAN link's and the receiver's ``stop``)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await lease.release()
