"""The node's read path does not evaluate Autobahn's debug-log arguments per read.

Autobahn's ``WebSocketAdapterProtocol.dataReceived`` builds a debug line's arguments (an
``inspect`` walk, two ``click.style`` calls) on every read even with debug logging off:
~3 % of a node's CPU at 5 k msgs/s. The node hands the bytes to the parser itself."""

from __future__ import annotations

from typing import Any

import autobahn.twisted.websocket as atws
import pytest

from tests.unit.relay.test_late_replies import connect, factory, masked, text_frames


def test_reads_do_not_build_autobahns_debug_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> str:
        raise AssertionError("a debug-log argument was built on the read path")

    f, clock = factory()
    p, t = connect(f, clock)  # (Autobahn's connectionMade builds them once: not a read)
    monkeypatch.setattr(atws, "hltype", refuse)
    monkeypatch.setattr(atws, "hlval", refuse)
    p.dataReceived(masked(b'{"op":"sub","ch":"c"}'))
    clock.advance(0)
    assert [r["op"] for r in text_frames(t.value())] == ["subscribed"]
