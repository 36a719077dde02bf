"""The plumbing under :class:`~cluster.slotlog.redislog.RedisSlotLog`: the Lua scripts of
``cluster/lua/`` (each with the shared prelude, sent by SHA, loaded on NOSCRIPT), the
clients' checks and construction, reply parsing, and :class:`RedisCalls`, the base class
that holds the clients and runs a script once or pipelined (with ``WAIT`` for replicas
when asked)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Self

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from cluster import keys, redisconn
from cluster.keys import check_region
from cluster.redisconn import AsyncClient
from cluster.slotlog.api import (
    DEFAULT_MAX_BLOCK_MS,
    TAIL_TIMEOUT_MARGIN_S,
    Entry,
    FencedError,
    NotReplicatedError,
    SlotLogError,
    TailEntry,
)
from cluster.slotlog.checks import _check_origin
from cluster.slotlog.leanpipe import LeanPipe


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

# Lean tail connections kept idle for the next tail (more tails at once open more).
_IDLE_TAILS: Final = 4


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
    kwargs = redisconn.own_connection_kwargs(client)
    kwargs["socket_timeout"] = socket_timeout
    pool = ConnectionPool(connection_class=client.connection_pool.connection_class, **kwargs)
    return Redis.from_pool(pool)


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


def _tail_entry(slot: int, entry_id: object, fields: object) -> TailEntry:
    """A raw ``XREAD`` row (RESP2: id, then a flat list of fields and values): the
    log's own layout (d, e, p) and the mirrors' (d, p) read by position, anything else
    as :func:`_entry` reads it."""
    if isinstance(fields, list):
        n = len(fields)
        if n == 6 and fields[0] == b"d" and fields[2] == b"e" and fields[4] == b"p":
            return TailEntry(
                slot, _as_bytes(entry_id).decode(), _as_bytes(fields[1]), _text(fields[5])
            )
        if n == 4 and fields[0] == b"d" and fields[2] == b"p":
            return TailEntry(
                slot, _as_bytes(entry_id).decode(), _as_bytes(fields[1]), _text(fields[3])
            )
        fields = dict(zip(fields[0::2], fields[1::2], strict=True)) if n % 2 == 0 else fields
    return TailEntry(slot, *_entry(entry_id, fields))


def _fenced(slot: int, epoch: int, reply: list[Any]) -> FencedError:
    return FencedError(slot, epoch, int(reply[1]), _text(reply[2]))


def _is_not_above_top(exc: ResponseError) -> bool:
    # Redis and Valkey: "The ID specified in XADD is equal or smaller than the target
    # stream top item".
    return "equal or smaller" in str(exc)


class RedisCalls:
    """The clients of a :class:`~cluster.slotlog.redislog.RedisSlotLog` and the way it runs
    its scripts (the class's documentation says how the clients are chosen and checked)."""

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
        # The group commit's appends on one server: their own lean connection.
        self._lean: LeanPipe | None = None
        # Blocking tails on one server: lean connections, one per tail under way (idle
        # ones kept for the next; a blocked XREAD holds its connection).
        self._tails_idle: list[LeanPipe] = []
        self._tails_all: set[LeanPipe] = set()
        self._tails_closed = False
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
    ) -> Self:
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

    async def _eval_append(self, script: _Script, keys_: Sequence[str], *args: bytes | str) -> Any:
        """An append script on one server without WAIT: on the lean connection
        (:mod:`cluster.slotlog.leanpipe`), not through redis-py's client."""
        if self._cluster or self.wait_replicas:
            return await self._eval(script, keys_, *args)
        pipe = self._lean
        if pipe is None:
            assert isinstance(self._client, Redis)
            pipe = self._lean = LeanPipe(self._client)
        n = str(len(keys_))
        try:
            return await pipe.call("EVALSHA", script.sha, n, *keys_, *args)
        except NoScriptError:
            await pipe.call("SCRIPT", "LOAD", script.source)
            return await pipe.call("EVALSHA", script.sha, n, *keys_, *args)

    async def _lean_tail(self, args: Sequence[bytes | str]) -> Any:
        """An ``XREAD`` on a lean connection of the tail client of its own (see
        :mod:`cluster.slotlog.leanpipe`; its socket timeout is above the longest block).
        A call that fails or is cancelled (a blocked read's reply may still come) closes
        its connection; one that returns gives it back for the next tail."""
        if self._tails_closed:
            raise RedisConnectionError("the slot log is closed")
        if self._tails_idle:
            pipe = self._tails_idle.pop()
        else:
            assert isinstance(self._tail, Redis)
            pipe = LeanPipe(self._tail)
            self._tails_all.add(pipe)
        try:
            reply = await pipe.call(*args)
        except BaseException:
            self._tails_all.discard(pipe)
            await pipe.close()
            raise
        if pipe in self._tails_all and len(self._tails_idle) < _IDLE_TAILS:
            self._tails_idle.append(pipe)  # (not once the log closed: close() took it)
        else:
            self._tails_all.discard(pipe)
            await pipe.close()
        return reply

    async def _close_lean(self) -> None:
        if self._lean is not None:
            await self._lean.close()
        self._tails_closed = True
        pipes, self._tails_all = self._tails_all, set()
        self._tails_idle.clear()
        for pipe in pipes:
            await pipe.close()

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
