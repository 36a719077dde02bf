"""Where this node stands in each slot's log and in each origin's mirror of it, and the
recent acks it must not let a checkpoint bring back.

Every reader of the region (a claim's catch-up, the replica tail, the mirror loops) goes
on from a position here and checks the chain through :meth:`Positions.follows`: an
entry whose ``prev`` is not our position means entries were trimmed under us, and the
slot must be rebuilt from its checkpoint (:meth:`Positions.forget`, then read again).
Pure: the edge reads and applies, this module only says where it stands.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from itertools import islice

from cluster.chain import parse_id

START = "0-0"  # before the first entry of a log or mirror


class Positions:
    """The newest entry applied here, per slot (the region's own log) and per origin and
    slot (our mirrors of other regions' logs).

    ``log`` and ``mirrors`` are the live dicts: the edge may keep and read them."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.log: dict[int, str] = {}
        self.mirrors: dict[str, dict[int, str]] = {o: {} for o in origins}

    def at(self, slot: int, origin: str = "") -> str | None:
        """Our position; None in the log of a slot whose state is not loaded here. A
        mirror not read yet stands at :data:`START`."""
        if origin:
            return self.mirrors[origin].get(slot, START)
        return self.log.get(slot)

    def loaded(self, slot: int) -> bool:
        return slot in self.log

    def follows(self, slot: int, prev: str, origin: str = "") -> bool:
        """The chain check: may an entry whose predecessor is ``prev`` be applied next?
        (An empty ``prev`` is an entry written before the chain existed.)"""
        return not prev or prev == self.at(slot, origin)

    def advance(self, slot: int, entry_id: str, origin: str = "") -> None:
        if origin:
            self.mirrors[origin][slot] = entry_id
        else:
            self.log[slot] = entry_id

    def start(self, slot: int, covers: str | None) -> None:
        """The slot's state is rebuilt from a checkpoint covering ``covers`` (None: from
        nothing)."""
        self.log[slot] = covers if covers is not None else START

    def forget(self, slot: int) -> None:
        """The slot's state is dropped from RAM: every position of it goes."""
        self.log.pop(slot, None)
        for done in self.mirrors.values():
            done.pop(slot, None)

    def merge_mirrors(self, slot: int, covered: Mapping[str, Mapping[int, str]]) -> None:
        """A checkpoint of the slot covers these mirror positions: never go back."""
        for origin, by_slot in covered.items():
            done = self.mirrors.get(origin)
            if done is None or slot not in by_slot:
                continue  # not an origin we mirror, or not this slot
            if parse_id(by_slot[slot]) > parse_id(done.get(slot, START)):
                done[slot] = by_slot[slot]

    def mirrors_of(self, slot: int) -> dict[str, str]:
        """Per origin, where our mirror of ``slot`` stands (origins read so far)."""
        return {o: done[slot] for o, done in self.mirrors.items() if slot in done}


class Tombstones:
    """Per slot, the recent acks ``(ch, id, hlc)``, oldest first: a checkpoint written
    before them must not bring their messages back, and a snapshot keeps them.

    Only a dedupe window's worth matters (older ones dedupe nothing), and at most
    ``per_slot`` are kept. ``by_slot`` is the live dict.

    Each tombstone of a slot has a sequence number, counted from 0 as they are added: a
    slot's tombstones are only ever added at the new end and dropped from the old one, so
    a writer that encoded those before :meth:`added` once need only encode the rest next
    time (:meth:`since`), however many the window holds."""

    def __init__(self, per_slot: int) -> None:
        self.per_slot = per_slot
        self.by_slot: dict[int, deque[tuple[str, str, int]]] = {}
        self._added: dict[int, int] = {}

    def add(self, slot: int, ch: str, ids: Iterable[str], hlc: int, *, cutoff_hlc: int) -> None:
        """Remember acks of ``ids`` at ``hlc``; drop those older than ``cutoff_hlc``."""
        q = self.by_slot.get(slot)
        if q is None:
            q = self.by_slot[slot] = deque()
        before = len(q)
        q.extend((ch, i, hlc) for i in ids)
        self._added[slot] = self._added.get(slot, 0) + len(q) - before
        while q and q[0][2] < cutoff_hlc:
            q.popleft()
        while len(q) > self.per_slot:
            q.popleft()

    def of(self, slot: int) -> Iterable[tuple[str, str, int]]:
        return self.by_slot.get(slot, ())

    def newest(self, slot: int, n: int) -> list[tuple[str, str, int]]:
        """The newest ``n`` tombstones of ``slot`` (fewer if it holds fewer), oldest first.
        Costs ``n``, not the size of the window."""
        q = self.by_slot.get(slot)
        if not q or n <= 0:
            return []
        out = list(islice(reversed(q), n))
        out.reverse()
        return out

    def added(self, slot: int) -> int:
        """How many tombstones ``slot`` was ever given: the sequence number of its next."""
        return self._added.get(slot, 0)

    def first(self, slot: int) -> int:
        """The sequence number of the oldest tombstone ``slot`` still holds."""
        return self.added(slot) - len(self.by_slot.get(slot, ()))

    def since(self, slot: int, seq: int) -> list[tuple[str, str, int]]:
        """The tombstones of ``slot`` from sequence number ``seq`` on (all it holds when
        ``seq`` is older than its oldest), oldest first."""
        return self.newest(slot, self.added(slot) - max(seq, self.first(slot)))

    def gone(self, slot: int) -> set[tuple[str, str]]:
        """``(ch, id)`` of every message acked in the slot's window."""
        return {(ch, i) for ch, i, _ in self.by_slot.get(slot, ())}
