"""``relay bench replication --soak``: does replication keep every region's Redis bounded?

Two regions (``sg``, ``fra``) of ``relay serve`` nodes with their own Redis servers and the
WAN proxy between them (``relay dev``'s parts, production leases, batch window and
checkpoint interval). One connection publishes steadily in sg (``ack=log``, one id per
message); one subscriber in fra, subscribed to every channel, acks everything it gets.
Every ``--sample-s`` the bench samples each region's Redis: ``used_memory``, the number of
keys, the entries in its slot logs and in its mirrors, and the bytes of its checkpoints;
and the largest resident set of the region's node processes (``node_rss``: what the
collector's thresholds, relay/gctune.py, leave uncollected would show there).

It reports growth after the first checkpoint cycles (the sample at ``--settle-s``) to the
end of the run, and checks the outcome: every acknowledged publish reached the
subscriber in fra (``lost``), and after the run nothing is pending in either region
(``left_pending``). What may grow for the dedupe window, the ack tombstones that
checkpoints carry, is reported as bytes per acknowledged message; a run whose
``--dedupe-window-s`` is shorter than the run shows it level off.

Traffic goes to loopback only; the run is bounded by ``--duration-s``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import psutil
import redis
import websockets
from websockets.typing import Subprotocol

from bench.procs import report
from bench.region import _children_output_to, _env
from relay.dev import DevCluster

REGIONS = ["sg", "fra"]
NODE_ENV = {"RELAY_CLIENT__RATE_PER_S": "100000000.0", "RELAY_CLIENT__BURST": "100000000"}


def sample(url: str, region: str) -> dict[str, int]:
    """One region's Redis: memory, keys, stream entries of logs and mirrors, checkpoint
    bytes (one SCAN and one pipelined pass)."""
    with redis.Redis.from_url(url) as r:
        info = r.info("memory")
        keys = [k.decode() for k in r.scan_iter(match=f"relay:{{{region}:*", count=1000)]
        pipe = r.pipeline(transaction=False)
        kinds: list[str] = []
        for k in keys:
            if k.endswith(":log") or ":mirror:" in k:
                pipe.xlen(k)
                kinds.append("mirror" if ":mirror:" in k else "log")
            elif k.endswith(":checkpoint"):
                pipe.hstrlen(k, "d")
                kinds.append("checkpoint")
        values = pipe.execute()
        out = {
            "used_memory": int(info["used_memory"]),
            "keys": int(r.dbsize()),
            "log_entries": 0,
            "mirror_entries": 0,
            "checkpoint_bytes": 0,
        }
        for kind, v in zip(kinds, values, strict=True):
            key = {"log": "log_entries", "mirror": "mirror_entries"}.get(kind, "checkpoint_bytes")
            out[key] += int(v)
        return out


# Ack ops per frame: with up to 1,000 ids of ~40 bytes each, 16 ops stay under 1 MiB.
ACK_OPS_PER_FRAME = 16
# Publishes per frame: ~250 bytes each, 2,000 of them ~500 kB, under 1 MiB.
PUBS_PER_FRAME = 2000


def nodes_rss(nodes: list[dict[str, Any]]) -> int:
    """The largest resident set (bytes) among a region's node processes (0: none alive)."""
    out = 0
    for n in nodes:
        with contextlib.suppress(psutil.Error, KeyError):
            out = max(out, int(psutil.Process(int(n["pid"])).memory_info().rss))
    return out


class Soak:
    def __init__(self, doc: dict[str, Any], channels: int, rate: float) -> None:
        self.doc = doc
        self.channels = [f"soak:{i}" for i in range(channels)]
        self.rate = rate
        self.published: set[str] = set()
        self.received: set[str] = set()
        self.acked = 0  # ids whose ack op was answered `acked`
        self.ack_retries = 0  # ack ops refused (e.g. `unavailable`) and sent again
        self.ack_errors: dict[str, int] = {}  # "code: reason" of those refusals
        self.stop = False
        self.publishing = True

    def ws(self, region: str) -> str:
        url: str = self.doc["regions"][region]["nodes"][0]["ws"]
        return url

    async def _hello(self, url: str) -> Any:
        proto = Subprotocol("relay.v1.json")
        c = await websockets.connect(url, subprotocols=[proto], max_size=None)
        await c.send(json.dumps({"op": "hello"}))
        return c

    async def publish(self, duration_s: float) -> None:
        c = await self._hello(self.ws("sg"))
        in_flight: set[str] = set()

        async def read() -> None:
            async for frame in c:
                for obj in _objects(frame):
                    if obj.get("op") == "puback" and obj["id"] in in_flight:
                        in_flight.discard(obj["id"])
                        self.published.add(obj["id"])
                    elif obj.get("op") == "error":
                        in_flight.discard(obj.get("id", ""))

        reader = asyncio.ensure_future(read())
        started = time.monotonic()
        n = 0
        try:
            while time.monotonic() - started < duration_s:
                if reader.done():
                    raise RuntimeError(f"the publisher in sg was disconnected: {reader!r}")
                due = int((time.monotonic() - started) * self.rate)
                if due > n and len(in_flight) < 20_000:
                    # Frames under the node's max_frame: after a wait for pubacks many
                    # publishes are due at once.
                    due = min(due, n + PUBS_PER_FRAME)
                    frame = []
                    for i in range(n, due):
                        msg_id = f"s{i}"
                        in_flight.add(msg_id)
                        ch = self.channels[i % len(self.channels)]
                        frame.append({"op": "pub", "id": msg_id, "ch": ch, "body": "x" * 200})
                    await c.send(json.dumps(frame))
                    n = due
                await asyncio.sleep(0.01)  # pace until the next publishes are due
            deadline = time.monotonic() + 60
            while in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # poll until the last pubacks are in
        finally:
            reader.cancel()
            await c.close()

    async def subscribe_and_ack(self) -> None:
        """Subscribe to every channel in fra and ack what arrives, every 50 ms."""
        c = await self._hello(self.ws("fra"))
        for i in range(0, len(self.channels), 100):
            await c.send(json.dumps([{"op": "sub", "ch": ch} for ch in self.channels[i : i + 100]]))
        to_ack: dict[str, list[str]] = {}
        # Per channel, the ids of each ack op sent and not answered yet, in order: an
        # `acked` answers the oldest; an error (`unavailable` while an owner moves)
        # sends its ids again in the next round, as PROTOCOL.md says ("retry later").
        unanswered: dict[str, collections.deque[list[str]]] = {}

        async def read() -> None:
            async for frame in c:
                for obj in _objects(frame):
                    op = obj.get("op")
                    if op == "msg":
                        self.received.add(obj["id"])
                        to_ack.setdefault(obj["ch"], []).append(obj["id"])
                    elif op in ("acked", "error") and obj.get("ch") in unanswered:
                        sent = unanswered[obj["ch"]]
                        ids = sent.popleft() if sent else []
                        if op == "error":
                            self.ack_retries += 1
                            why = f"{obj.get('code')}: {obj.get('reason')}"
                            self.ack_errors[why] = self.ack_errors.get(why, 0) + 1
                            to_ack.setdefault(obj["ch"], []).extend(ids)
                        else:
                            self.acked += len(ids)

        reader = asyncio.ensure_future(read())
        try:
            while not self.stop:
                await asyncio.sleep(0.05)  # the ack cadence
                if reader.done():
                    # The node closed the connection (its close code says why): fail
                    # the soak rather than count what was not acked as lost.
                    raise RuntimeError(f"the subscriber in fra was disconnected: {reader!r}")
                ops = [
                    (ch, ids[j : j + 1000])
                    for ch, ids in to_ack.items()
                    for j in range(0, len(ids), 1000)
                ]
                to_ack.clear()
                for ch, chunk in ops:
                    unanswered.setdefault(ch, collections.deque()).append(chunk)
                batch = [{"op": "ack", "ch": ch, "ids": chunk} for ch, chunk in ops]
                # Frames under the node's max_frame (1 MiB by default): a subscriber that
                # fell behind has many ids to ack at once.
                for i in range(0, len(batch), ACK_OPS_PER_FRAME):
                    await c.send(json.dumps(batch[i : i + ACK_OPS_PER_FRAME]))
        finally:
            reader.cancel()
            await c.close()

    async def pending(self, region: str) -> int:
        """How many messages are pending in ``region`` (a fresh subscriber's count)."""
        c = await self._hello(self.ws(region))
        total = seen = 0
        try:
            for i in range(0, len(self.channels), 100):
                chunk = self.channels[i : i + 100]
                await c.send(json.dumps([{"op": "sub", "ch": ch} for ch in chunk]))
            deadline = time.monotonic() + 60
            while seen < len(self.channels) and time.monotonic() < deadline:
                frame = await asyncio.wait_for(c.recv(), 30)
                for obj in _objects(frame):
                    if obj.get("op") == "subscribed":
                        seen += 1
                        total += obj["pending"]
        finally:
            await c.close()
        return total


def _objects(frame: str | bytes) -> list[dict[str, Any]]:
    data = json.loads(frame)
    return data if isinstance(data, list) else [data]


@contextlib.contextmanager
def _cluster(dedupe_window_s: int, wan_latency_ms: float, log_path: Path) -> Iterator[Any]:
    env = {**NODE_ENV, "RELAY_STORE__DEDUPE_WINDOW_S": str(dedupe_window_s)}
    cluster = DevCluster(REGIONS, nodes_per_region=1, wan_latency_ms=wan_latency_ms)
    try:
        with _children_output_to(log_path), _env(env):
            doc = cluster.start(timeout_s=90)
        yield cluster, doc
    finally:
        cluster.stop()


async def _soak(
    doc: dict[str, Any],
    *,
    duration_s: float,
    sample_s: float,
    rate: float,
    channels: int,
) -> dict[str, Any]:
    s = Soak(doc, channels, rate)
    samples: list[dict[str, Any]] = []

    async def sampler() -> None:
        started = time.monotonic()
        while True:
            row: dict[str, Any] = {"t_s": round(time.monotonic() - started, 1)}
            for r in REGIONS:
                row[r] = await asyncio.to_thread(sample, doc["regions"][r]["redis"], r)
                row[r]["node_rss"] = nodes_rss(doc["regions"][r]["nodes"])
            row["published"], row["acked"] = len(s.published), s.acked
            row["publishing"] = s.publishing
            samples.append(row)
            click.echo(
                f"  t={row['t_s']:>6}s  "
                + "  ".join(
                    f"{r}: {row[r]['used_memory'] / 1e6:.2f} MB, {row[r]['keys']} keys, "
                    f"node RSS {row[r]['node_rss'] / 1e6:.1f} MB, "
                    f"{row[r]['log_entries']}+{row[r]['mirror_entries']} entries"
                    for r in REGIONS
                ),
                err=True,
            )
            await asyncio.sleep(sample_s)  # the sampling period

    acker = asyncio.ensure_future(s.subscribe_and_ack())
    sampling = asyncio.ensure_future(sampler())
    await s.publish(duration_s)
    s.publishing = False
    # The subscriber gets and acks the rest; give the links a bounded while.
    deadline = time.monotonic() + 60
    while not s.published <= s.received and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # poll until fra has everything
    await asyncio.sleep(1)  # one more ack round and its replication
    s.stop = True
    await acker
    sampling.cancel()
    final: dict[str, Any] = {"t_s": "end"}
    for r in REGIONS:
        final[r] = sample(doc["regions"][r]["redis"], r)
        final[r]["node_rss"] = nodes_rss(doc["regions"][r]["nodes"])
    samples.append(final)
    left = {r: await s.pending(r) for r in REGIONS}
    return {
        "published": len(s.published),
        "received": len(s.received & s.published),
        "lost": len(s.published - s.received),
        "acked": s.acked,
        "ack_retries": s.ack_retries,
        "ack_errors": s.ack_errors,
        "left_pending": left,
        "samples": samples,
    }


def growth(samples: list[dict[str, Any]], settle_s: float) -> dict[str, dict[str, float]]:
    """Per region and figure, over the samples taken while publishing from ``settle_s``
    on: the median of their first half (``_start``) and of their second half (``_end``),
    and the growth between (medians of halves: a trend, not one sample's noise);
    ``used_memory_less_checkpoints_growth`` leaves out what the checkpoints' tombstones
    added (bounded by the dedupe window)."""
    during = [x for x in samples if x.get("publishing")]
    after = [x for x in during if x["t_s"] >= settle_s] or during
    half = max(1, len(after) // 2)
    first, last = after[:half], after[-half:]
    out: dict[str, dict[str, float]] = {}
    for r in REGIONS:
        out[r] = {}
        figures = ("used_memory", "keys", "log_entries", "mirror_entries", "checkpoint_bytes")
        for k in (*figures, "node_rss"):
            a = statistics.median(x[r][k] for x in first)
            b = statistics.median(x[r][k] for x in last)
            out[r][f"{k}_start"] = a
            out[r][f"{k}_end"] = b
            out[r][f"{k}_growth"] = round((b - a) / a, 4) if a else 0.0
        m0 = statistics.median(x[r]["used_memory"] - x[r]["checkpoint_bytes"] for x in first)
        m1 = statistics.median(x[r]["used_memory"] - x[r]["checkpoint_bytes"] for x in last)
        out[r]["used_memory_less_checkpoints_growth"] = round((m1 - m0) / m0, 4) if m0 else 0.0
    return out


@click.command("replication")
@click.option("--soak", is_flag=True, help="Run the soak: Redis memory over a long steady run.")
@click.option("--duration-s", default=600.0, show_default=True, help="Publishing time.")
@click.option("--sample-s", default=60.0, show_default=True, help="Time between samples.")
@click.option(
    "--settle-s",
    default=60.0,
    show_default=True,
    help="Growth is measured from the first sample at or after this (checkpoint cycles ran).",
)
@click.option("--rate", default=2000.0, show_default=True, help="Messages per second in sg.")
@click.option("--channels", default=1000, show_default=True)
@click.option(
    "--dedupe-window-s",
    default=600,
    show_default=True,
    help="The nodes' store.dedupe_window_s (how long ack tombstones are kept).",
)
@click.option("--wan-latency-ms", default=80.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--quick", is_flag=True, help="Side by side: one run of each phase, shorter.")
@click.option("--runs", default=3, show_default=True, help="Side by side: runs of each phase.")
@click.option(
    "--messages", default=300_000, show_default=True, help="Side by side: the drained backlog."
)
@click.option(
    "--per-entry", default=4, show_default=True, help="Side by side: messages per slot-log entry."
)
@click.option(
    "--rates", default="2000,10000", show_default=True, help="Side by side: steady msgs/s."
)
@click.option(
    "--steady-s", default=10.0, show_default=True, help="Side by side: each steady phase's time."
)
@click.option(
    "--drain-only", is_flag=True, help="Side by side: only the drain phases (no steady ones)."
)
def replication_cmd(
    soak: bool,
    duration_s: float,
    sample_s: float,
    settle_s: float,
    rate: float,
    channels: int,
    dedupe_window_s: int,
    wan_latency_ms: float,
    as_json: bool,
    quick: bool,
    runs: int,
    messages: int,
    per_entry: int,
    rates: str,
    steady_s: float,
    drain_only: bool,
) -> None:
    """Replication between two local regions (docs/BENCHMARKS.md).

    --soak: publish steadily in sg while a subscriber in fra acks everything; sample each
    region's Redis; report its growth after the first checkpoint cycles and the messages
    lost. Exit 0 when nothing was lost and nothing is left pending, 1 otherwise.
    """
    if not soak:
        side_by_side(
            quick=quick,
            runs=runs,
            messages=messages,
            per_entry=per_entry,
            rates=[] if drain_only else [float(r) for r in rates.split(",")],
            steady_s=steady_s,
            wan_latency_ms=wan_latency_ms,
            as_json=as_json,
        )
        return
    with tempfile.TemporaryDirectory(prefix="relay-bench-repl-") as tmp:
        log_path = Path(tmp) / "nodes.log"
        with _cluster(dedupe_window_s, wan_latency_ms, log_path) as (_, doc):
            click.echo(
                f"soak: {rate:g} msgs/s to {channels} channels in sg for {duration_s:g} s, "
                f"acked in fra; dedupe window {dedupe_window_s} s",
                err=True,
            )
            result = asyncio.run(
                _soak(doc, duration_s=duration_s, sample_s=sample_s, rate=rate, channels=channels)
            )
    g = growth(result["samples"], settle_s)
    acked = max(1, result["acked"])
    window_msgs = min(result["acked"], rate * dedupe_window_s)
    tomb = {r: round(g[r]["checkpoint_bytes_end"] / max(1.0, window_msgs), 2) for r in REGIONS}
    doc = {
        "machine": {"nproc": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {
            "duration_s": duration_s,
            "sample_s": sample_s,
            "settle_s": settle_s,
            "rate": rate,
            "channels": channels,
            "dedupe_window_s": dedupe_window_s,
            "wan_latency_ms": wan_latency_ms,
        },
        **{k: v for k, v in result.items() if k != "samples"},
        "growth": g,
        "checkpoint_bytes_per_message_in_window": tomb,
        "samples": result["samples"],
    }
    lines = [
        f"published {result['published']}, received in fra {result['received']}, "
        f"lost {result['lost']}, acked {result['acked']} (ack ops retried "
        f"{result['ack_retries']}), left pending {result['left_pending']}",
    ]
    for r in REGIONS:
        x = g[r]
        lines.append(
            f"{r}: used_memory {x['used_memory_start'] / 1e6:.2f} -> "
            f"{x['used_memory_end'] / 1e6:.2f} MB ({x['used_memory_growth']:+.1%}; "
            f"{x['used_memory_less_checkpoints_growth']:+.1%} less checkpoints), "
            f"keys {x['keys_start']:.0f} -> {x['keys_end']:.0f}, "
            f"log entries {x['log_entries_start']:.0f} -> {x['log_entries_end']:.0f}, "
            f"mirror entries {x['mirror_entries_start']:.0f} -> {x['mirror_entries_end']:.0f}, "
            f"checkpoints {x['checkpoint_bytes_start'] / 1e6:.2f} -> "
            f"{x['checkpoint_bytes_end'] / 1e6:.2f} MB, "
            f"largest node RSS {x['node_rss_start'] / 1e6:.1f} -> "
            f"{x['node_rss_end'] / 1e6:.1f} MB ({x['node_rss_growth']:+.1%})"
        )
    lines.append(
        "checkpoint bytes per acked message in the dedupe window: "
        + ", ".join(f"{r} {b}" for r, b in tomb.items())
        + f" (acked {acked})"
    )
    medians = {
        r: statistics.median([s[r]["used_memory"] for s in result["samples"]]) for r in REGIONS
    }
    doc["median_used_memory"] = medians
    report(doc, lines, as_json)
    if result["lost"] or any(result["left_pending"].values()):
        sys.exit(1)


def side_by_side(
    *,
    quick: bool,
    runs: int,
    messages: int,
    per_entry: int,
    rates: list[float],
    steady_s: float,
    wan_latency_ms: float,
    as_json: bool,
) -> None:
    from bench import nats, wanhop

    if nats.nats_server_path() is None:
        click.echo(
            "nats-server is not on the PATH: the NATS side cannot be measured, so no ratio "
            "is printed (Debian: apt-get install nats-server)",
            err=True,
        )
        sys.exit(3)
    if quick:
        runs, steady_s = 1, min(steady_s, 5.0)
    doc = wanhop.run(
        runs=runs,
        messages=messages,
        per_entry=per_entry,
        rates=rates,
        duration_s=steady_s,
        latencies_ms=[0.0, wan_latency_ms],
        say=lambda line: click.echo(line, err=True),
    )
    doc["settings"] = {
        "messages": messages,
        "per_entry": per_entry,
        "rates": rates,
        "steady_s": steady_s,
        "wan_latency_ms": [0.0, wan_latency_ms],
        "runs": runs,
    }
    lines = [f"{k}: {v}" for k, v in doc.items() if k not in ("medians", "settings")]
    lines += [f"{k}: {v}" for k, v in doc["medians"].items()]
    report(doc, lines, as_json)


def register(group: click.Group) -> None:
    group.add_command(replication_cmd)


if __name__ == "__main__":
    replication_cmd()
