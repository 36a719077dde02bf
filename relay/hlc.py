"""Hybrid logical clock.

A timestamp is one 64-bit integer, ``physical_ms << 16 | logical``: it sorts like a tuple,
stays close to wall time, and never goes backwards. ``ts`` on the wire is the physical
part (milliseconds); the full value orders messages inside the relay.
"""

from __future__ import annotations

LOGICAL_BITS = 16


def physical_ms(hlc: int) -> int:
    """The wall-clock part of ``hlc``, in milliseconds since the epoch."""
    return hlc >> LOGICAL_BITS


def from_ms(ms: int) -> int:
    """The smallest timestamp at wall time ``ms``."""
    return ms << LOGICAL_BITS


class HybridClock:
    """Issues strictly increasing timestamps from a wall clock the caller reads.

    Call :meth:`tick` with the current wall time for every local event, and
    :meth:`observe` with every timestamp received from elsewhere, so that local events
    always sort after what this node has seen.
    """

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def tick(self, wall_ms: int) -> int:
        """Return a timestamp above every one issued or observed so far."""
        wall = wall_ms << LOGICAL_BITS
        # When the logical counter overflows, the carry moves the physical part on by
        # one millisecond: still monotonic, still close to wall time.
        self.last = wall if wall > self.last else self.last + 1
        return self.last

    def observe(self, remote: int) -> None:
        """Move the clock past a timestamp seen from another node or region."""
        if remote > self.last:
            self.last = remote
