"""A link's reading side: the origin's slot logs read into windows, chain-checked.

The link reads every slot's new entries with a blocking ``XREAD`` of the origin's own
slot logs (local, fast) and gathers them for up to a window. Every log entry names the
one before it (``p``); an entry whose ``p`` is not the link's position for its slot means
entries were trimmed under the link (it fell further behind than
``cluster.link_max_backlog_s``, or it resumes after a long cut). That is a *gap*: the
link sends the origin's checkpoint of the slot (pending messages, ack tombstones, the
clock it was taken at) in the slot's place, under the checkpoint's id — with ``p`` set to
the link's position, so the mirror's own chain stays whole — and carries on after it.
Gaps are counted and logged; nothing is ever skipped.

:class:`LogReader` is a part of :class:`cluster.link.Link` (a mixin).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from cluster.chain import parse_id, split_on_gaps
from cluster.checkpoint import as_version_2, without_clock
from cluster.errors import ClusterError
from cluster.linksend import _Window, confirmed_key, oldest_ms
from cluster.redisconn import AsyncClient
from cluster.slotlog import RedisSlotLog, TailEntry
from cluster.window import WindowBounds, WindowPlan
from relay.errors import InvariantError

log = logging.getLogger("cluster.link")

TAIL_BLOCK_MS = 500
COPY_COUNT = 200
# A slot whose resync must wait (no checkpoint covers its hole yet) is left out of the
# copy for this long; the other slots go on.
PARK_S = 1.0


class LinkGap(ClusterError):
    """Entries of a slot were trimmed under the link and no checkpoint covers them yet."""


class LogReader:
    """Reads windows from the origin's logs and resyncs gaps (part of a Link)."""

    region: str
    dest: str
    slots: int
    client: AsyncClient
    local: RedisSlotLog
    bounds: WindowBounds
    position: dict[int, str]
    _parked: dict[int, float]
    _resyncs: set[tuple[int, str]]
    _backlog_hint: int
    _last_sent: float
    _read_end: float | None  # monotonic time the last read of the log returned
    _inflight: deque[_Window]
    _ahead: ReadAhead | None  # read ahead by a starting link (_read_ahead), until taken
    backlog_entries: int
    waiting_oldest_ms: int | None
    gaps_total: int
    # The dedupe window (store.dedupe_window_s): a resync leaves out older tombstones.
    dedupe_window_ms: int = 600_000

    async def _measure_waiting(self) -> None:
        """While the copy is failing or stuck, find the oldest entry not yet in the
        destination from our own Redis, so lag grows truthfully through a cut that
        began while nothing was waiting."""
        try:
            positions = self.position
            if not positions:
                confirmed = await self.client.hgetall(confirmed_key(self.region, self.dest))
                positions = {
                    int(k): v.decode() if isinstance(v, bytes) else v for k, v in confirmed.items()
                }
            if not positions:
                return
            firsts = await self.local.first_after_many(positions)
        except (RedisError, OSError) as e:
            log.warning("link %s→%s: reading the backlog: %s", self.region, self.dest, e)
            return
        if firsts:
            oldest = min(parse_id(i)[0] for i in firsts.values())
            if self.waiting_oldest_ms is None or oldest < self.waiting_oldest_ms:
                self.waiting_oldest_ms = oldest
            self.backlog_entries = max(self.backlog_entries, len(firsts))

    async def _read_window(self, plan: WindowPlan) -> list[TailEntry]:
        """The next entries of every slot (chain-checked), gathered for up to a window:
        until ``plan.entries`` are read, ``window_ms`` has passed since the oldest, or
        (little waiting, room in the pipe) they hold ``plan.close_bytes``."""
        now = time.monotonic()
        after = {s: p for s, p in self.position.items() if self._parked.get(s, 0) <= now}
        if not after:
            await asyncio.sleep(PARK_S)  # every slot waits for a checkpoint
            return []
        prev_read = self._read_end
        entries = await self.local.tail(after, TAIL_BLOCK_MS, COPY_COUNT)
        self._read_end = time.monotonic()
        if not entries:
            self._backlog_hint = 0
            return []
        # The window's time runs from its oldest entry (its id is Redis's clock; never
        # longer than window_ms from now). What the previous read did not see arrived
        # after it returned, so the time since then bounds the age too: a node clock
        # ahead of Redis's cannot make every window look full-aged (and tiny).
        first_ms = oldest_ms(entries)
        age_ms = min(self.bounds.window_ms, max(0, int(time.time() * 1000) - first_ms))
        if prev_read is not None:
            age_ms = min(age_ms, int((self._read_end - prev_read) * 1000))
        deadline = time.monotonic() + (self.bounds.window_ms - age_ms) / 1000
        size = sum(len(e.data) for e in entries)
        # Closed early, once it holds plan.close_bytes, only while the pipe has room for
        # more windows than this one, and no sooner than half a window after the last
        # one went: at load, windows fill up (one compressed unit per window).
        close_bytes = plan.close_bytes if len(self._inflight) + 1 < plan.inflight else 0
        not_before = self._last_sent + self.bounds.window_ms / 2000
        while len(entries) < plan.entries:
            if 0 < close_bytes <= size and time.monotonic() >= not_before:
                break
            now = time.monotonic()
            left_ms = int((deadline - now) * 1000)
            if left_ms <= 0:
                break
            if 0 < close_bytes <= size:  # full enough: wait only until it may go
                left_ms = max(1, min(left_ms, int((not_before - now) * 1000) + 1))
            for e in entries:
                if e.slot in after:
                    after[e.slot] = e.id
            more = await self.local.tail(after, left_ms, COPY_COUNT)
            self._read_end = time.monotonic()
            if not more:
                break
            entries.extend(more)
            size += sum(len(e.data) for e in more)
        return await self._taken(entries)

    async def _taken(self, entries: list[TailEntry]) -> list[TailEntry]:
        """``entries`` just read (each slot's after its position) taken in: the backlog
        seen, the position moved on, a gap resynced from its checkpoint."""
        # Twice what this window read: windows grow while reads keep filling them.
        self._backlog_hint = 2 * len(entries)
        self.backlog_entries = len(entries) + sum(w.entries for w in self._inflight)
        oldest = oldest_ms(entries)
        if self.waiting_oldest_ms is None or oldest < self.waiting_oldest_ms:
            self.waiting_oldest_ms = oldest
        good, gaps = split_on_gaps(self.position, entries)
        for e in good:
            self.position[e.slot] = e.id
        for slot, missing in gaps.items():
            try:
                good.append(await self._resync(slot, missing))
            except LinkGap as e:
                log.warning("link %s→%s: %s; retrying it shortly", self.region, self.dest, e)
                self._parked[slot] = time.monotonic() + PARK_S
        return good

    async def _read_ahead(self) -> None:
        """The log's entries after what the destination last confirmed (the trim
        floor, in our own Redis), read while the link connects across the WAN, into
        ``_ahead``: a (re)started link has a backlog ready to send once it learns the
        mirrors' tops (:func:`ahead_from`). None when our Redis does not answer (the
        copy reads as usual). Kept on the link, not returned, so that nothing holds
        the entries once they are sent: a read may be hundreds of MB."""
        self._ahead = None
        self._ahead = await self._read_ahead_entries()

    async def _read_ahead_entries(self) -> ReadAhead | None:
        try:
            confirmed: Any = await self.client.hgetall(confirmed_key(self.region, self.dest))
            now = time.monotonic()
            after = dict.fromkeys(range(self.slots), "0-0")
            for k, v in confirmed.items():
                slot = int(k)
                if slot in after:
                    after[slot] = v.decode() if isinstance(v, bytes) else str(v)
            after = {s: p for s, p in after.items() if self._parked.get(s, 0) <= now}
            if not after:
                return None
            return after, await self.local.tail(after, None, COPY_COUNT)
        except (RedisError, OSError, ValueError, ClusterError) as e:
            log.info("link %s→%s: reading ahead: %s", self.region, self.dest, e)
            return None

    async def _resync(self, slot: int, missing: str) -> TailEntry:
        """Entries of ``slot`` after our position, up to ``missing`` at least, were
        trimmed: copy the slot's checkpoint in their place and go on after it.

        The checkpoint goes into the mirror above its top, so the mirror's chain stays
        whole. It proves the origin's own messages gone (``superseded``) only when the
        hole is a trim of the same log after our position; when the log went back or
        began again (``missing`` at or below our position: the origin's Redis lost
        entries) it is merged as a plain state, its clock left out."""
        position = self.position[slot]
        cp = await self.local.read_checkpoint(slot)
        if cp is None or parse_id(cp.covers_id) < parse_id(missing):
            raise LinkGap(
                f"slot {slot}: entries after {position} were trimmed and no checkpoint "
                "covers them yet"
            )
        if parse_id(cp.covers_id) <= parse_id(position):
            raise LinkGap(
                f"slot {slot}: its log went back behind the copied {position}; waiting for "
                "a checkpoint above it"
            )
        data = await self._as_version_2(slot, cp.data, clock=parse_id(missing) > parse_id(position))
        self.gaps_total += 1
        log.warning(
            "link %s→%s: slot %d was trimmed past %s; resyncing from its checkpoint at %s",
            self.region,
            self.dest,
            slot,
            self.position[slot],
            cp.covers_id,
        )
        self.position[slot] = cp.covers_id
        self._resyncs.add((slot, cp.covers_id))
        # Sent in the window, in the slot's place: the receiver writes it above the
        # mirror's top, its ``p`` our position, so the mirror's chain stays whole.
        return TailEntry(slot, cp.covers_id, data, position)

    async def _as_version_2(self, slot: int, data: bytes, *, clock: bool) -> bytes:
        """``data`` as version 2 whatever this node writes (the destination may run an
        earlier build), tombstones older than the dedupe window left out, its clock
        kept or not; converted in a thread (a slot's checkpoint may take tens of ms).
        One too large to convert goes as it is (a destination of this build reads it)."""
        cutoff = (int(time.time() * 1000) - self.dedupe_window_ms) << 16
        convert = as_version_2 if clock else without_clock
        try:
            return await asyncio.to_thread(convert, data, cutoff_hlc=cutoff)
        except InvariantError as e:
            log.warning(
                "link %s→%s: slot %d's checkpoint goes in version 3 (%s): a region of an "
                "earlier build cannot read it",
                self.region,
                self.dest,
                slot,
                e,
            )
            return data


# What a link read ahead: the positions it read after, and what it read.
ReadAhead = tuple[dict[int, str], list[TailEntry]]


def ahead_from(ahead: ReadAhead, tops: Mapping[int, str]) -> list[TailEntry]:
    """Of the entries read ahead (each slot's after ``read_from``, oldest first), those
    a read after ``tops`` (the mirrors' tops, where the copy resumes) gives too: a
    slot read from its top keeps all of them as they are (a gap included: the copy
    resyncs it as after any read); another slot keeps those above its top when the
    first of them follows the top, and none otherwise (its read was from elsewhere:
    the copy reads it anew). Nothing is taken that a read from the tops would not
    give, in the same order."""
    read_from, entries = ahead
    out: list[TailEntry] = []
    follows: dict[int, bool] = {}
    for e in entries:
        top = tops.get(e.slot)
        if top is None:
            continue
        if read_from.get(e.slot) == top:
            out.append(e)
            continue
        ok = follows.get(e.slot)
        if ok is None:
            if parse_id(e.id) <= parse_id(top):
                continue  # the destination holds it already
            ok = follows[e.slot] = e.prev == top
        if ok:
            out.append(e)
    return out
