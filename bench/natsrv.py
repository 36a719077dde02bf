"""nats-server processes for the side-by-side benches: a JetStream hub and a leaf.

``relay bench replication`` compares a relay link with a NATS JetStream *mirror* between
two servers: the origin stream lives on a hub server (JetStream domain ``hub``); a
second server (domain ``leaf``) dials the hub's leafnode port — through the project's
WAN proxy — and holds a stream with ``mirror: {name: ORIGIN, external: {api:
"$JS.hub.API"}}``, which pulls the origin's messages across. Both listen on loopback
only, each in its own temporary directory, and are stopped (SIGTERM, then SIGKILL) when
the context ends.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NATS_SERVER = "nats-server"


class NatsServerMissing(RuntimeError):
    """No ``nats-server`` on the PATH: a NATS figure cannot be measured."""


def find_nats_server() -> str | None:
    """The path of ``nats-server`` on the PATH, or None."""
    return shutil.which(NATS_SERVER)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class NatsServer:
    name: str
    port: int
    leaf_port: int
    proc: subprocess.Popen[bytes]
    directory: Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)  # the server is starting
    raise RuntimeError(f"nats-server did not listen on {port} within {timeout_s}s")


def _config(name: str, port: int, domain: str, store: Path, leaf: str) -> str:
    return f"""
server_name: {name}
listen: 127.0.0.1:{port}
max_payload: 8MB
jetstream {{
  domain: {domain}
  store_dir: "{store}"
  max_memory_store: 4GB
  max_file_store: 16GB
}}
{leaf}
"""


def _start(name: str, domain: str, leaf: str, leaf_port: int, binary: str) -> NatsServer:
    directory = Path(tempfile.mkdtemp(prefix=f"relay-nats-{name}-"))
    port = free_port()
    conf = directory / "nats.conf"
    conf.write_text(_config(name, port, domain, directory / "js", leaf))
    proc = subprocess.Popen(
        [binary, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=(directory / "log").open("wb"),
    )
    server = NatsServer(name, port, leaf_port, proc, directory)
    try:
        _wait_port(port, proc, 10)
        if leaf_port and "listen" in leaf:
            _wait_port(leaf_port, proc, 10)
    except Exception:
        stop(server)
        raise
    return server


def stop(server: NatsServer) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    shutil.rmtree(server.directory, ignore_errors=True)


def start_hub() -> NatsServer:
    """The origin's server: JetStream domain ``hub``, a leafnode port on loopback."""
    binary = find_nats_server()
    if binary is None:
        raise NatsServerMissing("nats-server is not on the PATH")
    leaf_port = free_port()
    return _start("hub", "hub", f"leafnodes {{ listen: 127.0.0.1:{leaf_port} }}", leaf_port, binary)


def start_leaf(hub_leaf_port: int) -> NatsServer:
    """The destination's server (domain ``leaf``), dialling the hub's leafnode port (pass
    the WAN proxy's port to put the WAN between them)."""
    binary = find_nats_server()
    if binary is None:
        raise NatsServerMissing("nats-server is not on the PATH")
    leaf = f'leafnodes {{ remotes: [ {{ url: "nats://127.0.0.1:{hub_leaf_port}" }} ] }}'
    return _start("leaf", "leaf", leaf, 0, binary)


@contextlib.contextmanager
def hub_and_leaf(via_port: int | None = None) -> Iterator[tuple[NatsServer, NatsServer]]:
    """A hub and a leaf; the leaf dials ``via_port`` (a proxy to the hub's leafnode port)
    when given. Use ``start_hub`` first when the proxy must know the port."""
    hub = start_hub()
    try:
        leaf = start_leaf(via_port or hub.leaf_port)
        try:
            yield hub, leaf
        finally:
            stop(leaf)
    finally:
        stop(hub)
