"""Replication under faults combined with load, from the outside.

Real processes (``relay serve`` nodes from :class:`relay.dev.DevCluster`), real Redis
servers, the WAN proxy between regions, clients on the protocol; a history of what the
clients were told and a checker of what every region holds (``tests/faults/history.py``):
every acknowledged id pending exactly once in every region, nothing acked coming back,
nothing invented.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from cluster.keys import checkpoint_key, log_key
from cluster.redisconn import connect_sync
from cluster.ring import slot_of
from relay.dev import DevCluster
from tests.cluster.conftest import FAST, wait_settled
from tests.conftest import aio
from tests.faults.history import (
    History,
    Publisher,
    ack_all,
    admin_status,
    check,
    converged,
    hello,
    steady,
    wan,
)

# Publishers here go faster than a client's default rate limit, and a subscriber gets a
# whole healed burst at once (a slower reader than that would be cut off as a slow
# consumer, its messages kept pending: right, but not what these tests look at).
UNLIMITED = {
    "RELAY_CLIENT__RATE_PER_S": "100000000.0",
    "RELAY_CLIENT__BURST": "100000000",
    "RELAY_CLIENT__MAX_OUTBOUND_BYTES": str(256 * 1024 * 1024),
}


def start(
    regions: list[str],
    nodes: int,
    wan_latency_ms: float | None = 80,
    redis_cluster: int = 0,
    **settings: Any,
) -> tuple[DevCluster, dict[str, Any]]:
    cluster = DevCluster(
        regions,
        nodes_per_region=nodes,
        cluster_settings={**FAST, "checkpoint_interval_s": 1.0, **settings},
        wan_latency_ms=wan_latency_ms,
        redis_cluster=redis_cluster,
    )
    doc = cluster.start(timeout_s=90)
    try:
        for r in regions:
            wait_settled(cluster, doc["regions"][r]["nodes"], timeout_s=60)
    except BaseException:
        cluster.stop()
        raise
    return cluster, doc


@pytest.fixture
def unlimited(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in UNLIMITED.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def sg_fra(unlimited: None, redis_kind: str) -> Iterator[tuple[DevCluster, dict[str, Any]]]:
    """sg with two nodes (so the link has two candidates), fra with one; 80 ms WAN (none
    before a Redis Cluster: the cluster variant runs on loopback)."""
    if redis_kind == "cluster":
        cluster, doc = start(["sg", "fra"], 2, wan_latency_ms=None, redis_cluster=3)
    else:
        cluster, doc = start(["sg", "fra"], 2)
    try:
        yield cluster, doc
    finally:
        cluster.stop()


def ws(doc: dict[str, Any], region: str, i: int = 0) -> str:
    url: str = doc["regions"][region]["nodes"][i]["ws"]
    return url


def entry_urls(doc: dict[str, Any]) -> dict[str, str]:
    return {r: ws(doc, r) for r in doc["regions"]}


def link_rows(doc: dict[str, Any], region: str, dest: str) -> list[dict[str, Any]]:
    """The link to ``dest`` as every node of ``region`` reports it."""
    rows = []
    for n in doc["regions"][region]["nodes"]:
        try:
            st = admin_status(n["admin"])
        except OSError:
            continue
        for link in st["cluster"]["links"]:
            if link["dest"] == dest:
                rows.append({"node": n["id"], **link})
    return rows


def checkpoint_ids(doc: dict[str, Any], region: str) -> list[bytes | None]:
    """What each slot's checkpoint covers, read from the region's Redis."""
    with connect_sync(doc["regions"][region]["redis"]) as r:
        pipe = r.pipeline(transaction=False)
        for s in range(256):
            pipe.hget(checkpoint_key(region, s), "id")
        return list(pipe.execute())


def checkpointed_since(doc: dict[str, Any], region: str, before: list[bytes | None]) -> int:
    """How many slots got a new checkpoint since ``before``."""
    return sum(a != b for a, b in zip(before, checkpoint_ids(doc, region), strict=True))


def trimmed_past_link(doc: dict[str, Any], region: str, dest: str) -> bool:
    """Some slot log of ``region`` lost entries the link to ``dest`` had not confirmed:
    the first entry after the confirmed position does not follow on from it."""
    with connect_sync(doc["regions"][region]["redis"]) as r:
        confirmed = r.hgetall(f"relay:{{{region}}}:link:{dest}:confirmed")
        for slot_b, at in confirmed.items():
            rows = r.xrange(log_key(region, int(slot_b)), min=b"(" + at, max="+", count=1)
            if rows and rows[0][1].get(b"p", at) != at:
                return True
    return False


def copied(doc: dict[str, Any]) -> int:
    return sum(r["copied_entries"] for r in link_rows(doc, "sg", "fra"))


async def until_true(cond: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)  # poll interval


def assert_clean(verdicts: dict[str, Any]) -> None:
    assert all(v.ok for v in verdicts.values()), "\n".join(str(v) for v in verdicts.values())


CHANNELS = [f"room:{i}" for i in range(300)]


@aio
async def test_steady_load_over_a_slow_wan_with_frequent_checkpoints_loses_nothing(
    sg_fra: Any,
) -> None:
    """30 s of steady publishing in sg through an 80 ms WAN, checkpoints every second:
    the trims must never outrun the link."""
    _, doc = sg_fra
    h = History()
    await asyncio.gather(
        steady(ws(doc, "sg", 0), h, channels=CHANNELS, rate=400, duration_s=30, prefix="a"),
        steady(
            ws(doc, "sg", 1), h, channels=CHANNELS, rate=400, duration_s=30, prefix="b", ack="mem"
        ),
    )
    assert len(h.published) > 10_000 and len(h.published_mem) > 10_000, h.errors
    assert_clean(await converged(entry_urls(doc), h))


@aio
async def test_a_blackholed_link_is_stalled_within_3s_then_heals_without_loss(
    sg_fra: Any,
) -> None:
    _, doc = sg_fra
    h = History()
    load = asyncio.ensure_future(
        steady(ws(doc, "sg", 0), h, channels=CHANNELS, rate=300, duration_s=20, prefix="c")
    )
    await until_true(lambda: copied(doc) > 1000, "the link copies under load", 30)
    rows = link_rows(doc, "sg", "fra")
    assert [r["state"] for r in rows if r["holder"]] == ["running"], rows
    wan(doc, "/set", pair="sg-fra", blackhole=1)
    cut = time.monotonic()
    seen: list[list[dict[str, Any]]] = []
    while True:
        rows = link_rows(doc, "sg", "fra")
        seen.append(rows)
        holders = [r for r in rows if r["holder"]]
        assert len(holders) <= 1, f"two nodes hold the link: {rows}"
        if holders and holders[0]["state"] == "stalled":
            break
        assert time.monotonic() - cut < 3.0, f"not stalled 3 s after the cut: {seen[-3:]}"
        await asyncio.sleep(0.1)  # poll until the link reports the stall
    assert holders[0]["lag_s"] > 0
    # Seen from the outside too: relay links exits 1, the metric is 1.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "links",
        "--redis",
        doc["regions"]["sg"]["redis"],
        "--region",
        "sg",
        "--json",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(proc.wait(), 60) == 1
    node = next(n for n in doc["regions"]["sg"]["nodes"] if n["id"] == holders[0]["node"])
    with urllib.request.urlopen(node["admin"] + "/metrics", timeout=5) as m:
        metrics = m.read().decode()
    assert f'relay_link_stalled{{node="{node["id"]}",peer="fra",region="sg"}} 1.0' in metrics
    assert f'relay_link_running{{node="{node["id"]}",peer="fra",region="sg"}} 0.0' in metrics
    # Held for the rest of 10 s, always exactly one holder.
    while time.monotonic() - cut < 10:
        assert len([r for r in link_rows(doc, "sg", "fra") if r["holder"]]) <= 1
        await asyncio.sleep(0.5)  # poll the holders until the cut has lasted 10 s
    wan(doc, "/set", pair="sg-fra", blackhole=0)
    await load
    assert_clean(await converged(entry_urls(doc), h, timeout_s=90))
    deadline = time.monotonic() + 30
    while [r["state"] for r in link_rows(doc, "sg", "fra") if r["holder"]] != ["running"]:
        assert time.monotonic() < deadline, link_rows(doc, "sg", "fra")
        await asyncio.sleep(0.2)  # poll until the link runs again


@pytest.mark.timeout(300)  # tens of thousands of acks at log: slow on a busy machine
@aio
async def test_a_burst_during_a_cut_arrives_whole_and_live_after_the_heal(sg_fra: Any) -> None:
    """Tens of thousands of messages at full speed while the link is cut for longer than
    a checkpoint interval: after the heal every one is pending once in fra, and a
    subscriber that stayed connected in fra received each one live."""
    _, doc = sg_fra
    h = History()
    # Few enough channels that every slot gets an entry in most batch windows: the
    # backlog is then several reads deep per slot, with checkpoints between the reads.
    channels = [f"burst:{i}" for i in range(200)]
    sub = await hello(ws(doc, "fra"))
    for i in range(0, len(channels), 100):
        await sub.send([{"op": "sub", "ch": ch} for ch in channels[i : i + 100]])
    live: set[tuple[str, str]] = set()
    subscribed = 0
    while subscribed < len(channels):
        obj = await sub.recv(timeout_s=30)
        subscribed += obj["op"] == "subscribed"

    async def listen() -> None:
        while True:
            obj = await sub.recv(timeout_s=3600)
            if obj["op"] == "msg":
                live.add((obj["ch"], obj["id"]))

    listener = asyncio.ensure_future(listen())
    before = checkpoint_ids(doc, "sg")
    wan(doc, "/set", pair="sg-fra", blackhole=1)
    pubs = [await Publisher.connect(ws(doc, "sg", i % 2), h) for i in range(2)]
    total = 40_000
    for start_at in range(0, total, 500):
        await pubs[(start_at // 500) % 2].send(
            [(channels[i % len(channels)], f"burst-{i}") for i in range(start_at, start_at + 500)]
        )
    for p in pubs:
        await p.drain(timeout_s=120)
        await p.close()
    assert len(h.published) == total, h.errors
    # Longer than a checkpoint interval: sg checkpoints (and trims) every slot meanwhile.
    touched = len({slot_of(ch, 256) for ch in channels})
    await until_true(lambda: checkpointed_since(doc, "sg", before) >= touched, "sg checkpoints", 30)
    wan(doc, "/reset", pair="sg-fra")
    wan(doc, "/set", pair="sg-fra", blackhole=0)
    assert_clean(await converged(entry_urls(doc), h, timeout_s=120))
    deadline = time.monotonic() + 60
    while not h.published <= live:
        assert not listener.done(), f"the subscriber was cut off: {listener.exception()!r}"
        assert time.monotonic() < deadline, f"{len(h.published - live)} never delivered live"
        await asyncio.sleep(0.2)  # poll until the live subscriber has them all
    listener.cancel()
    await sub.close()


@pytest.fixture
def gappy(unlimited: None) -> Iterator[tuple[DevCluster, dict[str, Any]]]:
    """sg and fra, one node each, slot logs kept for a link at most 2 s behind."""
    cluster, doc = start(["sg", "fra"], 1, link_max_backlog_s=2.0)
    try:
        yield cluster, doc
    finally:
        cluster.stop()


@aio
async def test_acks_made_during_a_gap_do_not_come_back_after_the_resync(gappy: Any) -> None:
    """A message of sg acked in fra and one of fra acked in sg, both while the WAN is
    cut longer than sg keeps its logs for the link: after the resync from sg's
    checkpoints neither is pending anywhere, and nothing else is lost."""
    _, doc = gappy
    h = History()
    chans = [f"gap:{i}" for i in range(50)]
    sg_pub = await Publisher.connect(ws(doc, "sg"), h)
    fra_pub = await Publisher.connect(ws(doc, "fra"), h)
    await sg_pub.send([(ch, f"sg-{ch}") for ch in chans])
    await fra_pub.send([(ch, f"fra-{ch}") for ch in chans])
    await sg_pub.drain()
    await fra_pub.drain()
    assert_clean(await converged(entry_urls(doc), h))
    wan(doc, "/set", pair="*", blackhole=1)
    await ack_all(ws(doc, "fra"), h, [(ch, f"sg-{ch}") for ch in chans[:25]])
    await ack_all(ws(doc, "sg"), h, [(ch, f"fra-{ch}") for ch in chans[:25]])
    # More traffic in sg for longer than the logs are kept for the link: sg trims past it.
    i = 0
    deadline = time.monotonic() + 60
    while not trimmed_past_link(doc, "sg", "fra"):
        assert time.monotonic() < deadline, "sg never trimmed past the cut link"
        await sg_pub.send([(ch, f"more-{i}-{ch}") for ch in chans])
        await sg_pub.drain()
        i += 1
        await asyncio.sleep(0.2)  # poll until sg has trimmed past the link
    wan(doc, "/reset", pair="*")
    wan(doc, "/set", pair="*", blackhole=0)
    assert_clean(await converged(entry_urls(doc), h, timeout_s=60))
    gaps = [r["gaps_total"] for r in link_rows(doc, "sg", "fra") if r["holder"]]
    assert gaps and gaps[0] > 0, "the link never resynced: the test did not make a gap"
    await sg_pub.close()
    await fra_pub.close()


@pytest.fixture
def sg3_fra(unlimited: None) -> Iterator[tuple[DevCluster, dict[str, Any]]]:
    cluster, doc = start(["sg", "fra"], 3, wan_latency_ms=5)
    try:
        yield cluster, doc
    finally:
        cluster.stop()


def owner_in_sg(doc: dict[str, Any], ch: str) -> str:
    from cluster.status import owners

    with connect_sync(doc["regions"]["sg"]["redis"]) as r:
        table = owners(r, "sg", 256)
    return table[slot_of(ch, 256)][0]


@aio
async def test_an_owner_paused_past_its_lease_brings_back_nothing_acked(sg3_fra: Any) -> None:
    """Messages published in fra, pending in sg; sg/n2 paused past its lease while half of
    those on its channels are acked through another sg node; woken: nothing acked comes
    back in any region."""
    cluster, doc = sg3_fra
    h = History()
    chans = [f"pause:{i}" for i in range(120)]
    fra = await Publisher.connect(ws(doc, "fra"), h)
    for k in range(4):
        await fra.send([(ch, f"f{k}-{ch}") for ch in chans])
    await fra.drain()
    assert_clean(await converged(entry_urls(doc), h))
    n2 = next(n for n in cluster.nodes if n.id == "sg/n2")
    mine = [ch for ch in chans if owner_in_sg(doc, ch) == "sg/n2"]
    assert mine, "no channel of sg/n2 among the test's channels"
    os.kill(n2.proc.pid, signal.SIGSTOP)
    try:
        others = [n for n in doc["regions"]["sg"]["nodes"] if n["id"] != "sg/n2"]
        wait_settled(cluster, others, timeout_s=30)
        # Light publishing goes on in both regions meanwhile.
        sg = await Publisher.connect(others[1]["ws"], h)
        await fra.send([(ch, f"during-{ch}") for ch in chans[:20]])
        await sg.send([(ch, f"sg-during-{ch}") for ch in chans[20:40]])
        before = checkpoint_ids(doc, "sg")
        acked = [(ch, f"f{k}-{ch}") for ch in mine for k in (0, 1)]
        # Every one was pending in sg before the pause: its successors must hold them.
        assert await ack_all(others[0]["ws"], h, acked) == len(acked)
        # The successors checkpoint the acks (and trim the logs) while n2 sleeps.
        touched = len({slot_of(ch, 256) for ch in mine})
        await until_true(
            lambda: checkpointed_since(doc, "sg", before) >= min(10, touched),
            "sg checkpoints while n2 sleeps",
            30,
        )
    finally:
        os.kill(n2.proc.pid, signal.SIGCONT)
    await fra.drain()
    await sg.drain()
    await sg.close()
    wait_settled(cluster, doc["regions"]["sg"]["nodes"], timeout_s=60)
    verdicts = await converged(entry_urls(doc), h, timeout_s=60)
    assert_clean(verdicts)
    # And through every node of sg, again and again for a few seconds: nothing acked
    # comes back (a stale reader on the woken node would bring it back late).
    until = time.monotonic() + 5
    while time.monotonic() < until:
        for n in doc["regions"]["sg"]["nodes"]:
            v = await check("sg via " + n["id"], n["ws"], h)
            assert v.ok, str(v)
    await fra.close()


@pytest.mark.redis_cluster
@aio
async def test_one_holder_of_a_link_across_a_holder_kill(sg_fra: Any) -> None:
    cluster, doc = sg_fra
    h = History()
    await until_true(
        lambda: [r for r in link_rows(doc, "sg", "fra") if r["holder"]], "a link holder", 10
    )
    holder = next(r["node"] for r in link_rows(doc, "sg", "fra") if r["holder"])
    survivors = [n for n in doc["regions"]["sg"]["nodes"] if n["id"] != holder]
    # The load enters through the node that survives; the holder dies under it.
    load = asyncio.ensure_future(
        steady(survivors[0]["ws"], h, channels=CHANNELS, rate=300, duration_s=12, prefix="k")
    )
    await until_true(lambda: len(h.published) > 1000, "load", 30)
    victim = next(n for n in cluster.nodes if n.id == holder)
    victim.proc.kill()
    victim.proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    while True:
        rows = link_rows(doc, "sg", "fra")
        holders = [r["node"] for r in rows if r["holder"]]
        assert len(holders) <= 1, rows
        if holders == [survivors[0]["id"]] and rows[0]["state"] == "running":
            break
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.1)  # poll until the survivor holds the link
    await load
    regions = {"sg": survivors[0]["ws"], "fra": ws(doc, "fra")}
    assert_clean(await converged(regions, h, timeout_s=60))


def receiver_holder(doc: dict[str, Any], region: str, origin: str) -> list[str]:
    out = []
    for n in doc["regions"][region]["nodes"]:
        try:
            st = admin_status(n["admin"])
        except OSError:
            continue
        for rx in st["cluster"].get("receivers", []):
            if rx["origin"] == origin and rx["holder"]:
                out.append(n["id"])
    return out


@aio
async def test_a_receiver_killed_mid_stream_over_a_jittery_capped_wan_loses_nothing(
    sg_fra: Any,
) -> None:
    """The WAN at 80 ms with jitter and a bandwidth cap; fra's receiver (the node holding
    its lease) is killed -9 while windows stream in: the other fra node takes the lease
    over, resumes after the last finished window, and every acknowledged message is in
    both regions once; the inbound stream ends empty (trimmed as confirmed)."""
    cluster, doc = sg_fra
    wan(doc, "/set", pair="*", latency_ms=80, jitter_ms=15, bandwidth=2_000_000)
    h = History()
    # sg_fra has two nodes in each region: fra's two are the receiver's candidates.
    await until_true(lambda: receiver_holder(doc, "fra", "sg"), "a receiver", 15)
    (holder,) = receiver_holder(doc, "fra", "sg")
    load = asyncio.ensure_future(
        steady(ws(doc, "sg", 0), h, channels=CHANNELS, rate=300, duration_s=12, prefix="r")
    )
    await until_true(lambda: len(h.published) > 1000, "load", 30)
    victim = next(n for n in cluster.nodes if n.id == holder)
    victim.proc.kill()
    victim.proc.wait(timeout=10)
    await until_true(
        lambda: [n for n in receiver_holder(doc, "fra", "sg") if n != holder],
        "another receiver",
        20,
    )
    await load
    survivor = next(n["ws"] for n in doc["regions"]["fra"]["nodes"] if n["id"] != holder)
    assert_clean(await converged({"sg": ws(doc, "sg"), "fra": survivor}, h, timeout_s=60))
    with connect_sync(doc["regions"]["fra"]["redis"]) as r:
        await until_true(lambda: r.xlen("relay:{fra}:inbound:sg") == 0, "inbound trimmed", 10)
