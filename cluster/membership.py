"""Membership of a region, held in its Redis: leases, joins, leaves, expiries.

Each node holds a lease key ``relay:{<region>}:lease:<node_id>`` (``SET … PX``) whose
value describes it (epoch, mesh address, URLs, weight), renewed every ``renew_ms``.
Joins and leaves are published on ``relay:{<region>}:members`` (and so are changes of
the ring state ops make, :mod:`cluster.ringstore`); a lease that expires
(the node died or stalled) reaches every node through Redis keyspace notifications
(``notify-keyspace-events Ex``). Nobody polls.

On a Redis Cluster every key of the region (leases, epoch counter) carries the hash tag
``{<region>}``, so they live on one shard. Keyspace notifications are per node, so the
subscription is made on the primary serving that tag (where the leases expire); the
channels are classic pub/sub, which a cluster delivers on every node. Notifications are
switched on on every node, replicas too (a promoted replica keeps them). After a
failover the subscription drops; it is made again on the new primary and the leases are
read anew (``on_resync``), as after any lost connection.

This is an edge: it turns Redis traffic into :class:`Joined`, :class:`Left` and
:class:`Expired` events for the caller (which feeds the pure failure detector), and
calls ``on_lease_lost`` when this node's own lease is gone (it must then stop owning
anything and rejoin with a new epoch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from cluster.keys import (
    confirmed_channel,
    control_channel,
    epoch_key,
    lease_key,
    lease_prefix,
    members_channel,
)
from cluster.lease import RELEASE_IF_OURS, RENEW_IF_OURS
from cluster.redisconn import AsyncClient

log = logging.getLogger(__name__)

# The next epoch, above ARGV[1] (what the caller has seen) whatever the counter holds.
_NEXT_EPOCH = """
local e = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if e <= floor then
  e = floor + 1
  redis.call('SET', KEYS[1], e)
end
return e
"""


@dataclass(frozen=True, slots=True)
class Member:
    """A node as its lease describes it."""

    node_id: str
    epoch: int
    mesh: str  # host:port of its mesh listener
    ws: str = ""
    admin: str = ""
    weight: float = 1.0

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> Member:
        d = json.loads(raw)
        return cls(
            node_id=str(d["node_id"]),
            epoch=int(d["epoch"]),
            mesh=str(d["mesh"]),
            ws=str(d.get("ws", "")),
            admin=str(d.get("admin", "")),
            weight=float(d.get("weight", 1.0)),
        )


def decode_leases(values: list[Any]) -> dict[str, Member]:
    """The members described by lease values (MGET replies); expired (None) and
    malformed ones are skipped."""
    out: dict[str, Member] = {}
    for raw in values:
        if raw is None:
            continue
        try:
            m = Member.decode(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed lease value %r", raw[:200])
            continue
        out[m.node_id] = m
    return out


async def leases(client: AsyncClient, region: str) -> dict[str, Member]:
    """Every member of ``region`` holding a lease now."""
    keys = [k async for k in client.scan_iter(match=lease_prefix(region) + "*", count=1000)]
    return decode_leases(await client.mget(keys)) if keys else {}


@dataclass(frozen=True, slots=True)
class Joined:
    member: Member


@dataclass(frozen=True, slots=True)
class Left:
    node_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Expired:
    node_id: str


MembershipEvent = Joined | Left | Expired


class Membership:
    """This node's lease, and what it hears of the others'."""

    def __init__(
        self,
        *,
        client: AsyncClient,
        region: str,
        me: Member,
        lease_ttl_ms: int = 3000,
        renew_ms: int = 1000,
        on_event: Callable[[MembershipEvent], None],
        on_lease_lost: Callable[[], None],
        on_command: Callable[[dict[str, Any]], None] | None = None,
        on_confirmed: Callable[[dict[str, Any]], None] | None = None,
        on_resync: Callable[[dict[str, Member]], None] | None = None,
        on_ring: Callable[[int], None] | None = None,
    ) -> None:
        self.client = client
        self.region = region
        self.me = me
        self.lease_ttl_ms = lease_ttl_ms
        self.renew_ms = renew_ms
        self.on_event = on_event
        self.on_lease_lost = on_lease_lost
        self.on_command = on_command
        self.on_confirmed = on_confirmed
        self.on_resync = on_resync
        self.on_ring = on_ring
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self._lease_prefix = lease_prefix(region)
        self.notifications = False
        # Monotonic time until which our lease surely holds: measured from the moment
        # the last successful write of it was *sent*, so a paused process sees it pass.
        self.lease_valid_until = 0.0

    # -- lifecycle -----------------------------------------------------------------

    async def join(
        self, floor: int = 0, record: Callable[[int], Awaitable[None]] | None = None
    ) -> Member:
        """Take a new epoch and the lease; announce it. Returns this node, with epoch.

        ``floor``: the highest epoch this node has seen (its own and its peers'; a
        restarted node's last, from its disk). The new epoch is above it even when the
        region's Redis lost the counter (restarted empty): peers ignore a lease whose
        epoch is not above the incarnation they recorded, so a rejoin under a reused
        epoch would stay dead to them. ``record`` is given the epoch before anyone can
        see it (the node writes it to its disk)."""
        epoch = int(await self.client.eval(_NEXT_EPOCH, 1, epoch_key(self.region), floor))
        if record is not None:
            await record(epoch)
        self.me = replace(self.me, epoch=epoch)
        sent = time.monotonic()
        await self.client.set(
            lease_key(self.region, self.me.node_id), self.me.encode(), px=self.lease_ttl_ms
        )
        self.lease_valid_until = sent + self.lease_ttl_ms / 1000
        await self.client.publish(
            members_channel(self.region),
            json.dumps({"event": "join", "member": json.loads(self.me.encode())}),
        )
        return self.me

    async def start(self) -> None:
        """Listen for joins, leaves and expiries, and keep renewing the lease."""
        await self._enable_notifications()
        await self._subscribe()
        self._tasks = [asyncio.ensure_future(self._listen()), asyncio.ensure_future(self._renew())]

    async def _subscribe(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        if isinstance(self.client, RedisCluster):
            # The primary of the region's hash tag: where its leases expire.
            node = self.client.get_node_from_key(members_channel(self.region))
            self._pubsub = self.client.pubsub(node=node, ignore_subscribe_messages=True)
            db = 0
        else:
            self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            db = int(self.client.connection_pool.connection_kwargs.get("db", 0))
        await self._pubsub.subscribe(
            members_channel(self.region),
            control_channel(self.region),
            confirmed_channel(self.region),
            f"__keyevent@{db}__:expired",
        )

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
            self._pubsub = None

    async def leave(self) -> None:
        """Release the lease (if still ours) and announce the leave at once."""
        try:
            released = await self.client.eval(
                RELEASE_IF_OURS, 1, lease_key(self.region, self.me.node_id), self.me.encode()
            )
            # "released": false when the lease had run out already (a node paused past
            # it): its slots failed over, nothing was handed over (`relay node drain`).
            doc = {
                "event": "leave",
                "node_id": self.me.node_id,
                "epoch": self.me.epoch,
                "released": bool(released),
            }
            await self.client.publish(members_channel(self.region), json.dumps(doc))
        except (RedisError, OSError) as e:
            log.warning("could not release the lease of %s: %s", self.me.node_id, e)

    async def snapshot(self) -> dict[str, Member]:
        """Every member holding a lease now."""
        return await leases(self.client, self.region)

    # -- loops ---------------------------------------------------------------------

    async def _enable_notifications(self) -> None:
        try:
            if isinstance(self.client, RedisCluster):
                # Every node, replicas too: whichever is primary when a lease expires.
                nodes = self.client.get_nodes()
                for node in nodes:
                    current = await self.client.config_get(
                        "notify-keyspace-events", target_nodes=node
                    )
                    await self._enable_flags(current, node)
            else:
                await self._enable_flags(await self.client.config_get("notify-keyspace-events"))
            self.notifications = True
        except ResponseError as e:
            # Managed Redis may refuse CONFIG: expiries are then seen by mesh pings only.
            log.warning(
                "keyspace notifications unavailable (%s); set "
                "notify-keyspace-events to Ex on this Redis",
                e,
            )

    async def _enable_flags(self, current: Any, node: Any = None) -> None:
        flags = str(current.get("notify-keyspace-events", ""))
        if "E" not in flags or ("x" not in flags and "A" not in flags):
            if node is None:
                await self.client.config_set("notify-keyspace-events", flags + "Ex")
            else:
                await self.client.config_set(
                    "notify-keyspace-events", flags + "Ex", target_nodes=node
                )

    async def _renew(self) -> None:
        key = lease_key(self.region, self.me.node_id)
        while True:
            await asyncio.sleep(self.renew_ms / 1000)  # the renewal period
            sent = time.monotonic()
            try:
                ok = await self.client.eval(
                    RENEW_IF_OURS, 1, key, self.me.encode(), str(self.lease_ttl_ms)
                )
            except (RedisError, OSError) as e:
                log.warning("lease renewal failed: %s", e)
                continue
            if not ok:
                log.error("lease of %s (epoch %d) is lost", self.me.node_id, self.me.epoch)
                self.lease_valid_until = 0.0
                self.on_lease_lost()
                return
            self.lease_valid_until = sent + self.lease_ttl_ms / 1000

    async def _listen(self) -> None:
        """Dispatch pub/sub messages; after a lost connection, resubscribe and report the
        leases held now (what happened meanwhile was not heard)."""
        while True:
            try:
                assert self._pubsub is not None
                async for item in self._pubsub.listen():
                    try:
                        self._dispatch(item)
                    except Exception:
                        log.exception("bad membership message %r", item)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("membership channel lost (%s); reconnecting", e)
            await asyncio.sleep(0.5)  # back off before reconnecting
            try:
                # A restarted Redis (even one that kept its data) forgot CONFIG SET.
                await self._enable_notifications()
                await self._subscribe()
                if self.on_resync is not None:
                    self.on_resync(await self.snapshot())
            except Exception as e:
                log.warning("membership reconnect failed: %s", e)

    def _dispatch(self, item: dict[str, Any]) -> None:
        channel = _text(item.get("channel"))
        data = _text(item.get("data"))
        if channel.endswith(":expired"):
            if data.startswith(self._lease_prefix):
                self.on_event(Expired(data[len(self._lease_prefix) :]))
            return
        doc = json.loads(data)
        if channel == confirmed_channel(self.region):
            if self.on_confirmed is not None:
                self.on_confirmed(doc)
            return
        if channel == control_channel(self.region):
            if self.on_command is not None and doc.get("node") == self.me.node_id:
                self.on_command(doc)
            return
        if doc.get("event") == "join":
            self.on_event(Joined(Member.decode(json.dumps(doc["member"]))))
        elif doc.get("event") == "leave":
            self.on_event(Left(str(doc["node_id"]), int(doc["epoch"])))
        elif doc.get("event") == "ring" and self.on_ring is not None:
            self.on_ring(int(doc.get("version", 0)))


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v) if v is not None else ""
