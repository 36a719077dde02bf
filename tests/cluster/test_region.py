"""A region of three real node processes: channels shared over the mesh, failover,
fencing and drain, with a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

from cluster.redisconn import connect_sync
from cluster.ring import Ring, diff, slot_of
from relay.client import RelayClient, RelayErrorReply, RetryPolicy
from tests.cluster.conftest import FAST, admin_status, pending_ids, running, wait_settled
from tests.conftest import aio, run_relay, until
from tests.wsclient import Client


def nodes_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = doc["regions"]["sg"]["nodes"]
    return nodes


def owner_record(doc: dict[str, Any], slot: int) -> tuple[str, int]:
    with connect_sync(doc["regions"]["sg"]["redis"]) as r:
        owner, epoch = r.hmget(f"relay:{{sg:{slot}}}:owner", "owner", "epoch")
    return (owner.decode() if owner else "", int(epoch or 0))


def channels_owned_by(doc: dict[str, Any], node_id: str, n: int) -> list[str]:
    """Channels the ring of the region's nodes gives to ``node_id``."""
    ring = Ring([x["id"] for x in nodes_of(doc)])
    out: list[str] = []
    i = 0
    while len(out) < n:
        ch = f"inbox:u{i}"
        if ring.owner(slot_of(ch)) == node_id:
            out.append(ch)
        i += 1
    return out


async def status(node: dict[str, Any]) -> dict[str, Any]:
    return await asyncio.to_thread(admin_status, node["admin"])


async def owned_elsewhere(survivors: list[dict[str, Any]]) -> bool:
    try:
        docs = [await status(n) for n in survivors]
    except OSError:
        return False
    return sum(d["cluster"]["owned_slots"] for d in docs) == 256


PATIENT = RetryPolicy(max_attempts=200, base_delay_s=0.05, max_delay_s=0.2)


@pytest.mark.redis_cluster
@aio
async def test_clients_on_different_nodes_reach_each_other(region3: Any) -> None:
    _, doc = region3
    nodes = nodes_of(doc)
    pubs = [await RelayClient.connect(n["ws"]) for n in nodes]
    subs = [await RelayClient.connect(n["ws"]) for n in nodes]
    channels = [f"inbox:user{i}" for i in range(20)]
    for ch in channels:
        for i, c in enumerate(pubs):
            ack = await c.publish(ch, f"{ch} from {i}", id=f"{ch}-{i}", ack="log")
            assert ack.ack == "log" and not ack.dup
    for ch in channels:
        for c in subs:
            sub = await c.subscribe(ch)
            assert sub.pending == 3
            got = [await asyncio.wait_for(sub.__anext__(), 5) for _ in range(3)]
            assert sorted(m.id for m in got) == [f"{ch}-{i}" for i in range(3)]
            await sub.unsubscribe()
    # Live delivery across nodes; an ack through a third node removes it for everyone.
    sub = await subs[0].subscribe("room:live")
    await pubs[2].publish("room:live", "hello", id="live-1")
    m = await asyncio.wait_for(sub.__anext__(), 5)
    assert m.body == "hello" and m.id == "live-1"
    assert await subs[1].ack("room:live", ["live-1"]) == 1
    again = await subs[2].subscribe("room:live")
    assert again.pending == 0
    for c in pubs + subs:
        await c.close()
    docs = [await status(n) for n in nodes]
    assert all(d["cluster"]["owned_slots"] > 0 for d in docs)


@pytest.mark.redis_cluster
@aio
async def test_kill_9_of_an_owner_loses_no_acked_message(region3: Any) -> None:
    _cluster, doc = region3
    nodes = nodes_of(doc)
    victim, entry, other = nodes[0], nodes[1], nodes[2]
    channels = channels_owned_by(doc, victim["id"], 5)
    client = await RelayClient.connect(entry["ws"], retry=PATIENT)
    acked: list[tuple[str, str]] = []
    killed_at = 0.0
    first_after = 0.0
    for i in range(300):
        ch = channels[i % len(channels)]
        if i == 100:
            os.kill(victim["pid"], signal.SIGKILL)
            killed_at = time.monotonic()
        try:
            a = await client.publish(ch, f"m{i}", id=f"m{i}", ack="log", timeout_s=30)
        except RelayErrorReply:
            continue  # refused (never acknowledged): allowed to be missing
        assert a.ack == "log"
        acked.append((ch, f"m{i}"))
        if i >= 100 and not first_after:
            first_after = time.monotonic()
    print(
        f"\n{len(acked)} of 300 acked; first publish to the dead owner's channels "
        f"acked {first_after - killed_at:.2f}s after kill -9"
    )
    # Every acknowledged id is pending exactly once, read through either survivor.
    for ch in channels:
        want = sorted(i for c, i in acked if c == ch)
        for node in (entry, other):
            got = await pending_ids(node["ws"], ch)
            assert sorted(got) == want, (ch, node["id"])
            assert max(Counter(got).values(), default=1) == 1
    await client.close()
    slot = slot_of(channels[0])
    assert owner_record(doc, slot)[0] in (entry["id"], other["id"])


@aio
async def test_a_node_restarted_at_once_after_kill_9_takes_nothing_from_the_others(
    region3: Any,
) -> None:
    # A node killed and started again while its old lease still runs (FAST: 1.5 s)
    # hears its own join before the other members' leases: a rebalance then would
    # build a ring of itself alone and fence every live owner at once. The others'
    # slots must stay theirs, and a subscriber on a third node must keep getting live
    # messages of them (owners that lost and took back a slot had dropped its
    # subscribers' interest).
    cluster, doc = region3
    nodes = nodes_of(doc)
    owner, victim, entry = nodes
    channels = channels_owned_by(doc, owner["id"], 8)
    before = {ch: owner_record(doc, slot_of(ch)) for ch in channels}
    listener = await RelayClient.connect(entry["ws"], retry=PATIENT)
    subs = [await listener.subscribe(ch) for ch in channels]
    os.kill(victim["pid"], signal.SIGKILL)
    back = await asyncio.to_thread(cluster.restart, victim["id"], 60)
    await asyncio.to_thread(wait_settled, cluster, [owner, back, entry])
    assert {ch: owner_record(doc, slot_of(ch)) for ch in channels} == before
    publisher = await RelayClient.connect(owner["ws"], retry=PATIENT)
    for ch, sub in zip(channels, subs, strict=True):
        await publisher.publish(ch, "still here", id=f"after-{ch}", ack="log", timeout_s=30)
        m = await asyncio.wait_for(sub.__anext__(), 10)
        assert (m.ch, m.id) == (ch, f"after-{ch}")
    await publisher.close()
    await listener.close()


@aio
async def test_paused_owner_is_fenced_and_rejoins(region3: Any) -> None:
    _cluster, doc = region3
    nodes = nodes_of(doc)
    victim, a, b = nodes[0], nodes[1], nodes[2]
    ch = channels_owned_by(doc, victim["id"], 1)[0]
    slot = slot_of(ch)
    _, old_epoch = owner_record(doc, slot)
    watcher = await Client.connect(a["ws"])
    await watcher.request({"op": "hello"}, "welcome")
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        # The others declare it dead when its lease expires and take its slots.
        await until(
            lambda: owner_record(doc, slot)[0] in (a["id"], b["id"]),
            timeout_s=20,
            what="slot claimed by a survivor",
        )
        assert owner_record(doc, slot)[1] > old_epoch
        publisher = await RelayClient.connect(b["ws"], retry=PATIENT)
        await publisher.publish(ch, "while paused", id="p1", ack="log")
    finally:
        os.kill(victim["pid"], signal.SIGCONT)

    # The paused node finds its lease gone and rejoins as a new member.
    async def rejoined() -> bool:
        try:
            st = await status(victim)
        except OSError:
            return False
        return bool(st["cluster"]["epoch"] > 3)

    deadline = time.monotonic() + 20
    while not await rejoined():
        assert time.monotonic() < deadline, "paused node did not rejoin"
        await asyncio.sleep(0.1)  # poll interval
    # Whatever the ring settles on, the message is pending exactly once.
    await publisher.publish(ch, "after", id="p2", ack="log")
    for node in (a, b, victim):
        deadline = time.monotonic() + 20
        while True:
            try:
                got = await pending_ids(node["ws"], ch)
                break
            except (TimeoutError, AssertionError, OSError):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)  # poll interval while slots settle
        assert sorted(got) in (["p1", "p2"],), (node["id"], got)
    await publisher.close()
    await watcher.close()


@aio
async def test_drain_moves_slots_with_zero_loss(region3: Any) -> None:
    _cluster, doc = region3
    nodes = nodes_of(doc)
    leaving, stay1, stay2 = nodes[0], nodes[1], nodes[2]
    channels = channels_owned_by(doc, leaving["id"], 5)
    pub = await RelayClient.connect(stay1["ws"], retry=PATIENT)
    for i, ch in enumerate(channels):
        await pub.publish(ch, f"before {i}", id=f"b{i}", ack="log")
    proc = await asyncio.to_thread(
        run_relay,
        "node",
        "drain",
        leaving["id"],
        "--redis",
        doc["regions"]["sg"]["redis"],
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"node": leaving["id"], "drained": True, "failed_over": False}
    for i, ch in enumerate(channels):
        await pub.publish(ch, f"after {i}", id=f"a{i}", ack="log")
    for i, ch in enumerate(channels):
        got = await pending_ids(stay2["ws"], ch)
        assert sorted(got) == sorted([f"b{i}", f"a{i}"])
    await pub.close()
    assert all(owner_record(doc, s)[0] != leaving["id"] for s in range(256))


@aio
async def test_a_region_whose_redis_restarted_empty_heals_by_itself(region3: Any) -> None:
    # The region's Redis is killed and comes back empty: leases, owner records and the
    # epoch counter are gone. Every node loses its lease and rejoins; each must take an
    # epoch above the ones its peers recorded (the counter starts again at 1) and see the
    # others' joins even if they came while it was not subscribed. Then the region
    # settles: everyone alive in every view, every slot owned once.
    cluster, doc = region3
    nodes = nodes_of(doc)
    before = {n["id"]: (await status(n))["cluster"]["epoch"] for n in nodes}
    redis = cluster.redis["sg"]
    redis.kill()

    async def leases_lost() -> bool:
        docs = [await status(n) for n in nodes]
        return all(d["cluster"]["lease_fresh"] is False for d in docs)

    deadline = time.monotonic() + 30
    while not await leases_lost():
        assert time.monotonic() < deadline, "the nodes never saw their Redis go"
        await asyncio.sleep(0.1)  # poll until every node knows its lease is not sure
    redis.start()
    await asyncio.to_thread(wait_settled, cluster, nodes, 60)
    after = {n["id"]: (await status(n))["cluster"]["epoch"] for n in nodes}
    assert min(after.values()) > max(before.values()), (before, after)
    client = await RelayClient.connect(nodes[0]["ws"], retry=PATIENT)
    for node in nodes:
        for ch in channels_owned_by(doc, node["id"], 3):
            a = await client.publish(ch, "after", id=f"after-{ch}", ack="log", timeout_s=30)
            assert a.ack == "log"
    await client.close()


@aio
async def test_a_node_restarted_while_redis_is_empty_joins_above_its_recorded_epoch(
    region3: Any,
) -> None:
    # The region's Redis comes back empty and a node killed meanwhile starts again
    # before its peers have noticed: the epoch counter starts at 1, but the peers
    # recorded the node's last epoch and ignore a lease not above it. The node joins
    # above the epoch written in its data directory, so the region settles.
    cluster, doc = region3
    nodes = nodes_of(doc)
    victim, others = nodes[1], [nodes[0], nodes[2]]
    old = (await status(victim))["cluster"]["epoch"]
    os.kill(victim["pid"], signal.SIGKILL)
    for n in others:  # they must not rejoin (and raise the counter) before the victim
        os.kill(n["pid"], signal.SIGSTOP)
    try:
        redis = cluster.redis["sg"]
        redis.kill()
        redis.start()
        back = await asyncio.to_thread(cluster.restart, victim["id"], 60)
    finally:
        for n in others:
            os.kill(n["pid"], signal.SIGCONT)
    assert (await status(back))["cluster"]["epoch"] > old
    await asyncio.to_thread(wait_settled, cluster, [others[0], back, others[1]], 60)


@aio
async def test_a_channel_over_8_mib_is_subscribed_through_another_node(region3: Any) -> None:
    # A sub through a node that does not own the channel gets the owner's pending
    # messages in one mesh reply, as large as the channel's byte cap allows (16 MiB):
    # over the mesh's old 8 MiB frame limit the receiving node cut the connection to
    # the owner, and the sub was unavailable every time.
    _, doc = region3
    owner, entry = nodes_of(doc)[0], nodes_of(doc)[1]
    ch = channels_owned_by(doc, owner["id"], 1)[0]
    client = await RelayClient.connect(owner["ws"], retry=PATIENT)
    body = "x" * 60_000
    for i in range(170):  # 10.2 MB
        await client.publish(ch, body, id=f"big-{i}", ack="log", timeout_s=30)
    await client.close()
    through_owner = await pending_ids(owner["ws"], ch)
    through_entry = await pending_ids(entry["ws"], ch)
    assert len(through_owner) == 170 and through_entry == through_owner


@aio
async def test_a_slot_claimed_from_a_snapshot_on_an_emptied_redis_can_be_taken_over() -> None:
    # The region's Redis lost its data; a node starts again from its snapshots, claims
    # the slots and appends on from positions the emptied log does not hold. Without a
    # checkpoint of what it loaded, a node without that snapshot found a hole at the
    # log's start for good: the slot stayed unavailable ("its log keeps being trimmed").
    with running(["sg"], nodes_per_region=2, cluster_settings=FAST) as (cluster, doc):
        first, second = nodes_of(doc)
        ch = channels_owned_by(doc, first["id"], 1)[0]
        client = await RelayClient.connect(first["ws"], retry=PATIENT)
        for i in range(5):
            await client.publish(ch, f"before {i}", id=f"b{i}", ack="log", timeout_s=30)
        await client.close()
        for n in (second, first):
            await asyncio.to_thread(cluster.stop_node, n["id"])  # snapshots written
        redis = cluster.redis["sg"]
        redis.kill()
        redis.start()  # empty
        # The second node's disk is lost too.
        data = next(x.config for x in cluster.nodes if x.id == second["id"])
        assert data is not None
        subprocess.run(["rm", "-rf", str(data.parent / "data")], check=True)
        back = await asyncio.to_thread(cluster.restart, first["id"], 60)
        client = await RelayClient.connect(back["ws"], retry=PATIENT)
        await client.publish(ch, "after", id="a0", ack="log", timeout_s=30)
        await client.close()
        os.kill(back["pid"], signal.SIGKILL)  # before its checkpoint cadence
        other = await asyncio.to_thread(cluster.restart, second["id"], 60)

        async def every_id() -> list[str] | None:
            try:
                return sorted(await pending_ids(other["ws"], ch))
            except (AssertionError, OSError):
                return None  # unavailable while the slot fails over

        deadline = time.monotonic() + 30
        while (got := await every_id()) != ["a0", "b0", "b1", "b2", "b3", "b4"]:
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.2)  # poll until the slot is served


@aio
async def test_many_subs_of_a_full_channel_at_once_do_not_cut_the_mesh(region3: Any) -> None:
    # Each sub through another node makes the owner send the channel's whole backlog
    # (here ~16 MiB) over the mesh: six at once overflowed its 64 MiB send buffer, the
    # owner cut the connection and every op crossing it failed `unavailable`.
    _, doc = region3
    owner, entry = nodes_of(doc)[0], nodes_of(doc)[1]
    ch = channels_owned_by(doc, owner["id"], 1)[0]
    filler = await Client.connect(owner["ws"])
    await filler.request({"op": "hello"}, "welcome")
    for k in range(18):  # 270 x 60 kB: the channel at its 16 MiB cap
        await filler.send(
            [
                {"op": "pub", "id": f"f{k}-{i}", "ch": ch, "body": "x" * 60_000, "ack": "mem"}
                for i in range(15)
            ]
        )
        for _ in range(15):
            await filler.expect("puback", 30)
    await filler.close()
    subs = [await Client.connect(entry["ws"]) for _ in range(6)]
    for c in subs:
        await c.request({"op": "hello"}, "welcome")
    for c in subs:
        await c.send({"op": "sub", "ch": ch})
    answers = []
    for c in subs:
        while (obj := await c.recv(30))["op"] == "msg":
            pass
        answers.append(obj.get("code", obj["op"]))
        await c.close()
    assert "unavailable" not in answers and "subscribed" in answers, answers
    assert set(answers) <= {"subscribed", "overloaded"}, answers


def test_draining_a_node_that_was_killed_says_it_failed_over(region3: Any) -> None:
    # A node that cannot drain (stopped: its lease runs out, as after kill -9) must not
    # be reported as drained: nothing was handed over, its slots failed over. Woken up
    # later it reads the drain and announces a leave, but not with its lease held.
    _, doc = region3
    victim = nodes_of(doc)[0]
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        proc = run_relay("node", "drain", victim["id"], "--redis", doc["regions"]["sg"]["redis"])
    finally:
        os.kill(victim["pid"], signal.SIGKILL)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "lease ran out before it drained" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert all(owner_record(doc, s)[0] != victim["id"] for s in range(256))


def test_status_and_metrics_of_a_region(region3: Any) -> None:
    _, doc = region3
    nodes = nodes_of(doc)
    r = run_relay("status", "--redis", doc["regions"]["sg"]["redis"], "--region", "sg", "--json")
    assert r.returncode == 0, r.stderr
    import json

    st = json.loads(r.stdout)
    assert [m["id"] for m in st["members"]] == [n["id"] for n in nodes]
    assert sum(m["slots"] for m in st["members"]) == 256 and st["unowned_slots"] == 0
    assert all(m["slots"] > 0 for m in st["members"])
    assert all(
        set(m["data_at_risk"]) >= {"unlogged_events", "unsaved_slots", "snapshot_age_s"}
        for m in st["members"]
    )
    import urllib.request

    with urllib.request.urlopen(nodes[0]["admin"] + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'relay_ring_members{node="sg/n1",region="sg",state="alive"} 3.0' in text
    for name in (
        "relay_slot_log_append_seconds_bucket",
        "relay_failovers_total",
        "relay_fenced_writes_total",
        "relay_batch_events_bucket",
        "relay_owned_slots",
    ):
        assert name in text, name
    unreachable = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "status",
            "--redis",
            "redis://127.0.0.1:1/0",
            "--region",
            "sg",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unreachable.returncode == 69


@aio
async def test_ring_plan_lists_exact_moves_and_what_they_carry(region3: Any) -> None:
    import json

    _, doc = region3
    url = doc["regions"]["sg"]["redis"]
    nodes = nodes_of(doc)
    pub = await RelayClient.connect(nodes[0]["ws"], retry=PATIENT)
    for i in range(30):
        await pub.publish(f"inbox:p{i}", "x" * 100, id=f"p{i}", ack="log")
    await pub.close()

    def plan(*args: str) -> subprocess.CompletedProcess[str]:
        return run_relay("ring", "plan", "--redis", url, "--region", "sg", "--json", *args)

    r = await asyncio.to_thread(plan, "--add", "sg/n4")
    assert r.returncode == 0, r.stderr
    add = json.loads(r.stdout)
    ring_before = Ring([n["id"] for n in nodes])
    ring_after = Ring([*[n["id"] for n in nodes], "sg/n4"])
    want = [(m.slot, m.from_node, m.to_node) for m in diff(ring_before, ring_after)]
    assert [(m["slot"], m["from"], m["to"]) for m in add["moves"]] == want
    assert all(m["to"] == "sg/n4" for m in add["moves"])
    assert add["after"]["slots_per_node"]["sg/n4"] == len(want)
    assert add["after"]["max_over_share"] <= 1.25
    # What each moving slot carries comes from its owner.
    moved = {m["slot"]: m for m in add["moves"]}
    carried = sum(1 for i in range(30) if slot_of(f"inbox:p{i}") in moved)
    assert add["moving_messages"] == carried
    r = await asyncio.to_thread(plan, "--remove", "sg/n1")
    rem = json.loads(r.stdout)
    assert rem["moves"] and all(m["from"] == "sg/n1" for m in rem["moves"])
    assert "sg/n1" not in rem["after"]["slots_per_node"]
    r = await asyncio.to_thread(plan, "--remove", "sg/zz")
    assert r.returncode == 2 and "sg/zz" in r.stderr
    r = await asyncio.to_thread(plan, "--weight", "sg/n2=2")
    heavy = json.loads(r.stdout)
    assert heavy["after"]["slots_per_node"]["sg/n2"] > heavy["before"]["slots_per_node"]["sg/n2"]
    # Planning changed nothing.
    assert all(owner_record(doc, s)[0] for s in range(256))
