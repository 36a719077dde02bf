"""The receiver: a link's windows, split into this region's mirrors of the origin.

A link from ``origin`` appends one frame per window (cluster/window.py) to the inbound
stream ``relay:{<region>}:inbound:<origin>`` in this region's Redis. One node of this
region holds the receiver's lease (``relay:{<region>}:receiver:<origin>``) and, while it
surely holds it (its last renewal was sent less than a TTL ago, as for a link), reads the
inbound stream in order and writes every entry of every window into its slot's mirror
``relay:{<region>:<slot>}:mirror:<origin>`` with the **same id and bytes**.

**Chains.** The receiver checks each entry against the mirror's top: an id at or below
the top is already there (a window sent again after a restart) and is skipped; an entry
whose ``p`` is not the top is refused with the whole window — the link is told
(``bad``), re-reads the mirrors' tops and sends again from there. Nothing is skipped.

**Progress.** After each window the receiver appends ``{w: <window id>, n: <entries
written>, b: <their bytes>}`` to ``relay:{<region>}:inbound:<origin>:done`` (capped) and
trims the inbound stream up to that window, so it stays bounded. The link reads ``done``
over the WAN: it is the confirmation that answers ``ack=remote`` and sets the origin's
trim floor. A receiver that restarts (or another node taking the lease over) resumes
after the last ``done`` window; a window it had half written is written again, and the
mirrors refuse what they already hold: nothing is lost or doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import msgpack
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from cluster import redisconn
from cluster.chain import parse_id
from cluster.errors import ClusterError
from cluster.keys import PREFIX, check_region, mirror_key, region_tag
from cluster.lease import Lease, stop_leased
from cluster.redisconn import AsyncClient
from cluster.slotlog import RedisSlotLog, TailEntry
from cluster.slotlog.leanpipe import LeanPipe
from cluster.window import WindowError, unpack_window

log = logging.getLogger(__name__)

# One call per group of slots of a window (one slot on a Redis Cluster, where each
# mirror has a hash tag of its own; up to CALL_SLOTS on one server): KEYS the slots'
# mirrors, ARGV[k] a msgpack array [id, prev, bytes, ...] for KEYS[k] (one argument per
# mirror, not three per entry: packing arguments is most of a call's cost in Python).
# Each entry is XADDed into its mirror with its id, bytes and prev: 1 when written, 0
# when the mirror holds it already (its id is not above the top: a window written
# again), -1 when its prev is not the mirror's top as Redis holds it (the mirror lost
# entries, e.g. a failover of its shard, or another receiver wrote meanwhile): that
# mirror's list stops there, nothing after it is written. The reply holds one list per
# key. Any other error is returned as it is. An entry that follows the top (the usual
# case) is not compared with it: XADD refuses an id at or below the top by itself.
MIRROR_MANY: Final = """
local function le(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as <= bs)
end
local all = {}
for k = 1, #KEYS do
  local key = KEYS[k]
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  local top = false
  if #last > 0 then top = last[1][1] end
  local a = cmsgpack.unpack(ARGV[k])
  local out = {}
  for i = 1, #a, 3 do
    local id, prev = a[i], a[i + 1]
    if top and prev ~= top and le(id, top) then
      out[#out + 1] = 0
    elseif prev ~= '' and top and prev ~= top then
      out[#out + 1] = -1
      break
    else
      local r
      if prev == '' then
        r = redis.pcall('XADD', key, id, 'd', a[i + 2])
      else
        r = redis.pcall('XADD', key, id, 'd', a[i + 2], 'p', prev)
      end
      if type(r) == 'table' and r.err then
        if string.find(r.err, 'equal or smaller', 1, true) then
          out[#out + 1] = 0
        else
          return r
        end
      else
        out[#out + 1] = 1
        top = id
      end
    end
  end
  all[k] = out
end
return all
"""
MIRROR_MANY_SHA: Final = hashlib.sha1(MIRROR_MANY.encode()).hexdigest()

# Bytes as msgpack "raw" (str), which Redis's Lua cmsgpack reads (it has no bin type).
_packer = msgpack.Packer(use_bin_type=False)


def _pack_args(args: list[bytes | str]) -> bytes:
    packed: bytes = _packer.pack(args)
    return packed


# Mirrors one script call writes at most on one server: with a window's entries spread
# over the slots, a few hundred entries, ~1 ms of the server's time, so other clients
# wait no longer than that behind the receiver (a window whose entries sit in a few
# slots is written by one call, as a single hot slot's always was).
CALL_SLOTS = 32
READ_BLOCK_MS = 500
READ_COUNT = 16
DONE_MAXLEN = 1000
MAX_BACKOFF_S = 5.0


def inbound_key(region: str, origin: str) -> str:
    """The stream ``origin``'s link appends its windows to, in ``region``'s Redis."""
    return f"{PREFIX}:{region_tag(region)}:inbound:{check_region(origin)}"


def done_key(region: str, origin: str) -> str:
    """The receiver's progress: one entry per window written into the mirrors."""
    return inbound_key(region, origin) + ":done"


def receiver_lease_key(region: str, origin: str) -> str:
    return f"{PREFIX}:{region_tag(region)}:receiver:{check_region(origin)}"


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def last_done(client: AsyncClient, region: str, origin: str) -> str:
    """The id of the last window the receiver finished ("0-0": none)."""
    rows: Any = await client.xrevrange(done_key(region, origin), count=1)
    return last_done_of(rows)


def last_done_of(rows: Any) -> str:
    """:func:`last_done` from the reply of ``XREVRANGE <done key> + - COUNT 1``."""
    if not rows:
        return "0-0"
    return _text(rows[0][1][b"w"])


class Receiver:
    """Writes ``origin``'s windows into this region's mirrors (while holding the lease)."""

    def __init__(
        self,
        *,
        region: str,
        origin: str,
        url: str,
        node_id: str,
        slots: int,
        lease_ttl_ms: int = 3000,
    ) -> None:
        self.region = region
        self.origin = origin
        self.slots = slots
        self.lease_ttl_ms = lease_ttl_ms
        self.mirrors = RedisSlotLog.from_url(url, region, max_block_ms=READ_BLOCK_MS * 4)
        self.client = redisconn.connect(url, socket_timeout=max(1.0, lease_ttl_ms / 1000))
        self.reader = redisconn.connect(url, socket_timeout=READ_BLOCK_MS / 1000 + 5)
        # On one server the mirrors' writes go over a lean connection of their own: sent
        # at once, so the next window is decoded while Redis runs them.
        self._lean = None if isinstance(self.client, RedisCluster) else LeanPipe(self.client)
        self.lease = Lease(self.client, receiver_lease_key(region, origin), node_id, lease_ttl_ms)
        self.windows_total = 0
        self.entries_total = 0
        self.skipped_total = 0
        self.refused_total = 0
        self.errors_total = 0
        self.last_error = ""
        self.position = "0-0"
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def holding(self) -> bool:
        return self.lease.holding

    def status(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "holder": self.holding,
            "position": self.position,
            "windows_total": self.windows_total,
            "entries_total": self.entries_total,
            "skipped_total": self.skipped_total,
            "refused_total": self.refused_total,
            "errors_total": self.errors_total,
            "last_error": self.last_error,
        }

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stopped = True
        await stop_leased(self._task, self.lease)
        with contextlib.suppress(Exception):
            await self.mirrors.close()
        if self._lean is not None:
            await self._lean.close()
        for c in (self.client, self.reader):
            with contextlib.suppress(Exception):
                await c.aclose()

    async def _run(self) -> None:
        worker: asyncio.Task[None] | None = None
        try:
            while not self._stopped:
                ours = await self.lease.renew(log, f"receiver {self.region}←{self.origin}")
                if ours and worker is None:
                    worker = asyncio.ensure_future(self._apply_forever())
                elif not ours and worker is not None:
                    await cancel_task(worker)
                    worker = None
                await asyncio.sleep(self.lease_ttl_ms / 3000)  # the lease's renewal period
        finally:
            if worker is not None:
                await cancel_task(worker)

    async def _apply_forever(self) -> None:
        await retry_forever(self._apply_loop, lambda: self._stopped, self._failed, 0.1)

    def _failed(self, error: str, _backoff_s: float) -> None:
        self.errors_total += 1
        self.last_error = error
        log.warning("receiver %s←%s: %s", self.region, self.origin, error)

    async def _apply_loop(self) -> None:
        self.position = await last_done(self.client, self.region, self.origin)
        tops = await self.mirrors.mirror_tops(list(range(self.slots)), self.origin)
        top = {s: t or "0-0" for s, t in tops.items()}
        key = inbound_key(self.region, self.origin)
        while not self._stopped:
            reply: Any = await self.reader.xread(
                {key: self.position}, count=READ_COUNT, block=READ_BLOCK_MS
            )
            if not reply:
                continue
            pairs = reply.items() if isinstance(reply, dict) else reply
            rows = [(_text(wid), fields.get(b"w", b"")) for _, rs in pairs for wid, fields in rs]
            # Each window is decoded while Redis writes the one before (its decoding
            # needs no tops); their writes go one after the other, as the chains need.
            writing: asyncio.Task[None] | None = None
            try:
                for wid, frame in rows:
                    decoded = self._decode(frame)
                    if writing is not None:
                        await writing
                    writing = asyncio.ensure_future(self._apply_window(wid, decoded, top))
                    await asyncio.sleep(0)  # let it send its writes before the next decode
                if writing is not None:
                    await writing
            finally:
                if writing is not None and not writing.done():
                    await cancel_task(writing)

    def _decode(self, frame: bytes) -> list[TailEntry] | str:
        """A window's entries, or why it is refused."""
        try:
            return unpack_window(frame, slots=self.slots)
        except WindowError as exc:
            return f"{exc.code}: {exc}"

    async def _write(self, entries: list[TailEntry]) -> list[int]:
        """Write ``entries`` into their mirrors: one script call per group of slots
        (:data:`CALL_SLOTS`; one slot on a Redis Cluster, which routes each call to its
        slot's shard), pipelined. 1: written; 0: there already; -1: its prev is not the
        mirror's top in Redis (nothing after it in its slot is written: those are -2)."""
        by_slot: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            by_slot.setdefault(e.slot, []).append(i)
        per_call = 1 if isinstance(self.client, RedisCluster) else CALL_SLOTS
        slots = list(by_slot)
        calls: list[tuple[list[str], list[bytes]]] = []
        for at in range(0, len(slots), per_call):
            keys: list[str] = []
            argv: list[bytes] = []
            for slot in slots[at : at + per_call]:
                args: list[bytes | str] = []
                for i in by_slot[slot]:
                    e = entries[i]
                    args += [e.id, e.prev, e.data]
                keys.append(mirror_key(self.region, slot, self.origin))
                argv.append(_pack_args(args))
            calls.append((keys, argv))
        results = await self._mirror_calls(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self.client.script_load(MIRROR_MANY)
            again = await self._mirror_calls([calls[i] for i in missing])
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        out: list[int] = [-2] * len(entries)
        for at, r in zip(range(0, len(slots), per_call), results, strict=True):
            if isinstance(r, Exception):
                raise r
            for slot, oks in zip(slots[at : at + per_call], r, strict=True):
                for i, ok in zip(by_slot[slot], oks, strict=False):  # a break ends it
                    out[i] = int(ok)
        return out

    async def _mirror_calls(self, calls: Sequence[tuple[list[str], list[bytes]]]) -> list[Any]:
        """The script's replies to ``calls``, errors among them, not raised."""
        if self._lean is not None:
            return await self._lean.call_many(
                [("EVALSHA", MIRROR_MANY_SHA, str(len(k)), *k, *a) for k, a in calls]
            )
        async with self.client.pipeline(transaction=False) as pipe:
            for keys, argv in calls:
                pipe.evalsha(MIRROR_MANY_SHA, len(keys), *keys, *argv)
            out: list[Any] = await pipe.execute(raise_on_error=False)
            return out

    async def _apply_window(
        self, wid: str, decoded: list[TailEntry] | str, top: dict[int, str]
    ) -> None:
        bad = decoded if isinstance(decoded, str) else ""
        entries = [] if isinstance(decoded, str) else decoded
        todo: list[TailEntry] = []
        tentative: dict[int, tuple[str, tuple[int, int]]] = {}
        for e in entries:
            t = tentative.get(e.slot)
            if t is None:
                t = tentative[e.slot] = (top[e.slot], parse_id(top[e.slot]))
            at = parse_id(e.id)
            if at <= t[1]:
                self.skipped_total += 1
                continue
            if e.prev and e.prev != t[0]:
                bad = f"slot {e.slot}: entry {e.id} follows {e.prev}, the mirror's top is {t[0]}"
                todo = []
                break
            todo.append(e)
            tentative[e.slot] = (e.id, at)
        if not self.holding:
            raise ClusterError("the receiver's lease is not surely ours: not writing")
        written = 0
        nbytes = 0
        stale = False
        if todo:
            results = await self._write(todo)
            for e, ok in zip(todo, results, strict=True):
                if ok == 1:
                    written += 1
                    nbytes += len(e.data)
                    top[e.slot] = e.id
                elif ok == 0:  # written already (a window sent twice): the top is above
                    self.skipped_total += 1
                    top[e.slot] = max(top[e.slot], e.id, key=parse_id)
                elif ok == -1 and not stale:
                    # The mirror in Redis is not where this receiver thought: it lost
                    # entries (its shard failed over) or another receiver wrote. Refuse
                    # the window (the link resends from the mirrors' real tops) and read
                    # the tops again.
                    stale = True
                    bad = (
                        f"slot {e.slot}: entry {e.id} follows {e.prev}, which is not the "
                        "top of the mirror in Redis"
                    )
        if bad:
            self.refused_total += 1
            log.warning("receiver %s←%s: window %s refused: %s", self.region, self.origin, wid, bad)
        ms, seq = parse_id(wid)
        async with self.client.pipeline(transaction=False) as pipe:
            doc: dict[str, str | int] = {"w": wid, "n": written, "b": nbytes}
            if bad:
                doc["bad"] = bad[:500]
            pipe.xadd(done_key(self.region, self.origin), doc, maxlen=DONE_MAXLEN, approximate=True)  # type: ignore[arg-type]
            pipe.xtrim(inbound_key(self.region, self.origin), minid=f"{ms}-{seq + 1}")
            await pipe.execute()
        self.position = wid
        self.windows_total += 1
        self.entries_total += written
        if stale:
            raise ClusterError("a mirror's top moved under the receiver: reading the tops again")


async def cancel_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended. A cancellation that lands inside a
    Redis call's own timeout may come back out as a timeout error, which the task's
    retry loop would swallow: so cancel again until it is done."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)


async def retry_forever(
    loop: Callable[[], Awaitable[None]],
    stopped: Callable[[], bool],
    failed: Callable[[str, float], None],
    first_backoff_s: float,
) -> None:
    """Run ``loop`` until ``stopped()``: after a Redis, socket, window or cluster error
    call ``failed(error, backoff)`` and back off (doubling from ``first_backoff_s`` up to
    ``MAX_BACKOFF_S``; a run that ends without an error starts it over). The receiver's
    apply loop and the link's copy loop run this way while their lease is held."""
    backoff = first_backoff_s
    while not stopped():
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError, ValueError, ClusterError) as e:
            failed(f"{type(e).__name__}: {e}", backoff)
            await asyncio.sleep(backoff)  # back off before retrying
            backoff = min(MAX_BACKOFF_S, backoff * 2)
        else:
            backoff = first_backoff_s
