"""Slot logs, owner records, checkpoints and mirrors in a region's Redis.

:class:`SlotLog` is the interface; :class:`RedisSlotLog` is the real one (``redis.asyncio``
on the reactor's asyncio loop) and :class:`MemorySlotLog` a fake with the same behaviour
for fast unit tests. One shared test suite (``tests/integration/test_slotlog.py``) runs
the same cases against both, the Redis one against a real server.

Every write to a slot log or checkpoint is *fenced*: a Lua script reads the slot's owner
record (``relay:{<region>:<slot>}:owner``, hash ``{owner, epoch}``) and writes only if it
names the writer and its epoch, else the writer gets :class:`FencedError` and must stop
acting as the slot's owner. The record and the log share a hash tag, so the script runs on
one shard of a Redis Cluster. Layout of the keys: :mod:`cluster.keys`; of the scripts:
``cluster/lua/``; the whole design, with measurements: ``docs/SLOTLOG.md``.

Entry ids are Redis stream ids, ``"<ms>-<seq>"`` strings; :data:`START_ID` (``"0-0"``)
reads from the beginning. A log entry is ``{d: batch, e: epoch, p: id of the entry
before it}``; a mirror entry is ``{d: batch, p: the origin's}`` under the *same id* as in
the origin's log.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, cast

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from cluster import keys, redisconn
from cluster.errors import ClusterError
from cluster.keys import check_node_id, check_region, check_slot
from cluster.redisconn import AsyncClient

START_ID: Final = "0-0"
MAX_EPOCH: Final = 2**63 - 1
MAX_COUNT: Final = 100_000
DEFAULT_COUNT: Final = 1000
DEFAULT_MAX_BLOCK_MS: Final = 10_000
# The tailing connection's socket timeout is the longest block plus this, so a blocked
# XREAD is never mistaken for a dead server (redis-py requires socket_timeout > block).
TAIL_TIMEOUT_MARGIN_S: Final = 5.0
# On a Redis Cluster a blocking XREAD cannot span slots (CROSSSLOT), so a tail reads every
# shard without blocking (one pipelined round trip per shard, shards in parallel) and,
# while nothing is there, reads again after a pause that doubles from the first to the
# last of these: an idle tail costs ~1/TAIL_POLL_MAX_S round trips a second per shard.
TAIL_POLL_MIN_S: Final = 0.002
TAIL_POLL_MAX_S: Final = 0.05

# Canonical stream ids only: the scripts compare them as decimal strings.
_ID: Final = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})")
_U64: Final = 2**64 - 1


class SlotLogError(ClusterError):
    """Root of the slot-log errors: :class:`FencedError`, :class:`StaleCheckpointError`,
    and a reply from Redis that is not what the adapter wrote (a foreign key)."""


class FencedError(SlotLogError):
    """The owner record of ``slot`` does not name this writer at ``epoch``.

    ``current`` is the epoch in force (0: no owner record), ``owner`` its node ("": none).
    Nothing was written. The writer has lost the slot: it must stop acting as its owner
    (and fail its ``log`` waiters) until it claims the slot again.
    """

    def __init__(self, slot: int, epoch: int, current: int, owner: str = "") -> None:
        super().__init__(
            f"slot {slot}: write at epoch {epoch} fenced, epoch in force is {current}"
            + (f" (owner {owner})" if owner else " (no owner)")
        )
        self.slot = slot
        self.epoch = epoch
        self.current = current
        self.owner = owner

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.slot, self.epoch, self.current, self.owner))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FencedError) and (
            (self.slot, self.epoch, self.current, self.owner)
            == (other.slot, other.epoch, other.current, other.owner)
        )

    def __hash__(self) -> int:
        return hash((self.slot, self.epoch, self.current, self.owner))


class StaleCheckpointError(SlotLogError):
    """A checkpoint covering ``covers_id`` was refused: the stored one covers ``newest``.

    The log may already be trimmed up to ``newest``, so an older checkpoint could not
    rebuild the slot. The writer's state is behind the log: it must catch up first.
    """

    def __init__(self, slot: int, covers_id: str, newest: str) -> None:
        super().__init__(
            f"slot {slot}: checkpoint covering {covers_id} is older than the stored one "
            f"covering {newest}"
        )
        self.slot = slot
        self.covers_id = covers_id
        self.newest = newest


class NotReplicatedError(SlotLogError):
    """Written, but fewer replicas than asked (``cluster.log_replicas``) confirmed the
    write within the timeout: an append (or an owner record) may be lost if the primary
    fails now. The caller writes again (applying is idempotent, a claim retried returns
    the same epoch) before answering ``ack=log`` or acting as the slot's owner."""

    def __init__(self, wanted: int, got: int) -> None:
        super().__init__(f"written, but {got} of {wanted} replicas confirmed it in time")
        self.wanted = wanted
        self.got = got


class Owner(NamedTuple):
    """An owner record: ``node_id`` owns the slot under ``epoch``."""

    node_id: str
    epoch: int


class Entry(NamedTuple):
    """One slot-log (or mirror) entry: its id and the batch it holds.

    ``prev`` is the id of the entry appended just before it to the same log ("0-0" for
    the first; "" when unknown: entries written before it was recorded). Mirrors keep
    their origin's. A reader whose position is not ``prev`` has missed entries (trimmed
    under it): it must rebuild from the checkpoint."""

    id: str
    data: bytes
    prev: str = ""


class TailEntry(NamedTuple):
    """An entry returned by :meth:`SlotLog.tail`, with its slot (``prev``: see Entry)."""

    slot: int
    id: str
    data: bytes
    prev: str = ""


class Checkpoint(NamedTuple):
    """A slot's state ``data``, covering every log entry up to ``covers_id``."""

    data: bytes
    covers_id: str


@dataclass(frozen=True, slots=True)
class Trimmed:
    """What :meth:`SlotLog.trim` did: ``removed`` entries before ``min_id``.

    ``clamped`` is true when the checkpoint (or the lack of one) held the trim back from
    the id asked for; ``min_id`` is then the bound actually used (``"0-0"``: none).
    """

    removed: int
    min_id: str
    clamped: bool


class SlotLog(Protocol):
    """The slot logs, owner records, checkpoints and mirrors of one region's Redis.

    Slot logs are the region's own (``relay:{region:slot}:log``); mirrors hold other
    regions' logs (``relay:{region:slot}:mirror:<origin>``). Every method may raise the
    transport's errors (``redis.exceptions.ConnectionError``, ``TimeoutError``); a write
    retried after a lost reply may have been applied twice, which applying batches
    tolerates (message ids and ack tombstones make apply idempotent).
    """

    @property
    def region(self) -> str: ...

    async def get_owner(self, slot: int) -> Owner | None:
        """The slot's owner record, or None if it has never had one."""
        ...

    async def set_owner(self, slot: int, node_id: str, new_epoch: int) -> bool:
        """Give ``slot`` to ``node_id`` under ``new_epoch`` if that is above the epoch in
        force (atomic); False, and nothing changed, otherwise."""
        ...

    async def release(self, slot: int, node_id: str, epoch: int) -> bool:
        """Give ``slot`` up on purpose: the owner record keeps its epoch but names nobody
        (``get_owner`` then returns ``Owner("", epoch)``), if it still names ``node_id``
        at ``epoch``. True when released; False, nothing changed, otherwise."""
        ...

    async def claim(self, slot: int, node_id: str, seen_epoch: int) -> int:
        """Take ``slot`` over if its epoch is still ``seen_epoch`` (0: no owner record).

        Returns the new epoch, ``seen_epoch + 1``, under which the caller now writes. A
        retry of a claim that already succeeded returns the same epoch. Raises
        :class:`FencedError` (``current``: the epoch in force) when another node moved
        the slot first; the caller must re-read the owner record before trying again.
        """
        ...

    async def append(self, slot: int, node_id: str, epoch: int, data: bytes) -> str:
        """Append one batch to ``slot``'s log, fenced; return the entry id.

        Raises :class:`FencedError` when the owner record does not name ``node_id`` at
        ``epoch``; nothing is written then.
        """
        ...

    async def append_many(
        self,
        items: Sequence[tuple[int, bytes]],
        node_id: str,
        epoch_by_slot: Mapping[int, int],
    ) -> list[str | FencedError]:
        """Append ``(slot, batch)`` items, each fenced at ``epoch_by_slot[slot]``, in one
        round trip. Returns, per item in order, its entry id or the :class:`FencedError`
        that refused it. Each slot is all or nothing (its items are appended together, in
        the order given); slots are independent: a fenced slot does not stop the others."""
        ...

    async def read(
        self, slot: int, after_id: str = START_ID, count: int = DEFAULT_COUNT, *, origin: str = ""
    ) -> list[Entry]:
        """Up to ``count`` entries of ``slot``'s log (of the mirror of ``origin``'s log
        when ``origin`` is given) with ids above ``after_id``, oldest first."""
        ...

    async def tail(
        self,
        slots_after: Mapping[int, str],
        block_ms: int | None,
        count: int = DEFAULT_COUNT,
        *,
        origin: str = "",
    ) -> list[TailEntry]:
        """Entries above ``slots_after[slot]``, up to ``count`` per slot, grouped by slot
        in the order of ``slots_after``; when there are none yet, wait up to ``block_ms``
        for some (``None``: do not wait), then return ``[]``.

        Reads slot logs, or mirrors of ``origin`` when given. The wait happens on a
        connection of its own and is cancellable: cancelling the awaiting task returns
        at once (the connection is dropped and reopened on the next call).
        """
        ...

    async def write_checkpoint(
        self, slot: int, node_id: str, epoch: int, data: bytes, covers_id: str
    ) -> None:
        """Store ``data`` as ``slot``'s checkpoint, covering the log up to ``covers_id``.

        Fenced like :meth:`append` (:class:`FencedError`). Raises
        :class:`StaleCheckpointError` if the stored checkpoint covers more of the log.
        """
        ...

    async def read_checkpoint(self, slot: int) -> Checkpoint | None:
        """The newest checkpoint of ``slot``, or None."""
        ...

    async def trim(self, slot: int, before_id: str, *, margin: int = 0) -> Trimmed:
        """Remove ``slot``'s log entries with ids below ``before_id`` — but never past the
        newest checkpoint: the newest entry it covers and ``margin`` entries before it
        always stay, and without a checkpoint nothing is removed (``clamped`` says so).
        The bound is read and applied in one script, so a racing checkpoint is safe."""
        ...

    async def mirror_append(self, slot: int, origin: str, entry_id: str, data: bytes) -> bool:
        """Copy entry ``entry_id`` of ``origin``'s log ``slot`` into this region's mirror
        under the same id. Returns False, writing nothing, when the mirror's top id is
        already at or above it: the entry was copied before (a retry or a restarted link).
        """
        ...

    async def mirror_append_many(self, origin: str, entries: Sequence[TailEntry]) -> list[bool]:
        """:meth:`mirror_append` for each entry (as :meth:`tail` returns them), in one
        round trip; per entry, True when copied, False when it was already there."""
        ...

    async def mirror_top(self, slot: int, origin: str) -> str | None:
        """The highest id ever added to the mirror of ``origin``'s log ``slot`` (even if
        trimmed since), or None when it does not exist: where a link resumes."""
        ...

    async def mirror_tops(self, slots: Sequence[int], origin: str) -> dict[int, str | None]:
        """:meth:`mirror_top` of each slot, in one round trip (a link resuming over a WAN)."""
        ...

    async def first_id(self, slot: int) -> str | None:
        """The id of the oldest entry still in ``slot``'s log (None: empty): a reader
        whose position is below it has a gap (the log was trimmed past it)."""
        ...

    async def first_after(self, slot: int, after_id: str) -> str | None:
        """The id of the oldest entry of ``slot``'s log above ``after_id`` (None: none):
        its time part is how long a reader at ``after_id`` has been behind."""
        ...

    async def first_after_many(self, slots_after: Mapping[int, str]) -> dict[int, str]:
        """:meth:`first_after` of each slot, in one round trip; slots with no entry after
        their id are left out."""
        ...

    async def trim_mirror(self, slot: int, origin: str, before_id: str) -> int:
        """Remove the entries of the mirror of ``origin``'s log ``slot`` with ids below
        ``before_id`` (the mirror's top id is kept, so a link still resumes after it).
        The caller must hold a checkpoint of the slot covering the mirror up to
        ``before_id``: a reader behind it rebuilds from that. Returns entries removed."""
        ...

    async def close(self) -> None:
        """Close the connections; the object cannot be used afterwards."""
        ...


# Argument checks shared by both implementations, so that the fake refuses what the real
# one refuses.


def _check_epoch(epoch: int, *, least: int = 1) -> int:
    if type(epoch) is not int or not least <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be an int in {least}..{MAX_EPOCH}, got {epoch!r}")
    return epoch


def _parse_id(entry_id: str, *, zero_ok: bool = True) -> tuple[int, int]:
    m = _ID.fullmatch(entry_id) if isinstance(entry_id, str) else None
    if m is None:
        raise ValueError(f'stream id must be "<ms>-<seq>" (canonical), got {entry_id!r}')
    parsed = (int(m[1]), int(m[2]))
    if parsed[0] > _U64 or parsed[1] > _U64 or (not zero_ok and parsed == (0, 0)):
        raise ValueError(f"stream id out of range: {entry_id!r}")
    return parsed


def _check_count(count: int) -> int:
    if type(count) is not int or not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be an int in 1..{MAX_COUNT}, got {count!r}")
    return count


def _check_block(block_ms: int | None, max_block_ms: int) -> int | None:
    if block_ms is not None and (type(block_ms) is not int or not 1 <= block_ms <= max_block_ms):
        raise ValueError(f"block_ms must be None or an int in 1..{max_block_ms}, got {block_ms!r}")
    return block_ms


def _check_data(data: bytes) -> bytes:
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return data


def _check_origin(region: str, origin: str) -> str:
    if check_region(origin) == region:
        raise ValueError(f"a region does not mirror itself: origin {origin!r}")
    return origin


def _check_margin(margin: int) -> int:
    if type(margin) is not int or not 0 <= margin <= MAX_COUNT:
        raise ValueError(f"margin must be an int in 0..{MAX_COUNT}, got {margin!r}")
    return margin


def _format_id(parsed: tuple[int, int]) -> str:
    return f"{parsed[0]}-{parsed[1]}"


# ---- Redis -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: str
    sha: str


def _load_script(name: str) -> _Script:
    lua = resources.files("cluster") / "lua"
    source = (lua / "_prelude.lua").read_text() + (lua / f"{name}.lua").read_text()
    return _Script(name, source, hashlib.sha1(source.encode()).hexdigest())


_CLAIM: Final = _load_script("claim")
_SET_OWNER: Final = _load_script("set_owner")
_RELEASE: Final = _load_script("release")
_APPEND: Final = _load_script("append")
_APPEND_SLOTS: Final = _load_script("append_slots")
_CHECKPOINT: Final = _load_script("checkpoint")
_TRIM: Final = _load_script("trim")
# Scripts that change an owner record: with wait_replicas they wait for replicas too.
_FENCING: Final = frozenset({"claim", "set_owner", "release"})

# Connection kwargs that belong to the pool they were made by, not to its configuration.
_POOL_OWNED: Final = frozenset(
    {
        "maint_notifications_pool_handler",
        "oss_cluster_maint_notifications_handler",
        "himport_registry",
    }
)


def _check_tail_timeout(tail_client: Redis, max_block_ms: int) -> None:
    kwargs = tail_client.connection_pool.connection_kwargs
    # Left out, redis-py's default (5 s) applies, shorter than many blocks.
    if "socket_timeout" not in kwargs:
        raise ValueError(
            "tail_client must set socket_timeout explicitly, above max_block_ms (or None)"
        )
    timeout = kwargs["socket_timeout"]
    if timeout is not None and float(timeout) * 1000 <= max_block_ms:
        raise ValueError(
            f"tail_client's socket_timeout ({timeout} s) must exceed max_block_ms "
            f"({max_block_ms} ms), or a blocked read times out"
        )


def _client_like(client: Redis, *, socket_timeout: float) -> Redis:
    """A new client to the same server, with the same credentials and TLS settings."""
    pool = client.connection_pool
    kwargs = {
        k: v
        for k, v in pool.connection_kwargs.items()
        if k not in _POOL_OWNED and not k.startswith("orig_")
    }
    kwargs["socket_timeout"] = socket_timeout
    return Redis.from_pool(ConnectionPool(connection_class=pool.connection_class, **kwargs))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _as_bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        # A client made with decode_responses=True, or a key written by someone else.
        raise SlotLogError(f"expected bytes from Redis, got {type(value).__name__}")
    return value


def _entry(entry_id: object, fields: object) -> Entry:
    if not isinstance(fields, dict):
        raise SlotLogError(f"expected stream entry fields from Redis, got {fields!r:.80}")
    prev = fields.get(b"p")
    return Entry(
        _as_bytes(entry_id).decode(),
        _as_bytes(fields.get(b"d")),
        _as_bytes(prev).decode() if prev is not None else "",
    )


def _fenced(slot: int, epoch: int, reply: list[Any]) -> FencedError:
    return FencedError(slot, epoch, int(reply[1]), _text(reply[2]))


def _is_not_above_top(exc: ResponseError) -> bool:
    # Redis and Valkey: "The ID specified in XADD is equal or smaller than the target
    # stream top item".
    return "equal or smaller" in str(exc)


class RedisSlotLog:
    """:class:`SlotLog` on ``redis.asyncio``: ``RedisSlotLog.from_url(url, region)``.

    ``client`` serves every command but :meth:`tail`, which blocks on ``tail_client``:
    a client of its own whose socket timeout exceeds ``max_block_ms`` (when not given, one
    is made like ``client``). Both must return bytes (``decode_responses=False``). The
    scripts are sent by SHA and loaded on the first NOSCRIPT, so a restarted or failed-over
    Redis needs nothing from the caller.

    The client is a ``redis.asyncio.Redis`` (one server) or a ``RedisCluster``
    (:mod:`cluster.redisconn`). Each script touches the keys of one hash tag (one slot's),
    so it runs on one shard; pipelines are split by shard by the cluster client (one round
    trip per shard, in parallel). A blocking ``XREAD`` cannot span hash slots, so on a
    cluster :meth:`tail` reads each shard's slots in one pipelined non-blocking round
    trip and, while nothing is there, polls (:data:`TAIL_POLL_MAX_S`).

    ``wait_replicas`` > 0 makes every append, and every change of an owner record (claim,
    set_owner, release: the fence), wait (``WAIT``) until that many replicas of the shard
    hold it, up to ``wait_timeout_ms``, else raise :class:`NotReplicatedError`.
    """

    def __init__(
        self,
        client: AsyncClient,
        region: str,
        *,
        tail_client: AsyncClient | None = None,
        max_block_ms: int = DEFAULT_MAX_BLOCK_MS,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self._region = check_region(region)
        if type(max_block_ms) is not int or max_block_ms < 1:
            raise ValueError(f"max_block_ms must be a positive int, got {max_block_ms!r}")
        if type(wait_replicas) is not int or wait_replicas < 0:
            raise ValueError(f"wait_replicas must be an int >= 0, got {wait_replicas!r}")
        if type(wait_timeout_ms) is not int or wait_timeout_ms < 1:
            raise ValueError(f"wait_timeout_ms must be a positive int, got {wait_timeout_ms!r}")
        self._cluster = isinstance(client, RedisCluster)
        if tail_client is None:
            tail_client = (
                client
                if isinstance(client, RedisCluster)
                else _client_like(
                    client, socket_timeout=max_block_ms / 1000 + TAIL_TIMEOUT_MARGIN_S
                )
            )
        if isinstance(client, RedisCluster) != isinstance(tail_client, RedisCluster):
            raise ValueError("client and tail_client must both be clusters, or neither")
        for name, c in (("client", client), ("tail_client", tail_client)):
            if redisconn.connection_kwargs(c).get("decode_responses"):
                raise ValueError(f"{name} must not decode responses (decode_responses=False)")
        if not isinstance(tail_client, RedisCluster):
            _check_tail_timeout(tail_client, max_block_ms)
        self._client = client
        self._tail = tail_client
        self.max_block_ms = max_block_ms
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._slot_keys: dict[int, tuple[str, str, str]] = {}
        # Cluster tails waiting for entries right now (one server: the server counts
        # them, INFO blocked_clients).
        self.waiting_tails = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        region: str,
        *,
        max_block_ms: int = DEFAULT_MAX_BLOCK_MS,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        **kwargs: Any,
    ) -> RedisSlotLog:
        """Connect to ``url`` (``redis://``, ``rediss://`` for TLS, ``unix://``; ACL user
        and password as ``redis://user:password@host:port/db``; a Redis Cluster as
        ``redis+cluster://host:port,…``, see :mod:`cluster.redisconn`). ``kwargs`` go to
        the client for both clients (e.g. ``socket_timeout``, ``ssl_ca_certs``); the
        tailing client's socket timeout is set from ``max_block_ms``. Connections open on
        first use."""
        kwargs["decode_responses"] = False
        client = redisconn.connect(url, **kwargs)
        tail = redisconn.connect(
            url, **{**kwargs, "socket_timeout": max_block_ms / 1000 + TAIL_TIMEOUT_MARGIN_S}
        )
        return cls(
            client,
            region,
            tail_client=tail,
            max_block_ms=max_block_ms,
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
        )

    @property
    def region(self) -> str:
        return self._region

    def _keys(self, slot: int) -> tuple[str, str, str]:
        """(owner record, log, checkpoint) of ``slot``."""
        found = self._slot_keys.get(slot)
        if found is None:
            r = self._region
            found = (keys.owner_key(r, slot), keys.log_key(r, slot), keys.checkpoint_key(r, slot))
            self._slot_keys[slot] = found
        return found

    def _stream_key(self, slot: int, origin: str) -> str:
        if origin:
            return keys.mirror_key(self._region, slot, _check_origin(self._region, origin))
        return self._keys(slot)[1]

    async def _eval(self, script: _Script, keys_: Sequence[str], *args: bytes | str) -> Any:
        if self.wait_replicas and script.name in _FENCING:
            # The owner record is the fence: a failover must not bring an older one back.
            (reply,) = await self._eval_many(script, [(keys_, args)], wait=True)
            return reply
        try:
            return await self._client.evalsha(script.sha, len(keys_), *keys_, *args)
        except NoScriptError:
            await self._client.script_load(script.source)
            return await self._client.evalsha(script.sha, len(keys_), *keys_, *args)

    async def _pipeline(
        self,
        script: _Script,
        calls: Sequence[tuple[Sequence[str], Sequence[bytes | str]]],
        *,
        wait: bool = False,
    ) -> list[Any]:
        """The calls in one pipeline; with ``wait``, then a ``WAIT`` on each connection
        that wrote (one per shard: WAIT covers the writes made on its own connection),
        whose replies (replica counts) come last."""
        async with self._client.pipeline(transaction=False) as pipe:
            for keys_, args in calls:
                pipe.evalsha(script.sha, len(keys_), *keys_, *args)
            waits = 0
            if wait and calls:
                w = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
                if isinstance(self._client, RedisCluster):
                    nodes: dict[str, Any] = {}
                    for k, _ in calls:
                        node = self._client.get_node_from_key(k[0])
                        if node is not None:
                            nodes[node.name] = node
                    for node in nodes.values():
                        pipe.execute_command(*w, target_nodes=node)
                        waits += 1
                else:
                    pipe.execute_command(*w)
                    waits = 1
            results: list[Any] = await pipe.execute(raise_on_error=False)
        if waits:
            counts, results = results[-waits:], results[:-waits]
            if any(isinstance(c, Exception) for c in counts):
                raise next(c for c in counts if isinstance(c, Exception))
            got = min(int(c) for c in counts)
            if got < self.wait_replicas and not all(isinstance(r, Exception) for r in results):
                raise NotReplicatedError(self.wait_replicas, got)
        return results

    async def _eval_many(
        self,
        script: _Script,
        calls: Sequence[tuple[Sequence[str], Sequence[bytes | str]]],
        *,
        wait: bool = False,
    ) -> list[Any]:
        """Run ``script`` once per call in one pipelined round trip (two more after a
        NOSCRIPT: load, then the calls that were refused, which did not run). With
        ``wait``, each round trip ends with ``WAIT`` (see :meth:`_pipeline`)."""
        results = await self._pipeline(script, calls, wait=wait)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self._client.script_load(script.source)
            again = await self._pipeline(script, [calls[i] for i in missing], wait=wait)
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    async def get_owner(self, slot: int) -> Owner | None:
        owner, epoch = await self._client.hmget(self._keys(check_slot(slot))[0], ["owner", "epoch"])
        if owner is None or epoch is None:
            return None
        return Owner(_text(owner), int(epoch))

    async def set_owner(self, slot: int, node_id: str, new_epoch: int) -> bool:
        owner_key = self._keys(check_slot(slot))[0]
        args = (check_node_id(node_id), str(_check_epoch(new_epoch)))
        return bool(await self._eval(_SET_OWNER, (owner_key,), *args))

    async def release(self, slot: int, node_id: str, epoch: int) -> bool:
        owner_key = self._keys(check_slot(slot))[0]
        args = (check_node_id(node_id), str(_check_epoch(epoch)))
        return bool(await self._eval(_RELEASE, (owner_key,), *args))

    async def claim(self, slot: int, node_id: str, seen_epoch: int) -> int:
        owner_key = self._keys(check_slot(slot))[0]
        seen = _check_epoch(seen_epoch, least=0)
        _check_epoch(seen + 1)
        reply = await self._eval(
            _CLAIM, (owner_key,), check_node_id(node_id), str(seen), str(seen + 1)
        )
        if reply[0] != 1:
            raise _fenced(slot, seen, reply)
        return int(reply[1])

    async def append(self, slot: int, node_id: str, epoch: int, data: bytes) -> str:
        if self.wait_replicas:
            (done,) = await self.append_many([(slot, data)], node_id, {slot: epoch})
            if isinstance(done, FencedError):
                raise done
            return done
        owner_key, log_key, _ = self._keys(check_slot(slot))
        args = (check_node_id(node_id), str(_check_epoch(epoch)), _check_data(data))
        reply = await self._eval(_APPEND, (owner_key, log_key), *args)
        if reply[0] != 1:
            raise _fenced(slot, epoch, reply)
        return _text(reply[1])

    async def append_many(
        self,
        items: Sequence[tuple[int, bytes]],
        node_id: str,
        epoch_by_slot: Mapping[int, int],
    ) -> list[str | FencedError]:
        check_node_id(node_id)
        # One script call per slot, its batches in the order given: a NOSCRIPT (and the
        # retry after it) then moves a slot's batches as a whole, never reordering them.
        positions: dict[int, list[int]] = {}
        batches: dict[int, list[bytes]] = {}
        for i, (slot, data) in enumerate(items):
            check_slot(slot)
            if slot not in positions:
                if slot not in epoch_by_slot:
                    raise ValueError(f"epoch_by_slot has no epoch for slot {slot}")
                _check_epoch(epoch_by_slot[slot])
                positions[slot], batches[slot] = [], []
            positions[slot].append(i)
            batches[slot].append(_check_data(data))
        if not positions:
            return []
        calls: list[tuple[Sequence[str], Sequence[bytes | str]]] = []
        for slot, slot_batches in batches.items():
            owner_key, log_key, _ = self._keys(slot)
            calls.append(((owner_key, log_key), (node_id, str(epoch_by_slot[slot]), *slot_batches)))
        wait = self.wait_replicas > 0
        if len(calls) > 1 and not self._cluster:
            # One server: every slot in one script call (its keys need not share a
            # hash slot), not one call per slot.
            keys: list[str] = []
            args: list[bytes | str] = [node_id]
            for slot, slot_batches in batches.items():
                keys += self._keys(slot)[:2]
                args += (str(epoch_by_slot[slot]), str(len(slot_batches)), *slot_batches)
            if wait:
                (replies,) = await self._eval_many(_APPEND_SLOTS, [(keys, args)], wait=True)
            else:  # no pipeline needed for one call
                replies = await self._eval(_APPEND_SLOTS, keys, *args)
        elif len(calls) == 1 and not wait:
            replies = [await self._eval(_APPEND, *calls[0][0:1], *calls[0][1])]
        else:
            replies = await self._eval_many(_APPEND, calls, wait=wait)
        out: list[str | FencedError | None] = [None] * len(items)
        for (slot, where), reply in zip(positions.items(), replies, strict=True):
            if reply[0] == 1:
                for i, entry_id in zip(where, reply[1:], strict=True):
                    out[i] = _text(entry_id)
            else:
                fenced = _fenced(slot, epoch_by_slot[slot], reply)
                for i in where:
                    out[i] = fenced
        # zip(strict=True) checked every reply's length, so every position is filled.
        return cast(list[str | FencedError], out)

    async def read(
        self, slot: int, after_id: str = START_ID, count: int = DEFAULT_COUNT, *, origin: str = ""
    ) -> list[Entry]:
        key = self._stream_key(check_slot(slot), origin)
        _parse_id(after_id)
        rows: Any = await self._client.xrange(
            key, min=f"({after_id}", max="+", count=_check_count(count)
        )
        return [_entry(i, f) for i, f in rows or ()]

    async def tail(
        self,
        slots_after: Mapping[int, str],
        block_ms: int | None,
        count: int = DEFAULT_COUNT,
        *,
        origin: str = "",
    ) -> list[TailEntry]:
        _check_block(block_ms, self.max_block_ms)
        _check_count(count)
        streams: dict[bytes | str | memoryview, int | bytes | str | memoryview] = {}
        slot_of: dict[bytes, int] = {}
        for slot, after_id in slots_after.items():
            key = self._stream_key(check_slot(slot), origin)
            _parse_id(after_id)
            streams[key] = after_id
            slot_of[key.encode()] = slot
        if not streams:
            raise ValueError("tail needs at least one slot")
        if isinstance(self._tail, RedisCluster):
            return await self._tail_cluster(self._tail, streams, slot_of, count, block_ms)
        reply: Any = await self._tail.xread(streams, count=count, block=block_ms)
        if not reply:
            return []
        # RESP2 answers a list of [key, entries], RESP3 a map.
        pairs = reply.items() if isinstance(reply, dict) else reply
        out: list[TailEntry] = []
        for stream_key, rows in pairs:
            slot = slot_of[_as_bytes(stream_key)]
            out.extend(TailEntry(slot, *_entry(i, f)) for i, f in rows)
        return out

    async def _tail_cluster(
        self,
        client: RedisCluster,
        streams: dict[bytes | str | memoryview, int | bytes | str | memoryview],
        slot_of: dict[bytes, int],
        count: int,
        block_ms: int | None,
    ) -> list[TailEntry]:
        """:meth:`tail` on a cluster: one non-blocking ``XREAD`` per stream, pipelined
        (the client sends each shard's in one round trip, shards in parallel); while
        nothing is there, again after a pause, until ``block_ms`` has passed."""
        deadline = None if block_ms is None else time.monotonic() + block_ms / 1000
        pause = TAIL_POLL_MIN_S
        while True:
            async with client.pipeline(transaction=False) as pipe:
                for key, after in streams.items():
                    pipe.xread({key: after}, count=count)
                replies: list[Any] = await pipe.execute()
            out: list[TailEntry] = []
            for reply in replies:
                if not reply:
                    continue
                pairs = reply.items() if isinstance(reply, dict) else reply
                for stream_key, rows in pairs:
                    slot = slot_of[_as_bytes(stream_key)]
                    out.extend(TailEntry(slot, *_entry(i, f)) for i, f in rows)
            if out or deadline is None:
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self.waiting_tails += 1
            try:
                await asyncio.sleep(min(pause, left))  # the poll interval of a cluster tail
            finally:
                self.waiting_tails -= 1
            pause = min(pause * 2, TAIL_POLL_MAX_S)

    async def write_checkpoint(
        self, slot: int, node_id: str, epoch: int, data: bytes, covers_id: str
    ) -> None:
        owner_key, _, checkpoint_key = self._keys(check_slot(slot))
        _parse_id(covers_id)
        args = (check_node_id(node_id), str(_check_epoch(epoch)), _check_data(data), covers_id)
        reply = await self._eval(_CHECKPOINT, (owner_key, checkpoint_key), *args)
        if reply[0] == 0:
            raise _fenced(slot, epoch, reply)
        if reply[0] == 2:
            raise StaleCheckpointError(slot, covers_id, _text(reply[1]))

    async def read_checkpoint(self, slot: int) -> Checkpoint | None:
        key = self._keys(check_slot(slot))[2]
        data, covers = await self._client.hmget(key, ["d", "id"])
        if data is None or covers is None:
            return None
        return Checkpoint(_as_bytes(data), _text(covers))

    async def trim(self, slot: int, before_id: str, *, margin: int = 0) -> Trimmed:
        _, log_key, checkpoint_key = self._keys(check_slot(slot))
        _parse_id(before_id)
        args = (before_id, str(_check_margin(margin)))
        removed, bound, clamped = await self._eval(_TRIM, (checkpoint_key, log_key), *args)
        return Trimmed(int(removed), _text(bound), bool(clamped))

    async def mirror_append(self, slot: int, origin: str, entry_id: str, data: bytes) -> bool:
        (done,) = await self.mirror_append_many(origin, [TailEntry(slot, entry_id, data)])
        return done

    async def mirror_append_many(self, origin: str, entries: Sequence[TailEntry]) -> list[bool]:
        _check_origin(self._region, origin)
        if not entries:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for slot, entry_id, data, prev in entries:
                key = keys.mirror_key(self._region, check_slot(slot), origin)
                _parse_id(entry_id, zero_ok=False)
                fields: dict[str | bytes, str | bytes] = {"d": _check_data(data)}
                if prev:
                    fields["p"] = prev
                pipe.xadd(key, fields, id=entry_id)  # type: ignore[arg-type]
            results = await pipe.execute(raise_on_error=False)
        out: list[bool] = []
        for r in results:
            if isinstance(r, ResponseError):
                if not _is_not_above_top(r):
                    raise r
                out.append(False)
            elif isinstance(r, Exception):
                raise r
            else:
                out.append(True)
        return out

    async def mirror_top(self, slot: int, origin: str) -> str | None:
        key = keys.mirror_key(self._region, check_slot(slot), _check_origin(self._region, origin))
        try:
            info = await self._client.xinfo_stream(key)
        except ResponseError as exc:
            if "no such key" in str(exc):
                return None
            raise
        return _text(info["last-generated-id"])

    async def mirror_tops(self, slots: Sequence[int], origin: str) -> dict[int, str | None]:
        _check_origin(self._region, origin)
        async with self._client.pipeline(transaction=False) as pipe:
            for slot in slots:
                pipe.xinfo_stream(keys.mirror_key(self._region, check_slot(slot), origin))
            results = await pipe.execute(raise_on_error=False)
        out: dict[int, str | None] = {}
        for slot, r in zip(slots, results, strict=True):
            if isinstance(r, ResponseError) and "no such key" in str(r):
                out[slot] = None
            elif isinstance(r, Exception):
                raise r
            else:
                out[slot] = _text(r["last-generated-id"])
        return out

    async def first_id(self, slot: int) -> str | None:
        _, log_key, _ = self._keys(check_slot(slot))
        rows: Any = await self._client.xrange(log_key, min="-", max="+", count=1)
        return _text(rows[0][0]) if rows else None

    async def first_after(self, slot: int, after_id: str) -> str | None:
        _, log_key, _ = self._keys(check_slot(slot))
        _parse_id(after_id)
        rows: Any = await self._client.xrange(log_key, min=f"({after_id}", max="+", count=1)
        return _text(rows[0][0]) if rows else None

    async def first_after_many(self, slots_after: Mapping[int, str]) -> dict[int, str]:
        async with self._client.pipeline(transaction=False) as pipe:
            for slot, after in slots_after.items():
                _parse_id(after)
                pipe.xrange(self._keys(check_slot(slot))[1], min=f"({after}", max="+", count=1)
            rows = await pipe.execute()
        return {s: _text(r[0][0]) for s, r in zip(slots_after, rows, strict=True) if r}

    async def trim_mirror(self, slot: int, origin: str, before_id: str) -> int:
        key = keys.mirror_key(self._region, check_slot(slot), _check_origin(self._region, origin))
        if _parse_id(before_id) == (0, 0):
            return 0
        return int(await self._client.xtrim(key, minid=before_id))

    async def close(self) -> None:
        try:
            await self._client.aclose()
        finally:
            await self._tail.aclose()


# ---- In memory ---------------------------------------------------------------------------


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class _Stream:
    """A Redis stream: entries in id order, and the highest id ever added."""

    __slots__ = ("entries", "ids", "top")

    def __init__(self) -> None:
        self.ids: list[tuple[int, int]] = []
        self.entries: list[Entry] = []
        self.top = (0, 0)

    def add(self, parsed: tuple[int, int], data: bytes, prev: str = "") -> str:
        entry_id = _format_id(parsed)
        self.ids.append(parsed)
        self.entries.append(Entry(entry_id, data, prev))
        self.top = parsed
        return entry_id

    def after(self, parsed: tuple[int, int], count: int) -> list[Entry]:
        i = bisect.bisect_right(self.ids, parsed)
        return self.entries[i : i + count]


class MemorySlotLog:
    """:class:`SlotLog` in this process's memory, for unit tests: the same checks, fencing,
    trimming and mirror rules as :class:`RedisSlotLog`, no server. One instance is one
    region's Redis; ``clock_ms`` (wall-clock milliseconds) makes the entry ids, as Redis's
    clock does. ``blocked_readers`` counts the :meth:`tail` calls waiting now."""

    def __init__(
        self,
        region: str,
        *,
        clock_ms: Callable[[], int] = _wall_clock_ms,
        max_block_ms: int = DEFAULT_MAX_BLOCK_MS,
    ) -> None:
        self._region = check_region(region)
        self._clock_ms = clock_ms
        self.max_block_ms = max_block_ms
        self._owners: dict[int, Owner] = {}
        self._logs: dict[int, _Stream] = {}
        self._mirrors: dict[tuple[str, int], _Stream] = {}
        self._checkpoints: dict[int, tuple[Checkpoint, int]] = {}
        self._changed = asyncio.Event()
        self.blocked_readers = 0
        self._closed = False

    @property
    def region(self) -> str:
        return self._region

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MemorySlotLog is closed")

    def _fence(self, slot: int, node_id: str, epoch: int) -> FencedError | None:
        rec = self._owners.get(slot)
        if rec is not None and rec == (node_id, epoch):
            return None
        return FencedError(slot, epoch, rec.epoch if rec else 0, rec.node_id if rec else "")

    def _stream(self, slot: int, origin: str, *, create: bool = False) -> _Stream | None:
        if origin:
            mkey = (_check_origin(self._region, origin), slot)
            found = self._mirrors.get(mkey)
            if found is None and create:
                found = self._mirrors[mkey] = _Stream()
            return found
        found = self._logs.get(slot)
        if found is None and create:
            found = self._logs[slot] = _Stream()
        return found

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def get_owner(self, slot: int) -> Owner | None:
        self._check_open()
        return self._owners.get(check_slot(slot))

    async def set_owner(self, slot: int, node_id: str, new_epoch: int) -> bool:
        self._check_open()
        check_slot(slot)
        check_node_id(node_id)
        _check_epoch(new_epoch)
        rec = self._owners.get(slot)
        if rec is not None and new_epoch <= rec.epoch:
            return False
        self._owners[slot] = Owner(node_id, new_epoch)
        return True

    async def release(self, slot: int, node_id: str, epoch: int) -> bool:
        self._check_open()
        check_slot(slot)
        check_node_id(node_id)
        _check_epoch(epoch)
        if self._owners.get(slot) != (node_id, epoch):
            return False
        self._owners[slot] = Owner("", epoch)
        return True

    async def claim(self, slot: int, node_id: str, seen_epoch: int) -> int:
        self._check_open()
        check_slot(slot)
        check_node_id(node_id)
        _check_epoch(seen_epoch, least=0)
        _check_epoch(seen_epoch + 1)
        rec = self._owners.get(slot)
        current = rec.epoch if rec else 0
        if current == seen_epoch:
            self._owners[slot] = Owner(node_id, seen_epoch + 1)
            return seen_epoch + 1
        if rec is not None and rec == (node_id, seen_epoch + 1):
            return rec.epoch
        raise FencedError(slot, seen_epoch, current, rec.node_id if rec else "")

    def _append(self, slot: int, node_id: str, epoch: int, data: bytes) -> str | FencedError:
        fenced = self._fence(slot, node_id, epoch)
        if fenced is not None:
            return fenced
        stream = self._stream(slot, "", create=True)
        assert stream is not None
        ms, seq = self._clock_ms(), 0
        if ms <= stream.top[0]:  # Redis never lets ids go backwards with the clock
            ms, seq = stream.top[0], stream.top[1] + 1
        return stream.add((ms, seq), data, _format_id(stream.top))

    async def append(self, slot: int, node_id: str, epoch: int, data: bytes) -> str:
        self._check_open()
        check_slot(slot)
        check_node_id(node_id)
        _check_epoch(epoch)
        result = self._append(slot, node_id, epoch, _check_data(data))
        if isinstance(result, FencedError):
            raise result
        self._notify()
        return result

    async def append_many(
        self,
        items: Sequence[tuple[int, bytes]],
        node_id: str,
        epoch_by_slot: Mapping[int, int],
    ) -> list[str | FencedError]:
        self._check_open()
        check_node_id(node_id)
        for slot, data in items:
            check_slot(slot)
            if slot not in epoch_by_slot:
                raise ValueError(f"epoch_by_slot has no epoch for slot {slot}")
            _check_epoch(epoch_by_slot[slot])
            _check_data(data)
        out = [self._append(s, node_id, epoch_by_slot[s], d) for s, d in items]
        if out:
            self._notify()
        return out

    async def read(
        self, slot: int, after_id: str = START_ID, count: int = DEFAULT_COUNT, *, origin: str = ""
    ) -> list[Entry]:
        self._check_open()
        stream = self._stream(check_slot(slot), origin)
        after = _parse_id(after_id)
        _check_count(count)
        return stream.after(after, count) if stream is not None else []

    async def tail(
        self,
        slots_after: Mapping[int, str],
        block_ms: int | None,
        count: int = DEFAULT_COUNT,
        *,
        origin: str = "",
    ) -> list[TailEntry]:
        self._check_open()
        _check_block(block_ms, self.max_block_ms)
        _check_count(count)
        wanted = [(check_slot(s), _parse_id(a)) for s, a in slots_after.items()]
        if origin:
            _check_origin(self._region, origin)
        if not wanted:
            raise ValueError("tail needs at least one slot")
        deadline = None if block_ms is None else time.monotonic() + block_ms / 1000
        while True:
            out: list[TailEntry] = []
            for slot, after in wanted:
                stream = self._stream(slot, origin)
                if stream is not None:
                    out.extend(TailEntry(slot, *e) for e in stream.after(after, count))
            if out or deadline is None:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            changed = self._changed
            self.blocked_readers += 1
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return []
            finally:
                self.blocked_readers -= 1

    async def write_checkpoint(
        self, slot: int, node_id: str, epoch: int, data: bytes, covers_id: str
    ) -> None:
        self._check_open()
        check_slot(slot)
        check_node_id(node_id)
        _check_epoch(epoch)
        covers = _parse_id(covers_id)
        _check_data(data)
        fenced = self._fence(slot, node_id, epoch)
        if fenced is not None:
            raise fenced
        prev = self._checkpoints.get(slot)
        if prev is not None and covers < _parse_id(prev[0].covers_id):
            raise StaleCheckpointError(slot, covers_id, prev[0].covers_id)
        self._checkpoints[slot] = (Checkpoint(data, covers_id), epoch)

    async def read_checkpoint(self, slot: int) -> Checkpoint | None:
        self._check_open()
        found = self._checkpoints.get(check_slot(slot))
        return found[0] if found else None

    async def trim(self, slot: int, before_id: str, *, margin: int = 0) -> Trimmed:
        self._check_open()
        check_slot(slot)
        before = _parse_id(before_id)
        _check_margin(margin)
        limit = (0, 0)
        cp = self._checkpoints.get(slot)
        stream = self._logs.get(slot)
        if cp is not None and stream is not None:
            # The newest covered entry is at index i - 1; it and `margin` before it stay.
            i = bisect.bisect_right(stream.ids, _parse_id(cp[0].covers_id))
            if i - 1 - margin >= 0:
                limit = stream.ids[i - 1 - margin]
        bound, clamped = (limit, True) if before > limit else (before, False)
        if bound == (0, 0) or stream is None:
            return Trimmed(0, _format_id(bound), clamped)
        cut = bisect.bisect_left(stream.ids, bound)
        del stream.ids[:cut]
        del stream.entries[:cut]
        return Trimmed(cut, _format_id(bound), clamped)

    async def mirror_append(self, slot: int, origin: str, entry_id: str, data: bytes) -> bool:
        (done,) = await self.mirror_append_many(origin, [TailEntry(slot, entry_id, data)])
        return done

    async def mirror_append_many(self, origin: str, entries: Sequence[TailEntry]) -> list[bool]:
        self._check_open()
        _check_origin(self._region, origin)
        checked = [
            (check_slot(s), _parse_id(i, zero_ok=False), _check_data(d), p)
            for s, i, d, p in entries
        ]
        out: list[bool] = []
        for slot, parsed, data, prev in checked:
            stream = self._stream(slot, origin, create=True)
            assert stream is not None
            if parsed <= stream.top:
                out.append(False)
            else:
                stream.add(parsed, data, prev)
                out.append(True)
        if any(out):
            self._notify()
        return out

    async def mirror_top(self, slot: int, origin: str) -> str | None:
        self._check_open()
        stream = self._stream(check_slot(slot), origin)
        return _format_id(stream.top) if stream is not None else None

    async def mirror_tops(self, slots: Sequence[int], origin: str) -> dict[int, str | None]:
        return {slot: await self.mirror_top(slot, origin) for slot in slots}

    async def first_id(self, slot: int) -> str | None:
        self._check_open()
        stream = self._stream(check_slot(slot), "")
        return stream.entries[0].id if stream is not None and stream.entries else None

    async def first_after(self, slot: int, after_id: str) -> str | None:
        self._check_open()
        stream = self._stream(check_slot(slot), "")
        after = stream.after(_parse_id(after_id), 1) if stream is not None else []
        return after[0].id if after else None

    async def first_after_many(self, slots_after: Mapping[int, str]) -> dict[int, str]:
        out = {s: await self.first_after(s, a) for s, a in slots_after.items()}
        return {s: i for s, i in out.items() if i is not None}

    async def trim_mirror(self, slot: int, origin: str, before_id: str) -> int:
        self._check_open()
        stream = self._stream(check_slot(slot), origin)
        before = _parse_id(before_id)
        if stream is None or before == (0, 0):
            return 0
        cut = bisect.bisect_left(stream.ids, before)
        del stream.ids[:cut]
        del stream.entries[:cut]
        return cut

    async def close(self) -> None:
        self._closed = True


if TYPE_CHECKING:  # mypy checks that both implementations satisfy the interface

    def _implements(redis_log: RedisSlotLog, memory_log: MemorySlotLog) -> list[SlotLog]:
        return [redis_log, memory_log]
