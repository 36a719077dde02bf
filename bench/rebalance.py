"""``relay bench rebalance``: what a planned ring change costs the clients, and how fast it
moves slots.

Each case is a fresh region of real processes (:class:`relay.dev.DevCluster`: a real Redis
and three ``relay serve`` nodes on loopback, production lease and batch settings) plus a
fourth node started with ``cluster.weight = 0``. ``--publishers`` clients (the SDK,
``relay.client``, closed loop, ``ack=log``, spread over the three nodes and ``--channels``
channels) publish throughout. After ``--before`` seconds of steady load, the fourth node
is put on the ring at weight 1 by :func:`cluster.ringstore.apply_plan` (what ``relay node
add`` and ``relay ring apply`` run), with ``--max-moving`` slots in flight, polling the
owner records every 5 ms so that the figures are the cluster's rather than the poll's.

Printed per ``--max-moving``, medians over ``--runs``:

- slots moved, the apply's duration and slots moved per second;
- each slot's handoff time: from the release of its hold to its owner record naming the
  new owner (the old owner flushes, checkpoints and releases; the new one claims and
  reads the log), measured with ``--max-moving 1`` where one slot moves at a time;
- publish latency (``puback`` round trip as the SDK sees it, retries of ``unavailable``
  included) p50 / p99 / max, before and during the apply;
- lost and doubled messages: every acknowledged id must be pending exactly once after
  the apply (checked through raw ``sub`` replies, without client-side dedupe).

Every process started is stopped at the end, also on error or Ctrl-C. ``--json`` prints
one document on stdout; progress and the summary go to stderr.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections import Counter
from typing import Any

import click

from bench.procs import report
from bench.region import _pending_ids


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def _med(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


async def _case(
    max_moving: int, publishers: int, channels: int, before_s: float, log: Any
) -> dict[str, Any]:
    from cluster.rebalance import make_plan
    from cluster.redisconn import connect
    from cluster.ringstore import Progress, RedisRingStore, apply_plan
    from relay.client import RelayClient, RetryPolicy
    from relay.dev import DevCluster

    cluster = DevCluster(["sg"], nodes_per_region=3)
    doc = await asyncio.to_thread(cluster.start, 60)
    client = None
    try:
        url = doc["regions"]["sg"]["redis"]
        nodes = doc["regions"]["sg"]["nodes"]
        await asyncio.to_thread(cluster.add_node, "sg", "n4", {"weight": 0}, 60)
        client = connect(url)
        store = RedisRingStore(client, "sg")
        deadline = time.monotonic() + 60
        want = {n["id"] for n in nodes}

        async def settled() -> bool:
            # Four members, and every slot owned by one of the three weighted nodes.
            owners = await store.owners(range(256))
            return len(await store.leases()) == 4 and set(owners.values()) == want

        while not await settled():
            if time.monotonic() > deadline:
                raise click.ClickException("the region did not settle")
            await asyncio.sleep(0.1)  # poll while the region settles
        names = [f"room:{i}" for i in range(channels)]
        acked: dict[str, list[str]] = {ch: [] for ch in names}
        samples: list[tuple[float, float]] = []  # (sent at, latency)
        stop = asyncio.Event()
        retry = RetryPolicy(max_attempts=400, base_delay_s=0.01, max_delay_s=0.1)

        async def publisher(k: int) -> None:
            c = await RelayClient.connect(nodes[k % len(nodes)]["ws"], retry=retry)
            i = 0
            while not stop.is_set() and i < 100_000:
                ch = names[(k * 31 + i * 7) % len(names)]
                mid = f"p{k}-{i}"
                t = time.monotonic()
                await c.publish(ch, "x" * 100, id=mid, ack="log", timeout_s=60)
                samples.append((t, time.monotonic() - t))
                acked[ch].append(mid)
                i += 1
            await c.close()

        tasks = [asyncio.ensure_future(publisher(k)) for k in range(publishers)]
        await asyncio.sleep(before_s)  # steady load before the change
        leases = await store.leases()
        plan = make_plan(
            "sg",
            leases,
            await store.read(),
            add={"sg/n4": 1.0},
            slots=256,
            replicas=2,
            live_adds=True,
        )
        landed: list[float] = []

        def on_progress(p: Progress) -> None:
            landed.append(time.monotonic())

        t0 = time.monotonic()
        result = await apply_plan(
            store, plan, max_moving=max_moving, on_progress=on_progress, poll_s=0.005
        )
        t1 = time.monotonic()
        await asyncio.sleep(0.5)  # a little load after it, then stop
        stop.set()
        await asyncio.gather(*tasks)
        lost = doubled = 0
        for ch in names:
            got = Counter(await _pending_ids(nodes[0]["ws"], ch))
            expected = Counter(acked[ch])
            lost += sum((expected - got).values())
            doubled += sum((got - expected).values())  # copies beyond one, or unknown ids
        before = [lat for t, lat in samples if t0 - before_s / 2 <= t < t0]
        during = [lat for t, lat in samples if t0 <= t < t1]
        gaps = [b - a for a, b in itertools.pairwise(landed)]
        out: dict[str, Any] = {
            "max_moving": max_moving,
            "slots_moved": len(result.moved),
            "apply_s": round(t1 - t0, 3),
            "slots_per_s": round(len(result.moved) / (t1 - t0), 1) if t1 > t0 else None,
            "handoff_ms_median": _ms(statistics.median(gaps)) if gaps and max_moving == 1 else None,
            "publishes_during": len(during),
            "before_ms": {
                "p50": _ms(_pct(before, 0.5)),
                "p99": _ms(_pct(before, 0.99)),
                "max": _ms(max(before, default=None)),
            },
            "during_ms": {
                "p50": _ms(_pct(during, 0.5)),
                "p99": _ms(_pct(during, 0.99)),
                "max": _ms(max(during, default=None)),
            },
            "acked": sum(len(v) for v in acked.values()),
            "lost": lost,
            "doubled": doubled,
        }
        log(
            f"  max-moving {max_moving}: {out['slots_moved']} slots in {out['apply_s']} s; "
            f"publish p99 {out['before_ms']['p99']} → {out['during_ms']['p99']} ms, "
            f"max {out['during_ms']['max']} ms; lost {lost}, doubled {doubled}"
        )
        return out
    finally:
        if client is not None:
            await client.aclose()
        await asyncio.to_thread(cluster.stop)


def run(
    runs: int, max_moving: tuple[int, ...], publishers: int, channels: int, before_s: float
) -> dict[str, Any]:
    def log(msg: str) -> None:
        click.echo(msg, err=True)

    cases: list[dict[str, Any]] = []
    for r in range(runs):
        log(f"run {r + 1}/{runs}")
        for m in max_moving:
            cases.append(asyncio.run(_case(m, publishers, channels, before_s, log)))
    summary = []
    for m in max_moving:
        mine = [c for c in cases if c["max_moving"] == m]
        summary.append(
            {
                "max_moving": m,
                "slots_moved": _med([c["slots_moved"] for c in mine]),
                "apply_s": _med([c["apply_s"] for c in mine]),
                "slots_per_s": _med([c["slots_per_s"] for c in mine]),
                "handoff_ms_median": _med([c["handoff_ms_median"] for c in mine]),
                "p99_before_ms": _med([c["before_ms"]["p99"] for c in mine]),
                "p99_during_ms": _med([c["during_ms"]["p99"] for c in mine]),
                "max_during_ms": _med([c["during_ms"]["max"] for c in mine]),
                "lost": sum(c["lost"] for c in mine),
                "doubled": sum(c["doubled"] for c in mine),
            }
        )
    return {"runs": cases, "summary": summary}


@click.command("rebalance")
@click.option("--runs", default=3, show_default=True, help="Fresh regions per case (medians).")
@click.option(
    "--max-moving",
    "max_moving",
    multiple=True,
    type=click.IntRange(1, 256),
    default=(1, 4, 16),
    show_default=True,
    help="Slots in flight at once (repeat for several cases).",
)
@click.option("--publishers", default=8, show_default=True, help="Publishing clients.")
@click.option("--channels", default=64, show_default=True, help="Channels they publish to.")
@click.option("--before", "before_s", default=2.0, show_default=True, help="Seconds of load first.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def rebalance_cmd(
    runs: int,
    max_moving: tuple[int, ...],
    publishers: int,
    channels: int,
    before_s: float,
    as_json: bool,
) -> None:
    """A node put on a loaded region's ring: apply time, handoff time per slot, publish
    latency before and during, and lost/doubled messages (must be 0)."""
    doc = run(runs, max_moving, publishers, channels, before_s)
    head = "max-moving  slots  apply s  slots/s  handoff ms  p99 before→during ms  max ms"
    lines = [head + "  lost  doubled"]
    for s in doc["summary"]:
        lines.append(
            f"{s['max_moving']:>10}  {s['slots_moved']!s:>5}  {s['apply_s']!s:>7}  "
            f"{s['slots_per_s']!s:>7}  {s['handoff_ms_median']!s:>10}  "
            f"{s['p99_before_ms']!s:>8} → {s['p99_during_ms']!s:<9}  {s['max_during_ms']!s:>6}  "
            f"{s['lost']:>4}  {s['doubled']:>7}"
        )
    report(doc, lines, as_json)


def register(group: click.Group) -> None:
    group.add_command(rebalance_cmd)


if __name__ == "__main__":
    rebalance_cmd()
