"""The batcher: what changed per slot, cut into slot-log entries every window.

Pure: the owner feeds it events as they happen (:meth:`Batcher.add`) with the time, and
asks it (:meth:`Batcher.flush`) for the entries to append when the window is over or a
slot's batch is full. Each :class:`AppendToLog` carries the waiters (opaque tokens: the
``pub`` requests that asked for ``ack=log``) to answer once the append succeeded
(:meth:`Batcher.appended`) or to fail (:meth:`Batcher.append_failed`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from relay.codec import AckEvent, Event, MessageEvent

DEFAULT_WINDOW_MS = 100
DEFAULT_MAX_EVENTS = 1000
DEFAULT_MAX_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class AppendToLog:
    """Effect: append one entry holding ``events`` to ``slot``'s log, then report back."""

    batch_id: int
    slot: int
    events: tuple[Event, ...]
    waiters: tuple[Hashable, ...]


@dataclass(slots=True)
class _Open:
    events: list[Event] = field(default_factory=list)
    waiters: list[Hashable] = field(default_factory=list)
    bytes: int = 0


def event_size(event: Event) -> int:
    """A cheap estimate of an event's encoded size, for the batch byte cap."""
    if isinstance(event, MessageEvent):
        return len(event.body) + len(event.id) + len(event.ch) + len(event.sender) + 32
    return sum(len(i) for i in event.ids) + len(event.ch) + 24


class Batcher:
    """Open batches per slot; a batch closes at the window's end or when full."""

    def __init__(
        self,
        *,
        window_ms: int = DEFAULT_WINDOW_MS,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if window_ms < 1 or max_events < 1 or max_bytes < 1:
            raise ValueError("window_ms, max_events and max_bytes must be positive")
        self.window_ms = window_ms
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._open: dict[int, _Open] = {}
        self._window_started_ms: int | None = None
        self._next_id = 1
        self._in_flight: dict[int, AppendToLog] = {}
        # Called whenever something is gathered (an event or a waiter): a group-commit
        # loop waiting for work sets its wake-up here.
        self.on_gather: Callable[[], None] | None = None

    @property
    def has_open(self) -> bool:
        """Whether anything (events or waiters) waits to be handed out."""
        return bool(self._open)

    @property
    def pending_events(self) -> int:
        """Events accepted but not yet handed out for appending."""
        return sum(len(o.events) for o in self._open.values())

    @property
    def in_flight(self) -> int:
        """Entries handed out and not yet reported appended or failed."""
        return len(self._in_flight)

    def add(
        self, slot: int, event: Event, now_ms: int, waiter: Hashable | None = None
    ) -> list[AppendToLog]:
        """Record an event; return the slot's entry at once if its batch is now full."""
        o = self._open.get(slot)
        if o is None:
            o = self._open[slot] = _Open()
        if self._window_started_ms is None:
            self._window_started_ms = now_ms
        o.events.append(event)
        o.bytes += event_size(event)
        if waiter is not None:
            o.waiters.append(waiter)
        if self.on_gather is not None:
            self.on_gather()
        if len(o.events) >= self.max_events or o.bytes >= self.max_bytes:
            return [self._close(slot)]
        return []

    def add_waiter(self, slot: int, waiter: Hashable, now_ms: int) -> None:
        """Answer ``waiter`` with the slot's next entry (e.g. after a failed append is
        queued again)."""
        o = self._open.get(slot)
        if o is None:
            o = self._open[slot] = _Open()
        if self._window_started_ms is None:
            self._window_started_ms = now_ms
        o.waiters.append(waiter)
        if self.on_gather is not None:
            self.on_gather()

    def take(self, slot: int) -> list[AppendToLog]:
        """Close ``slot``'s open batch now (the slot is being lost): the caller must end
        the returned entry with :meth:`appended` or :meth:`append_failed`."""
        return [self._close(slot)] if slot in self._open else []

    def busy(self, slot: int) -> bool:
        """Whether ``slot`` has events waiting or on their way to its log."""
        return slot in self._open or any(e.slot == slot for e in self._in_flight.values())

    def deadline_ms(self) -> int | None:
        """When the current window ends (None: nothing is waiting)."""
        if self._window_started_ms is None or not self._open:
            return None
        return self._window_started_ms + self.window_ms

    def flush(self, now_ms: int, *, force: bool = False) -> list[AppendToLog]:
        """Entries for every slot with events, if the window is over (or ``force``)."""
        deadline = self.deadline_ms()
        if deadline is None or (not force and now_ms < deadline):
            return []
        out = [self._close(slot) for slot in sorted(self._open)]
        self._window_started_ms = None
        return out

    def appended(self, batch_id: int) -> AppendToLog:
        """The entry is in the log: its waiters can be answered ``ack=log``."""
        return self._in_flight.pop(batch_id)

    def append_failed(self, batch_id: int) -> AppendToLog:
        """The append failed (fenced, Redis down): the caller decides what to tell."""
        return self._in_flight.pop(batch_id)

    def _close(self, slot: int) -> AppendToLog:
        o = self._open.pop(slot)
        effect = AppendToLog(self._next_id, slot, tuple(o.events), tuple(o.waiters))
        self._in_flight[self._next_id] = effect
        self._next_id += 1
        if not self._open:
            self._window_started_ms = None
        return effect


def message_event(
    *, id: str, ch: str, sender: str, hlc: int, origin: str, body: bytes, expires_ms: int
) -> MessageEvent:
    return MessageEvent(id, ch, sender, hlc, origin, body, expires_ms)


def ack_events(ch: str, ids: list[str], hlc: int, origin: str) -> list[AckEvent]:
    """Ack events of at most 1000 ids each (the codec's bound)."""
    return [AckEvent(ch, tuple(ids[i : i + 1000]), hlc, origin) for i in range(0, len(ids), 1000)]
