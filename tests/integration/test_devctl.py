"""relay.devctl: the control socket of `relay dev`, over a real Unix socket."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from relay.devctl import ControlServer, ControlUnreachable, request


def serve_in_thread(server: ControlServer, n: int) -> threading.Thread:
    def run() -> None:
        for _ in range(n):
            server.serve_once(5.0)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_request_and_answer(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def handle(doc: dict[str, Any]) -> dict[str, Any]:
        seen.append(doc)
        return {"ok": True, "echo": doc["cmd"]}

    server = ControlServer(tmp_path / "c.sock", handle)
    try:
        assert (tmp_path / "c.sock").stat().st_mode & 0o077 == 0  # only its owner
        t = serve_in_thread(server, 1)
        assert request(tmp_path / "c.sock", {"cmd": "nodes"}, timeout_s=5) == {
            "ok": True,
            "echo": "nodes",
        }
        t.join(5)
        assert seen == [{"cmd": "nodes"}]
    finally:
        server.close()
    assert not (tmp_path / "c.sock").exists()


def test_a_bad_request_is_answered_not_fatal(tmp_path: Path) -> None:
    server = ControlServer(tmp_path / "c.sock", lambda doc: {"ok": True})
    try:
        t = serve_in_thread(server, 2)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(tmp_path / "c.sock"))
            s.sendall(b"[1, 2]\n")
            answer = s.recv(4096)
        assert b'"ok": false' in answer and b"bad request" in answer
        assert request(tmp_path / "c.sock", {"cmd": "x"}, timeout_s=5) == {"ok": True}
        t.join(5)
    finally:
        server.close()


def test_nobody_listening_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(ControlUnreachable, match="no relay dev answers"):
        request(tmp_path / "none.sock", {"cmd": "nodes"}, timeout_s=5)
