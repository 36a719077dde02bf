"""Running a callback once the current reactor turn is over, cheaply.

``reactor.callLater(0, f)`` on Twisted's asyncio reactor makes a ``DelayedCall``, and
every call to it cancels and re-arms the asyncio timer that wakes the reactor for its
earliest call (``_reschedule``): in a cProfile of a node at 300 msgs/s that timer work
was ~8 % of its busy time (docs/BENCHMARKS.md §9). On the asyncio reactor the
loop's own ``call_soon`` does the same job, a callback after this turn's, with none of
it; any other reactor (a test's ``Clock``) gets ``callLater(0, f)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def soon(reactor: Any, f: Callable[[], None]) -> None:
    """Call ``f`` after the callbacks of the current reactor turn."""
    loop = getattr(reactor, "_asyncioEventloop", None)
    if loop is not None:
        loop.call_soon(f)
    else:
        reactor.callLater(0, f)
