"""Console-script entry point: install Twisted's asyncio reactor before anything else.

Nothing here may import ``twisted.internet.reactor`` (directly or through another
module) before :func:`install_reactor` ran, or Twisted installs its default reactor.
"""

from __future__ import annotations

# Imports inside functions here are lazy on purpose (tests/unit/test_layers.py allows them
# only at the top layer): the CLI starts fast, and the reactor is installed before
# Twisted loads (relay/entry.py). None hides a cycle.
import os
import sys
from typing import Any


def install_reactor() -> None:
    """Install the asyncio reactor once; a no-op when it is already installed."""
    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor

        if type(reactor).__name__ != "AsyncioSelectorReactor":
            raise RuntimeError(
                f"a {type(reactor).__name__} reactor was installed before relay could "
                "install the asyncio reactor"
            )
        return
    import asyncio

    from twisted.internet import asyncioreactor

    # The asyncio reactor wants a selector event loop (uvloop or the default one).
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    from twisted.internet import reactor

    steady_clock(reactor, loop)


def steady_clock(reactor: Any, loop: Any) -> None:
    """Run Twisted's timers on the event loop's monotonic clock instead of the wall clock.

    Twisted's ``reactor.seconds`` is ``time.time``: when NTP steps the wall clock back (a
    VM resumed, ``chrony makestep``), every ``callLater`` waits that much longer — mesh
    request timeouts, mesh pings, redials, hello timers. Every deadline relay checks is
    monotonic, or is a wall-clock time whose timer looks at the wall clock again at
    least every ``EXPIRY_RECHECK_S`` (a token's expiry, relay/ws.py), so nothing here
    needs Twisted's timers on wall time. Call it before anything is scheduled."""
    if reactor.getDelayedCalls():
        raise RuntimeError("steady_clock: calls are already scheduled on the wall clock")
    reactor.seconds = loop.time


def _new_loop() -> Any:
    """The default asyncio loop, or uvloop's when ``RELAY_EVENT_LOOP=uvloop`` and it is
    installed (docs/BENCHMARKS.md measures both)."""
    import asyncio

    if os.environ.get("RELAY_EVENT_LOOP", "") == "uvloop":
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            print("relay: RELAY_EVENT_LOOP=uvloop but uvloop is not installed", file=sys.stderr)
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def main() -> None:
    install_reactor()
    from relay.cli import cli

    cli()


if __name__ == "__main__":
    main()
