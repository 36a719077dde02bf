"""The slot logs in Redis: :class:`RedisSlotLog`, every :class:`~cluster.slotlog.api.SlotLog`
operation as a fenced Lua script, a pipeline or a stream command, on one server or a
Redis Cluster (tails poll each shard there). The clients and the script calls are its
base class's (:mod:`cluster.slotlog.rediscalls`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from cluster import keys
from cluster.keys import check_node_id, check_slot
from cluster.slotlog.api import (
    DEFAULT_COUNT,
    START_ID,
    TAIL_POLL_MAX_S,
    TAIL_POLL_MIN_S,
    Checkpoint,
    Entry,
    FencedError,
    Owner,
    StaleCheckpointError,
    TailEntry,
    Trimmed,
)
from cluster.slotlog.checks import (
    _check_block,
    _check_count,
    _check_data,
    _check_epoch,
    _check_margin,
    _check_origin,
    _parse_id,
)
from cluster.slotlog.rediscalls import (
    _APPEND,
    _APPEND_SLOTS,
    _CHECKPOINT,
    _CLAIM,
    _RELEASE,
    _SET_OWNER,
    _TRIM,
    RedisCalls,
    _as_bytes,
    _entry,
    _fenced,
    _is_not_above_top,
    _tail_entry,
    _text,
)


class RedisSlotLog(RedisCalls):
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
                replies = await self._eval_append(_APPEND_SLOTS, keys, *args)
        elif len(calls) == 1 and not wait:
            replies = [await self._eval_append(_APPEND, *calls[0][0:1], *calls[0][1])]
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
        args: list[bytes | str] = ["XREAD", "COUNT", str(count)]
        if block_ms is not None:
            args += ("BLOCK", str(block_ms))
        args.append("STREAMS")
        args += [str(k) for k in streams]  # str keys and ids: built above
        args += [str(i) for i in streams.values()]
        reply: Any = await self._lean_tail(args)  # RESP2: [[key, [[id, fields]…]]…] or nil
        if not reply:
            return []
        out: list[TailEntry] = []
        for stream_key, rows in reply:
            slot = slot_of[_as_bytes(stream_key)]
            out.extend(_tail_entry(slot, i, f) for i, f in rows)
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
        async with self._client.pipeline(transaction=False) as pipe:
            self.queue_mirror_tops(pipe, slots, origin)
            results = await pipe.execute(raise_on_error=False)
        return mirror_tops_of(slots, results)

    def queue_mirror_tops(self, pipe: Any, slots: Sequence[int], origin: str) -> None:
        """Queue on ``pipe`` (executed with ``raise_on_error=False``) the questions whose
        answers :func:`mirror_tops_of` reads as :meth:`mirror_tops` does: so the tops
        can share a round trip with other questions to the same server."""
        _check_origin(self._region, origin)
        for slot in slots:
            pipe.xinfo_stream(keys.mirror_key(self._region, check_slot(slot), origin))

    async def first_id(self, slot: int) -> str | None:
        _, log_key, _ = self._keys(check_slot(slot))
        rows: Any = await self._client.xrange(log_key, min="-", max="+", count=1)
        return _text(rows[0][0]) if rows else None

    async def last_id(self, slot: int) -> str | None:
        _, log_key, _ = self._keys(check_slot(slot))
        rows: Any = await self._client.xrevrange(log_key, max="+", min="-", count=1)
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
            await self._close_lean()
            await self._client.aclose()
        finally:
            await self._tail.aclose()


def mirror_tops_of(slots: Sequence[int], results: Sequence[Any]) -> dict[int, str | None]:
    """:meth:`RedisSlotLog.mirror_tops` from the answers to what
    :meth:`RedisSlotLog.queue_mirror_tops` queued (errors other than a missing stream
    are raised)."""
    out: dict[int, str | None] = {}
    for slot, r in zip(slots, results, strict=True):
        if isinstance(r, ResponseError) and "no such key" in str(r):
            out[slot] = None
        elif isinstance(r, Exception):
            raise r
        else:
            out[slot] = _text(r["last-generated-id"])
    return out
