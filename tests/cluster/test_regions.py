"""Three regions as real processes, each with its own Redis, linked by slot-log mirrors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from cluster.redisconn import connect_sync
from relay.client import RelayClient, RetryPolicy
from relay.dev import DevCluster
from tests.cluster.conftest import (
    FAST,
    admin_status,
    pending_ids,
    redis_cluster_of,
    running,
)
from tests.conftest import aio, run_relay
from tests.faults.history import wan

REGIONS = ["sg", "fra", "iad"]
PATIENT = RetryPolicy(max_attempts=200, base_delay_s=0.05, max_delay_s=0.2)


@pytest.fixture
def world(redis_kind: str) -> Iterator[tuple[DevCluster, dict[str, Any]]]:
    # A WAN proxy cannot stand before a Redis Cluster: the cluster variant runs without.
    with running(
        REGIONS,
        nodes_per_region=1,
        cluster_settings=FAST,
        wan_latency_ms=5 if redis_kind == "server" else None,
        redis_cluster=redis_cluster_of(redis_kind),
    ) as world:
        yield world


def ws(doc: dict[str, Any], region: str) -> str:
    url: str = doc["regions"][region]["nodes"][0]["ws"]
    return url


async def eventually(fn: Any, want: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await fn()
        if got == want:
            return
        assert time.monotonic() < deadline, f"still {got!r}, want {want!r}"
        await asyncio.sleep(0.1)  # poll interval while links copy


@pytest.mark.redis_cluster
@aio
async def test_message_follows_the_recipient_and_ack_removes_it_everywhere(world: Any) -> None:
    _, doc = world
    sender = await RelayClient.connect(ws(doc, "sg"), retry=PATIENT)
    ack = await sender.publish("inbox:alice", "hello from sg", id="m1", ack="remote")
    assert ack.ack == "remote" and ack.origin == "sg"
    await sender.publish("inbox:alice", "second", id="m2", ack="log")
    # Alice connects in iad: she gets what she has not acked, oldest first.
    for region in REGIONS:
        await eventually(lambda r=region: pending_ids(ws(doc, r), "inbox:alice"), ["m1", "m2"])
    alice = await RelayClient.connect(ws(doc, "iad"))
    sub = await alice.subscribe("inbox:alice")
    got = [await asyncio.wait_for(sub.__anext__(), 5) for _ in range(2)]
    assert [(m.id, m.origin, m.body) for m in got] == [
        ("m1", "sg", "hello from sg"),
        ("m2", "sg", "second"),
    ]
    # Live across regions too.
    await sender.publish("inbox:alice", "live", id="m3", ack="log")
    m3 = await asyncio.wait_for(sub.__anext__(), 10)
    assert m3.id == "m3"
    # Acked in iad: gone from all three regions, and never comes back.
    assert await alice.ack("inbox:alice", ["m1", "m2", "m3"]) == 3
    for region in REGIONS:
        await eventually(lambda r=region: pending_ids(ws(doc, r), "inbox:alice"), [])
    await sender.close()
    await alice.close()


@aio
async def test_same_id_published_in_two_regions_converges_to_one(world: Any) -> None:
    _, doc = world
    a = await RelayClient.connect(ws(doc, "sg"), retry=PATIENT)
    b = await RelayClient.connect(ws(doc, "fra"), retry=PATIENT)
    await asyncio.gather(
        a.publish("room:x", "from sg", id="same", ack="log"),
        b.publish("room:x", "from fra", id="same", ack="log"),
    )
    for region in REGIONS:
        await eventually(lambda r=region: pending_ids(ws(doc, r), "room:x"), ["same"])

    async def copies() -> int:
        origins = set()
        for region in REGIONS:
            c = await RelayClient.connect(ws(doc, region))
            s = await c.subscribe("room:x")
            m = await asyncio.wait_for(s.__anext__(), 5)
            origins.add(m.origin)
            await c.close()
        return len(origins)

    # Every region ends up keeping the same copy (the other copy's entry may still be
    # on its way to a region when the ids first agree).
    await eventually(copies, 1)
    await a.close()
    await b.close()


def test_links_report_their_state(world: Any) -> None:
    _, doc = world
    st = admin_status(doc["regions"]["sg"]["nodes"][0]["admin"])
    links = {link["dest"]: link for link in st["cluster"]["links"]}
    assert set(links) == {"fra", "iad"}
    assert all(link["holder"] for link in links.values())
    assert all(link["state"] == "running" for link in links.values())
    r = run_relay("links", "--redis", doc["regions"]["sg"]["redis"], "--region", "sg", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["to"]: row for row in json.loads(r.stdout)["links"]}
    assert set(rows) == {"fra", "iad"}
    assert all(row["holder"] == "sg/n1" and row["state"] == "running" for row in rows.values())
    with urllib.request.urlopen(doc["regions"]["sg"]["nodes"][0]["admin"] + "/metrics") as m:
        text = m.read().decode()
    for name in (
        "relay_link_lag_seconds",
        "relay_link_backlog_entries",
        "relay_link_bytes_total",
        "relay_link_gaps_total",
        "relay_link_stalled",
        "relay_link_errors_total",
    ):
        assert f'{name}{{node="sg/n1",peer="fra",region="sg"}}' in text, name
    assert 'relay_link_running{node="sg/n1",peer="fra",region="sg"} 1.0' in text


@pytest.fixture
def world2() -> Iterator[tuple[DevCluster, dict[str, Any]]]:
    """sg with two nodes (so a link can move), fra and iad with one each."""
    with running(REGIONS, timeout_s=90, nodes_per_region=2, cluster_settings=FAST) as world:
        yield world


def link_holder(doc: dict[str, Any], dest: str) -> str:

    with connect_sync(doc["regions"]["sg"]["redis"]) as r:
        v = r.get(f"relay:{{sg}}:link:{dest}")
    return v.decode().split("#", 1)[0] if v else ""


@aio
async def test_killing_the_link_holder_moves_the_link_and_loses_nothing(world2: Any) -> None:
    _, doc = world2
    holder = link_holder(doc, "iad")
    nodes = {n["id"]: n for n in doc["regions"]["sg"]["nodes"]}
    other = next(n for i, n in nodes.items() if i != holder)
    pub = await RelayClient.connect(other["ws"], retry=PATIENT)
    acked = []
    for i in range(60):
        if i == 20:
            os.kill(nodes[holder]["pid"], signal.SIGKILL)
        a = await pub.publish("inbox:bob", f"m{i}", id=f"m{i}", ack="log", timeout_s=30)
        assert a.ack == "log"
        acked.append(f"m{i}")
    await eventually(lambda: pending_ids(ws(doc, "iad"), "inbox:bob"), acked, timeout_s=30)

    async def holder_now() -> str:
        return link_holder(doc, "iad")

    await eventually(holder_now, other["id"])
    await pub.close()


@aio
async def test_ack_remote_survives_losing_the_origin_region(world: Any) -> None:
    cluster, doc = world
    pub = await RelayClient.connect(ws(doc, "sg"), retry=PATIENT)
    ids = [f"r{i}" for i in range(10)]
    for i in ids:
        a = await pub.publish("inbox:carol", f"body {i}", id=i, ack="remote")
        assert a.ack == "remote"
    await pub.close()
    # The whole origin region goes: its node and its Redis.
    for n in doc["regions"]["sg"]["nodes"]:
        os.kill(n["pid"], signal.SIGKILL)
    cluster.redis["sg"].stop()
    # Every message acknowledged at remote reaches Carol in another region.
    for region in ("fra", "iad"):
        await eventually(lambda r=region: pending_ids(ws(doc, r), "inbox:carol"), ids, timeout_s=30)


@aio
async def test_a_cut_link_is_reported_stalled_and_catches_up_after(world: Any) -> None:
    _, doc = world
    assert set(doc["wan"]["pairs"]) == {f"{a}-{b}" for a in REGIONS for b in REGIONS if a != b}
    await asyncio.to_thread(wan, doc, "/set", pair="sg-iad", blackhole=1)
    pub = await RelayClient.connect(ws(doc, "sg"), retry=PATIENT)
    ids = [f"c{i}" for i in range(50)]
    for i in ids:
        assert (await pub.publish("inbox:dave", i, id=i, ack="log")).ack == "log"
    # fra gets everything; iad nothing while the cut lasts, and the link says so.
    await eventually(lambda: pending_ids(ws(doc, "fra"), "inbox:dave"), ids)
    admin = doc["regions"]["sg"]["nodes"][0]["admin"]

    async def iad_link_state() -> str:
        st = await asyncio.to_thread(admin_status, admin)
        return next(x["state"] for x in st["cluster"]["links"] if x["dest"] == "iad")

    await eventually(iad_link_state, "stalled", timeout_s=15)
    assert await pending_ids(ws(doc, "iad"), "inbox:dave") == []
    # The cut heals: iad catches up, nothing lost, nothing doubled.
    await asyncio.to_thread(wan, doc, "/set", pair="sg-iad", blackhole=0)
    await eventually(lambda: pending_ids(ws(doc, "iad"), "inbox:dave"), ids, timeout_s=30)
    await eventually(iad_link_state, "running", timeout_s=30)
    await pub.close()
