"""``relay bench peer``: relay against NATS JetStream on the chat workload, one load generator.

Systems, all started before the first case and stopped at the end:

relay-1 / relay-3
    A region of one and of three ``relay serve`` processes with their Redis, started as
    :func:`bench.region.region` starts them (the nodes' per-connection guards raised), every
    publish at ``ack: "log"`` (answered once the slot-log append has returned).
nats-memory / nats-file
    One ``nats-server`` (from ``PATH``) with JetStream; per case a stream on ``memory`` or
    ``file`` storage, every publish carrying a ``Nats-Msg-Id`` (the stream's duplicate
    window is on) and answered by the stream's PubAck, and one durable push consumer per
    subscriber with explicit ack (every delivered message acked).

The workload, the same for all: ``channels`` channels (NATS subjects
``<stream>.<subscriber>.<channel>``), ``pubs`` publisher connections each cycling over all
channels, ``subs`` subscriber connections each taking ``channels / subs`` of them (relay:
``sub`` to each; NATS: a consumer filtered on ``<stream>.<k>.*``), ``body_bytes`` bodies
starting with the send time, so that the subscriber measures publish → delivery. In a
3-node region publishers and subscribers are spread over the nodes (publisher *i* on node
*i mod 3*, subscriber *k* on node *k+1 mod 3*).

Cases per system and run: ``closed`` (every publisher keeps ``window`` publishes
unanswered: the most accepted per second) and ``paced`` (``rate`` publishes a second in
all: server CPU per message, publish → ack and publish → delivery percentiles). The order
of the systems alternates from run to run; medians over runs; every ratio is taken within
a run, then its median printed. Server CPU is the processes' own CPU time (relay: the
nodes and Redis; NATS: ``nats-server``) over the measured window.

Without ``nats-server`` on ``PATH`` (or at ``--nats-server``) it says so and exits 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import click
import msgspec

from bench.nats import (
    NatsConn,
    NatsServer,
    create_push_consumer,
    create_stream,
    nats_server,
    nats_server_path,
)
from bench.nats import connect as nats_connect
from bench.procs import report, tail_on_failure
from bench.region import (
    TS_DIGITS,
    CpuSample,
    Region,
    _Conn,
    _connect,
    _hello,
    _med,
    _pacer,
    _pct,
    _progress,
    cpu_between,
    machine,
    region,
    relay_root_option,
    source,
    wait_settled,
)

EXIT_NO_NATS = 3
# Leases longer than the default 3000/1000 ms: on a machine shared with other work a node
# starved of CPU for a few seconds would lose its lease, and the case would measure the
# failover (bench/region.py measures that), not the steady state.
RELAY_SETTINGS = {"lease_ttl_ms": 10000, "lease_renew_ms": 2000}
ACK_EVERY_S = 0.05
DRAIN_S = 60.0
SYSTEMS = ("relay-1", "relay-3", "nats-memory", "nats-file")
MODES = ("closed", "paced")


@dataclass(frozen=True)
class Workload:
    channels: int = 1000
    pubs: int = 20
    subs: int = 20
    body_bytes: int = 200
    window: int = 800  # per publisher, closed loop (16 k in flight with 20)
    rate: float = 5000.0  # msgs/s in all, paced
    duration_s: float = 5.0
    warmup_s: float = 1.0

    def channel_of(self, pub: int, seq: int) -> int:
        """Publisher ``pub``'s ``seq``-th channel: every publisher cycles over all."""
        return (pub * (self.channels // max(self.pubs, 1)) + seq) % self.channels

    def subscriber_of(self, ch: int) -> int:
        return ch % self.subs

    def pad(self) -> bytes:
        return b"x" * max(0, self.body_bytes - TS_DIGITS)


@dataclass
class _Window:
    running: bool = True
    measuring: bool = False
    accepted: int = 0
    delivered: int = 0
    # Over the whole case (not only the measured window): the drain at its end waits for
    # every accepted message to be delivered and acked, so the next case starts clean.
    accepted_all: int = 0
    delivered_all: int = 0
    acking: bool = True
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    ack_ns: list[int] = field(default_factory=list)
    delivery_ns: list[int] = field(default_factory=list)
    skipped: int = 0  # paced publishes not sent (their publisher had ``cap`` unanswered)

    def error(self, what: str) -> None:
        if self.measuring:
            self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])


class _Publisher(Protocol):
    window: int

    @property
    def outstanding(self) -> int: ...

    def fire(self, n: int) -> None: ...


# -- relay ------------------------------------------------------------------------------


class _RObj(msgspec.Struct):
    op: str
    id: str = ""
    ch: str = ""
    body: str = ""
    code: str = ""
    reason: str = ""


_decode_r = msgspec.json.Decoder(_RObj | list[_RObj]).decode


def _robjects(payload: bytes) -> list[_RObj]:
    data = _decode_r(payload)
    return data if isinstance(data, list) else [data]


K = TypeVar("K", str, bytes)


class _Pub(Generic[K]):
    """What a relay and a NATS publisher share: publish ids in sequence, the sent times
    by id (``outstanding``: unanswered), the accounting of an acknowledgement and, closed
    loop, the refill to ``window`` outstanding."""

    def __init__(self, i: int, wl: Workload, w: _Window) -> None:
        self.i, self.wl, self.w = i, wl, w
        self.window = 0
        self.seq = 0
        self.sent: dict[K, int] = {}
        self.pad = wl.pad()

    @property
    def outstanding(self) -> int:
        return len(self.sent)

    def fire(self, n: int) -> None:
        raise NotImplementedError

    def _seqs(self, n: int) -> range:
        """The next ``n`` sequence numbers."""
        s = self.seq
        self.seq = s + n
        return range(s, s + n)

    def _accepted(self, t0: int | None, now: int) -> None:
        w = self.w
        w.accepted_all += 1
        if w.measuring:
            w.accepted += 1
            if t0 is not None:
                w.ack_ns.append(now - t0)

    def _refill(self) -> None:
        if self.w.running and self.window:
            self.fire(self.window - len(self.sent))


class _RelayPub(_Pub[str]):
    def __init__(self, conn: _Conn, i: int, names: list[bytes], wl: Workload, w: _Window) -> None:
        super().__init__(i, wl, w)
        self.conn, self.names = conn, names
        conn.on_text = self.on_text

    def fire(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter_ns()
        frame = self.conn.masker.frame
        frames = []
        for s in self._seqs(n):
            pid = f"p{self.i}-{s}"
            ch = self.names[self.wl.channel_of(self.i, s)]
            frames.append(
                frame(
                    b'{"op":"pub","ch":"%s","ack":"log","id":"%s","body":"%020d%s"}'
                    % (ch, pid.encode(), now, self.pad)
                )
            )
            self.sent[pid] = now
        self.conn.send_frames(frames)

    def on_text(self, payload: bytes) -> None:
        now = time.perf_counter_ns()
        w = self.w
        for o in _robjects(payload):
            t0 = self.sent.pop(o.id, None)
            if o.op == "puback":
                self._accepted(t0, now)
            elif o.op == "error":
                w.error(f"{o.code}: {o.reason}")
        self._refill()


class _RelaySub:
    def __init__(self, conn: _Conn, names: list[bytes], w: _Window) -> None:
        self.conn, self.names, self.w = conn, names, w
        self.ids: dict[str, list[str]] = {}
        self.waiting = len(names)
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn.on_text = self.on_text

    def on_text(self, payload: bytes) -> None:
        now = time.perf_counter_ns()
        w = self.w
        for o in _robjects(payload):
            if o.op == "msg":
                self.ids.setdefault(o.ch, []).append(o.id)
                w.delivered_all += 1
                if w.measuring:
                    w.delivered += 1
                    w.delivery_ns.append(now - int(o.body[:TS_DIGITS]))
            elif o.op == "subscribed":
                self.waiting -= 1
                if self.waiting == 0 and not self.subscribed.done():
                    self.subscribed.set_result(None)
            elif o.op == "error":
                w.error(f"{o.code}: {o.reason}")

    def flush_acks(self) -> None:
        ids, self.ids = self.ids, {}
        frames = []
        for ch, xs in ids.items():
            for i in range(0, len(xs), 1000):
                frames.append(
                    self.conn.masker.frame(
                        msgspec.json.encode({"op": "ack", "ch": ch, "ids": xs[i : i + 1000]})
                    )
                )
        if frames:
            self.conn.send_frames(frames)


async def _relay_setup(
    reg: Region, wl: Workload, w: _Window, tag: str
) -> tuple[list[_Publisher], list[Any], list[Any]]:
    """Subscribers subscribed, publishers connected; (publishers, flushers, connections)."""
    nodes = reg.nodes
    n = len(nodes)
    names = [b"peer:%s:%d" % (tag.encode(), c) for c in range(wl.channels)]
    subs: list[_RelaySub] = []
    conns: list[_Conn] = []
    for k in range(wl.subs):
        c = await _connect(nodes[(k + 1) % n]["ws"])
        conns.append(c)
        await _hello(c)
        mine = [names[c_] for c_ in range(wl.channels) if wl.subscriber_of(c_) == k]
        s = _RelaySub(c, mine, w)
        c.send_frames([c.masker.frame(b'{"op":"sub","ch":"%s"}' % ch) for ch in mine])
        subs.append(s)
    await asyncio.wait_for(asyncio.gather(*(s.subscribed for s in subs)), 60)
    pubs: list[_Publisher] = []
    for i in range(wl.pubs):
        c = await _connect(nodes[i % n]["ws"])
        conns.append(c)
        await _hello(c)
        pubs.append(_RelayPub(c, i, names, wl, w))
    return pubs, [s.flush_acks for s in subs], [c.abort for c in conns]


# -- NATS -------------------------------------------------------------------------------


class _NatsPub(_Pub[bytes]):
    def __init__(
        self, conn: NatsConn, i: int, subjects: list[bytes], wl: Workload, w: _Window
    ) -> None:
        super().__init__(i, wl, w)
        self.conn, self.subjects = conn, subjects
        self.inbox = b"_INBOX.p%d." % i
        conn.sub(f"_INBOX.p{i}.*", self.on_ack)

    def fire(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter_ns()
        conn = self.conn
        for s in self._seqs(n):
            token = b"%d" % s
            conn.hpub(
                self.subjects[self.wl.channel_of(self.i, s)],
                self.inbox + token,
                b"NATS/1.0\r\nNats-Msg-Id: p%d-%s\r\n\r\n" % (self.i, token),
                b"%020d%s" % (now, self.pad),
            )
            self.sent[token] = now
        conn.flush()

    def on_ack(self, subject: bytes, _reply: bytes, data: bytes, hdr: int) -> None:
        now = time.perf_counter_ns()
        w = self.w
        t0 = self.sent.pop(subject[len(self.inbox) :], None)
        if b'"error"' in data or hdr:  # a 503 "no responders" comes as headers only
            w.error(data.decode(errors="replace"))
            return
        self._accepted(t0, now)
        self._refill()


class _NatsSub:
    def __init__(self, conn: NatsConn, deliver: str, w: _Window) -> None:
        self.conn, self.w = conn, w
        conn.sub(deliver, self.on_msg)

    def on_msg(self, _subject: bytes, reply: bytes, data: bytes, hdr: int) -> None:
        now = time.perf_counter_ns()
        w = self.w
        w.delivered_all += 1
        if w.measuring:
            w.delivered += 1
            w.delivery_ns.append(now - int(data[hdr : hdr + TS_DIGITS]))
        if reply:
            self.conn.pub(reply, b"")  # explicit ack; flushed after this read


async def _nats_setup(
    srv: NatsServer, storage: str, wl: Workload, w: _Window, tag: str
) -> tuple[list[_Publisher], list[Any], list[Any], Any]:
    """Stream and consumers created, subscribers and publishers connected;
    (publishers, flushers, aborts, the stream's deleter)."""
    stream = f"PEER{tag}".replace("-", "_").upper()
    admin = await nats_connect(srv.host, srv.port, "relay-bench-admin")
    await create_stream(admin, stream, [f"{stream}.>"], storage, max_msgs=5_000_000)
    conns: list[NatsConn] = [admin]
    for k in range(wl.subs):
        c = await nats_connect(srv.host, srv.port, f"relay-bench-sub{k}")
        conns.append(c)
        deliver = f"deliver.{stream}.{k}"
        _NatsSub(c, deliver, w)
        await c.ping()
        await create_push_consumer(
            admin, stream, f"sub{k}", deliver, f"{stream}.{k}.*", max_ack_pending=1_000_000
        )
    subjects = [
        b"%s.%d.%d" % (stream.encode(), wl.subscriber_of(c_), c_) for c_ in range(wl.channels)
    ]
    pubs: list[_Publisher] = []
    for i in range(wl.pubs):
        c = await nats_connect(srv.host, srv.port, f"relay-bench-pub{i}")
        conns.append(c)
        pubs.append(_NatsPub(c, i, subjects, wl, w))
        await c.ping()

    async def delete() -> None:
        with contextlib.suppress(Exception):
            await admin.request(f"$JS.API.STREAM.DELETE.{stream}", b"")

    return pubs, [], [c.abort for c in conns], delete


# -- one case ---------------------------------------------------------------------------


async def _acker(flushers: list[Any], w: _Window) -> None:
    while w.acking:
        await asyncio.sleep(ACK_EVERY_S)
        for f in flushers:
            f()


async def _drain(w: _Window, timeout_s: float) -> float:
    """Seconds until every accepted message was delivered (-1: not within ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while w.delivered_all < w.accepted_all:
        if loop.time() - t0 > timeout_s:
            return -1.0
        await asyncio.sleep(0.02)  # poll interval
    await asyncio.sleep(0.2)  # the subscribers' last acks (every 50 ms) go out
    return round(loop.time() - t0, 2)


@dataclass
class System:
    name: str
    pids: dict[str, int]  # server processes whose CPU counts
    reg: Region | None = None
    nats: NatsServer | None = None
    storage: str = ""


async def run_case(sysm: System, mode: str, wl: Workload, tag: str) -> dict[str, Any]:
    w = _Window()
    aborts: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    delete: Any = None
    try:
        if sysm.reg is not None:
            await asyncio.to_thread(wait_settled, sysm.reg.redis_url, sysm.reg.nodes, 60)
            pubs, flushers, aborts = await _relay_setup(sysm.reg, wl, w, tag)
        else:
            assert sysm.nats is not None
            pubs, flushers, aborts, delete = await _nats_setup(sysm.nats, sysm.storage, wl, w, tag)
        sampler = CpuSample({**sysm.pids, "loadgen": os.getpid()})
        if flushers:
            tasks.append(asyncio.ensure_future(_acker(flushers, w)))
        if mode == "closed":
            for p in pubs:
                p.window = wl.window
                p.fire(wl.window)
        else:
            tasks.append(asyncio.ensure_future(_pacer(pubs, wl.rate, w, cap=wl.window * 50)))
        await asyncio.sleep(wl.warmup_s)
        a = sampler.take()
        w.measuring = True
        await asyncio.sleep(wl.duration_s)
        w.measuring = False
        b = sampler.take()
        w.running = False
        # Drain: what was accepted is delivered and acked before the next case.
        drained = await _drain(w, DRAIN_S)
        w.acking = False
        for f in flushers:
            f()
        await asyncio.sleep(0.05)
        if delete is not None:
            await delete()
    finally:
        w.running = w.acking = False
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ab in aborts:
            ab()
        await asyncio.sleep(0.05)
    secs = b.t - a.t
    cpu = cpu_between(a, b)
    server_cores = sum(cpu[k]["cpu"] for k in sysm.pids)
    acks = sorted(x / 1e6 for x in w.ack_ns)
    dels = sorted(x / 1e6 for x in w.delivery_ns)
    accepted_per_s = w.accepted / secs if secs else 0.0
    return {
        "system": sysm.name,
        "mode": mode,
        "seconds": round(secs, 3),
        "accepted": w.accepted,
        "accepted_per_s": round(accepted_per_s),
        "delivered_per_s": round(w.delivered / secs) if secs else 0,
        "server_cores": round(server_cores, 3),
        "per_core": round(accepted_per_s / server_cores) if server_cores > 0.01 else None,
        "server_us_per_msg": (
            round(server_cores * secs / w.accepted * 1e6, 1) if w.accepted else None
        ),
        "ack_p50_ms": _pct(acks, 0.5, 3),
        "ack_p99_ms": _pct(acks, 0.99, 3),
        "delivery_p50_ms": _pct(dels, 0.5, 3),
        "delivery_p99_ms": _pct(dels, 0.99, 3),
        "drain_s": drained,
        "errors": w.errors,
        "error_samples": w.error_samples,
        "cpu": cpu,
    }


# -- orchestration ----------------------------------------------------------------------


@contextlib.contextmanager
def relay_system(name: str, log_path: Path, relay_root: str | None) -> Iterator[System]:
    """A fresh region for one case: a node carries what earlier cases left (the acks'
    tombstones kept for the dedupe window go into every checkpoint of a changed slot),
    so every case starts from an empty region and an empty Redis, as NATS starts from an
    empty stream."""
    n = int(name.split("-")[1])
    with region(dict(RELAY_SETTINGS), log_path, nodes=n, relay_root=relay_root) as reg:
        pids = {nd["id"]: int(nd["pid"]) for nd in reg.nodes}
        rpid = reg.redis_pid()
        if rpid is not None:
            pids["redis"] = rpid
        yield System(name, pids, reg=reg)


@contextlib.contextmanager
def nats_systems(names: list[str], nats_exe: str, log_path: Path) -> Iterator[dict[str, System]]:
    """One ``nats-server`` per NATS system for the whole run (each case has its own stream)."""
    out: dict[str, System] = {}
    with contextlib.ExitStack() as stack:
        for name in names:
            if name.startswith("nats-"):
                srv = stack.enter_context(nats_server(nats_exe, log_path))
                storage = name.split("-")[1]
                out[name] = System(name, {"nats-server": srv.pid}, nats=srv, storage=storage)
        yield out


def wait_quiet(pids: dict[str, int], timeout_s: float = 60.0, cores: float = 0.15) -> float:
    """Wait until the servers use less than ``cores`` together (what the previous case
    left them, e.g. deliveries still queued, is done); the seconds it took, or -1 when
    they did not quiet down in time (the case then runs anyway; the document says so)."""
    t0 = time.monotonic()
    sampler = CpuSample(pids)
    a = sampler.take()
    while True:
        time.sleep(0.5)  # sampling period
        b = sampler.take()
        used = sum(v["cpu"] for k, v in cpu_between(a, b).items() if k in pids)
        if used < cores:
            return round(time.monotonic() - t0, 2)
        if time.monotonic() - t0 > timeout_s:
            return -1.0
        a = b


def run_peer_bench(
    wl: Workload,
    *,
    runs: int,
    names: list[str],
    nats_exe: str,
    log_path: Path,
    relay_root: str | None = None,
    modes: tuple[str, ...] = MODES,
) -> dict[str, Any]:
    started = time.monotonic()
    raw: list[dict[str, Any]] = []
    with nats_systems(names, nats_exe, log_path) as natss:
        for run in range(runs):
            order = names if run % 2 == 0 else list(reversed(names))
            for name in order:
                for mode in modes:
                    with contextlib.ExitStack() as stack:
                        sysm = natss.get(name) or stack.enter_context(
                            relay_system(name, log_path, relay_root)
                        )
                        quiet_s = wait_quiet(sysm.pids)
                        r = asyncio.run(run_case(sysm, mode, wl, f"r{run}{mode[0]}{name}"))
                    r["run"] = run
                    r["quiet_wait_s"] = quiet_s
                    raw.append(r)
                    _progress(_line(r, runs))
    return {
        "machine": machine(),
        "source": source(),
        "settings": {
            "systems": names,
            "runs": runs,
            "channels": wl.channels,
            "pubs": wl.pubs,
            "subs": wl.subs,
            "body_bytes": wl.body_bytes,
            "window_per_pub": wl.window,
            "paced_rate": wl.rate,
            "duration_s": wl.duration_s,
            "warmup_s": wl.warmup_s,
            "modes": list(modes),
            "relay_ack": "log",
            "relay_settings": RELAY_SETTINGS,
            "nats_server": nats_exe,
        },
        **summarize(raw, names),
        "runs": raw,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def _line(r: dict[str, Any], runs: int) -> str:
    return (
        f"  run {r['run'] + 1}/{runs} {r['system']:11} {r['mode']:6}: "
        f"{r['accepted_per_s']:>7,} acc/s  server {r['server_cores']:.2f} cores "
        f"({r['server_us_per_msg']} µs/msg)  ack p50/p99 {r['ack_p50_ms']}/{r['ack_p99_ms']} ms"
        f"  delivery p50/p99 {r['delivery_p50_ms']}/{r['delivery_p99_ms']} ms"
        f"  errors {r['errors']}  loadgen {r['cpu']['loadgen']['cpu']:.2f}"
        f"  machine {r['cpu']['machine_busy']}"
    )


_FIGURES = {
    # name: (mode, key)
    "max_msgs_per_s": ("closed", "accepted_per_s"),
    "max_server_cores": ("closed", "server_cores"),
    "max_per_core": ("closed", "per_core"),
    "us_per_msg_5k": ("paced", "server_us_per_msg"),
    "ack_p50_ms_5k": ("paced", "ack_p50_ms"),
    "ack_p99_ms_5k": ("paced", "ack_p99_ms"),
    "delivery_p50_ms_5k": ("paced", "delivery_p50_ms"),
    "delivery_p99_ms_5k": ("paced", "delivery_p99_ms"),
}


def _ratio(raw: list[dict[str, Any]], fig: str, a: str, b: str) -> float | None:
    """Median over runs of ``a``'s figure ÷ ``b``'s in the same run."""
    mode, key = _FIGURES[fig]
    xs = []
    for run in sorted({r["run"] for r in raw}):
        by = {r["system"]: r for r in raw if r["run"] == run and r["mode"] == mode}
        if a in by and b in by and by[a][key] and by[b][key]:
            xs.append(by[a][key] / by[b][key])
    return _med(xs)


def summarize(raw: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        row: dict[str, Any] = {}
        for fig, (mode, key) in _FIGURES.items():
            row[fig] = _med(
                [r[key] for r in raw if r["system"] == name and r["mode"] == mode and r[key]]
            )
        row["errors"] = sum(r["errors"] for r in raw if r["system"] == name)
        table[name] = row
    ratios: dict[str, dict[str, float | None]] = {}
    for relay in ("relay-1", "relay-3"):
        for nats in ("nats-memory", "nats-file"):
            if relay in names and nats in names:
                ratios[f"{relay}/{nats}"] = {fig: _ratio(raw, fig, relay, nats) for fig in _FIGURES}
    doc: dict[str, Any] = {"table": table, "ratios": ratios}
    # The headline figures: one node against NATS on memory storage.
    head = ratios.get("relay-1/nats-memory", {})
    one = table.get("relay-1", {})
    doc["max_ratio_per_core"] = head.get("max_per_core")
    doc["max_ratio"] = head.get("max_msgs_per_s")
    doc["cpu_ratio_5k"] = head.get("us_per_msg_5k")
    doc["ack_p50_ms_5k"] = one.get("ack_p50_ms_5k")
    doc["ack_p99_ms_5k"] = one.get("ack_p99_ms_5k")
    doc["delivery_p50_ms_5k"] = one.get("delivery_p50_ms_5k")
    doc["delivery_p99_ms_5k"] = one.get("delivery_p99_ms_5k")
    doc["three_vs_one_node"] = (
        _ratio(raw, "max_msgs_per_s", "relay-3", "relay-1")
        if "relay-1" in names and "relay-3" in names
        else None
    )
    return doc


def human(doc: dict[str, Any]) -> list[str]:
    st = doc["settings"]
    m = doc["machine"]
    lines = [
        f"relay bench peer: {st['channels']} channels, {st['pubs']} publishers, "
        f"{st['subs']} subscribers, {st['body_bytes']}-byte bodies, relay ack=log; "
        f"medians of {st['runs']} runs; nproc {m['nproc']}, Python {m['python']}",
        f"  {'figure':28}" + "".join(f"{n:>14}" for n in st["systems"]),
    ]
    labels = {
        "max_msgs_per_s": f"max accepted/s ({st['window_per_pub']}/pub)",
        "max_server_cores": "  server cores used",
        "max_per_core": "  accepted/s per core",
        "us_per_msg_5k": f"server µs/msg at {st['paced_rate']:.0f}/s",
        "ack_p50_ms_5k": "publish→ack p50 ms",
        "ack_p99_ms_5k": "publish→ack p99 ms",
        "delivery_p50_ms_5k": "publish→delivery p50 ms",
        "delivery_p99_ms_5k": "publish→delivery p99 ms",
    }
    for fig, label in labels.items():
        cells = "".join(f"{_fmt(doc['table'][n][fig]):>14}" for n in st["systems"])
        lines.append(f"  {label:28}{cells}")
    lines.append(
        "  errors                      "
        + "".join(f"{doc['table'][n]['errors']:>14}" for n in st["systems"])
    )
    for pair, rs in doc["ratios"].items():
        lines.append(f"  ratios {pair} (same-run, median):")
        for fig, label in labels.items():
            lines.append(f"    {label.strip():28}{_fmt(rs[fig]):>10}")
    lines.append(
        f"  headline: max_ratio_per_core {doc['max_ratio_per_core']}  "
        f"cpu_ratio_5k {doc['cpu_ratio_5k']}  ack_p50_ms_5k {doc['ack_p50_ms_5k']}  "
        f"delivery_p99_ms_5k {doc['delivery_p99_ms_5k']}  "
        f"three_vs_one_node {doc['three_vs_one_node']}"
    )
    return lines


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def _list_option(
    flag: str, dest: str, choices: tuple[str, ...], help: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A comma-separated choice of ``choices`` (all of them by default)."""
    return click.option(flag, dest, default=",".join(choices), show_default=True, help=help)


@click.command("peer")
@click.option("--channels", default=1000, show_default=True)
@click.option("--pubs", default=20, show_default=True, help="Publisher connections.")
@click.option("--subs", default=20, show_default=True, help="Subscriber connections.")
@click.option("--body-bytes", default=200, show_default=True)
@click.option(
    "--window", default=800, show_default=True, help="Unanswered publishes per publisher (closed)."
)
@click.option("--rate", default=5000.0, show_default=True, help="Publishes a second (paced).")
@click.option("--duration", default=5.0, show_default=True, help="Measured seconds per case.")
@click.option("--warmup", default=1.0, show_default=True, help="Seconds before measuring.")
@click.option("--runs", default=3, show_default=True, help="Runs of every case (medians).")
@_list_option("--systems", "system_list", SYSTEMS, "Comma-separated subset of the systems.")
@click.option(
    "--nats-server",
    "nats_exe",
    default=None,
    help="The nats-server executable [default: the one on PATH].",
)
@_list_option(
    "--modes",
    "mode_list",
    MODES,
    "Comma-separated cases: closed (max accepted), paced (the fixed rate).",
)
@relay_root_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def peer_cmd(
    channels: int,
    pubs: int,
    subs: int,
    body_bytes: int,
    window: int,
    rate: float,
    duration: float,
    warmup: float,
    runs: int,
    system_list: str,
    mode_list: str,
    nats_exe: str | None,
    relay_root: str | None,
    as_json: bool,
) -> None:
    """relay (1 and 3 nodes, ack=log) against NATS JetStream (memory and file storage),
    one load generator: max accepted msgs/s per core, CPU per message, ack and delivery
    latency at a fixed rate, each ratio printed."""
    exe = nats_exe if nats_exe is not None else nats_server_path()
    if exe is None or not Path(exe).is_file():
        click.echo(
            "relay bench peer: nats-server not found "
            f"({'on PATH' if nats_exe is None else nats_exe}); install it (e.g. the Debian "
            "package nats-server) or pass --nats-server",
            err=True,
        )
        sys.exit(EXIT_NO_NATS)
    names = [s.strip() for s in system_list.split(",") if s.strip()]
    bad = [s for s in names if s not in SYSTEMS]
    if bad or not names:
        raise click.BadParameter(f"choose from {', '.join(SYSTEMS)}", param_hint="--systems")
    modes = tuple(dict.fromkeys(m.strip() for m in mode_list.split(",") if m.strip()))
    if not modes or any(m not in MODES for m in modes):
        raise click.BadParameter(f"choose from {', '.join(MODES)}", param_hint="--modes")
    if body_bytes < TS_DIGITS:
        raise click.BadParameter(f"at least {TS_DIGITS}", param_hint="--body-bytes")
    if subs < 1 or pubs < 1 or channels < subs:
        raise click.BadParameter("need pubs >= 1, subs >= 1, channels >= subs")
    wl = Workload(channels, pubs, subs, body_bytes, window, rate, duration, warmup)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-bench-peer-"))
        log_path = Path(tmp) / "servers.log"
        with tail_on_failure(log_path, "the servers'"):
            doc = run_peer_bench(
                wl,
                runs=runs,
                names=names,
                nats_exe=exe,
                log_path=log_path,
                relay_root=relay_root,
                modes=modes,
            )
    report(doc, human(doc), as_json)


def register(group: click.Group) -> None:
    group.add_command(peer_cmd)


if __name__ == "__main__":
    peer_cmd()
