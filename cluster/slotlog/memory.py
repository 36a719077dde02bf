"""The in-memory slot log: :class:`MemorySlotLog`, a fake with the same checks, fencing,
trimming and mirror rules as the Redis one, for fast unit tests and scenario scripts;
the shared suite (``tests/integration/test_slotlog.py``) runs the same cases against
both."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Mapping, Sequence

from cluster.keys import check_node_id, check_region, check_slot
from cluster.slotlog.api import (
    DEFAULT_COUNT,
    DEFAULT_MAX_BLOCK_MS,
    START_ID,
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
    _format_id,
    _parse_id,
)


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

    async def last_id(self, slot: int) -> str | None:
        self._check_open()
        stream = self._stream(check_slot(slot), "")
        return stream.entries[-1].id if stream is not None and stream.entries else None

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
