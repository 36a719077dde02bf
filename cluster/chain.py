"""Chains and trim floors: the rules that keep a reader from skipping a log entry.

Every slot-log entry carries ``p``, the id of the entry before it in the same log (mirrors
keep their origin's). A reader at ``position`` that reads an entry whose ``p`` is not
``position`` has missed entries — they were trimmed under it — and must not read on: it
rebuilds the slot from the checkpoint, which covers the hole (:func:`split_on_gaps`).

A slot log is trimmed behind its newest checkpoint *and* behind the oldest position every
link of the region has confirmed for the slot, unless that link is more than the stated
backlog behind: then it is declared gapped for the slot and resyncs from the checkpoint
instead of pinning the log for ever (:func:`trim_bound`).

Pure: ids are Redis stream ids (``"<ms>-<seq>"``), times are passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


def parse_id(entry_id: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a pair that orders like the stream ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Chained(Protocol):
    """An entry as a reader sees it: its slot, id and the id of the one before it."""

    @property
    def slot(self) -> int: ...

    @property
    def id(self) -> str: ...

    @property
    def prev(self) -> str: ...


E = TypeVar("E", bound=Chained)


def split_on_gaps(
    positions: Mapping[int, str], entries: Iterable[E]
) -> tuple[list[E], dict[int, str]]:
    """Entries (oldest first per slot) that follow on from ``positions`` (slot → the id
    the reader stands at), and per slot with a break the ``p`` of the first entry after
    it: the newest entry the reader is missing. After a break nothing more of that slot
    is returned. Entries with no ``p`` recorded (``""``) are taken as following on."""
    expect = dict(positions)
    good: list[E] = []
    gaps: dict[int, str] = {}
    for e in entries:
        if e.slot in gaps:
            continue
        if e.prev and e.prev != expect.get(e.slot, "0-0"):
            gaps[e.slot] = e.prev
            continue
        good.append(e)
        expect[e.slot] = e.id
    return good, gaps


@dataclass(frozen=True, slots=True)
class TrimBound:
    """Trim the log before ``before_id``; ``gapped``: past a link that fell too far
    behind (that link resyncs the slot from the checkpoint)."""

    before_id: str
    gapped: bool = False


def trim_bound(
    *,
    covers: str,
    links: Sequence[tuple[str, str | None]],
    now_ms: int,
    max_backlog_ms: float,
) -> TrimBound:
    """Where a slot log may be trimmed.

    ``covers``: the id the newest checkpoint covers; ``links``: per link of the region,
    the position it has confirmed for the slot (``"0-0"``: nothing yet) and the id of the
    first entry after it (None: none). Never past the checkpoint; never past a link,
    unless the oldest entry that link still needs is older than ``max_backlog_ms``: then
    that link alone is passed over (``gapped``), the others still hold the log.
    """
    bound = covers
    gapped = False
    for floor, oldest in links:
        if parse_id(floor) >= parse_id(covers):
            continue
        if oldest is None or parse_id(oldest) > parse_id(covers):
            continue  # nothing the checkpoint covers waits for this link
        if now_ms - parse_id(oldest)[0] > max_backlog_ms:
            gapped = True
            continue
        if parse_id(floor) < parse_id(bound):
            bound = floor
    return TrimBound(bound, gapped)
