"""The console entry point's event loop choice (relay/entry.py)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from relay.entry import _new_loop


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
