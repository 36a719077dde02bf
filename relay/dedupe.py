"""Recently accepted message ids that are no longer pending.

While a message is pending, the store itself answers "seen before?". Once it is acked,
evicted or expired, its id moves here and is remembered until ``window_ms`` after it was
accepted, so a retried ``pub`` is still answered ``dup: true`` and not stored again.

Memory is bounded: at most ``max_ids`` ids are kept; past that the oldest remembered are
forgotten early, and :attr:`forgotten_early` counts them (a metric, never silent).
"""

from __future__ import annotations

from collections import deque

from relay.hlc import physical_ms


def dedupe_key(ch: str, msg_id: str) -> str:
    """The key of a message id within its channel (ids are unique per channel)."""
    # Channel names cannot contain NUL (the frame parser refuses control characters).
    return f"{ch}\x00{msg_id}"


class DedupeIndex:
    """Ids seen within the window, with the timestamp they were accepted at.

    An id remembered ``weak`` is one acked without its message pending here (a tombstone
    for a message that may still arrive, e.g. by a lagging link, or one loaded from a
    snapshot or checkpoint). Anyone allowed to ack on a channel can name any ids, so weak
    ids are held apart: at most ``max_weak`` of them (default: ``max_ids``), the oldest
    weak one forgotten first when the index is full, never an id the node accepted — a
    flood of made-up acks cannot make a retried ``pub`` of a message accepted here be
    delivered twice."""

    __slots__ = (
        "_hlc",
        "_order",
        "_weak",
        "_weak_order",
        "forgotten_early",
        "max_ids",
        "max_weak",
        "window_ms",
    )

    def __init__(self, *, window_ms: int, max_ids: int, max_weak: int | None = None) -> None:
        if window_ms < 0 or max_ids < 1 or (max_weak is not None and max_weak < 1):
            raise ValueError("window_ms must be >= 0, max_ids and max_weak >= 1")
        self.window_ms = window_ms
        self.max_ids = max_ids
        self.max_weak = max_ids if max_weak is None else max_weak
        self._hlc: dict[str, int] = {}
        # Keys in the order they were remembered; acceptance times are nearly in order,
        # so expiring from the left is close to exact (late expiry only keeps ids longer).
        self._order: deque[str] = deque()
        self._weak: dict[str, int] = {}
        self._weak_order: deque[str] = deque()
        self.forgotten_early = 0

    def __len__(self) -> int:
        return len(self._hlc) + len(self._weak)

    @property
    def weak(self) -> int:
        """How many of the ids held are weak (acked before their message was seen)."""
        return len(self._weak)

    def remember(self, key: str, hlc: int, now_ms: int, *, weak: bool = False) -> None:
        """Remember ``key``, accepted at ``hlc``, if its window has not passed yet
        (``weak``: acked before its message was seen here; see the class)."""
        if physical_ms(hlc) + self.window_ms <= now_ms:
            return
        known = self._hlc.get(key)
        if known is not None and physical_ms(known) + self.window_ms > now_ms:
            return  # still remembered from within its window
        if weak:
            if self.lookup(key, now_ms) is not None:
                return
            self._weak[key] = hlc
            self._weak_order.append(key)
            while len(self._weak) > self.max_weak or len(self) > self.max_ids:
                self._forget_oldest_weak()
            return
        early = self._weak
        if early:
            early.pop(key, None)  # now accepted here: held as any other
        # New, or an entry whose window passed but expire() has not reached yet (the id
        # was accepted again since): remember the new acceptance. The key may then stand
        # twice in _order; expire() stops at an entry still in its window, so the newer
        # one is never dropped early by the older occurrence.
        table = self._hlc
        table[key] = hlc
        self._order.append(key)
        while len(table) + len(early) > self.max_ids:
            if early:
                self._forget_oldest_weak()
                continue
            old = self._order.popleft()
            if table.pop(old, None) is not None:
                self.forgotten_early += 1

    def _forget_oldest_weak(self) -> None:
        while self._weak_order:
            old = self._weak_order.popleft()
            if self._weak.pop(old, None) is not None:
                self.forgotten_early += 1
                return

    def lookup(self, key: str, now_ms: int) -> int | None:
        """The timestamp ``key`` was accepted at, if it is within the window."""
        hlc = self._hlc.get(key)
        if hlc is None or physical_ms(hlc) + self.window_ms <= now_ms:
            hlc = self._weak.get(key)  # none accepted within the window: an early ack?
        if hlc is None or physical_ms(hlc) + self.window_ms <= now_ms:
            return None
        return hlc

    def expire(self, now_ms: int, *, limit: int = 100_000) -> int:
        """Forget ids whose window has passed (at most ``limit`` per call)."""
        n = self._expire(self._order, self._hlc, now_ms, limit)
        return n + self._expire(self._weak_order, self._weak, now_ms, limit - n)

    def _expire(self, order: deque[str], table: dict[str, int], now_ms: int, limit: int) -> int:
        n = 0
        cutoff = now_ms - self.window_ms
        while order and n < limit:
            key = order[0]
            hlc = table.get(key)
            if hlc is not None and physical_ms(hlc) > cutoff:
                break
            order.popleft()
            if hlc is not None:
                del table[key]
            n += 1
        return n
