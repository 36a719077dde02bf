"""The WAN hop side by side: a relay link vs a NATS JetStream mirror vs a naive push.

``relay bench replication`` (without ``--soak``) runs everything through one WAN proxy
process (``python -m cluster.wan``), whose latency it sets per phase, and counts bytes
there:

- **drain** — a backlog of ``--messages`` chat messages (200-byte bodies, 1,000 channels,
  256 slots, ``--per-entry`` messages per slot-log entry) sits in sg's slot logs; the
  link (sg's Redis → proxy → fra's Redis) and fra's receiver run; the time until every
  entry is *present in fra's mirrors* (XLEN) gives msgs/s. The same messages sit in a
  JetStream stream on a hub ``nats-server``; a second server, a leaf dialling the hub
  through the proxy, creates a mirror of it; the time until the mirror holds them all
  gives NATS's msgs/s (memory and file storage).
- **steady** — a publisher appends to sg's slot logs at a fixed rate, each tick's
  messages grouped per slot as the batcher does (at 2 k msgs/s over 256 slots an entry
  holds about one message); a reader in fra tails the mirrors and decodes each batch:
  publish→delivery latency (the message carries its publish time) and ids seen (lost,
  doubled). The naive baseline pushes each message as one JSON line over TCP through the
  proxy to a sink. Bytes per message are the proxy's counts (both directions) over the
  messages sent.

The link runs in this process (sg's node, beside the publisher and the reader); fra's
receiver runs in a process of its own (``python -m bench.wanrx``), as it does in
production, where it is a part of one of fra's nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from bench import nats as natsproc
from bench.procs import stop_process
from cluster.keys import mirror_key
from cluster.link import Link
from cluster.slotlog import RedisSlotLog
from relay.codec import MessageEvent, decode_batch, encode_batch
from relay.redis_server import RedisServer

SLOTS = 256
CHANNELS = 1000
_WORDS_TEXT = (
    "the a to and of in is it you that for on are with be this have at not but we "
    "meeting tomorrow lunch today call later thanks okay sure great see soon back "
    "time late now here there what when where why how can could would should will "
    "send file link photo deck slides review please done ready start finish office "
    "home train station airport hotel flight ticket coffee dinner weekend monday"
)
WORDS = _WORDS_TEXT.split()
TICK_S = 0.01


def chat_body(rng: random.Random) -> str:
    """About 200 characters of chat: words drawn from a small vocabulary."""
    words: list[str] = []
    size = 0
    while size < 200:
        w = rng.choice(WORDS)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)[:200]


def message(n: int, rng: random.Random, now_us: int) -> MessageEvent:
    ch = f"inbox:user{n % CHANNELS}"
    return MessageEvent(
        f"m{n}", ch, f"user{rng.randrange(CHANNELS)}", now_us, "sg", chat_body(rng).encode(), 0
    )


# -- the WAN proxy process ------------------------------------------------------------


class Wan:
    def __init__(self, pairs: dict[str, int]) -> None:
        self.dir = tempfile.mkdtemp(prefix="relay-wanbench-")
        ready = Path(self.dir) / "ready.json"
        args = [f"--pair={n}=0:{p}" for n, p in pairs.items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.wan", *args, "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not ready.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the WAN proxy did not start")
            time.sleep(0.05)  # the proxy is starting
        doc = json.loads(ready.read_text())
        self.control: str = doc["control"]
        self.token: str = doc["token"]
        self.ports: dict[str, int] = doc["pairs"]

    def _call(self, path: str, query: str = "") -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.control}{path}{query}",
            method="POST",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc

    def set_latency(self, ms: float) -> None:
        self._call("/set", f"?pair=*&latency_ms={ms}")

    def bytes(self, pair: str) -> int:
        s = self._call("/status")[pair]
        return int(s["bytes_from_client"]) + int(s["bytes_from_target"])

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- relay -------------------------------------------------------------------------------


# Entries in every mirror of sg in fra, counted by fra's Redis in one call (the poll must
# not load the process that runs the link and the receiver).
_COUNT_MIRRORS = """
local n = 0
for i = 1, #KEYS do n = n + redis.call('XLEN', KEYS[i]) end
return n
"""
_MIRROR_KEYS = [mirror_key("fra", s, "sg") for s in range(SLOTS)]


async def _mirror_count(r: aioredis.Redis) -> int:
    n: Any = await r.eval(_COUNT_MIRRORS, len(_MIRROR_KEYS), *_MIRROR_KEYS)
    return int(n)


async def _fill(origin: RedisSlotLog, messages: int, per_entry: int, rng: random.Random) -> int:
    items: list[tuple[int, bytes]] = []
    entries = 0
    n = 0
    while n < messages:
        k = min(per_entry, messages - n)
        events = [message(n + i, rng, 0) for i in range(k)]
        items.append((entries % SLOTS, encode_batch(events)))
        entries += 1
        n += k
        if len(items) >= 2000:
            await origin.append_many(items, "sg/n1", {s: 1 for s in range(SLOTS)})
            items = []
    if items:
        await origin.append_many(items, "sg/n1", {s: 1 for s in range(SLOTS)})
    return entries


def _flush(*urls: str) -> None:
    for u in urls:
        with redis.Redis.from_url(u) as r:
            r.flushall()


class RxProcess:
    """fra's receiver in its own process (bench/wanrx.py); a context manager that stops
    it (and waits for it) whatever happens in the block."""

    def __init__(self, dest_url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.wanrx", dest_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.cpu_s = 0.0
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # "ready" once it runs, "" if it died
        if line != "ready":
            self.proc.kill()
            self.proc.wait(30)
            raise RuntimeError(f"the receiver process did not start: {line!r}")

    def __enter__(self) -> RxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> float:
        """Stop it (once; later calls return the same); its CPU seconds after it started."""
        if self.proc.returncode is not None:
            return self.cpu_s
        try:
            out, _ = self.proc.communicate(timeout=30)  # closes its stdin: it stops
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            return 0.0
        for line in out.splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.cpu_s = float(json.loads(line)["cpu_s"])
        return self.cpu_s


def _link(origin_url: str, via_url: str) -> Link:
    return Link(
        region="sg",
        dest="fra",
        dest_url=via_url,
        node_id="sg/n1",
        local_url=origin_url,
        slots=SLOTS,
    )


async def relay_drain(
    origin_url: str, dest_url: str, via_url: str, messages: int, per_entry: int
) -> dict[str, Any]:
    _flush(origin_url, dest_url)
    origin = RedisSlotLog.from_url(origin_url, "sg")
    for s in range(SLOTS):
        await origin.set_owner(s, "sg/n1", 1)
    entries = await _fill(origin, messages, per_entry, random.Random(1))
    await origin.close()
    link = _link(origin_url, via_url)
    with RxProcess(dest_url) as rx:
        t0 = time.monotonic()
        cpu0 = time.process_time()
        link.start()
        present = 0
        r = aioredis.Redis.from_url(dest_url)
        deadline = t0 + 600
        while time.monotonic() < deadline:
            present = await _mirror_count(r)
            if present >= entries:
                break
            await asyncio.sleep(0.02)  # poll the destination's mirrors
        elapsed = time.monotonic() - t0
        # This process's CPU (the link and this poll; not the Redis servers or the proxy)
        # and the receiver's, per message drained.
        cpu_us = (time.process_time() - cpu0) / messages * 1e6
        await r.aclose()
        status = link.status(0)
        await link.stop()
        rx_cpu_us = rx.stop() / messages * 1e6
    return {
        "msgs_per_s": messages / elapsed if present >= entries else 0.0,
        "seconds": round(elapsed, 3),
        "entries": entries,
        "lost": max(0, entries - present) * per_entry,
        "doubled": max(0, present - entries) * per_entry,
        "compression_ratio": status["compression_ratio"],
        "windows": status["windows_total"],
        "raw_windows": status["raw_windows_total"],
        "cpu_us_per_msg": round(cpu_us, 2),
        "receiver_cpu_us_per_msg": round(rx_cpu_us, 2),
    }


async def relay_steady(
    origin_url: str, dest_url: str, via_url: str, wan: Wan, rate: float, duration_s: float
) -> dict[str, Any]:
    _flush(origin_url, dest_url)
    origin = RedisSlotLog.from_url(origin_url, "sg")
    for s in range(SLOTS):
        await origin.set_owner(s, "sg/n1", 1)
    link = _link(origin_url, via_url)
    with RxProcess(dest_url) as rx:
        link.start()
        mirrors = RedisSlotLog.from_url(dest_url, "fra", max_block_ms=2000)
        seen: dict[str, int] = {}
        latencies: list[float] = []
        stop = asyncio.Event()

        async def read() -> None:
            after = {s: "0-0" for s in range(SLOTS)}
            while not stop.is_set():
                got = await mirrors.tail(after, 200, 1000, origin="sg")
                now_us = time.time_ns() // 1000
                for e in got:
                    after[e.slot] = e.id
                    for ev in decode_batch(e.data):
                        assert isinstance(ev, MessageEvent)
                        seen[ev.id] = seen.get(ev.id, 0) + 1
                        latencies.append((now_us - ev.hlc) / 1000)

        deadline = time.monotonic() + 30
        while link.status(0)["state"] != "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the link takes its lease and reads the mirrors' tops
        reader = asyncio.ensure_future(read())
        before = wan.bytes("relay")
        rng = random.Random(2)
        sent = await _paced(rate, duration_s, rng, origin)
        await _arrived(seen, sent)
        wan_bytes = wan.bytes("relay") - before
        stop.set()
        await reader
        status = link.status(0)
        await link.stop()
        rx.stop()
        await origin.close()
        await mirrors.close()
    return {
        **_delivery(sent, wan_bytes, latencies, seen),
        "compression_ratio": status["compression_ratio"],
        "rtt_ms": status["rtt_ms"],
    }


async def _arrived(seen: dict[str, int], sent: int) -> None:
    """Wait (up to 30 s) until ``sent`` distinct messages were seen at the far end."""
    deadline = time.monotonic() + 30
    while len(seen) < sent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the last of them are on their way


def _delivery(
    sent: int, wan_bytes: int, latencies: list[float], seen: dict[str, int]
) -> dict[str, Any]:
    """A steady run's figures: WAN bytes per message, latency, lost and doubled."""
    return {
        "sent": sent,
        "bytes_per_msg": wan_bytes / sent,
        "p50_ms": _pct(latencies, 50),
        "p99_ms": _pct(latencies, 99),
        "lost": sent - len(seen),
        "doubled": sum(v - 1 for v in seen.values()),
    }


async def _paced(
    rate: float,
    duration_s: float,
    rng: random.Random,
    origin: RedisSlotLog | None,
    push: Any = None,
) -> int:
    """Publish at ``rate`` for ``duration_s``: every tick, the tick's messages — grouped
    per slot into one entry each (``origin``), or pushed one by one (``push``)."""
    n = 0
    t0 = time.monotonic()
    tick = 0
    while True:
        tick += 1
        due = t0 + tick * TICK_S
        if due - t0 > duration_s:
            return n
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)  # pacing the publisher
        target = int(rate * min(duration_s, time.monotonic() - t0))
        now_us = time.time_ns() // 1000
        events = [message(i, rng, now_us) for i in range(n, target)]
        n = target
        if not events:
            continue
        if origin is not None:
            by_slot: dict[int, list[MessageEvent]] = {}
            for ev in events:
                by_slot.setdefault(zlib.crc32(ev.ch.encode()) % SLOTS, []).append(ev)
            items = [(s, encode_batch(evs)) for s, evs in by_slot.items()]
            await origin.append_many(items, "sg/n1", {s: 1 for s in by_slot})
        else:
            await push(events)


# -- the naive push -------------------------------------------------------------------


async def naive_steady(
    wan: Wan, sink_port_holder: dict[str, Any], rate: float, duration_s: float
) -> dict[str, Any]:
    seen: dict[str, int] = sink_port_holder["seen"]
    latencies: list[float] = sink_port_holder["latencies"]
    seen.clear()
    latencies.clear()
    _, writer = await asyncio.open_connection("127.0.0.1", wan.ports["naive"])
    before = wan.bytes("naive")

    async def push(events: list[MessageEvent]) -> None:
        for ev in events:
            doc = {
                "id": ev.id,
                "ch": ev.ch,
                "from": ev.sender,
                "ts": ev.hlc,
                "origin": ev.origin,
                "body": ev.body.decode(),
            }
            writer.write(json.dumps(doc).encode() + b"\n")
        await writer.drain()

    sent = await _paced(rate, duration_s, random.Random(2), None, push)
    await _arrived(seen, sent)
    wan_bytes = wan.bytes("naive") - before
    writer.close()
    return _delivery(sent, wan_bytes, latencies, seen)


async def _sink(state: dict[str, Any]) -> asyncio.Server:
    handlers: set[asyncio.Task[Any]] = state.setdefault("handlers", set())

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # cancelled when the bench ends (_stop_sink)
            handlers.add(task)
            task.add_done_callback(handlers.discard)
        try:
            while line := await reader.readline():
                doc = json.loads(line)
                state["seen"][doc["id"]] = state["seen"].get(doc["id"], 0) + 1
                state["latencies"].append((time.time_ns() // 1000 - doc["ts"]) / 1000)
        except asyncio.CancelledError:
            # The bench ends (_stop_sink). Ended, not cancelled: asyncio's stream
            # callback would log a cancelled handler's task as an error.
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _stop_sink(sink: asyncio.Server, state: dict[str, Any]) -> None:
    """Close the sink and end its connections' handlers (none left pending at exit)."""
    sink.close()
    handlers = list(state.get("handlers", ()))
    for t in handlers:
        t.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)


# -- NATS --------------------------------------------------------------------------------


async def nats_drain(
    hub: natsproc.NatsServer, leaf: natsproc.NatsServer, messages: int, storage: str
) -> dict[str, Any]:
    import msgspec
    import nats
    from nats.js.api import ExternalStream, StreamConfig, StreamSource

    kind = {"memory": "memory", "file": "file"}[storage]
    nc = await nats.connect(hub.url)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream("ORIGIN")
    await js.add_stream(StreamConfig(name="ORIGIN", subjects=["chat.>"], storage=kind))  # type: ignore[arg-type]
    rng = random.Random(1)
    enc = msgspec.msgpack.Encoder()
    for n in range(messages):
        ev = message(n, rng, 0)
        await nc.publish(
            f"chat.{n % CHANNELS}",
            enc.encode((ev.id, ev.ch, ev.sender, ev.hlc, ev.origin, ev.body)),
        )
        if n % 5000 == 0:
            await nc.flush()
    await nc.flush()
    deadline = time.monotonic() + 300
    while (await js.stream_info("ORIGIN")).state.messages < messages:
        if time.monotonic() > deadline:
            raise RuntimeError("the hub did not store every message")
        await asyncio.sleep(0.05)  # the hub is storing them
    lc = await nats.connect(leaf.url)
    ljs = lc.jetstream()
    with contextlib.suppress(Exception):
        await ljs.delete_stream("MIRROR")
    t0 = time.monotonic()
    await ljs.add_stream(
        StreamConfig(
            name="MIRROR",
            storage=kind,  # type: ignore[arg-type]
            mirror=StreamSource(name="ORIGIN", external=ExternalStream(api="$JS.hub.API")),
        )
    )
    present = 0
    deadline = t0 + 600
    while time.monotonic() < deadline:
        present = (await ljs.stream_info("MIRROR")).state.messages
        if present >= messages:
            break
        await asyncio.sleep(0.02)  # poll the mirror
    elapsed = time.monotonic() - t0
    await ljs.delete_stream("MIRROR")
    await js.delete_stream("ORIGIN")
    await lc.close()
    await nc.close()
    return {
        "msgs_per_s": messages / elapsed if present >= messages else 0.0,
        "seconds": round(elapsed, 3),
        "lost": max(0, messages - present),
        "doubled": max(0, present - messages),
    }


# -- the run -----------------------------------------------------------------------------


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(len(s) * p / 100))], 1)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


@contextlib.contextmanager
def _world() -> Iterator[dict[str, Any]]:
    origin, dest = RedisServer().start(), RedisServer().start()
    hub = natsproc.start_hub()
    loop = asyncio.get_event_loop()
    sink_state: dict[str, Any] = {"seen": {}, "latencies": []}
    sink = loop.run_until_complete(_sink(sink_state))
    sink_port = sink.sockets[0].getsockname()[1]
    wan = Wan({"relay": dest.port, "nats": hub.leaf_port, "naive": sink_port})
    leaf = natsproc.start_leaf(wan.ports["nats"])
    try:
        yield {
            "origin": origin.url,
            "dest": dest.url,
            "via": f"redis://127.0.0.1:{wan.ports['relay']}/0",
            "wan": wan,
            "hub": hub,
            "leaf": leaf,
            "sink": sink_state,
        }
    finally:
        natsproc.stop(leaf)
        wan.stop()
        natsproc.stop(hub)
        loop.run_until_complete(_stop_sink(sink, sink_state))
        origin.stop()
        dest.stop()


def run(
    *,
    runs: int,
    messages: int,
    per_entry: int,
    rates: list[float],
    duration_s: float,
    latencies_ms: list[float],
    say: Any = print,
) -> dict[str, Any]:
    """Every phase ``runs`` times; medians. Raises NatsServerMissing without nats-server."""
    if natsproc.nats_server_path() is None:
        raise natsproc.NatsServerMissing("nats-server is not on the PATH")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    raw: dict[str, list[dict[str, Any]]] = {}
    with _world() as w:
        wan: Wan = w["wan"]
        for lat in latencies_ms:
            wan.set_latency(lat)
            for i in range(runs):
                r = loop.run_until_complete(
                    relay_drain(w["origin"], w["dest"], w["via"], messages, per_entry)
                )
                raw.setdefault(f"drain_relay_{lat:g}ms", []).append(r)
                say(f"drain {lat:g} ms, run {i + 1}: relay {r['msgs_per_s']:,.0f} msgs/s")
                for storage in ("memory", "file"):
                    n = loop.run_until_complete(nats_drain(w["hub"], w["leaf"], messages, storage))
                    raw.setdefault(f"drain_nats_{storage}_{lat:g}ms", []).append(n)
                    say(
                        f"drain {lat:g} ms, run {i + 1}: "
                        f"NATS {storage} {n['msgs_per_s']:,.0f} msgs/s"
                    )
        lat = max(latencies_ms)
        wan.set_latency(lat)
        for rate in rates:
            for i in range(runs):
                r = loop.run_until_complete(
                    relay_steady(w["origin"], w["dest"], w["via"], wan, rate, duration_s)
                )
                raw.setdefault(f"steady_relay_{rate:g}", []).append(r)
                n = loop.run_until_complete(naive_steady(wan, w["sink"], rate, duration_s))
                raw.setdefault(f"steady_naive_{rate:g}", []).append(n)
                say(
                    f"steady {rate:g}/s at {lat:g} ms, run {i + 1}: "
                    f"relay {r['bytes_per_msg']:.0f} B/msg p99 {r['p99_ms']} ms; "
                    f"naive {n['bytes_per_msg']:.0f} B/msg p99 {n['p99_ms']} ms"
                )
    loop.close()
    return summarize(raw, latencies_ms, rates, runs)


def summarize(
    raw: dict[str, list[dict[str, Any]]], latencies_ms: list[float], rates: list[float], runs: int
) -> dict[str, Any]:
    def med(key: str, field: str) -> float:
        return round(
            _median([float(x[field]) for x in raw.get(key, []) if x.get(field) is not None]), 1
        )

    doc: dict[str, Any] = {"runs": runs, "medians": {}}
    m = doc["medians"]
    for key in raw:
        m[key] = {f: med(key, f) for f in raw[key][0] if isinstance(raw[key][0][f], int | float)}
    for lat in latencies_ms:
        relay = med(f"drain_relay_{lat:g}ms", "msgs_per_s")
        nats_mem = med(f"drain_nats_memory_{lat:g}ms", "msgs_per_s")
        nats_file = med(f"drain_nats_file_{lat:g}ms", "msgs_per_s")
        doc[f"drain_ratio_{lat:g}ms"] = (
            round(relay / max(nats_mem, nats_file), 2) if max(nats_mem, nats_file) else None
        )
    if rates:
        _steady_keys(doc, med, latencies_ms, rates)
    doc["lost"] = sum(int(x.get("lost", 0)) for xs in raw.values() for x in xs)
    doc["doubled"] = sum(int(x.get("doubled", 0)) for xs in raw.values() for x in xs)
    doc["machine"] = {"cpus": os.cpu_count()}
    return doc


def _steady_keys(
    doc: dict[str, Any], med: Any, latencies_ms: list[float], rates: list[float]
) -> None:
    low = min(rates)
    doc[f"bytes_ratio_{low / 1000:g}k"] = round(
        med(f"steady_relay_{low:g}", "bytes_per_msg")
        / med(f"steady_naive_{low:g}", "bytes_per_msg"),
        3,
    )
    doc[f"p99_ms_{low / 1000:g}k_{max(latencies_ms):g}ms"] = med(f"steady_relay_{low:g}", "p99_ms")
