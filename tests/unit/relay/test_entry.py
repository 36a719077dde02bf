"""The console entry point's event loop choice (relay/entry.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from relay.entry import _new_loop, steady_clock


def test_the_default_loop_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_EVENT_LOOP", raising=False)
    loop = _new_loop()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)
    finally:
        loop.close()


def test_uvloop_asked_but_missing_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAY_EVENT_LOOP", "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    loop = _new_loop()
    try:
        assert "uvloop" not in type(loop).__module__
    finally:
        loop.close()
    assert "uvloop is not installed" in capsys.readouterr().err


def test_uvloop_when_asked_and_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.setenv("RELAY_EVENT_LOOP", "uvloop")
    loop = _new_loop()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()


def test_the_entry_points_reactor_keeps_time_on_the_monotonic_clock() -> None:
    """A node's Twisted timers (mesh timeouts and pings, hello timers) must not wait out a
    backward step of the wall clock: in a fresh interpreter, after install_reactor, the
    reactor's clock is the loop's monotonic one and a callLater fires on it."""
    code = textwrap.dedent(
        """
        import time
        from relay.entry import install_reactor
        install_reactor()
        from twisted.internet import reactor
        assert abs(reactor.seconds() - time.monotonic()) < 1.0, reactor.seconds()
        assert abs(reactor.seconds() - time.time()) > 1000.0
        fired = []
        t0 = time.monotonic()
        reactor.callLater(0.05, lambda: fired.append(time.monotonic() - t0))
        reactor.callLater(0.05, lambda: reactor.callLater(0.05, reactor.stop))
        reactor.callLater(5.0, reactor.stop)  # a bound, should the timers not fire
        reactor.run()
        assert fired and 0.04 <= fired[0] < 2.0, fired
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_steady_clock_refuses_once_calls_are_scheduled_on_the_wall_clock() -> None:
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    loop = asyncio.new_event_loop()
    try:
        r = AsyncioSelectorReactor(loop)
        r.callLater(10, lambda: None)
        with pytest.raises(RuntimeError, match="already scheduled"):
            steady_clock(r, loop)
        fresh = AsyncioSelectorReactor(loop)
        steady_clock(fresh, loop)
        assert fresh.seconds() == pytest.approx(loop.time(), abs=1.0)
    finally:
        loop.close()
