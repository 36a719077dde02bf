"""``relay bench region``: one region of three real nodes, under load and through kill -9.

A region is started with :class:`relay.dev.DevCluster` (a real Redis and three
``relay serve`` processes on loopback), settled (every node sees the same members and
together they own every slot, as the owner records in Redis say), then:

throughput
    ``pairs`` publisher connections and ``pairs`` subscriber connections, one channel per
    pair. The channel's owner is node *k*, its publisher is connected to node *k+1* and its
    subscriber to node *k+2*: every message crosses the mesh twice (publisher's node →
    owner → subscriber's node). Publishers keep ``window`` ``pub``s outstanding (closed
    loop) or send at a fixed total rate (``paced``); the body starts with the send time
    (``perf_counter_ns``, 20 digits), so the subscriber measures publish → delivery.
    Subscribers ack what they received every 50 ms, so nothing piles up. Figures: messages
    delivered per second in the measured window, p50/p99 publish → delivery and publish →
    ``puback``, and the CPU each process used (nodes, Redis, the load generator, and the
    whole machine).
failover
    With two SDK clients (:class:`relay.client.RelayClient`) on a surviving node
    publishing continuously at ``ack=mem`` and at ``ack=log`` to channels owned by the
    victim, the victim gets ``SIGKILL``. Figures: seconds from the kill to the first
    ``puback`` of a publish sent after it; to the moment no owner record names the victim;
    and, after the region settles on the two survivors, the acknowledged ids missing when
    the channels are read through the survivor the publishers did not use.

The load generator is this process (no node runs in it): hand-built frames over raw
asyncio sockets for the throughput part (:mod:`bench.wire`), the SDK for the failover part.
Loopback only, bounded in time, every process stopped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import click
import msgspec
import psutil
import redis
import redis.asyncio

from bench.procs import report, tail_on_failure
from bench.wire import OP_CLOSE, OP_PING, OP_PONG, FrameReader, Masker, handshake_request
from cluster.keys import lease_key
from cluster.redisconn import connect, connect_sync
from cluster.ring import slot_of
from cluster.status import owners
from relay.cli_dev import redis_cluster_option
from relay.client import (
    ClientError,
    ClientTimeout,
    ConnectionLostError,
    RelayClient,
    RelayErrorReply,
    RetryPolicy,
)
from relay.dev import DevCluster
from relay.redis_server import RedisClusterServers

ROOT = Path(__file__).resolve().parents[1]
REGION = "bench"
SLOTS = 256
TS_DIGITS = 20
ACK_EVERY_S = 0.05
# Limits a node would otherwise apply to one connection: raised (as bench/procs.py does for
# one node) so that the region, not a per-connection guard, is what is measured; channel
# caps raised so that nothing published during the failover is evicted before it is counted.
NODE_ENV = {
    "RELAY_CLIENT__RATE_PER_S": "100000000.0",
    "RELAY_CLIENT__BURST": "100000000",
    "RELAY_CLIENT__MAX_OUTBOUND_BYTES": "1073741824",
    "RELAY_STORE__CHANNEL_MAX_MESSAGES": "100000000",
    "RELAY_STORE__CHANNEL_MAX_BYTES": "100000000000",
}
# Retries of a publish refused `unavailable` while the owner is dead: often, so that the
# first success after the failover is seen within ~0.1 s of when it became possible.
FAILOVER_RETRY = RetryPolicy(
    max_attempts=1_000_000, base_delay_s=0.02, max_delay_s=0.1, reconnect_timeout_s=30.0
)


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


def _med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def _pct(sorted_xs: list[float], q: float, nd: int | None = None) -> float | None:
    """The ``q`` quantile (nearest rank) of ``sorted_xs``; rounded to ``nd`` digits if given."""
    if not sorted_xs:
        return None
    x = sorted_xs[min(len(sorted_xs) - 1, max(0, round(q * (len(sorted_xs) - 1))))]
    return x if nd is None else round(x, nd)


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def source() -> dict[str, Any]:
    """The commit the nodes run, and the files of relay/ and cluster/ changed since."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        changed = git("status", "--porcelain", "--", "relay", "cluster").splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"head": head, "uncommitted": [line[3:] for line in changed]}


# -- the region -------------------------------------------------------------------------


@dataclass
class Region:
    """A started, settled region of real processes."""

    cluster: DevCluster
    nodes: list[dict[str, Any]]  # {"id", "ws", "admin", "pid"}
    redis_url: str
    settings: dict[str, Any]

    def redis_pid(self) -> int | None:
        found = self.redis_pids()
        return found.get("redis")

    def redis_pids(self) -> dict[str, int]:
        """``{"redis": pid}`` for one server; ``{"redis:<port>": pid}`` for each node of
        a Redis Cluster (primaries and replicas)."""
        served = self.cluster.redis[REGION]
        if isinstance(served, RedisClusterServers):
            return {f"redis:{s.port}": s.proc.pid for s in served.servers if s.proc is not None}
        return {"redis": served.proc.pid} if served.proc is not None else {}

    def owner_table(self) -> list[str | None]:
        with connect_sync(self.redis_url) as r:
            return [o for o, _ in owners(r, REGION, SLOTS)]

    def channels_owned_by(self, node_id: str, n: int, prefix: str) -> list[str]:
        """``n`` channel names whose slot ``node_id`` owns now (per the owner records)."""
        table = self.owner_table()
        out: list[str] = []
        i = 0
        while len(out) < n:
            ch = f"{prefix}{i}"
            if table[slot_of(ch, SLOTS)] == node_id:
                out.append(ch)
            i += 1
        return out


def _status(admin: str) -> dict[str, Any]:
    with urllib.request.urlopen(admin + "/status", timeout=5) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def settled(redis_url: str, live: list[dict[str, Any]]) -> bool:
    """Every live node sees exactly the live members, has nothing in flight to Redis, and
    owns what the owner records say; together they own every slot."""
    try:
        docs = [_status(n["admin"]) for n in live]
        with connect_sync(redis_url) as r:
            records = Counter(o for o, _ in owners(r, REGION, SLOTS))
    except (OSError, redis.RedisError):
        return False
    ids = {n["id"] for n in live}
    total = 0
    for n, d in zip(live, docs, strict=True):
        c = d["cluster"]
        alive = {m for m, s in c["members"].items() if s in ("alive", "suspect")}
        if alive != ids or c["batcher"]["in_flight"] or records.get(n["id"], 0) != c["owned_slots"]:
            return False
        total += c["owned_slots"]
    return total == SLOTS


def wait_settled(redis_url: str, live: list[dict[str, Any]], timeout_s: float) -> float:
    """Seconds it took; raises TimeoutError."""
    t0 = time.monotonic()
    while not settled(redis_url, live):
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"region did not settle on {[n['id'] for n in live]}")
        time.sleep(0.05)  # poll interval
    return time.monotonic() - t0


@contextlib.contextmanager
def _children_output_to(path: Path) -> Iterator[None]:
    """Processes started inside inherit ``path`` as stdout and stderr (our ``--json``
    stdout stays one document; node logs do not flood the terminal)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        os.close(fd)


@contextlib.contextmanager
def _env(extra: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _cwd(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def region(
    settings: dict[str, Any],
    log_path: Path,
    nodes: int = 3,
    timeout_s: float = 60.0,
    relay_root: str | None = None,
    redis_cluster: int = 0,
) -> Iterator[Region]:
    """A region of ``nodes`` node processes and one Redis (``redis_cluster`` > 0: a Redis
    Cluster of that many primaries, a replica each), settled; all stopped on exit.

    ``relay_root``: run the nodes with the ``relay/`` and ``cluster/`` found there
    (``python -m`` puts the working directory first on ``sys.path``), e.g. a patched copy.
    """
    cluster = DevCluster(
        [REGION], nodes_per_region=nodes, cluster_settings=settings, redis_cluster=redis_cluster
    )
    env = dict(NODE_ENV)
    if relay_root is not None:
        relay_root = os.path.abspath(relay_root)
        env["PYTHONPATH"] = relay_root + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        with _children_output_to(log_path), _env(env), _cwd(relay_root):
            doc = cluster.start(timeout_s=timeout_s)
        r = doc["regions"][REGION]
        reg = Region(cluster, r["nodes"], r["redis"], settings)
        wait_settled(reg.redis_url, reg.nodes, timeout_s)
        yield reg
    finally:
        cluster.stop()


# -- CPU accounting ----------------------------------------------------------------------


def _proc_times(pid: int) -> tuple[float, float]:
    """(CPU seconds, seconds runnable but waiting for a core) of a live process."""
    try:
        t = psutil.Process(pid).cpu_times()
        cpu = float(t.user + t.system)
    except psutil.Error:
        return 0.0, 0.0
    try:
        wait = int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        wait = 0.0
    return cpu, wait


def _machine_busy_s() -> tuple[float, float]:
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)
    return total - idle, total


@dataclass
class CpuSample:
    pids: dict[str, int]
    t: float = 0.0
    procs: dict[str, tuple[float, float]] = field(default_factory=dict)
    machine: tuple[float, float] = (0.0, 0.0)

    def take(self) -> CpuSample:
        s = CpuSample(self.pids, time.monotonic())
        s.procs = {name: _proc_times(pid) for name, pid in self.pids.items()}
        s.machine = _machine_busy_s()
        return s


def cpu_between(a: CpuSample, b: CpuSample) -> dict[str, Any]:
    """Per process: share of one core used (``cpu``) and spent waiting for one (``wait``);
    ``machine``: share of all cores busy (every process on the machine, ours or not)."""
    secs = b.t - a.t
    out: dict[str, Any] = {}
    for name in a.procs:
        c0, w0 = a.procs[name]
        c1, w1 = b.procs.get(name, (c0, w0))
        out[name] = {"cpu": round((c1 - c0) / secs, 3), "wait": round((w1 - w0) / secs, 3)}
    busy = b.machine[0] - a.machine[0]
    total = b.machine[1] - a.machine[1]
    out["machine_busy"] = round(busy / total, 3) if total else None
    # Cores' worth of CPU that processes other than ours used meanwhile (other work on a
    # shared machine): what our processes could not have.
    ours = sum(v["cpu"] for v in out.values() if isinstance(v, dict))
    cores = os.cpu_count() or 1
    out["others_cores"] = round(max(0.0, busy / total * cores - ours), 3) if total else None
    return out


# -- a lean WebSocket client -------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One raw client connection: handshake, then every text frame to ``on_text``."""

    def __init__(self, host: str, port: int, path: str) -> None:
        loop = asyncio.get_running_loop()
        self.request = handshake_request(host, port, path, None)
        self.masker = Masker()
        self.reader = FrameReader(self._frame)
        self.on_text: Callable[[bytes], None] = lambda _payload: None
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.opened.done():
            self.reader.feed(data)
            return
        self._head += data
        i = self._head.find(b"\r\n\r\n")
        if i < 0:
            return
        status = self._head.split(b"\r\n", 1)[0]
        rest, self._head = self._head[i + 4 :], b""
        if b" 101 " not in status:
            self.opened.set_exception(ConnectionError(f"handshake refused: {status!r}"))
            if self.transport is not None:
                self.transport.abort()
            return
        self.opened.set_result(None)
        if rest:
            self.reader.feed(rest)

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.send_frames([self.masker.frame(payload, OP_PONG)])
        elif opcode < OP_CLOSE:
            self.on_text(payload)

    def send_frames(self, frames: list[bytes]) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def send(self, payload: bytes) -> None:
        self.send_frames([self.masker.frame(payload)])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def _connect(url: str, timeout_s: float = 10.0) -> _Conn:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Conn(host, port, u.path or "/"), host, port)
    await asyncio.wait_for(conn.opened, timeout_s)
    return conn


class _Obj(msgspec.Struct):
    """The fields of node → client objects this generator reads (the rest is skipped)."""

    op: str
    id: str = ""
    body: str = ""
    pending: int = 0
    code: str = ""
    reason: str = ""


_decode = msgspec.json.Decoder(_Obj | list[_Obj]).decode


def _objects(payload: bytes) -> list[_Obj]:
    data = _decode(payload)
    return data if isinstance(data, list) else [data]


# -- throughput --------------------------------------------------------------------------


@dataclass
class _Window:
    running: bool = True
    measuring: bool = False
    delivered: int = 0
    pubacks: int = 0
    errors: int = 0
    skipped: int = 0  # paced publishes not sent: their publisher had ``cap`` outstanding
    error_codes: Counter[str] = field(default_factory=Counter)
    lat_ns: list[int] = field(default_factory=list)
    puback_ns: list[int] = field(default_factory=list)


class _Publisher:
    def __init__(
        self, conn: _Conn, ch: str, ack: str, tag: str, body_bytes: int, w: _Window
    ) -> None:
        self.conn = conn
        self.w = w
        self.window = 0  # closed loop: keep this many outstanding (0: paced)
        self.prefix = b'{"op":"pub","ch":"%s","ack":"%s","id":"%s-' % (
            ch.encode(),
            ack.encode(),
            tag.encode(),
        )
        pad = max(0, body_bytes - TS_DIGITS)
        self.suffix = (b"x" * pad) + b'"}'
        self.seq = 0
        self.sent_ns: deque[int] = deque()
        conn.on_text = self.on_text

    @property
    def outstanding(self) -> int:
        return len(self.sent_ns)

    def fire(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter_ns()
        frame = self.conn.masker.frame
        prefix, suffix, seq = self.prefix, self.suffix, self.seq
        frames = [
            frame(b'%s%d","body":"%020d%s' % (prefix, seq + k, now, suffix)) for k in range(n)
        ]
        self.seq = seq + n
        self.sent_ns.extend([now] * n)
        self.conn.send_frames(frames)

    def on_text(self, payload: bytes) -> None:
        ok = payload.count(b'"puback"')
        bad = payload.count(b'"op":"error"')
        n = ok + bad
        if not n:
            return
        w = self.w
        now = time.perf_counter_ns()
        sent = self.sent_ns
        if w.measuring:
            w.pubacks += ok
            if bad:
                w.errors += bad
                for o in _objects(payload):
                    if o.op == "error":
                        w.error_codes[o.code] += 1
            for _ in range(min(n, len(sent))):
                w.puback_ns.append(now - sent.popleft())
        else:
            for _ in range(min(n, len(sent))):
                sent.popleft()
        if w.running and self.window:
            self.fire(self.window - len(sent))


SUB_RETRY_CODES = frozenset({"unavailable", "overloaded"})
SUB_RETRIES = 20


class _Subscriber:
    def __init__(self, conn: _Conn, ch: str, w: _Window) -> None:
        self.conn = conn
        self.ch = ch
        self.w = w
        self.ids: list[str] = []
        self.subscribed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.sub_retries = 0
        conn.on_text = self.on_text

    def subscribe(self) -> None:
        self.conn.send(b'{"op":"sub","ch":"%s"}' % self.ch.encode())

    def refused(self, o: _Obj) -> None:
        """The ``sub`` was answered with an error: retry what the protocol says is
        retryable (a mesh connection to the owner can drop on a starved machine), fail
        fast with the code otherwise."""
        if o.code in SUB_RETRY_CODES and self.sub_retries < SUB_RETRIES:
            self.sub_retries += 1
            asyncio.get_running_loop().call_later(0.05 * self.sub_retries, self.subscribe)
        else:
            self.subscribed.set_exception(RuntimeError(f"sub {self.ch}: {o.code} {o.reason}"))

    def on_text(self, payload: bytes) -> None:
        now = time.perf_counter_ns()
        w = self.w
        for o in _objects(payload):
            if o.op == "msg":
                self.ids.append(o.id)
                if w.measuring:
                    w.delivered += 1
                    w.lat_ns.append(now - int(o.body[:TS_DIGITS]))
            elif o.op == "subscribed" and not self.subscribed.done():
                self.subscribed.set_result(o.pending)
            elif o.op == "error":
                if not self.subscribed.done():
                    self.refused(o)
                    continue
                w.errors += 1
                w.error_codes[o.code] += 1
        if len(self.ids) >= 1000:
            self.flush_acks()

    def flush_acks(self) -> None:
        ids, self.ids = self.ids, []
        for i in range(0, len(ids), 1000):
            self.conn.send(
                msgspec.json.encode({"op": "ack", "ch": self.ch, "ids": ids[i : i + 1000]})
            )


async def _hello(conn: _Conn) -> None:
    got: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_text(payload: bytes) -> None:
        if b'"welcome"' in payload and not got.done():
            got.set_result(None)

    conn.on_text = on_text
    conn.send(b'{"op":"hello","client":"bench-region"}')
    await asyncio.wait_for(got, 10)


async def _acker(subs: list[_Subscriber], w: _Window) -> None:
    while w.running:
        await asyncio.sleep(ACK_EVERY_S)
        for s in subs:
            if s.ids:
                s.flush_acks()


class Pacing(Protocol):
    """A case's window, as the pacer sees it."""

    running: bool
    measuring: bool
    skipped: int


class Paced(Protocol):
    """A publisher, as the pacer sees it."""

    @property
    def outstanding(self) -> int: ...

    def fire(self, n: int) -> None: ...


async def _pacer(pubs: Sequence[Paced], rate: float, w: Pacing, cap: int) -> None:
    """Open loop: ``rate`` publishes a second in all, round robin over the publishers;
    a publisher with ``cap`` outstanding skips its turn (counted while measuring: the
    system fell behind). Used by ``relay bench region`` and ``relay bench peer``."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sent = 0
    i = 0
    while w.running:
        await asyncio.sleep(0.002)  # pacing tick
        due = int((loop.time() - t0) * rate) - sent
        if due <= 0:
            continue
        counts = [0] * len(pubs)
        for _ in range(due):
            counts[i] += 1
            i = (i + 1) % len(pubs)
        for p, n in zip(pubs, counts, strict=True):
            if n and p.outstanding < cap:
                p.fire(n)
            elif n and w.measuring:
                w.skipped += n
        sent += due


def pair_plan(reg: Region, pairs: int, prefix: str) -> list[tuple[str, int, int, int]]:
    """(channel, owner, publisher's node, subscriber's node) by node index: three
    different nodes for every channel, owners spread evenly."""
    n = len(reg.nodes)
    per_owner = {
        k: reg.channels_owned_by(reg.nodes[k]["id"], (pairs + n - 1) // n, f"{prefix}n{k}-")
        for k in range(n)
    }
    plan = []
    for i in range(pairs):
        k = i % n
        plan.append((per_owner[k][i // n], k, (k + 1) % n, (k + 2) % n))
    return plan


async def throughput_case(
    reg: Region,
    *,
    ack: str,
    mode: str,
    pairs: int,
    window: int,
    rate: float,
    duration_s: float,
    warmup_s: float,
    body_bytes: int,
    tag: str,
) -> dict[str, Any]:
    """One measured window; ``mode`` is ``closed`` (``window`` outstanding per publisher)
    or ``paced`` (``rate`` msgs/s in all)."""
    w = _Window()
    plan = pair_plan(reg, pairs, f"bench:{tag}:")
    conns: list[_Conn] = []
    subs: list[_Subscriber] = []
    pubs: list[_Publisher] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for ch, _owner, _pi, si in plan:
            c = await _connect(reg.nodes[si]["ws"])
            conns.append(c)
            await _hello(c)
            sub = _Subscriber(c, ch, w)
            sub.subscribe()
            subs.append(sub)
        await asyncio.wait_for(asyncio.gather(*(x.subscribed for x in subs)), 30)
        for ch, _owner, pi, _si in plan:
            c = await _connect(reg.nodes[pi]["ws"])
            conns.append(c)
            await _hello(c)
            pubs.append(_Publisher(c, ch, ack, tag, body_bytes, w))
        pids = {n["id"]: int(n["pid"]) for n in reg.nodes}
        pids.update(reg.redis_pids())
        pids["loadgen"] = os.getpid()
        sampler = CpuSample(pids)
        tasks.append(asyncio.ensure_future(_acker(subs, w)))
        if mode == "closed":
            for p in pubs:
                p.window = window
                p.fire(window)
        else:
            tasks.append(asyncio.ensure_future(_pacer(pubs, rate, w, cap=max(window, 1) * 50)))
        await asyncio.sleep(warmup_s)
        a = sampler.take()
        w.measuring = True
        await asyncio.sleep(duration_s)
        w.measuring = False
        b = sampler.take()
        w.running = False
        await asyncio.sleep(0.3)  # let what is in flight arrive and be acked
        for s in subs:
            if s.ids:
                s.flush_acks()
        await asyncio.sleep(0.05)
    finally:
        w.running = False
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            c.abort()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=5)
    secs = b.t - a.t
    lat = sorted(x / 1e6 for x in w.lat_ns)
    pa = sorted(x / 1e6 for x in w.puback_ns)
    cpu = cpu_between(a, b)
    shards = [k for k in cpu if k.startswith("redis:")]
    if shards:  # a Redis Cluster: its nodes together, as one server's figure
        cpu["redis"] = {
            "cpu": round(sum(cpu[k]["cpu"] for k in shards), 3),
            "wait": round(sum(cpu[k]["wait"] for k in shards), 3),
        }
    node_cpu_s = sum(cpu[n["id"]]["cpu"] for n in reg.nodes) * secs
    redis_cpu_s = cpu["redis"]["cpu"] * secs if "redis" in cpu else 0.0
    return {
        "ack": ack,
        "mode": mode,
        "pairs": pairs,
        "window": window if mode == "closed" else None,
        "rate": rate if mode == "paced" else None,
        "seconds": round(secs, 3),
        "delivered": w.delivered,
        "msgs_per_s": round(w.delivered / secs) if secs else 0,
        "pubacks_per_s": round(w.pubacks / secs) if secs else 0,
        "errors": w.errors,
        "error_codes": dict(w.error_codes),
        "sub_retries": sum(x.sub_retries for x in subs),
        "paced_skipped": w.skipped,
        "p50_ms": _round(_pct(lat, 0.5)),
        "p99_ms": _round(_pct(lat, 0.99)),
        "max_ms": _round(lat[-1] if lat else None),
        "puback_p50_ms": _round(_pct(pa, 0.5)),
        "puback_p99_ms": _round(_pct(pa, 0.99)),
        # Node CPU (the three nodes together) per message delivered: steadier than msgs/s.
        "node_us_per_msg": round(node_cpu_s / w.delivered * 1e6, 1) if w.delivered else None,
        # Redis CPU (every node of a cluster together) per message delivered.
        "redis_us_per_msg": round(redis_cpu_s / w.delivered * 1e6, 1) if w.delivered else None,
        "cpu": cpu,
    }


def _round(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


# -- failover ----------------------------------------------------------------------------


@dataclass
class _Attempt:
    level: str
    ch: str
    id: str
    sent: float
    done: float
    ok: bool
    code: str = ""


async def _publisher_task(
    client: RelayClient,
    level: str,
    channels: list[str],
    name: str,
    out: list[_Attempt],
    stop: asyncio.Event,
    body: str,
) -> None:
    loop = asyncio.get_running_loop()
    i = 0
    while not stop.is_set():
        ch = channels[i % len(channels)]
        msg_id = f"{name}-{i}"
        i += 1
        t0 = loop.time()
        try:
            await client.publish(ch, body, ack=level, id=msg_id, timeout_s=10.0)
        except RelayErrorReply as e:
            out.append(_Attempt(level, ch, msg_id, t0, loop.time(), False, e.code))
            continue
        except (ClientTimeout, ConnectionLostError) as e:
            out.append(_Attempt(level, ch, msg_id, t0, loop.time(), False, type(e).__name__))
            continue
        out.append(_Attempt(level, ch, msg_id, t0, loop.time(), True))


async def _pending_ids(url: str, ch: str, timeout_s: float = 30.0) -> list[str]:
    """Every pending id of ``ch`` read through node ``url``, raw: duplicates kept."""
    conn = await _connect(url)
    try:
        await _hello(conn)
        ids: list[str] = []
        want: list[int] = []
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_text(payload: bytes) -> None:
            for o in _objects(payload):
                if o.op == "subscribed":
                    want.append(o.pending)
                elif o.op == "msg":
                    ids.append(o.id)
                elif o.op == "error" and not done.done():
                    done.set_exception(RuntimeError(f"sub {ch}: {o.code} {o.reason}"))
            if want and len(ids) >= want[0] and not done.done():
                done.set_result(None)

        conn.on_text = on_text
        conn.send(b'{"op":"sub","ch":"%s"}' % ch.encode())
        await asyncio.wait_for(done, timeout_s)
        return ids
    finally:
        conn.abort()


async def _watch_owners(
    reg: Region, victim: str, t_kill: float, out: dict[str, float], stop: asyncio.Event
) -> None:
    """When the victim's lease key went, and when no owner record names it any more."""
    loop = asyncio.get_running_loop()
    r = connect(reg.redis_url)
    lease = lease_key(REGION, victim)
    try:
        while not stop.is_set() and ("reowned_s" not in out or "lease_gone_s" not in out):
            if "lease_gone_s" not in out and not await r.exists(lease):
                out["lease_gone_s"] = loop.time() - t_kill
            if "reowned_s" not in out:
                pipe = r.pipeline(transaction=False)
                for s in range(SLOTS):
                    pipe.hget(f"relay:{{{REGION}:{s}}}:owner", "owner")
                names = await pipe.execute()
                if all(n is not None and n.decode() != victim for n in names):
                    out["reowned_s"] = loop.time() - t_kill
            await asyncio.sleep(0.02)  # poll interval
    finally:
        await r.aclose()


async def failover_case(
    reg: Region,
    *,
    channels: int,
    tasks_per_level: tuple[int, int],
    before_s: float,
    after_s: float,
    body_bytes: int,
    tag: str,
) -> dict[str, Any]:
    """kill -9 of node 0 while SDK clients on node 1 publish to its channels at mem and
    log; the channels are read back through node 2 once the survivors settle."""
    loop = asyncio.get_running_loop()
    victim, entry, other = reg.nodes[0], reg.nodes[1], reg.nodes[2]
    ttl_s = int(reg.settings.get("lease_ttl_ms", 3000)) / 1000
    owned = reg.channels_owned_by(victim["id"], 2 * channels, f"fo:{tag}:")
    chans = {"mem": owned[:channels], "log": owned[channels:]}
    body = "y" * body_bytes
    attempts: list[_Attempt] = []
    stop = asyncio.Event()
    clients = {
        lvl: await RelayClient.connect(entry["ws"], retry=FAILOVER_RETRY) for lvl in ("mem", "log")
    }
    watch: dict[str, float] = {}
    watch_stop = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    workers = [
        asyncio.ensure_future(
            _publisher_task(clients[lvl], lvl, chans[lvl], f"{lvl}{k}", attempts, stop, body)
        )
        for lvl, n in (("mem", tasks_per_level[0]), ("log", tasks_per_level[1]))
        for k in range(n)
    ]
    try:
        await asyncio.sleep(before_s)
        os.kill(int(victim["pid"]), signal.SIGKILL)
        t_kill = loop.time()
        watcher = asyncio.ensure_future(_watch_owners(reg, victim["id"], t_kill, watch, watch_stop))

        def first_ok(level: str) -> float | None:
            ts = [a.done for a in attempts if a.ok and a.level == level and a.sent >= t_kill]
            return min(ts) - t_kill if ts else None

        deadline = t_kill + 4 * ttl_s + 20
        while loop.time() < deadline and (first_ok("mem") is None or first_ok("log") is None):
            await asyncio.sleep(0.02)  # poll interval
        await asyncio.sleep(after_s)
    finally:
        stop.set()
        _done, pending = await asyncio.wait(workers, timeout=12)
        for t in pending:
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for c in clients.values():
            with contextlib.suppress(ClientError, OSError):
                await c.close()
    survivors = [entry, other]
    settle_s = await asyncio.to_thread(wait_settled, reg.redis_url, survivors, 60.0)
    watch_stop.set()
    if watcher is not None:
        await watcher
    result: dict[str, Any] = {
        "lease_ttl_ms": reg.settings.get("lease_ttl_ms", 3000),
        "lease_renew_ms": reg.settings.get("lease_renew_ms", 1000),
        "batch_window_ms": reg.settings.get("batch_window_ms", 100),
        "victim": victim["id"],
        "publisher_node": entry["id"],
        "read_back_node": other["id"],
        "lease_gone_s": _round(watch.get("lease_gone_s"), 3),
        "reowned_s": _round(watch.get("reowned_s"), 3),
        "settled_after_s": round(loop.time() - t_kill, 3),
        "settle_wait_s": round(settle_s, 3),
    }
    firsts = []
    for level in ("mem", "log"):
        mine = [a for a in attempts if a.level == level]
        acked = {a.id: a for a in mine if a.ok}
        after = [a.done - t_kill for a in mine if a.ok and a.sent >= t_kill]
        present: Counter[str] = Counter()
        for ch in chans[level]:
            present.update(await _pending_ids(other["ws"], ch))
        lost = [acked[i] for i in acked if i not in present]
        failed = Counter(a.code for a in mine if not a.ok)
        first = min(after) if after else None
        if first is not None:
            firsts.append(first)
        result[level] = {
            "published_acked": len(acked),
            "acked_before_kill": sum(1 for a in acked.values() if a.done < t_kill),
            "acked_per_s_before_kill": round(
                sum(1 for a in acked.values() if t_kill - 1.0 <= a.done < t_kill) / 1.0
            ),
            "failed": dict(failed),
            "first_ok_after_kill_s": _round(first, 3),
            "lost": len(lost),
            # How long before the kill the oldest lost message was acknowledged.
            "lost_acked_up_to_ms_before_kill": (
                round(max(t_kill - a.done for a in lost) * 1000, 1) if lost else None
            ),
            "lost_ids_sample": sorted(a.id for a in lost)[:5],
            "duplicates": sum(n - 1 for n in present.values() if n > 1),
            "unacked_but_stored": sum(1 for i in present if i not in acked),
        }
    result["first_ok_after_kill_s"] = _round(min(firsts) if firsts else None, 3)
    result["goal_s"] = round(ttl_s + 1.0, 3)
    return result


# -- orchestration -----------------------------------------------------------------------


def _lease_sets(specs: tuple[str, ...]) -> list[dict[str, int]]:
    out = []
    for s in specs:
        ttl, _, renew = s.partition(":")
        out.append({"lease_ttl_ms": int(ttl), "lease_renew_ms": int(renew)})
    return out


def run_region_bench(
    *,
    pairs: int,
    window_mem: int,
    window_log: int,
    paced_rate: float,
    duration_s: float,
    warmup_s: float,
    runs: int,
    failover_runs: int,
    leases: list[dict[str, int]],
    fo_channels: int,
    fo_tasks: tuple[int, int],
    fo_before_s: float,
    fo_after_s: float,
    body_bytes: int,
    node_log: Path,
    relay_root: str | None = None,
) -> dict[str, Any]:
    started = time.monotonic()
    thr: list[dict[str, Any]] = []
    fo: list[dict[str, Any]] = []
    for li, lease in enumerate(leases):
        for frun in range(max(failover_runs, 1 if li == 0 and runs else 0)):
            with region(dict(lease), node_log, relay_root=relay_root) as reg:
                if li == 0 and frun == 0:
                    for run in range(runs):
                        # Alternate the order within a run so that drift hurts both alike.
                        levels = ["mem", "log"] if run % 2 == 0 else ["log", "mem"]
                        cases = [("closed", lvl) for lvl in levels]
                        if paced_rate > 0:
                            cases += [("paced", lvl) for lvl in levels]
                        for mode, lvl in cases:
                            r = asyncio.run(
                                throughput_case(
                                    reg,
                                    ack=lvl,
                                    mode=mode,
                                    pairs=pairs,
                                    window=window_mem if lvl == "mem" else window_log,
                                    rate=paced_rate,
                                    duration_s=duration_s,
                                    warmup_s=warmup_s,
                                    body_bytes=body_bytes,
                                    tag=f"r{run}{mode[0]}{lvl}",
                                )
                            )
                            r["run"] = run
                            thr.append(r)
                            _progress(_thr_line(r, runs))
                if frun < failover_runs:
                    f = asyncio.run(
                        failover_case(
                            reg,
                            channels=fo_channels,
                            tasks_per_level=fo_tasks,
                            before_s=fo_before_s,
                            after_s=fo_after_s,
                            body_bytes=body_bytes,
                            tag=f"l{li}r{frun}",
                        )
                    )
                    f["run"] = frun
                    fo.append(f)
                    _progress(_fo_line(f, failover_runs))
    return {
        "machine": machine(),
        "source": source(),
        "settings": {
            "nodes": 3,
            "pairs": pairs,
            "window_mem": window_mem,
            "window_log": window_log,
            "paced_rate": paced_rate,
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "runs": runs,
            "failover_runs": failover_runs,
            "leases": leases,
            "body_bytes": body_bytes,
            "failover_channels_per_level": fo_channels,
            "failover_publish_tasks": {"mem": fo_tasks[0], "log": fo_tasks[1]},
            "node_env": NODE_ENV,
            "relay_root": relay_root,
        },
        "throughput": {"summary": summarize_throughput(thr), "runs": thr},
        "failover": {"summary": summarize_failover(fo), "runs": fo},
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def _thr_line(r: dict[str, Any], runs: int) -> str:
    c = r["cpu"]
    nodes = " ".join(f"{v['cpu']:.2f}" for k, v in c.items() if "/" in k)
    return (
        f"  run {r['run'] + 1}/{runs} {r['mode']:6} ack={r['ack']:3}: {r['msgs_per_s']:>7,} msgs/s"
        f"  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  puback p50 {r['puback_p50_ms']} ms"
        f"  errors {r['errors']}  CPU nodes {nodes} redis {c.get('redis', {}).get('cpu', 0):.2f}"
        f" loadgen {c['loadgen']['cpu']:.2f} others {c['others_cores']} machine {c['machine_busy']}"
    )


def _fo_line(f: dict[str, Any], runs: int) -> str:
    return (
        f"  failover run {f['run'] + 1}/{runs} "
        f"(lease {f['lease_ttl_ms']}/{f['lease_renew_ms']} ms):"
        f" first puback after kill {f['first_ok_after_kill_s']} s (goal {f['goal_s']} s),"
        f" lease gone {f['lease_gone_s']} s, re-owned {f['reowned_s']} s;"
        f" lost mem {f['mem']['lost']}/{f['mem']['published_acked']}"
        f" log {f['log']['lost']}/{f['log']['published_acked']}"
    )


def summarize_throughput(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for mode in ("closed", "paced"):
        for ack in ("mem", "log"):
            rs = [r for r in raw if r["mode"] == mode and r["ack"] == ack]
            if not rs:
                continue

            def med(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
                return _med([r[key] for r in rs if r[key] is not None])

            def med_cpu(name: str, rs: list[dict[str, Any]] = rs) -> float | None:
                return _med([r["cpu"][name]["cpu"] for r in rs if name in r["cpu"]])

            node_names = [k for k in rs[0]["cpu"] if "/" in k]
            out.append(
                {
                    "mode": mode,
                    "ack": ack,
                    "runs": len(rs),
                    "msgs_per_s": med("msgs_per_s"),
                    "p50_ms": med("p50_ms"),
                    "p99_ms": med("p99_ms"),
                    "puback_p50_ms": med("puback_p50_ms"),
                    "puback_p99_ms": med("puback_p99_ms"),
                    "node_us_per_msg": med("node_us_per_msg"),
                    "errors": sum(r["errors"] for r in rs),
                    "cpu_nodes": [med_cpu(n) for n in node_names],
                    "wait_nodes": [
                        _med([r["cpu"][n]["wait"] for r in rs if n in r["cpu"]]) for n in node_names
                    ],
                    "cpu_redis": med_cpu("redis"),
                    "cpu_loadgen": med_cpu("loadgen"),
                    "machine_busy": _med([r["cpu"]["machine_busy"] for r in rs]),
                    "others_cores": _med([r["cpu"]["others_cores"] for r in rs]),
                }
            )
    # Ratios within a run, then their median.
    for mode in ("closed", "paced"):
        ratios: dict[str, list[float]] = {"msgs_per_s": [], "p50_ms": [], "p99_ms": []}
        for run in sorted({r["run"] for r in raw}):
            by = {r["ack"]: r for r in raw if r["run"] == run and r["mode"] == mode}
            if "mem" in by and "log" in by:
                for k, xs in ratios.items():
                    if by["mem"][k] and by["log"][k] is not None:
                        xs.append(by["log"][k] / by["mem"][k])
        if ratios["msgs_per_s"]:
            out.append(
                {
                    "mode": mode,
                    "ratio": "log/mem",
                    **{k: _med(v) for k, v in ratios.items()},
                }
            )
    return out


def summarize_failover(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ttl, renew in sorted({(f["lease_ttl_ms"], f["lease_renew_ms"]) for f in raw}):
        fs = [f for f in raw if f["lease_ttl_ms"] == ttl and f["lease_renew_ms"] == renew]

        def med(get: Callable[[dict[str, Any]], Any], fs: list[dict[str, Any]] = fs) -> Any:
            return _med([get(f) for f in fs if get(f) is not None])

        out.append(
            {
                "lease_ttl_ms": ttl,
                "lease_renew_ms": renew,
                "runs": len(fs),
                "goal_s": fs[0]["goal_s"],
                "first_ok_after_kill_s": med(lambda f: f["first_ok_after_kill_s"]),
                "first_ok_after_kill_s_max": max(
                    (f["first_ok_after_kill_s"] for f in fs if f["first_ok_after_kill_s"]),
                    default=None,
                ),
                "first_ok_over_ttl": med(
                    lambda f: (
                        f["first_ok_after_kill_s"] / (f["lease_ttl_ms"] / 1000)
                        if f["first_ok_after_kill_s"] is not None
                        else None
                    )
                ),
                "lease_gone_s": med(lambda f: f["lease_gone_s"]),
                "reowned_s": med(lambda f: f["reowned_s"]),
                "mem_lost": [f["mem"]["lost"] for f in fs],
                "mem_acked": [f["mem"]["published_acked"] for f in fs],
                "mem_lost_ms_before_kill": [
                    f["mem"]["lost_acked_up_to_ms_before_kill"] for f in fs
                ],
                "log_lost": [f["log"]["lost"] for f in fs],
                "log_acked": [f["log"]["published_acked"] for f in fs],
                "duplicates": sum(f[lv]["duplicates"] for f in fs for lv in ("mem", "log")),
            }
        )
    return out


def run_cluster_compare(
    *,
    primaries: int,
    pairs: int,
    window_mem: int,
    window_log: int,
    duration_s: float,
    warmup_s: float,
    runs: int,
    body_bytes: int,
    node_log: Path,
    relay_root: str | None = None,
) -> dict[str, Any]:
    """The throughput cases (closed loop, ack=mem and ack=log) on a region whose Redis is
    one server and on one whose Redis is a cluster of ``primaries`` (a replica each),
    alternating which goes first run by run; per run, the cluster/server ratios."""
    started = time.monotonic()
    raw: list[dict[str, Any]] = []
    for run in range(runs):
        kinds = [0, primaries] if run % 2 == 0 else [primaries, 0]
        for kind in kinds:
            with region({}, node_log, relay_root=relay_root, redis_cluster=kind) as reg:
                for ack in ("mem", "log"):
                    r = asyncio.run(
                        throughput_case(
                            reg,
                            ack=ack,
                            mode="closed",
                            pairs=pairs,
                            window=window_mem if ack == "mem" else window_log,
                            rate=0,
                            duration_s=duration_s,
                            warmup_s=warmup_s,
                            body_bytes=body_bytes,
                            tag=f"r{run}k{kind}{ack}",
                        )
                    )
                    r["run"] = run
                    r["redis"] = f"cluster{kind}" if kind else "server"
                    raw.append(r)
                    _progress(
                        f"  run {run + 1}/{runs} {r['redis']:9} ack={ack}: "
                        f"{r['msgs_per_s']:>7,} msgs/s  node µs/msg {r['node_us_per_msg']}"
                        f"  redis µs/msg {r['redis_us_per_msg']}  redis CPU "
                        f"{r['cpu']['redis']['cpu']}  machine {r['cpu']['machine_busy']}"
                    )
    summary: list[dict[str, Any]] = []
    names = ["server", f"cluster{primaries}"]
    keys = ("msgs_per_s", "node_us_per_msg", "redis_us_per_msg", "p50_ms", "p99_ms")
    for name in names:
        for ack in ("mem", "log"):
            rs = [r for r in raw if r["redis"] == name and r["ack"] == ack]
            if rs:
                row: dict[str, Any] = {"redis": name, "ack": ack, "runs": len(rs)}
                for k in keys:
                    row[k] = _med([r[k] for r in rs if r[k] is not None])
                row["cpu_redis"] = _med([r["cpu"]["redis"]["cpu"] for r in rs])
                row["machine_busy"] = _med([r["cpu"]["machine_busy"] for r in rs])
                summary.append(row)
    for ack in ("mem", "log"):
        ratios: dict[str, list[float]] = {k: [] for k in keys[:3]}
        for run in range(runs):
            by = {r["redis"]: r for r in raw if r["run"] == run and r["ack"] == ack}
            if len(by) == 2:
                for k, xs in ratios.items():
                    if by["server"][k] and by[names[1]][k] is not None:
                        xs.append(by[names[1]][k] / by["server"][k])
        summary.append(
            {"ratio": f"{names[1]}/server", "ack": ack, **{k: _med(v) for k, v in ratios.items()}}
        )
    return {
        "machine": machine(),
        "source": source(),
        "settings": {
            "nodes": 3,
            "primaries": primaries,
            "pairs": pairs,
            "window_mem": window_mem,
            "window_log": window_log,
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "runs": runs,
            "body_bytes": body_bytes,
            "node_env": NODE_ENV,
        },
        "cluster_compare": {"summary": summary, "runs": raw},
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def human_compare(doc: dict[str, Any]) -> list[str]:
    st = doc["settings"]
    lines = [
        f"relay bench region --redis-cluster {st['primaries']}: 3 nodes, {st['pairs']} "
        f"publisher + {st['pairs']} subscriber connections, closed loop; one Redis server vs "
        f"a {st['primaries']}-primary cluster (a replica each), medians of {st['runs']} runs; "
        f"nproc {doc['machine']['nproc']}",
    ]
    for s in doc["cluster_compare"]["summary"]:
        if "ratio" in s:
            lines.append(
                f"  {s['ratio']} ack={s['ack']}: msgs/s {_round(s['msgs_per_s'])}  node µs/msg "
                f"{_round(s['node_us_per_msg'])}  redis µs/msg {_round(s['redis_us_per_msg'])}"
            )
            continue
        lines.append(
            f"  {s['redis']:9} ack={s['ack']}: {s['msgs_per_s']} msgs/s  node µs/msg "
            f"{s['node_us_per_msg']}  redis µs/msg {s['redis_us_per_msg']}  redis CPU "
            f"{s['cpu_redis']}  p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  machine "
            f"{s['machine_busy']}"
        )
    return lines


def human(doc: dict[str, Any]) -> list[str]:
    m = doc["machine"]
    st = doc["settings"]
    lines = [
        f"relay bench region: 3 nodes, {st['pairs']} publisher + {st['pairs']} subscriber "
        f"connections, {st['body_bytes']}-byte bodies; nproc {m['nproc']}, Python {m['python']}",
        "throughput (medians; publish → delivery across two mesh hops):",
    ]
    for s in doc["throughput"]["summary"]:
        if "ratio" in s:
            lines.append(
                f"  {s['mode']:6} {s['ratio']}: msgs/s {s['msgs_per_s']}  p50 {s['p50_ms']}"
                f"  p99 {s['p99_ms']}"
            )
            continue
        lines.append(
            f"  {s['mode']:6} ack={s['ack']:3}: {s['msgs_per_s']:>9} msgs/s  p50 {s['p50_ms']} ms"
            f"  p99 {s['p99_ms']} ms  puback p50 {s['puback_p50_ms']} p99 {s['puback_p99_ms']} ms"
            f"  node µs/msg {s['node_us_per_msg']}  CPU nodes {s['cpu_nodes']} "
            f"(waited {s['wait_nodes']}) redis {s['cpu_redis']} loadgen {s['cpu_loadgen']}"
            f" others {s['others_cores']} machine {s['machine_busy']}"
        )
    lines.append("failover (kill -9 of an owner):")
    for s in doc["failover"]["summary"]:
        lines.append(
            f"  lease {s['lease_ttl_ms']}/{s['lease_renew_ms']} ms, {s['runs']} runs: first "
            f"puback after kill median {s['first_ok_after_kill_s']} s, max "
            f"{s['first_ok_after_kill_s_max']} s (goal {s['goal_s']} s); lease gone "
            f"{s['lease_gone_s']} s, slots re-owned {s['reowned_s']} s; acked lost: "
            f"mem {s['mem_lost']} of {s['mem_acked']}, log {s['log_lost']} of {s['log_acked']}"
        )
    lines.append(f"elapsed {doc['elapsed_s']} s")
    return lines


relay_root_option = click.option(
    "--relay-root",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Run the nodes from the relay/ and cluster/ in this directory (before/after runs).",
)


@click.command("region")
@click.option("--pairs", default=30, show_default=True, help="Publisher/subscriber pairs.")
@click.option(
    "--window-mem", default=8, show_default=True, help="Pubs outstanding per publisher, ack=mem."
)
@click.option(
    "--window-log",
    default=64,
    show_default=True,
    help="Pubs outstanding per publisher, ack=log (its puback waits for the slot log).",
)
@click.option(
    "--paced-rate",
    default=1000.0,
    show_default=True,
    help="Msgs/s in all for the paced (latency) case; 0 skips it.",
)
@click.option("--duration", default=3.0, show_default=True, help="Measured seconds per case.")
@click.option("--warmup", default=1.0, show_default=True, help="Seconds before measuring.")
@click.option("--runs", default=3, show_default=True, help="Throughput runs (medians).")
@click.option("--failover-runs", default=3, show_default=True, help="Kills per lease setting.")
@click.option(
    "--leases",
    multiple=True,
    default=("1500:300", "3000:1000"),
    show_default=True,
    help="lease_ttl_ms:lease_renew_ms for the failover runs (repeat for several).",
)
@click.option("--failover-channels", default=4, show_default=True, help="Victim channels a level.")
@click.option(
    "--failover-tasks",
    type=(int, int),
    default=(8, 32),
    show_default=True,
    help="Concurrent publish loops at ack=mem and at ack=log (a log puback waits a batch).",
)
@click.option("--failover-before", default=1.5, show_default=True, help="Seconds before the kill.")
@click.option("--failover-after", default=1.0, show_default=True, help="Seconds after recovery.")
@click.option("--body-bytes", default=200, show_default=True)
@click.option(
    "--node-log",
    type=click.Path(dir_okay=False),
    default=None,
    help="Append the nodes' output here [default: a temporary file, tail shown on failure].",
)
@relay_root_option
@redis_cluster_option(
    "N > 0: instead, compare one Redis server with an N-primary Redis Cluster (a "
    "replica each): throughput, node and Redis CPU per message, closed loop, same run."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def region_cmd(
    pairs: int,
    window_mem: int,
    window_log: int,
    paced_rate: float,
    duration: float,
    warmup: float,
    runs: int,
    failover_runs: int,
    leases: tuple[str, ...],
    failover_channels: int,
    failover_tasks: tuple[int, int],
    failover_before: float,
    failover_after: float,
    body_bytes: int,
    node_log: str | None,
    relay_root: str | None,
    redis_cluster: int,
    as_json: bool,
) -> None:
    """A region of three nodes: cross-node throughput and latency at ack=mem and ack=log,
    then kill -9 of an owner (time to the first puback after it, acked messages lost)."""
    if body_bytes < TS_DIGITS:
        raise click.BadParameter(f"at least {TS_DIGITS}", param_hint="--body-bytes")
    with contextlib.ExitStack() as stack:
        if node_log is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-bench-region-"))
            log_path = Path(tmp) / "nodes.log"
        else:
            log_path = Path(node_log)
        with tail_on_failure(log_path, "the nodes'"):
            if redis_cluster:
                doc = run_cluster_compare(
                    primaries=redis_cluster,
                    pairs=pairs,
                    window_mem=window_mem,
                    window_log=window_log,
                    duration_s=duration,
                    warmup_s=warmup,
                    runs=runs,
                    body_bytes=body_bytes,
                    node_log=log_path,
                    relay_root=relay_root,
                )
                report(doc, human_compare(doc), as_json)
                return
            doc = run_region_bench(
                pairs=pairs,
                window_mem=window_mem,
                window_log=window_log,
                paced_rate=paced_rate,
                duration_s=duration,
                warmup_s=warmup,
                runs=runs,
                failover_runs=failover_runs,
                leases=_lease_sets(leases),
                fo_channels=failover_channels,
                fo_tasks=failover_tasks,
                fo_before_s=failover_before,
                fo_after_s=failover_after,
                body_bytes=body_bytes,
                node_log=log_path,
                relay_root=relay_root,
            )
    report(doc, human(doc), as_json)


def register(group: click.Group) -> None:
    group.add_command(region_cmd)


if __name__ == "__main__":
    region_cmd()
