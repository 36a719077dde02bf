"""The load generator: raw asyncio sockets, hand-built frames, closed loop, bounded time.

Run as its own process (``python -m bench.loadgen ingest|fanout ...``) so that it never
shares a core's time slice with the server under test inside one interpreter. It prints
``START`` when the measured window opens and ``END`` when it closes (the parent samples
the server's CPU time at both), then one JSON document with its figures.

ingest
    ``conns`` connections each publish ``batch`` messages per frame to their own channel
    at ``ack: mem``, keeping ``window`` frames outstanding: a frame is answered by one
    reply frame (the node's pubacks, or the bare server's one-byte ack), and each answer
    lets the next frame go. Latency is per frame, send to answer.
fanout
    ``subs`` connections subscribe to one channel, then one publisher sends one message
    per frame, keeping at most ``window`` messages not yet received by every subscriber.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from bench.wire import OP_CLOSE, OP_PING, FrameReader, Masker, handshake_request

BODY_BYTES = 200


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def body_of(n: int = BODY_BYTES) -> bytes:
    return (b"lorem ipsum dolor sit amet " * (n // 27 + 1))[:n]


class _Ws(asyncio.Protocol):
    """One client connection: handshake, then frames to ``on_frame``."""

    def __init__(self, host: str, port: int, path: str, on_open: Any, on_frame: Any) -> None:
        self.request = handshake_request(host, port, path, None)
        self.on_open = on_open
        self.reader = FrameReader(on_frame)
        self.masker = Masker()
        self.transport: asyncio.Transport | None = None
        self.opened = False
        self.head = b""
        self.out: list[bytes] = []
        self.frame_size = 0
        self.counted_bytes = 0
        self.on_count: Any = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def count_frames_of(self, size: int, on_count: Any) -> None:
        """From now on every frame is ``size`` bytes: count them, parse nothing."""
        self.frame_size = size
        self.counted_bytes = 0
        self.on_count = on_count

    def data_received(self, data: bytes) -> None:
        if self.frame_size:
            b = self.counted_bytes
            size = self.frame_size
            self.counted_bytes = b + len(data)
            n = (b + len(data)) // size - b // size
            if n:
                self.on_count(n)
            self.flush()
            return
        if not self.opened:
            self.head += data
            i = self.head.find(b"\r\n\r\n")
            if i < 0:
                return
            status = self.head.split(b"\r\n", 1)[0]
            if b" 101 " not in status:
                raise RuntimeError(f"handshake refused: {status!r}")
            rest = self.head[i + 4 :]
            self.opened = True
            self.on_open(self)
            if rest:
                self.reader.feed(rest)
        else:
            self.reader.feed(data)
        self.flush()

    def flush(self) -> None:
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
            self.out.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Window:
    """The measured window: counters read at its start and end."""

    def __init__(self) -> None:
        self.measuring = False
        self.running = True
        self.t0 = self.t1 = 0.0
        self.cpu0 = self.cpu1 = 0.0

    def open(self) -> None:
        self.measuring = True
        self.t0 = time.perf_counter()
        self.cpu0 = _cpu_s()
        print("START", flush=True)

    def close(self) -> None:
        self.t1 = time.perf_counter()
        self.cpu1 = _cpu_s()
        self.measuring = False
        self.running = False
        print("END", flush=True)

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    def loadgen_cpu(self) -> float:
        return (self.cpu1 - self.cpu0) / self.seconds if self.seconds else 0.0


def _percentile(sorted_xs: list[float], q: float) -> float:
    if not sorted_xs:
        return float("nan")
    i = min(len(sorted_xs) - 1, max(0, round(q * (len(sorted_xs) - 1))))
    return sorted_xs[i]


async def _connect_all(url: str, n: int, make: Any) -> list[_Ws]:
    u = urlsplit(url)
    host, port, path = u.hostname or "127.0.0.1", u.port or 80, u.path or "/"
    loop = asyncio.get_running_loop()
    conns: list[_Ws] = []
    for i in range(n):
        on_open, on_frame = make(i)
        _, proto = await loop.create_connection(
            lambda o=on_open, f=on_frame: _Ws(host, port, path, o, f), host, port
        )
        conns.append(proto)
    return conns


async def _wait_until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _close_all(conns: list[_Ws]) -> None:
    for c in conns:
        if c.transport is not None:
            c.transport.abort()
    await asyncio.wait([c.closed for c in conns], timeout=5)


# -- ingest ---------------------------------------------------------------------------


async def ingest(
    url: str, *, conns: int, batch: int, window: int, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    body = body_of()
    w = _Window()
    lat: list[float] = []
    totals = {"frames": 0, "pubacks": 0, "errors": 0, "replies": 0}
    opened = [0]
    starts: list[Any] = []  # per connection: send the first window of frames

    def make(i: int) -> tuple[Any, Any]:
        prefix = b'{"op":"pub","ch":"bench:%d","ack":"mem","body":"%s","id":"' % (i, body)
        seq = [0]
        sent: deque[float] = deque()
        holder: list[_Ws] = []

        def build() -> bytes:
            s = seq[0]
            seq[0] = s + batch
            if batch == 1:
                payload = b'%s%d"}' % (prefix, s)
            else:
                payload = b"[" + b",".join(b'%s%d"}' % (prefix, k) for k in range(s, s + batch))
                payload += b"]"
            return holder[0].masker.frame(payload)

        def send_one(now: float) -> None:
            holder[0].out.append(build())
            sent.append(now)

        def on_open(ws: _Ws) -> None:
            holder.append(ws)
            opened[0] += 1

        def start() -> None:
            now = time.perf_counter()
            for _ in range(window):
                send_one(now)
            holder[0].flush()

        def on_frame(opcode: int, payload: bytes) -> None:
            if opcode >= OP_CLOSE:
                if opcode == OP_PING:
                    holder[0].out.append(holder[0].masker.frame(payload, 0xA))
                return
            now = time.perf_counter()
            t0 = sent.popleft()
            if w.measuring:
                lat.append(now - t0)
                totals["replies"] += 1
                totals["frames"] += 1
                n = payload.count(b'"puback"')
                totals["pubacks"] += n if n else (batch if len(payload) < 8 else 0)
                totals["errors"] += payload.count(b'"error"')
            if w.running:
                send_one(now)

        starts.append(start)
        return on_open, on_frame

    cs = await _connect_all(url, conns, make)
    await _wait_until(lambda: opened[0] == conns, 30, "handshakes")
    for start in starts:
        start()
    loop = asyncio.get_running_loop()
    await asyncio.sleep(warmup_s)
    w.open()
    loop.call_later(duration_s, w.close)
    await _wait_until(lambda: not w.running, duration_s + 30, "the end of the window")
    await asyncio.sleep(0.2)
    await _close_all(cs)
    lat.sort()
    secs = w.seconds
    return {
        "mode": "ingest",
        "conns": conns,
        "batch": batch,
        "window": window,
        "seconds": round(secs, 3),
        "msgs": totals["pubacks"],
        "msgs_per_s": round(totals["pubacks"] / secs) if secs else 0,
        "frames_per_s": round(totals["frames"] / secs) if secs else 0,
        "errors": totals["errors"],
        "p50_ms": round(_percentile(lat, 0.50) * 1000, 3),
        "p99_ms": round(_percentile(lat, 0.99) * 1000, 3),
        "loadgen_cpu": round(w.loadgen_cpu(), 3),
    }


# -- fanout ---------------------------------------------------------------------------


async def fanout(
    url: str, *, subs: int, window: int, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    body = body_of()
    w = _Window()
    st = {"subscribed": 0, "delivered": 0, "measured": 0, "published": 0, "first": 0}
    pub_holder: list[_Ws] = []
    sub_conns: list[_Ws] = []
    prefix = b'{"op":"pub","ch":"fan","ack":"mem","body":"%s","id":"' % body
    # Every delivery frame has the same size (fixed-width ids), so once the first
    # message has been parsed everywhere, subscribers count bytes, not frames.
    frame_size = [0]

    def pump() -> None:
        if not pub_holder or not w.running:
            return
        ws = pub_holder[0]
        while st["published"] * subs - st["delivered"] < window * subs:
            ws.out.append(ws.masker.frame(b'%s%010d"}' % (prefix, st["published"])))
            st["published"] += 1
        ws.flush()

    def on_bytes(n: int) -> None:
        st["delivered"] += n
        if w.measuring:
            st["measured"] += n
        if st["published"] * subs - st["delivered"] < (window - 1) * subs:
            pump()

    def make_sub(i: int) -> tuple[Any, Any]:
        seen = [0]

        def on_open(ws: _Ws) -> None:
            sub_conns.append(ws)
            ws.out.append(ws.masker.frame(b'{"op":"sub","ch":"fan"}'))

        def on_frame(opcode: int, payload: bytes) -> None:
            if opcode >= OP_CLOSE:
                return
            seen[0] += 1
            if seen[0] == 1:
                st["subscribed"] += 1
            else:
                n = len(payload)
                frame_size[0] = n + (2 if n < 126 else 4 if n < 65536 else 10)
                st["first"] += 1

        return on_open, on_frame

    def make_pub(i: int) -> tuple[Any, Any]:
        def on_open(ws: _Ws) -> None:
            pub_holder.append(ws)

        def on_frame(opcode: int, payload: bytes) -> None:
            pass

        return on_open, on_frame

    cs = await _connect_all(url, subs, make_sub)
    await _wait_until(lambda: st["subscribed"] == subs, 60, "subscriptions")
    cs += await _connect_all(url, 1, make_pub)
    await _wait_until(lambda: bool(pub_holder), 30, "the publisher")
    ws = pub_holder[0]
    ws.out.append(ws.masker.frame(b'%s%010d"}' % (prefix, 0)))
    ws.flush()
    await _wait_until(lambda: st["first"] == subs, 30, "the first delivery")
    size = frame_size[0]
    for c in sub_conns:
        c.count_frames_of(size, on_bytes)
    st["published"] = 1
    st["delivered"] = subs
    pump()
    await asyncio.sleep(warmup_s)
    w.open()
    asyncio.get_running_loop().call_later(duration_s, w.close)
    await _wait_until(lambda: not w.running, duration_s + 30, "the end of the window")
    await asyncio.sleep(0.2)
    await _close_all(cs)
    secs = w.seconds
    return {
        "mode": "fanout",
        "subs": subs,
        "window": window,
        "frame_bytes": size,
        "seconds": round(secs, 3),
        "deliveries": st["measured"],
        "deliveries_per_s": round(st["measured"] / secs) if secs else 0,
        "loadgen_cpu": round(w.loadgen_cpu(), 3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen")
    ap.add_argument("mode", choices=["ingest", "fanout"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    a = ap.parse_args(argv)
    if a.mode == "ingest":
        coro = ingest(
            a.url,
            conns=a.conns,
            batch=a.batch,
            window=a.window,
            duration_s=a.duration,
            warmup_s=a.warmup,
        )
    else:
        coro = fanout(
            a.url, subs=a.conns, window=a.window, duration_s=a.duration, warmup_s=a.warmup
        )
    result = asyncio.run(coro)
    result["loadgen_pid"] = os.getpid()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
