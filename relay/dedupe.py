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
    """Ids seen within the window, with the timestamp they were accepted at."""

    __slots__ = ("_hlc", "_order", "forgotten_early", "max_ids", "window_ms")

    def __init__(self, *, window_ms: int, max_ids: int) -> None:
        if window_ms < 0 or max_ids < 1:
            raise ValueError("window_ms must be >= 0 and max_ids >= 1")
        self.window_ms = window_ms
        self.max_ids = max_ids
        self._hlc: dict[str, int] = {}
        # Keys in the order they were remembered; acceptance times are nearly in order,
        # so expiring from the left is close to exact (late expiry only keeps ids longer).
        self._order: deque[str] = deque()
        self.forgotten_early = 0

    def __len__(self) -> int:
        return len(self._hlc)

    def remember(self, key: str, hlc: int, now_ms: int) -> None:
        """Remember ``key``, accepted at ``hlc``, if its window has not passed yet."""
        if physical_ms(hlc) + self.window_ms <= now_ms:
            return
        known = self._hlc.get(key)
        if known is not None and physical_ms(known) + self.window_ms > now_ms:
            return  # still remembered from within its window
        # New, or an entry whose window passed but expire() has not reached yet (the id
        # was accepted again since): remember the new acceptance. The key may then stand
        # twice in _order; expire() stops at an entry still in its window, so the newer
        # one is never dropped early by the older occurrence.
        self._hlc[key] = hlc
        self._order.append(key)
        while len(self._hlc) > self.max_ids:
            old = self._order.popleft()
            if self._hlc.pop(old, None) is not None:
                self.forgotten_early += 1

    def lookup(self, key: str, now_ms: int) -> int | None:
        """The timestamp ``key`` was accepted at, if it is within the window."""
        hlc = self._hlc.get(key)
        if hlc is None or physical_ms(hlc) + self.window_ms <= now_ms:
            return None
        return hlc

    def expire(self, now_ms: int, *, limit: int = 100_000) -> int:
        """Forget ids whose window has passed (at most ``limit`` per call)."""
        n = 0
        order = self._order
        table = self._hlc
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
