"""``relay bench durability``: what a node's disk snapshots cost it, and what they buy.

Two cases, each on a one-node region of real processes (:class:`relay.dev.DevCluster`: a
real Redis and one ``relay serve`` on loopback), with the node's per-connection rate limit,
outbound buffer, channel caps and memory watermark raised so that no guard binds:

write
    The node is filled with ``--write-messages`` pending messages (200-byte bodies of
    random base64, so lz4 cannot shrink them: the worst case for the disk), 10 per channel,
    at ``ack=mem``, and left until every slot is on disk. Then, ``--write-ticks`` times: a
    quiet window (no snapshot activity: the baseline), then one new message to a channel of
    every one of the 256 slots, so the snapshot tick after their checkpoints rewrites every
    slot whole (the bench sets ``node.snapshot_max_age_s`` 0: every changed slot on the
    next tick, so that one tick writes them all and is measured alone). The
    **write rate** is taken from the files themselves: the tick writes slots one after the
    other, each renamed into place once fsynced, so the bytes of the 2nd…nth file over the
    time from the 1st rename to the nth (their ctimes) are what one tick writes a second:
    capture on the reactor, encode in a thread, write, fsync, rename, fsync the directory.
    The **reactor stall** is measured from outside: a separate probe process sends
    ``{"op":"ping"}`` every 5 ms whatever the answers (open loop) and records each round
    trip; a reactor that stops for *S* ms answers the pings sent meanwhile up to *S* ms
    late. Per tick: the longest round trip during the tick minus the median round trip of
    the quiet window before it; the quiet window's own longest extra delay is printed
    beside it (the machine's noise floor). Checkpoints to Redis are made rare in this
    region (``checkpoint_interval_s`` 3600), so that the ticks measured are the snapshots'.
restart
    A fresh region (the node's own ``checkpoint_interval_s``, 5 s) is filled with
    ``--restart-messages`` messages over a tenth as many channels, and left until nothing
    is at risk (``data_at_risk``: no unsaved slot, no unlogged event) and the Redis
    checkpoints have caught up (every slot with a log has one, and none moved for two
    checkpoint intervals; the log entries a rebuild still replays after them are counted).
    Then the node gets ``SIGKILL`` and is started again (``DevCluster.restart``), either as
    it was (**snapshots**: every slot loaded from disk, then the log after each) or with
    ``<data_dir>/slots/*.snap`` deleted first (**checkpoints**: every slot rebuilt from
    Redis). Timed from the start of the new process to its ready file (written once it
    serves: snapshots loaded, lease taken, every slot claimed) and to the moment a ``sub``
    on a few sample channels has returned all their pending messages, whose ids are
    checked; the node's whole pending count is checked too. The two ways alternate (A, B,
    B, A…), each after the node has saved everything again.

The node runs its own code unchanged, but by default under a ``gc.callbacks`` hook
(:data:`GC_WRAPPER`, ``--no-gc-probe`` to run plain ``python -m relay serve``) that logs
each garbage collection, so that stalls and restart times can be set against the
collector's pauses.

Every process started (Redis, the node, the probe) is stopped at the end, also on error
or Ctrl-C. ``--json`` prints one document (every run and the medians) on stdout; progress
and the summary go to stderr.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import msgspec
import psutil

from bench.procs import report, tail_on_failure
from bench.region import (
    NODE_ENV as REGION_NODE_ENV,
)
from bench.region import (
    REGION,
    SLOTS,
    _children_output_to,
    _Conn,
    _connect,
    _env,
    machine,
    source,
)
from cluster.keys import checkpoint_key, log_key
from cluster.redisconn import connect_sync
from cluster.ring import slot_of
from relay.codec import MessageEvent
from relay.dev import DevCluster
from relay.snapshot import decode_snapshot, encode_snapshot
from relay.snapshot_io import write_snapshot

ROOT = Path(__file__).resolve().parents[1]
NODE_ID = f"{REGION}/n1"
NODE_ENV = {
    **REGION_NODE_ENV,
    "RELAY_STORE__MEMORY_HIGH_WATERMARK_BYTES": "100000000000",
    # Every changed slot on the next tick: the bench measures a tick that writes every
    # slot at once (the worst case) and restarts once all is written, neither of which
    # depends on when a slot falls due (by default, after its checkpoint).
    "RELAY_NODE__SNAPSHOT_MAX_AGE_S": "0",
}
PER_CHANNEL = 10  # messages per channel
SAMPLE_CHANNELS = 3  # read back after every restart
BODY_POOL = 65_536  # distinct random bodies (far more than lz4's 64 KiB window holds)
_PUB = b'{"op":"pub","ch":"c%d","id":"m%09d","ack":"mem","body":"%s"}'
_DIRTY = b'{"op":"pub","ch":"%s","id":"t%d-%d","ack":"mem","body":"%s"}'


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


def _med(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(statistics.median(vals), 4) if vals else None


def _status(admin: str) -> dict[str, Any]:
    with urllib.request.urlopen(admin + "/status", timeout=10) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


# -- messages ----------------------------------------------------------------------------


def body_pool(n: int, size: int, seed: int = 1) -> list[bytes]:
    """``n`` distinct bodies of ``size`` random base64 characters (valid in JSON as is)."""
    raw = random.Random(seed).randbytes(n * size * 3 // 4 + 3)
    text = base64.b64encode(raw)
    return [text[i * size : (i + 1) * size] for i in range(n)]


def pub_frames(
    start: int, stop: int, channels: int, per_frame: int, bodies: list[bytes]
) -> Iterator[tuple[bytes, int]]:
    """Messages ``start``…``stop - 1`` as JSON frames of ``per_frame`` pubs: message *i* has
    id ``m<i>`` (9 digits) and goes to channel ``c<i % channels>``."""
    pool = len(bodies)
    for a in range(start, stop, per_frame):
        b = min(stop, a + per_frame)
        objs = [_PUB % (i % channels, i, bodies[i % pool]) for i in range(a, b)]
        yield b"[" + b",".join(objs) + b"]", b - a


def expected_ids(ch_index: int, messages: int, channels: int) -> list[str]:
    return [f"m{i:09d}" for i in range(ch_index, messages, channels)]


def one_channel_per_slot(channels: int) -> list[str]:
    """A channel of each slot, taken from the filled channels where possible."""
    out: dict[int, str] = {}
    i = 0
    while len(out) < SLOTS:
        ch = f"c{i}" if i < channels else f"x{i}"
        out.setdefault(slot_of(ch, SLOTS), ch)
        i += 1
    return [out[s] for s in range(SLOTS)]


# -- raw WebSocket clients ---------------------------------------------------------------


class _Reply(msgspec.Struct):
    op: str
    id: str = ""
    ch: str = ""
    pending: int = 0
    code: str = ""
    reason: str = ""


_decode_replies = msgspec.json.Decoder(_Reply | list[_Reply]).decode


def _replies(payload: bytes) -> list[_Reply]:
    data = _decode_replies(payload)
    return data if isinstance(data, list) else [data]


async def _open(url: str, timeout_s: float = 10.0) -> _Conn:
    conn = await _connect(url, timeout_s)
    welcomed = asyncio.get_running_loop().create_future()

    def on_text(payload: bytes) -> None:
        if b'"welcome"' in payload and not welcomed.done():
            welcomed.set_result(None)

    conn.on_text = on_text
    conn.send(b'{"op":"hello"}')
    await asyncio.wait_for(welcomed, timeout_s)
    return conn


@dataclass
class _Flow:
    conn: _Conn
    outstanding: int = 0


async def publish(
    url: str,
    frames: Iterator[tuple[bytes, int]],
    *,
    conns: int,
    window: int,
    timeout_s: float,
) -> dict[str, Any]:
    """Send every frame, keeping about ``window`` frames' worth of messages unanswered per
    connection; returns once every message is answered. Raises RuntimeError on any
    ``error`` reply, TimeoutError past ``timeout_s``."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    state = {"acked": 0, "errors": 0, "sent": 0, "frames": 0}
    first_error: list[bytes] = []
    exhausted = False
    flows: list[_Flow] = []
    per_frame = 0

    def pump(f: _Flow) -> None:
        nonlocal exhausted, per_frame
        while not exhausted and f.outstanding < window * max(1, per_frame):
            try:
                payload, n = next(frames)
            except StopIteration:
                exhausted = True
                break
            per_frame = max(per_frame, n)
            f.conn.send(payload)
            f.outstanding += n
            state["sent"] += n
            state["frames"] += 1
        if exhausted and not done.done() and all(x.outstanding == 0 for x in flows):
            done.set_result(None)

    def on_text_of(f: _Flow) -> Any:
        def on_text(payload: bytes) -> None:
            k = payload.count(b'"puback"')
            e = payload.count(b'"op":"error"')
            if e and not first_error:
                first_error.append(payload[:300])
            f.outstanding -= k + e
            state["acked"] += k
            state["errors"] += e
            pump(f)

        return on_text

    for _ in range(conns):
        flows.append(_Flow(await _open(url)))
    t0 = time.monotonic()
    try:
        for f in flows:
            f.conn.on_text = on_text_of(f)
        for f in flows:
            pump(f)
        await asyncio.wait_for(done, timeout_s)
    finally:
        for f in flows:
            f.conn.abort()
    secs = time.monotonic() - t0
    if state["errors"]:
        raise RuntimeError(f"{state['errors']} publishes refused; first: {first_error[0]!r}")
    return {**state, "seconds": round(secs, 3), "msgs_per_s": round(state["acked"] / secs)}


async def read_pending(
    url: str, channels: list[str], timeout_s: float = 60.0
) -> dict[str, list[str]]:
    """Subscribe to ``channels`` on one new connection; every pending id of each."""
    conn = await _open(url)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    want: dict[str, int | None] = dict.fromkeys(channels)
    got: dict[str, list[str]] = {ch: [] for ch in channels}

    def check() -> None:
        if not done.done() and all(n is not None and len(got[ch]) >= n for ch, n in want.items()):
            done.set_result(None)

    def on_text(payload: bytes) -> None:
        for r in _replies(payload):
            if r.op == "subscribed":
                want[r.ch] = r.pending
            elif r.op == "msg" and r.ch in got:
                got[r.ch].append(r.id)
            elif r.op == "error" and not done.done():
                done.set_exception(RuntimeError(f"sub refused: {r.code}: {r.reason}"))
        check()

    conn.on_text = on_text
    try:
        conn.send_frames(
            [conn.masker.frame(b'{"op":"sub","ch":"%s"}' % ch.encode()) for ch in channels]
        )
        await asyncio.wait_for(done, timeout_s)
    finally:
        conn.abort()
    return got


# -- the ping probe (its own process) ------------------------------------------------------


async def _probe(url: str, interval_s: float) -> dict[str, Any]:
    conn = await _open(url)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def wait_stdin() -> None:
        sys.stdin.buffer.read()  # the parent closes our stdin to stop us
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_stdin, daemon=True).start()
    sent: deque[float] = deque()
    out_t: list[float] = []
    out_rtt: list[float] = []

    def on_text(payload: bytes) -> None:
        now = time.monotonic()
        for _ in range(payload.count(b'"pong"')):
            if sent:
                t = sent.popleft()
                out_t.append(round(t, 6))
                out_rtt.append(round(now - t, 6))

    conn.on_text = on_text
    ping = conn.masker.frame(b'{"op":"ping"}')
    nxt = time.monotonic()
    while not stop.is_set():
        nxt += interval_s
        now = time.monotonic()
        nxt = max(nxt, now)  # late (this process was not scheduled): no burst to catch up
        await asyncio.sleep(nxt - now)
        sent.append(time.monotonic())
        conn.send_frames([ping])
    conn.abort()
    return {"t": out_t, "rtt": out_rtt, "unanswered": len(sent)}


def probe_main(url: str, interval_ms: float) -> None:
    """``python -m bench.durability probe URL INTERVAL_MS``: ping until stdin closes, then
    print {"t": [send times, monotonic], "rtt": [...], "unanswered": n} on stdout."""
    doc = asyncio.run(_probe(url, interval_ms / 1000))
    sys.stdout.write(json.dumps(doc))
    sys.stdout.flush()


class Probe:
    """The probe process: started on enter, its samples in ``t`` / ``rtt`` after exit."""

    def __init__(self, url: str, interval_ms: float) -> None:
        self.url = url
        self.interval_ms = interval_ms
        self.proc: subprocess.Popen[bytes] | None = None
        self.t: list[float] = []
        self.rtt: list[float] = []
        self.unanswered = 0

    def __enter__(self) -> Probe:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "bench.durability", "probe", self.url, str(self.interval_ms)]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        return self

    def samples(self, a: float, b: float) -> list[float]:
        """Round trips (s) of the pings sent in [a, b] (monotonic)."""
        return [r for t, r in zip(self.t, self.rtt, strict=True) if a <= t <= b]

    def __exit__(self, *exc: object) -> None:
        p = self.proc
        if p is None:
            return
        try:
            out, _ = p.communicate(input=b"", timeout=30)
            if p.returncode == 0 and out:
                doc = json.loads(out)
                self.t, self.rtt, self.unanswered = doc["t"], doc["rtt"], doc["unanswered"]
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# -- the GC probe (inside the node's process, opt-in) ----------------------------------------

# Run as ``python -c GC_WRAPPER LOG serve …``: ``relay serve …`` in this very process (the
# node's code unchanged, as ``python -m relay`` runs it), with a ``gc.callbacks`` hook that
# appends every garbage collection of 0.5 ms or more to LOG: pid, monotonic end, generation,
# milliseconds, objects collected. A pause of the whole interpreter, so of the reactor.
GC_WRAPPER = """\
import gc, os, runpy, sys, time
log = open(sys.argv[1], "a", buffering=1)
t = [0.0]
def hook(phase, info):
    if phase == "start":
        t[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - t[0]) * 1000
    if ms >= 0.5:
        end = time.monotonic()
        g, n = info["generation"], info["collected"]
        log.write(f"{os.getpid()} {end:.6f} {g} {ms:.3f} {n}\\n")
gc.callbacks.append(hook)
sys.argv = ["relay", *sys.argv[2:]]
runpy.run_module("relay", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class GcPause:
    pid: int
    end: float  # monotonic
    generation: int
    ms: float


def read_gc_log(path: Path | None) -> list[GcPause]:
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) == 5:
            out.append(GcPause(int(f[0]), float(f[1]), int(f[2]), float(f[3])))
    return out


def gc_between(pauses: list[GcPause], a: float, b: float, pid: int | None = None) -> dict[str, Any]:
    """Collections that ended in [a, b] (of ``pid``): the longest, the full ones, the total."""
    sel = [p for p in pauses if a <= p.end <= b and (pid is None or p.pid == pid)]
    return {
        "longest_ms": round(max((p.ms for p in sel), default=0.0), 2),
        "full": sum(1 for p in sel if p.generation == 2),
        "total_ms": round(sum(p.ms for p in sel), 1),
    }


# -- the region --------------------------------------------------------------------------


@dataclass
class OneNode:
    cluster: DevCluster
    node: dict[str, Any]  # {"id", "ws", "admin", "pid"}
    redis_url: str
    log_path: Path
    env: dict[str, str]
    gc_log: Path | None = None

    @property
    def slots_dir(self) -> Path:
        assert self.cluster.workdir is not None
        return self.cluster.workdir / REGION / "n1" / "data" / "slots"

    @property
    def ready_file(self) -> Path:
        return self.cluster.nodes[0].ready_file

    def status(self) -> dict[str, Any]:
        return _status(self.node["admin"])


@contextlib.contextmanager
def one_node(
    settings: dict[str, Any],
    env: dict[str, str],
    log_path: Path,
    data_root: str | None,
    gc_log: Path | None = None,
) -> Iterator[OneNode]:
    """A region of one node and its Redis; everything stopped on exit. With ``gc_log`` the
    node runs under :data:`GC_WRAPPER` (started, killed while still empty, and started
    again so: every later restart too)."""
    with contextlib.ExitStack() as stack:
        workdir = None
        if data_root is not None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=data_root)))
        cluster = DevCluster([REGION], nodes_per_region=1, cluster_settings=settings)
        cluster.workdir = workdir
        stack.callback(cluster.stop)
        with _children_output_to(log_path), _env(env):
            doc = cluster.start(timeout_s=60)
        r = doc["regions"][REGION]
        one = OneNode(cluster, r["nodes"][0], r["redis"], log_path, env, gc_log)
        if gc_log is not None:
            n = cluster.nodes[0]
            os.kill(n.proc.pid, signal.SIGKILL)
            n.proc.wait()
            assert n.cmd[1:3] == ["-m", "relay"], n.cmd
            n.cmd = [n.cmd[0], "-c", GC_WRAPPER, str(gc_log), *n.cmd[3:]]
            with _children_output_to(log_path), _env(env):
                one.node = cluster.restart(NODE_ID, timeout_s=60)
        deadline = time.monotonic() + 60
        while one.status()["cluster"]["owned_slots"] != SLOTS:
            if time.monotonic() > deadline:
                raise TimeoutError("the node did not claim every slot")
            time.sleep(0.05)  # poll interval while the node claims its slots
        yield one


def wait_saved(one: OneNode, timeout_s: float) -> float:
    """Until no slot is unsaved and no event unlogged; seconds it took."""
    t0 = time.monotonic()
    while True:
        risk = one.status()["cluster"]["data_at_risk"]
        if risk["unsaved_slots"] == 0 and risk["unlogged_events"] == 0:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"snapshots not all written after {timeout_s}s: {risk}")
        time.sleep(0.1)  # poll interval while snapshots are written


def checkpoint_positions(redis_url: str) -> tuple[list[bytes | None], int, int]:
    """Per slot, the log id its checkpoint covers (None: no checkpoint); the slots with a
    log but no checkpoint; and how many log entries lie after the checkpoints in all (what
    a rebuild replays after them)."""
    with connect_sync(redis_url) as r:
        pipe = r.pipeline(transaction=False)
        for slot in range(SLOTS):
            pipe.hget(checkpoint_key(REGION, slot), "id")
            pipe.xlen(log_key(REGION, slot))
        res = pipe.execute()
        covers: list[bytes | None] = res[0::2]
        missing = sum(1 for c, n in zip(covers, res[1::2], strict=True) if c is None and n)
        pipe = r.pipeline(transaction=False)
        for slot, c in enumerate(covers):
            pipe.xrange(log_key(REGION, slot), min=b"(" + c if c else b"-")
        tail = sum(len(entries) for entries in pipe.execute())
    return covers, missing, tail


def wait_checkpoints(one: OneNode, timeout_s: float, hold_s: float) -> tuple[float, int]:
    """Until every slot with a log has a checkpoint and none has moved for ``hold_s`` (the
    node's checkpoint passes have caught up). A checkpoint may cover a little less of the
    log than its state holds (an append that lands after the state was taken): those
    entries are replayed on a rebuild, and counted here. Returns (seconds, log entries
    after the checkpoints)."""
    t0 = time.monotonic()
    prev: list[bytes | None] = []
    since = t0
    while True:
        covers, missing, tail = checkpoint_positions(one.redis_url)
        now = time.monotonic()
        if covers != prev:
            prev, since = covers, now
        elif not missing and now - since >= hold_s:
            return now - t0, tail
        if now - t0 > timeout_s:
            raise TimeoutError(
                f"{missing} slots without a checkpoint, or still moving, after {timeout_s}s"
            )
        time.sleep(0.25)  # poll interval while checkpoints are written


def _fs_of(path: Path) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts), for the notes."""
    best, fstype = "", "?"
    try:
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- write: snapshot write rate and reactor stalls ------------------------------------------


def _files_since(slots_dir: Path, wall_s: float) -> list[tuple[float, int]]:
    """(ctime as wall seconds, size) of the snapshots renamed into place after ``wall_s``."""
    out = []
    for p in slots_dir.glob("*.snap"):
        st = p.stat()
        if st.st_ctime_ns / 1e9 >= wall_s:
            out.append((st.st_ctime_ns / 1e9, st.st_size))
    return sorted(out)


def _stall_stats(rtts: list[float], base: float) -> dict[str, Any]:
    if not rtts:
        return {"pings": 0, "max_extra_ms": None, "p99_ms": None}
    s = sorted(rtts)
    p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
    return {
        "pings": len(s),
        "max_extra_ms": round((s[-1] - base) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
    }


async def write_case(
    one: OneNode,
    *,
    messages: int,
    ticks: int,
    quiet_s: float,
    bodies: list[bytes],
    conns: int,
    per_frame: int,
    window: int,
    probe_ms: float,
    timeout_s: float,
) -> dict[str, Any]:
    channels = max(1, messages // PER_CHANNEL)
    url = one.node["ws"]
    _progress(f"  write: filling {messages:,} messages over {channels:,} channels")
    fill = await publish(
        url,
        pub_frames(0, messages, channels, per_frame, bodies),
        conns=conns,
        window=window,
        timeout_s=timeout_s,
    )
    _progress(f"    {fill['msgs_per_s']:,} msgs/s; waiting for the snapshots")
    saved_s = await asyncio.to_thread(wait_saved, one, timeout_s)
    dirty_channels = one_channel_per_slot(channels)
    runs: list[dict[str, Any]] = []
    wall_off = time.time() - time.monotonic()
    with Probe(url, probe_ms) as probe:
        await asyncio.sleep(0.5)  # the probe connects
        for tick in range(ticks):
            st0 = (await asyncio.to_thread(one.status))["cluster"]
            q0 = time.monotonic()
            await asyncio.sleep(quiet_s)
            q1 = time.monotonic()
            st1 = (await asyncio.to_thread(one.status))["cluster"]
            quiet_clean = (
                st1["snapshots"]["written"] == st0["snapshots"]["written"]
                and st1["data_at_risk"]["unsaved_slots"] == 0
            )
            dirty_wall = time.time()
            objs = [
                _DIRTY % (ch.encode(), tick, k, bodies[k % len(bodies)])
                for k, ch in enumerate(dirty_channels)
            ]
            await publish(
                url,
                iter([(b"[" + b",".join(objs) + b"]", len(objs))]),
                conns=1,
                window=1,
                timeout_s=30,
            )
            written0 = st1["snapshots"]["written"]
            bytes0 = st1["snapshots"]["bytes"]
            deadline = time.monotonic() + timeout_s
            while True:
                c = (await asyncio.to_thread(one.status))["cluster"]
                if (
                    c["snapshots"]["written"] >= written0 + SLOTS
                    and c["data_at_risk"]["unsaved_slots"] == 0
                ):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tick {tick}: snapshots not written: {c['data_at_risk']}")
                await asyncio.sleep(0.1)  # poll interval while the tick runs
            files = _files_since(one.slots_dir, dirty_wall)
            times = [t - wall_off for t, _ in files]
            sizes = [n for _, n in files]
            span = times[-1] - times[0] if len(times) > 1 else 0.0
            per_file = span / (len(times) - 1) if len(times) > 1 else 0.0
            runs.append(
                {
                    "tick": tick,
                    "quiet": [q0, q1],
                    "quiet_clean": quiet_clean,
                    "files": len(files),
                    "bytes": sum(sizes),
                    "bytes_status": c["snapshots"]["bytes"] - bytes0,
                    "tick_s": round(span + per_file, 3),
                    "window": [times[0] - per_file - 0.05, times[-1] + 0.05] if times else None,
                    "mb_per_s": round(sum(sizes[1:]) / span / 1e6, 2) if span > 0 else None,
                    "ms_per_slot": round(per_file * 1000, 2),
                }
            )
            _progress(
                f"    tick {tick + 1}/{ticks}: {len(files)} slots, "
                f"{sum(sizes) / 1e6:.1f} MB in {runs[-1]['tick_s']} s "
                f"({runs[-1]['mb_per_s']} MB/s)"
            )
            await asyncio.sleep(0.3)  # pings sent during the tick come back
    pauses = read_gc_log(one.gc_log)
    pid = one.node["pid"]
    for r in runs:
        q = r.pop("quiet")
        quiet = probe.samples(*q)
        base = statistics.median(quiet) if quiet else 0.0
        r["baseline_rtt_ms"] = round(base * 1000, 3)
        r["quiet"] = _stall_stats(quiet, base)
        w = r.pop("window")
        r["stall"] = _stall_stats(probe.samples(*w), base) if w else _stall_stats([], base)
        if one.gc_log is not None:
            r["quiet"]["gc"] = gc_between(pauses, q[0], q[1], pid=pid)
            r["stall"]["gc"] = gc_between(pauses, w[0], w[1], pid=pid) if w else None
        gc_note = ""
        if r["stall"].get("gc"):
            g = r["stall"]["gc"]
            gc_note = f"; longest GC pause {g['longest_ms']} ms, {g['full']} full collections"
        _progress(
            f"    tick {r['tick'] + 1}: longest extra ping delay {r['stall']['max_extra_ms']} ms "
            f"(quiet window: {r['quiet']['max_extra_ms']} ms, base rtt {r['baseline_rtt_ms']} ms)"
            + gc_note
        )
    summary = {
        "mb_per_s": _med([r["mb_per_s"] for r in runs]),
        "tick_s": _med([r["tick_s"] for r in runs]),
        "ms_per_slot": _med([r["ms_per_slot"] for r in runs]),
        "bytes_per_tick": _med([r["bytes"] for r in runs]),
        "stall_max_ms_median": _med([r["stall"]["max_extra_ms"] for r in runs]),
        "stall_max_ms_worst": max(
            (r["stall"]["max_extra_ms"] for r in runs if r["stall"]["max_extra_ms"] is not None),
            default=None,
        ),
        "stall_p99_ms_median": _med([r["stall"]["p99_ms"] for r in runs]),
        "quiet_max_ms_median": _med([r["quiet"]["max_extra_ms"] for r in runs]),
        "baseline_rtt_ms": _med([r["baseline_rtt_ms"] for r in runs]),
        "goal_stall_ms": 20,
    }
    if one.gc_log is not None:
        gcs = [r["stall"]["gc"] for r in runs if r["stall"].get("gc")]
        summary["gc_longest_ms_median"] = _med([g["longest_ms"] for g in gcs])
        summary["gc_full_per_tick_median"] = _med([g["full"] for g in gcs])
        summary["gc_total_ms_per_tick_median"] = _med([g["total_ms"] for g in gcs])
    return {
        "messages": messages,
        "channels": channels,
        "fill": fill,
        "saved_after_fill_s": round(saved_s, 2),
        "probe_unanswered": probe.unanswered,
        "runs": runs,
        "summary": summary,
    }


def components(data_dir: Path, messages_per_slot: int, bodies: list[bytes]) -> dict[str, Any]:
    """The parts of a tick and of a load, in this process, for one slot's worth of messages
    (medians of 5): encode, write + fsync + rename + directory fsync, decode."""
    events = [
        MessageEvent(
            f"m{i:09d}",
            f"c{i // PER_CHANNEL}",
            "anon",
            i << 16,
            REGION,
            bodies[i % len(bodies)],
            2**40,
        )
        for i in range(messages_per_slot)
    ]
    encodes, writes, decodes = [], [], []
    data = b""
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        d = Path(tmp)
        for k in range(5):
            t0 = time.perf_counter()
            data = encode_snapshot(1, "1-0", {}, events)
            t1 = time.perf_counter()
            write_snapshot(d, k, data)
            t2 = time.perf_counter()
            decode_snapshot(data, slot=1)
            t3 = time.perf_counter()
            encodes.append(t1 - t0)
            writes.append(t2 - t1)
            decodes.append(t3 - t2)
    enc_s, w, dec_s = (statistics.median(x) for x in (encodes, writes, decodes))
    return {
        "slot_messages": messages_per_slot,
        "slot_bytes": len(data),
        "encode_ms": round(enc_s * 1000, 2),
        "encode_mb_per_s": round(len(data) / enc_s / 1e6, 1),
        "write_fsync_ms": round(w * 1000, 2),
        "write_fsync_mb_per_s": round(len(data) / w / 1e6, 1),
        "decode_ms": round(dec_s * 1000, 2),
        "decode_mb_per_s": round(len(data) / dec_s / 1e6, 1),
    }


# -- restart: snapshots vs checkpoints -----------------------------------------------------


def _wall_to_mono(wall: float) -> float:
    return wall - (time.time() - time.monotonic())


async def restart_once(one: OneNode, mode: str, *, messages: int, channels: int) -> dict[str, Any]:
    """Kill -9 the node and start it again (``mode``: ``snapshots`` as it was,
    ``checkpoints`` with its snapshot files deleted); timed to ready and to a sample read."""
    n = one.cluster.nodes[0]
    os.kill(n.proc.pid, signal.SIGKILL)
    await asyncio.to_thread(n.proc.wait)
    deleted = 0
    if mode == "checkpoints":
        for p in one.slots_dir.glob("*.snap*"):
            p.unlink()
            deleted += 1
    machine0 = psutil.cpu_times()
    t0 = time.monotonic()

    def start() -> dict[str, Any]:
        with _children_output_to(one.log_path), _env(one.env):
            return one.cluster.restart(NODE_ID, timeout_s=120)

    info = await asyncio.to_thread(start)
    returned = time.monotonic()
    try:
        ready = min(returned, _wall_to_mono(one.ready_file.stat().st_mtime_ns / 1e9))
    except OSError:
        ready = returned
    proc = psutil.Process(info["pid"])
    cpu = proc.cpu_times()
    try:
        waited = int(Path(f"/proc/{info['pid']}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        waited = 0.0
    machine1 = psutil.cpu_times()
    one.node = info
    gc_ready = (
        gc_between(read_gc_log(one.gc_log), t0, ready, pid=info["pid"])
        if one.gc_log is not None
        else None
    )
    sample = [channels // 7 * k % channels for k in range(1, SAMPLE_CHANNELS + 1)]
    got = await read_pending(info["ws"], [f"c{k}" for k in sample])
    served = time.monotonic()
    bad = [f"c{k}" for k in sample if sorted(got[f"c{k}"]) != expected_ids(k, messages, channels)]
    if bad:
        raise RuntimeError(f"{mode} restart: wrong pending messages on {bad}")
    st = await asyncio.to_thread(one.status)
    if st["pending"]["messages"] != messages:
        raise RuntimeError(
            f"{mode} restart: {st['pending']['messages']} pending messages, expected {messages}"
        )
    busy = sum(machine1) - machine1.idle - (sum(machine0) - machine0.idle)
    total = sum(machine1) - sum(machine0)
    return {
        "mode": mode,
        "snapshot_files_deleted": deleted,
        "ready_s": round(ready - t0, 3),
        "serving_s": round(served - t0, 3),
        "cpu_to_ready_s": round(cpu.user + cpu.system, 2),
        "waited_to_ready_s": round(waited, 2),
        "machine_busy": round(busy / total, 3) if total else None,
        "gc_to_ready": gc_ready,
        "rss_mb": round(proc.memory_info().rss / 1e6),
        "snapshots_loaded": st["cluster"]["snapshots"]["loaded"],
        "snapshots_refused": st["cluster"]["snapshots"]["refused"],
        "pending_messages": st["pending"]["messages"],
        "sample_channels": len(sample),
        "sample_messages": sum(len(v) for v in got.values()),
    }


async def restart_case(
    one: OneNode,
    *,
    messages: int,
    runs: int,
    bodies: list[bytes],
    conns: int,
    per_frame: int,
    window: int,
    checkpoint_interval_s: float,
    timeout_s: float,
) -> dict[str, Any]:
    channels = max(1, messages // PER_CHANNEL)
    hold_s = 2 * checkpoint_interval_s + 1.0
    _progress(f"  restart: filling {messages:,} messages over {channels:,} channels")
    fill = await publish(
        one.node["ws"],
        pub_frames(0, messages, channels, per_frame, bodies),
        conns=conns,
        window=window,
        timeout_s=timeout_s,
    )
    st = await asyncio.to_thread(one.status)
    _progress(
        f"    {fill['msgs_per_s']:,} msgs/s; node RSS {st['memory']['rss_bytes'] / 1e6:.0f} MB; "
        "waiting for snapshots and checkpoints"
    )
    saved_s = await asyncio.to_thread(wait_saved, one, timeout_s)
    cp_s, _ = await asyncio.to_thread(wait_checkpoints, one, timeout_s, hold_s)
    snap_bytes = sum(p.stat().st_size for p in one.slots_dir.glob("*.snap"))
    raw: list[dict[str, Any]] = []
    for run in range(runs):
        order = ["snapshots", "checkpoints"] if run % 2 == 0 else ["checkpoints", "snapshots"]
        for mode in order:
            t0 = time.monotonic()
            if raw:
                await asyncio.to_thread(wait_saved, one, timeout_s)
                await asyncio.to_thread(wait_checkpoints, one, timeout_s, hold_s)
            resaved = round(time.monotonic() - t0, 2)
            _, _, tail = await asyncio.to_thread(checkpoint_positions, one.redis_url)
            r = await restart_once(one, mode, messages=messages, channels=channels)
            r.update(run=run, saved_again_s=resaved, log_entries_after_checkpoints=tail)
            raw.append(r)
            _progress(
                f"    run {run + 1}/{runs} {mode:11}: ready {r['ready_s']} s, sample read "
                f"{r['serving_s']} s (CPU {r['cpu_to_ready_s']} s, "
                f"waited {r['waited_to_ready_s']} s"
                + (f", GC {r['gc_to_ready']['total_ms']} ms" if r["gc_to_ready"] else "")
                + ")"
            )

    def med(mode: str, key: str) -> float | None:
        return _med([r[key] for r in raw if r["mode"] == mode])

    ratios = []
    for run in range(runs):
        by = {r["mode"]: r for r in raw if r["run"] == run}
        ratios.append(by["checkpoints"]["serving_s"] / by["snapshots"]["serving_s"])
    summary: dict[str, Any] = {
        mode: {
            "ready_s": med(mode, "ready_s"),
            "serving_s": med(mode, "serving_s"),
            "cpu_to_ready_s": med(mode, "cpu_to_ready_s"),
            "waited_to_ready_s": med(mode, "waited_to_ready_s"),
            "gc_ms_to_ready": _med(
                [
                    r["gc_to_ready"]["total_ms"]
                    for r in raw
                    if r["mode"] == mode and r["gc_to_ready"]
                ]
            ),
        }
        for mode in ("snapshots", "checkpoints")
    }
    summary["checkpoints_over_snapshots"] = _med(ratios)
    summary["goal_s"] = 10
    return {
        "messages": messages,
        "channels": channels,
        "fill": fill,
        "node_rss_mb_after_fill": round(st["memory"]["rss_bytes"] / 1e6),
        "saved_after_fill_s": round(saved_s, 2),
        "checkpointed_after_fill_s": round(cp_s, 2),
        "snapshot_bytes_on_disk": snap_bytes,
        "runs": raw,
        "summary": summary,
    }


# -- the whole run -------------------------------------------------------------------------


def run_durability_bench(
    *,
    write_messages: int,
    write_ticks: int,
    quiet_s: float,
    restart_messages: list[int],
    restart_runs: int,
    body_bytes: int,
    conns: int,
    per_frame: int,
    window: int,
    probe_ms: float,
    snapshot_interval_s: float,
    checkpoint_interval_s: float,
    data_root: str | None,
    node_log: Path,
    gc_log: Path | None,
    timeout_s: float,
) -> dict[str, Any]:
    t_start = time.monotonic()
    bodies = body_pool(BODY_POOL, body_bytes)
    env = {**NODE_ENV, "RELAY_NODE__SNAPSHOT_INTERVAL_S": str(snapshot_interval_s)}
    data_dir = Path(data_root) if data_root is not None else Path(tempfile.gettempdir())
    doc: dict[str, Any] = {
        "machine": {
            **machine(),
            "data_fs": _fs_of(data_dir),
            "loadavg_start": _loadavg(),
        },
        "source": source(),
        "settings": {
            "body_bytes": body_bytes,
            "per_channel": PER_CHANNEL,
            "snapshot_interval_s": snapshot_interval_s,
            "checkpoint_interval_s_restart": checkpoint_interval_s,
            "conns": conns,
            "per_frame": per_frame,
            "window": window,
            "probe_interval_ms": probe_ms,
            "gc_probe": gc_log is not None,
        },
    }
    _progress(
        f"relay bench durability: data on {doc['machine']['data_fs']} ({data_dir}), "
        f"load average {doc['machine']['loadavg_start']}"
    )
    if write_ticks > 0:
        doc["components"] = components(data_dir, max(1, write_messages // SLOTS), bodies)
        settings = {"checkpoint_interval_s": 3600}
        with one_node(settings, env, node_log, data_root, gc_log) as one:
            doc["write"] = asyncio.run(
                write_case(
                    one,
                    messages=write_messages,
                    ticks=write_ticks,
                    quiet_s=quiet_s,
                    bodies=bodies,
                    conns=conns,
                    per_frame=per_frame,
                    window=window,
                    probe_ms=probe_ms,
                    timeout_s=timeout_s,
                )
            )
    doc["restart"] = []
    if restart_runs > 0:
        for n in restart_messages:
            restart_settings = {"checkpoint_interval_s": checkpoint_interval_s}
            with one_node(restart_settings, env, node_log, data_root, gc_log) as one:
                doc["restart"].append(
                    asyncio.run(
                        restart_case(
                            one,
                            messages=n,
                            runs=restart_runs,
                            bodies=bodies,
                            conns=conns,
                            per_frame=per_frame,
                            window=window,
                            checkpoint_interval_s=checkpoint_interval_s,
                            timeout_s=timeout_s,
                        )
                    )
                )
    doc["machine"]["loadavg_end"] = _loadavg()
    doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return doc


def human(doc: dict[str, Any]) -> list[str]:
    lines = []
    if "write" in doc:
        w = doc["write"]
        s = w["summary"]
        lines.append(
            f"snapshot ticks, {w['messages']:,} pending messages "
            f"({len(w['runs'])} ticks, medians): "
            f"{s['mb_per_s']} MB/s, {s['bytes_per_tick'] / 1e6:.1f} MB in {s['tick_s']} s "
            f"({s['ms_per_slot']} ms a slot); longest reactor stall {s['stall_max_ms_median']} ms "
            f"(worst {s['stall_max_ms_worst']} ms; goal {s['goal_stall_ms']} ms), "
            f"quiet-window noise {s['quiet_max_ms_median']} ms"
        )
        if "gc_longest_ms_median" in s:
            lines.append(
                f"  garbage collection in the ticks (medians): longest pause "
                f"{s['gc_longest_ms_median']} ms, {s['gc_full_per_tick_median']} full "
                f"collections, {s['gc_total_ms_per_tick_median']} ms in all a tick"
            )
        c = doc.get("components", {})
        if c:
            lines.append(
                f"  one slot of {c['slot_messages']:,} messages, {c['slot_bytes'] / 1e6:.2f} MB, "
                f"in this process: encode {c['encode_ms']} ms ({c['encode_mb_per_s']} MB/s), "
                f"write+fsync {c['write_fsync_ms']} ms ({c['write_fsync_mb_per_s']} MB/s), "
                f"decode {c['decode_ms']} ms ({c['decode_mb_per_s']} MB/s)"
            )
    for r in doc.get("restart", []):
        s = r["summary"]
        sn, cp = s["snapshots"], s["checkpoints"]
        lines.append(
            f"restart with {r['messages']:,} pending messages ({len(r['runs'])} restarts, "
            f"medians): from snapshots ready {sn['ready_s']} s, sample read {sn['serving_s']} s; "
            f"from Redis checkpoints ready {cp['ready_s']} s, sample read {cp['serving_s']} s; "
            f"checkpoints / snapshots {s['checkpoints_over_snapshots']} (goal {s['goal_s']} s)"
        )
    lines.append(f"elapsed {doc['elapsed_s']} s, load average {doc['machine']['loadavg_end']}")
    return lines


@click.command("durability")
@click.option(
    "--write-messages",
    default=200_000,
    show_default=True,
    help="Pending messages while snapshot ticks are measured.",
)
@click.option(
    "--write-ticks",
    default=5,
    show_default=True,
    help="Snapshot ticks measured (each rewrites all 256 slots); 0 skips the case.",
)
@click.option("--quiet", default=1.5, show_default=True, help="Seconds of baseline before a tick.")
@click.option(
    "--restart-messages",
    multiple=True,
    type=int,
    default=(1_000_000,),
    show_default=True,
    help="Pending messages at the kill (repeat for several sizes).",
)
@click.option(
    "--restart-runs",
    default=2,
    show_default=True,
    help="Restarts of each kind per size (alternated); 0 skips the case.",
)
@click.option("--body-bytes", default=200, show_default=True)
@click.option("--conns", default=2, show_default=True, help="Publishing connections for fills.")
@click.option("--per-frame", default=1000, show_default=True, help="Pubs per frame for fills.")
@click.option("--window", default=4, show_default=True, help="Frames unanswered per connection.")
@click.option("--probe-ms", default=5.0, show_default=True, help="Ping interval of the probe.")
@click.option(
    "--snapshot-interval",
    default=2.0,
    show_default=True,
    help="The node's snapshot_interval_s (2.0: the default).",
)
@click.option(
    "--checkpoint-interval",
    default=5.0,
    show_default=True,
    help="The node's checkpoint_interval_s in the restart case (5.0: the default).",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Directory for the nodes' files and data [default: the system's temporary directory].",
)
@click.option(
    "--node-log",
    type=click.Path(dir_okay=False),
    default=None,
    help="Append the node's output here [default: a temporary file, tail shown on failure].",
)
@click.option(
    "--gc-probe/--no-gc-probe",
    default=True,
    show_default=True,
    help="Run the node under a gc.callbacks hook that logs its garbage collections "
    "(--no-gc-probe: exactly `python -m relay serve`).",
)
@click.option("--timeout", default=240.0, show_default=True, help="Bound on each wait (s).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def durability_cmd(
    write_messages: int,
    write_ticks: int,
    quiet: float,
    restart_messages: tuple[int, ...],
    restart_runs: int,
    body_bytes: int,
    conns: int,
    per_frame: int,
    window: int,
    probe_ms: float,
    snapshot_interval: float,
    checkpoint_interval: float,
    data_root: str | None,
    node_log: str | None,
    gc_probe: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Snapshot write rate and the reactor stalls of snapshot ticks; restart-to-serving
    time after kill -9, from disk snapshots and from Redis checkpoints alone."""
    with contextlib.ExitStack() as stack:
        if node_log is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-bench-dur-"))
            log_path = Path(tmp) / "node.log"
        else:
            log_path = Path(node_log)
        gc_log = None
        if gc_probe:
            gc_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-bench-gc-"))
            gc_log = Path(gc_dir) / "gc.log"
        with tail_on_failure(log_path, "the node's"):
            doc = run_durability_bench(
                write_messages=write_messages,
                write_ticks=write_ticks,
                quiet_s=quiet,
                restart_messages=list(restart_messages),
                restart_runs=restart_runs,
                body_bytes=body_bytes,
                conns=conns,
                per_frame=per_frame,
                window=window,
                probe_ms=probe_ms,
                snapshot_interval_s=snapshot_interval,
                checkpoint_interval_s=checkpoint_interval,
                data_root=data_root,
                node_log=log_path,
                gc_log=gc_log,
                timeout_s=timeout,
            )
    report(doc, human(doc), as_json)


def register(group: click.Group) -> None:
    group.add_command(durability_cmd)


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        probe_main(sys.argv[2], float(sys.argv[3]))
    else:
        durability_cmd()
