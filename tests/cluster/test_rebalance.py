"""Planned ring changes on a real region (processes, Redis): `relay node add`, `relay ring
plan`/`apply` under publish load, an apply killed half-way then resumed, and a node killed
under an apply."""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest
import redis

from cluster.ring import Ring
from relay.client import RelayClient, RetryPolicy
from relay.dev import DevCluster
from tests.cluster.conftest import pending_ids, wait_settled
from tests.conftest import aio, run_relay, until

PATIENT = RetryPolicy(max_attempts=400, base_delay_s=0.02, max_delay_s=0.2)


@pytest.fixture
def region4(
    region3: tuple[DevCluster, dict[str, Any]],
) -> tuple[DevCluster, str, list[dict[str, Any]], dict[str, Any]]:
    """``region3`` and a fourth node, sg/n4, joined with weight 0 (a member owning nothing
    until ops add it), settled: the cluster, its Redis URL, the first three nodes, sg/n4."""
    cluster, doc = region3
    nodes = list(doc["regions"]["sg"]["nodes"])
    n4 = cluster.add_node("sg", "n4", {"weight": 0})
    wait_settled(cluster, [*nodes, n4])
    return cluster, doc["regions"]["sg"]["redis"], nodes, n4


relay = functools.partial(run_relay, timeout=120)


def plan_sg(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``relay ring plan ARGS`` for region sg of the Redis at ``url``."""
    return relay("ring", "plan", "--redis", url, "--region", "sg", *args)


def owner_records(url: str) -> list[str]:
    with redis.Redis.from_url(url) as r:
        pipe = r.pipeline(transaction=False)
        for s in range(256):
            pipe.hget(f"relay:{{sg:{s}}}:owner", "owner")
        return [(o or b"").decode() for o in pipe.execute()]


def held(url: str) -> int:
    with redis.Redis.from_url(url) as r:
        return int(r.hlen("relay:{sg}:ring:holds"))


@aio
async def test_live_apply_under_publish_load_loses_and_doubles_nothing(region4: Any) -> None:
    _, url, nodes, n4 = region4
    assert Counter(owner_records(url))["sg/n4"] == 0

    channels = [f"room:{i}" for i in range(48)]
    watched = channels[:6]
    listener = await RelayClient.connect(nodes[1]["ws"], retry=PATIENT)
    received: dict[str, list[str]] = {ch: [] for ch in watched}

    async def consume(ch: str) -> None:
        async for m in await listener.subscribe(ch):
            received[ch].append(m.id)

    consumers = [asyncio.ensure_future(consume(ch)) for ch in watched]
    acked: dict[str, list[str]] = {ch: [] for ch in channels}
    stop = asyncio.Event()

    async def publisher(k: int, node: dict[str, Any], ack: str) -> int:
        c = await RelayClient.connect(node["ws"], retry=PATIENT)
        i = 0
        while not stop.is_set() and i < 3000:  # bounded, whatever happens
            ch = channels[(k * 7 + i) % len(channels)]
            mid = f"p{k}-{i}"
            await c.publish(ch, f"body {mid}", id=mid, ack=ack, timeout_s=30)
            acked[ch].append(mid)
            i += 1
        await c.close()
        return i

    # ack=log and ack=mem publishers, through every original node.
    pubs = [
        asyncio.ensure_future(publisher(k, nodes[k % 3], "log" if k % 2 else "mem"))
        for k in range(4)
    ]

    def total() -> int:
        return sum(len(v) for v in acked.values())

    await until(lambda: total() >= 100, 30, "publishers under way")
    before_add = total()
    r = await asyncio.to_thread(
        relay, "node", "add", "sg/n4", "--redis", url, "--steps", "2", "--max-moving", "4", "--json"
    )
    assert r.returncode == 0, r.stderr
    added = json.loads(r.stdout)
    assert [s["weight"] for s in added["steps"]] == [0.5, 1.0]
    assert sum(s["moved_slots"] for s in added["steps"]) > 0
    assert "moving slots" in r.stderr  # the progress bar
    r = await asyncio.to_thread(plan_sg, url, "--remove", "sg/n1", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["moving_slots"] > 0
    r = await asyncio.to_thread(
        relay, "ring", "apply", "-", "--redis", url, "--max-moving", "8", "--json", stdin=r.stdout
    )
    assert r.returncode == 0, r.stderr
    applied = json.loads(r.stdout)
    assert applied["moved_slots"] == plan["moving_slots"]
    during = total() - before_add
    stop.set()
    counts = await asyncio.gather(*pubs)
    assert during > 0, "nothing was published while the slots moved"

    # The planned ring: n1 holds nothing (it keeps running, weight 0).
    want = Ring({"sg/n2": 1.0, "sg/n3": 1.0, "sg/n4": 1.0}).assignment()
    assert owner_records(url) == list(want)
    assert held(url) == 0

    # Every acknowledged message is pending exactly once: nothing lost, nothing doubled.
    for ch in channels:
        got = await pending_ids(n4["ws"], ch)
        assert Counter(got) == Counter(acked[ch]), ch
    assert sum(counts) == total()

    # The live subscriber saw every message of its channels, each once.
    await until(
        lambda: all(set(received[ch]) >= set(acked[ch]) for ch in watched),
        30,
        "every message delivered live",
    )
    for ch in watched:
        assert Counter(received[ch]) == Counter(acked[ch]), ch
    for t in consumers:
        t.cancel()
    await listener.close()


@aio
async def test_an_interrupted_apply_is_resumed_to_the_planned_ring(region4: Any) -> None:
    _, url, nodes, n4 = region4

    # Adding a node that is not running is refused: 69.
    r = await asyncio.to_thread(relay, "node", "add", "sg/n9", "--redis", url)
    assert r.returncode == 69, r.stderr
    assert "no lease" in r.stderr

    r = await asyncio.to_thread(plan_sg, url, "--add", "sg/n4", "--json")
    assert r.returncode == 0, r.stderr
    plan_doc = r.stdout
    moving = json.loads(plan_doc)["moving_slots"]
    assert moving >= 20
    apply = subprocess.Popen(
        [sys.executable, "-m", "relay", "ring", "apply", "-", "--redis", url, "--max-moving", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert apply.stdin is not None
    apply.stdin.write(plan_doc)
    apply.stdin.close()
    try:
        await until(lambda: 0 < held(url) <= moving - 3, 60, "a few slots moved")
        # While it runs, another change is refused: 75.
        r = await asyncio.to_thread(
            relay, "ring", "apply", "--resume", "--region", "sg", "--redis", url
        )
        assert r.returncode == 75, r.stderr
    finally:
        apply.kill()  # interrupted half-way, without a chance to clean up
        apply.wait(timeout=10)
    left = held(url)
    assert 0 < left < moving

    # The interrupted change is visible and blocks new ones until it is finished.
    r = await asyncio.to_thread(relay, "status", "--redis", url, "--region", "sg", "--json")
    assert json.loads(r.stdout)["held_slots"] == left
    r = await asyncio.to_thread(plan_sg, url, "--remove", "sg/n2")
    assert r.returncode == 75, r.stderr
    r = await asyncio.to_thread(relay, "ring", "apply", "-", "--redis", url, stdin=plan_doc)
    assert r.returncode == 75, r.stderr

    # Meanwhile the region serves every slot, held or moved.
    pub = await RelayClient.connect(nodes[0]["ws"], retry=PATIENT)
    for i in range(64):
        await pub.publish(f"inbox:r{i}", "x", id=f"r{i}", ack="log")
    await pub.close()

    # Resume: refused (75) until the killed apply's lock expires, then it finishes.
    deadline = time.monotonic() + 30
    while True:
        r = await asyncio.to_thread(
            relay, "ring", "apply", "--resume", "--region", "sg", "--redis", url, "--json"
        )
        if r.returncode != 75 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)  # poll interval while the old lock expires
    assert r.returncode == 0, r.stderr
    resumed = json.loads(r.stdout)
    assert resumed["resumed"] and resumed["moved_slots"] == left
    want = Ring({"sg/n1": 1.0, "sg/n2": 1.0, "sg/n3": 1.0, "sg/n4": 1.0}).assignment()
    assert owner_records(url) == list(want)
    assert held(url) == 0
    for i in range(64):
        assert await pending_ids(n4["ws"], f"inbox:r{i}") == [f"r{i}"]

    # A plan made before the change is stale now: 1.
    r = await asyncio.to_thread(relay, "ring", "apply", "-", "--redis", url, stdin=plan_doc)
    assert r.returncode == 1, r.stderr
    assert "plan again" in r.stderr

    # Plan and apply in one go: a reweight.
    r = await asyncio.to_thread(plan_sg, url, "--weight", "sg/n4=2", "--apply", "--json")
    assert r.returncode == 0, r.stderr
    both = json.loads(r.stdout)
    assert both["applied"]["moved_slots"] == both["moving_slots"] > 0
    want = Ring({"sg/n1": 1.0, "sg/n2": 1.0, "sg/n3": 1.0, "sg/n4": 2.0}).assignment()
    assert owner_records(url) == list(want)
    # A plan for another slot count than the region's is refused: 2.
    r = await asyncio.to_thread(plan_sg, url, "--remove", "sg/n4", "--slots", "128")
    assert r.returncode == 2, r.stderr
    assert "256 slots" in r.stderr


@aio
async def test_an_apply_survives_a_node_killed_under_it(region4: Any) -> None:
    import os
    import signal

    cluster, url, nodes, n4 = region4
    channels = [f"room:{i}" for i in range(32)]
    acked: dict[str, list[str]] = {ch: [] for ch in channels}
    stop = asyncio.Event()

    async def publisher(k: int, node: dict[str, Any]) -> None:
        c = await RelayClient.connect(node["ws"], retry=PATIENT)
        i = 0
        while not stop.is_set() and i < 3000:  # bounded, whatever happens
            ch = channels[(k * 5 + i) % len(channels)]
            await c.publish(ch, "x", id=f"k{k}-{i}", ack="log", timeout_s=30)
            acked[ch].append(f"k{k}-{i}")
            i += 1
        await c.close()

    # Publishers on the nodes that live; sg/n2 is killed while slots move to sg/n4.
    pubs = [asyncio.ensure_future(publisher(k, [nodes[0], nodes[2]][k % 2])) for k in range(4)]
    await until(lambda: sum(map(len, acked.values())) >= 50, 30, "publishers under way")
    add = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "node",
        "add",
        "sg/n4",
        "--redis",
        url,
        "--max-moving",
        "1",
        "--json",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    await until(lambda: held(url) > 0, 30, "the change under way")
    os.kill(nodes[1]["pid"], signal.SIGKILL)
    out, err = await asyncio.wait_for(add.communicate(), 120)
    assert add.returncode == 0, err.decode()[-2000:]
    assert json.loads(out)["steps"][0]["moved_slots"] > 0
    stop.set()
    await asyncio.gather(*pubs)
    await asyncio.to_thread(wait_settled, cluster, [nodes[0], nodes[2], n4])
    assert held(url) == 0
    # The ring of the nodes alive, weights as ops set them; nothing acknowledged lost.
    want = Ring({"sg/n1": 1.0, "sg/n3": 1.0, "sg/n4": 1.0}).assignment()
    assert owner_records(url) == list(want)
    for ch in channels:
        got = await pending_ids(n4["ws"], ch)
        assert Counter(got) == Counter(acked[ch]), ch
