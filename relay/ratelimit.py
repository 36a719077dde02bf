"""Token bucket: ``rate_per_s`` tokens a second, at most ``burst`` saved up."""

from __future__ import annotations


class TokenBucket:
    """A bucket the caller feeds with the current monotonic time in seconds."""

    __slots__ = ("_last", "_tokens", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: float, now_s: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = now_s

    def take(self, now_s: float, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if there are that many; say whether it was allowed."""
        elapsed = now_s - self._last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_s)
            self._last = now_s
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def tokens(self, now_s: float) -> float:
        """Tokens available at ``now_s`` (does not spend any)."""
        elapsed = max(0.0, now_s - self._last)
        return min(self.burst, self._tokens + elapsed * self.rate_per_s)
