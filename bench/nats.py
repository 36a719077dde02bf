"""``nats-server`` processes for the side-by-side benches, and a lean NATS client.

:func:`nats_server` starts the ``nats-server`` found on ``PATH`` on a free loopback port
with JetStream on (its store in a temporary directory) and stops it on exit (``relay
bench peer``).

``relay bench replication`` compares a relay link with a NATS JetStream *mirror* between
two servers: :func:`start_hub` runs the origin stream's server (JetStream domain ``hub``);
:func:`start_leaf` runs a second server (domain ``leaf``) that dials the hub's leafnode
port — through the project's WAN proxy — and holds a stream with ``mirror: {name: ORIGIN,
external: {api: "$JS.hub.API"}}``, which pulls the origin's messages across; each in its
own temporary directory, removed by :func:`stop` (:func:`hub_and_leaf` does both).

:class:`NatsConn` speaks the NATS client protocol over a raw asyncio socket (``CONNECT``,
``SUB``, ``PUB``/``HPUB`` out; ``MSG``/``HMSG``, ``PING``, ``-ERR`` in): no client library,
so that the load generator stays as cheap on the NATS side as :mod:`bench.wire` makes it
on the relay side. :func:`create_stream` and :func:`create_push_consumer` use the JetStream
API subjects (``$JS.API.…``) directly.

Loopback only; every process started here is stopped (SIGTERM, then SIGKILL) on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.procs import stop_process

# A handler of one delivered message: (subject, reply subject, headers + payload, header
# length). Headers are left unparsed: the benchmark reads only the payload.
MsgHandler = Callable[[bytes, bytes, bytes, int], None]

NATS_SERVER = "nats-server"


class NatsServerMissing(RuntimeError):
    """No ``nats-server`` on the PATH: a NATS figure cannot be measured."""


def nats_server_path() -> str | None:
    """The ``nats-server`` executable on ``PATH`` (``None`` when there is none)."""
    return shutil.which(NATS_SERVER)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class NatsServer:
    """A running ``nats-server``; ``name``, ``leaf_port`` (0: none) and ``directory``
    (removed by :func:`stop`) are those of a hub or leaf server."""

    port: int
    proc: subprocess.Popen[bytes]
    name: str = "nats"
    leaf_port: int = 0
    directory: Path | None = None
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)


def _wait_port(proc: subprocess.Popen[bytes], port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode} before it listened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)  # poll interval
    raise TimeoutError(f"nats-server did not listen on {port} within {timeout_s}s")


@contextlib.contextmanager
def nats_server(
    executable: str | None = None, log_path: Path | None = None
) -> Iterator[NatsServer]:
    """``nats-server -js`` on a free loopback port, its store in a temporary directory."""
    exe = executable or nats_server_path()
    if exe is None:
        raise FileNotFoundError("nats-server is not on PATH")
    with tempfile.TemporaryDirectory(prefix="relay-bench-nats-") as tmp:
        port = free_port()
        conf = Path(tmp) / "nats.conf"
        store = Path(tmp) / "js"
        # Limits raised so that none binds before the server's own speed does.
        conf.write_text(
            f'listen: "127.0.0.1:{port}"\n'
            "max_payload: 1048576\n"
            "max_pending: 1073741824\n"
            f'jetstream {{ store_dir: "{store}", max_memory_store: 4294967296, '
            "max_file_store: 17179869184 }\n"
        )
        out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            [exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
        try:
            _wait_port(proc, port, 15)
            yield NatsServer(port, proc)
        finally:
            stop_process(proc)
            if log_path is not None and not isinstance(out, int):
                out.close()


# -- a JetStream hub and a leaf (relay bench replication) --------------------------------


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
    server = NatsServer(port, proc, name, leaf_port, directory)
    try:
        _wait_port(proc, port, 10)
        if leaf_port and "listen" in leaf:
            _wait_port(proc, leaf_port, 10)
    except Exception:
        stop(server)
        raise
    return server


def stop(server: NatsServer) -> None:
    """Stop a hub or leaf server and remove its directory."""
    stop_process(server.proc)
    if server.directory is not None:
        shutil.rmtree(server.directory, ignore_errors=True)


def _binary() -> str:
    binary = nats_server_path()
    if binary is None:
        raise NatsServerMissing("nats-server is not on the PATH")
    return binary


def start_hub() -> NatsServer:
    """The origin's server: JetStream domain ``hub``, a leafnode port on loopback."""
    binary = _binary()
    leaf_port = free_port()
    return _start("hub", "hub", f"leafnodes {{ listen: 127.0.0.1:{leaf_port} }}", leaf_port, binary)


def start_leaf(hub_leaf_port: int) -> NatsServer:
    """The destination's server (domain ``leaf``), dialling the hub's leafnode port (pass
    the WAN proxy's port to put the WAN between them)."""
    binary = _binary()
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


class NatsConn(asyncio.Protocol):
    """One NATS client connection: protocol lines parsed by hand, messages to handlers by
    subscription id. ``flush`` sends what ``pub``/``hpub`` gathered (one write per turn)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.out: list[bytes] = []
        self.handlers: dict[bytes, MsgHandler] = {}
        self.next_sid = 1
        self.pongs: list[asyncio.Future[None]] = []
        self.errors: list[str] = []
        self.info: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.info.done():
            self.info.set_exception(ConnectionError(f"connection lost: {exc}"))
        for f in self.pongs:
            if not f.done():
                f.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        i = 0
        n = len(buf)
        handlers = self.handlers
        while i < n:
            j = buf.find(b"\r\n", i)
            if j < 0:
                break
            c = buf[i]
            if c == 77 or c == 72:  # MSG / HMSG
                parts = buf[i:j].split(b" ")
                if c == 77:
                    hdr = 0
                    total = int(parts[-1])
                else:
                    hdr = int(parts[-2])
                    total = int(parts[-1])
                end = j + 2 + total
                if end + 2 > n:
                    break
                reply = parts[3] if len(parts) == (5 if c == 77 else 6) else b""
                h = handlers.get(parts[2])
                if h is not None:
                    h(parts[1], reply, buf[j + 2 : end], hdr)
                i = end + 2
                continue
            line = buf[i:j]
            i = j + 2
            if line == b"PING":
                self.out.append(b"PONG\r\n")
            elif line == b"PONG":
                if self.pongs:
                    f = self.pongs.pop(0)
                    if not f.done():
                        f.set_result(None)
            elif line.startswith(b"INFO "):
                if not self.info.done():
                    self.info.set_result(json.loads(line[5:]))
            elif line.startswith(b"-ERR"):
                self.errors.append(line.decode(errors="replace"))
        self.buf = buf[i:] if i < n else b""
        self.flush()

    # -- sending ----------------------------------------------------------------------

    def flush(self) -> None:
        t = self.transport
        if self.out and t is not None and not t.is_closing():
            t.write(b"".join(self.out))
            self.out.clear()

    def sub(self, subject: str, handler: MsgHandler) -> bytes:
        sid = b"%d" % self.next_sid
        self.next_sid += 1
        self.handlers[sid] = handler
        self.out.append(b"SUB %s %s\r\n" % (subject.encode(), sid))
        return sid

    def pub(self, subject: bytes, payload: bytes, reply: bytes = b"") -> None:
        if reply:
            self.out.append(b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(payload), payload))
        else:
            self.out.append(b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload))

    def hpub(self, subject: bytes, reply: bytes, headers: bytes, payload: bytes) -> None:
        """``headers``: the header block, ``NATS/1.0\\r\\n…\\r\\n\\r\\n``."""
        h = len(headers)
        self.out.append(
            b"HPUB %s %s %d %d\r\n%s%s\r\n"
            % (subject, reply, h, h + len(payload), headers, payload)
        )

    async def ping(self, timeout_s: float = 10.0) -> None:
        """Round trip to the server: everything sent before has been processed."""
        f: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pongs.append(f)
        self.out.append(b"PING\r\n")
        self.flush()
        await asyncio.wait_for(f, timeout_s)

    async def request(self, subject: str, payload: bytes, timeout_s: float = 10.0) -> bytes:
        """One request/reply (for the JetStream API); the reply's payload."""
        f: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        inbox = f"_INBOX.req.{self.next_sid}"

        def on_reply(_s: bytes, _r: bytes, data: bytes, hdr: int) -> None:
            if not f.done():
                f.set_result(data[hdr:])

        sid = self.sub(inbox, on_reply)
        self.pub(subject.encode(), payload, inbox.encode())
        self.flush()
        try:
            return await asyncio.wait_for(f, timeout_s)
        finally:
            self.handlers.pop(sid, None)
            self.out.append(b"UNSUB %s\r\n" % sid)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect(
    host: str, port: int, name: str = "relay-bench", timeout_s: float = 10.0
) -> NatsConn:
    """A connected :class:`NatsConn` (headers on, no echo), after one PING round trip."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(NatsConn, host, port)
    await asyncio.wait_for(conn.info, timeout_s)
    opts = {
        "verbose": False,
        "pedantic": False,
        "headers": True,
        "no_responders": True,
        "echo": False,
        "protocol": 1,
        "name": name,
        "lang": "python-raw",
        "version": "0",
    }
    conn.out.append(b"CONNECT %s\r\n" % json.dumps(opts).encode())
    await conn.ping(timeout_s)
    if conn.errors:
        raise ConnectionError(f"nats refused the connection: {conn.errors}")
    return conn


def _api_result(raw: bytes, what: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(raw)
    if "error" in doc:
        raise RuntimeError(f"{what}: {doc['error']}")
    return doc


async def create_stream(
    conn: NatsConn, name: str, subjects: list[str], storage: str, max_msgs: int
) -> dict[str, Any]:
    """A stream (``storage``: ``memory`` or ``file``) keeping at most ``max_msgs``
    messages, with the default two-minute ``Nats-Msg-Id`` duplicate window."""
    cfg = {
        "name": name,
        "subjects": subjects,
        "storage": storage,
        "retention": "limits",
        "discard": "old",
        "max_msgs": max_msgs,
        "max_bytes": -1,
        "max_age": 0,
        "max_consumers": -1,
        "max_msg_size": -1,
        "num_replicas": 1,
        "duplicate_window": 120_000_000_000,
    }
    raw = await conn.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(cfg).encode())
    return _api_result(raw, "stream create")


async def create_push_consumer(
    conn: NatsConn,
    stream: str,
    durable: str,
    deliver_subject: str,
    filter_subject: str,
    max_ack_pending: int,
) -> dict[str, Any]:
    """A durable push consumer with explicit ack, delivering new messages only."""
    cfg = {
        "stream_name": stream,
        "config": {
            "durable_name": durable,
            "deliver_subject": deliver_subject,
            "deliver_policy": "new",
            "ack_policy": "explicit",
            "ack_wait": 30_000_000_000,
            "max_deliver": -1,
            "filter_subject": filter_subject,
            "replay_policy": "instant",
            "max_ack_pending": max_ack_pending,
        },
    }
    raw = await conn.request(
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}", json.dumps(cfg).encode()
    )
    return _api_result(raw, "consumer create")
