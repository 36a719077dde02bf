"""The control socket of a running ``relay dev``: restart a node, start one, list them.

A Unix socket in the cluster's work directory (its path is in the CLI context ``relay
dev`` writes, as ``dev_control``). One request per connection: a JSON object on one
line, answered by one JSON object on one line::

    {"cmd": "nodes"}                          -> {"ok": true, "nodes": [{id, state, ...}]}
    {"cmd": "restart", "node": "sg/n2"}       -> {"ok": true, "node": {id, ws, admin, pid}}
    {"cmd": "start", "node": "sg/n4", "weight": 0}
                                              -> {"ok": true, "node": {...}}

or ``{"ok": false, "error": "…"}``. ``relay dev restart|start|nodes`` are its client.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.errors import RelayError

MAX_REQUEST_BYTES = 65536


class ControlUnreachable(RelayError):
    """No ``relay dev`` answers on that control socket."""


class ControlServer:
    """Listens on ``path``; :meth:`serve_once` answers at most one request."""

    def __init__(self, path: Path, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path = path
        self._handle = handle
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        path.chmod(0o600)
        self._sock.listen(8)

    def serve_once(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a request; answer it if one came."""
        try:
            readable, _, _ = select.select([self._sock], [], [], timeout_s)
        except InterruptedError:
            return  # a signal: the caller looks at why
        if not readable:
            return
        conn, _ = self._sock.accept()
        with conn:
            conn.settimeout(5)
            try:
                request = json.loads(_read_line(conn))
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                answer = self._handle(request)
            except (OSError, ValueError) as e:
                answer = {"ok": False, "error": f"bad request: {e}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
    return buf.split(b"\n", 1)[0]


def request(path: str | Path, doc: dict[str, Any], timeout_s: float = 90.0) -> dict[str, Any]:
    """Send ``doc`` to the ``relay dev`` listening on ``path``; its answer.

    Raises :class:`ControlUnreachable` when none listens there.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(str(path))
        except OSError as e:
            raise ControlUnreachable(f"no relay dev answers at {path} ({e.strerror})") from e
        s.sendall(json.dumps(doc).encode() + b"\n")
        try:
            line = _read_line(s)
        except OSError as e:
            raise ControlUnreachable(f"relay dev at {path} did not answer ({e})") from e
    if not line:
        raise ControlUnreachable(f"relay dev at {path} closed the connection")
    answer: dict[str, Any] = json.loads(line)
    return answer
