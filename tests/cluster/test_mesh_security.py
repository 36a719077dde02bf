"""The mesh port from the outside: real node processes, a raw TCP peer, a real Redis.

A peer that cannot prove the region's mesh secret, or that claims a live node's id, is
refused before any op and nothing it sent is stored; an admitted peer's arguments pass
the same checks as a client's, and a bad one fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from cluster.keys import epoch_key, lease_key
from cluster.membership import Member
from cluster.ring import slot_of
from cluster.status import owners
from cluster.wire import Kind
from relay.dev import DevCluster
from tests.cluster.conftest import FAST, admin_status, wait_settled
from tests.conftest import aio
from tests.meshpeer import MeshPeer
from tests.wsclient import Client


@pytest.fixture(scope="module")
def region2() -> Iterator[tuple[DevCluster, dict[str, Any]]]:
    cluster = DevCluster(["sg"], nodes_per_region=2, cluster_settings=FAST)
    doc = cluster.start(timeout_s=60)
    try:
        wait_settled(cluster, doc["regions"]["sg"]["nodes"])
        yield cluster, doc
    finally:
        cluster.stop()


def lease(doc: dict[str, Any], node_id: str) -> Member:
    with redis.Redis.from_url(doc["regions"]["sg"]["redis"]) as r:
        raw = r.get(lease_key("sg", node_id))
    assert raw is not None
    return Member.decode(raw)


def mesh_port(doc: dict[str, Any], node_id: str) -> int:
    return int(lease(doc, node_id).mesh.rsplit(":", 1)[1])


def channel_owned_by(doc: dict[str, Any], node_id: str, prefix: str) -> str:
    with redis.Redis.from_url(doc["regions"]["sg"]["redis"]) as r:
        record = owners(r, "sg", 256)
    i = 0
    while record[slot_of(f"{prefix}{i}", 256)][0] != node_id:
        i += 1
    return f"{prefix}{i}"


def slot_log_length(doc: dict[str, Any], ch: str) -> int:
    with redis.Redis.from_url(doc["regions"]["sg"]["redis"]) as r:
        n: int = r.xlen(f"relay:{{sg:{slot_of(ch, 256)}}}:log")
    return n


def fake_member(doc: dict[str, Any], node_id: str) -> int:
    """Give ``node_id`` a lease (weight 0: no slot) as a joining node would; its epoch."""
    with redis.Redis.from_url(doc["regions"]["sg"]["redis"]) as r:
        epoch = int(r.incr(epoch_key("sg")))
        m = Member(node_id, epoch, "127.0.0.1:1", weight=0.0)
        r.set(lease_key("sg", node_id), m.encode(), px=60_000)
    return epoch


async def pending(doc: dict[str, Any], ch: str) -> int:
    c = await Client.connect(doc["regions"]["sg"]["nodes"][0]["ws"])
    await c.request({"op": "hello"}, "welcome")
    s = await c.request({"op": "sub", "ch": ch}, "subscribed")
    await c.close()
    n: int = s["pending"]
    return n


async def publish(node: dict[str, Any], ch: str, msg_id: str) -> dict[str, Any]:
    c = await Client.connect(node["ws"])
    await c.request({"op": "hello"}, "welcome")
    reply: dict[str, Any] = await c.request(
        {"op": "pub", "id": msg_id, "ch": ch, "body": "hi", "ack": "log"}, "puback"
    )
    await c.close()
    return reply


def attack(port: int, node_id: str, epoch: int, secret: str | None, ch: str) -> bool:
    """Handshake as ``node_id``, then forge a pub, an ack, a sub and an interest; whether
    the node cut the connection off without answering any of them."""
    p = MeshPeer(port)
    try:
        p.handshake(node_id, epoch, secret)
        args = {"ch": ch, "id": "forged", "body": b"x", "from": "admin", "ttl_ms": 10**12}
        p.send([Kind.REQUEST, 1, "pub", {**args, "ack": "mem"}])
        p.send([Kind.REQUEST, 2, "sub", {"ch": ch}])
        p.send([Kind.REQUEST, 3, "ack", {"ch": ch, "ids": ["legit"]}])
        p.send([Kind.INTEREST, ch, True])
        while True:
            p.sock.settimeout(10)
            m = p.recv()
            if m is None:
                return True
            if m[0] == Kind.REPLY:
                return False
    finally:
        p.close()


@pytest.mark.parametrize(
    "who",
    ["new-id-no-secret", "live-id-no-secret", "live-id-wrong-secret", "live-id-same-epoch"],
)
@aio
async def test_peers_that_cannot_prove_membership_are_refused_before_any_op(
    region2: Any, who: str
) -> None:
    cluster, doc = region2
    n1, n2 = doc["regions"]["sg"]["nodes"]
    ch = channel_owned_by(doc, n2["id"], f"inbox:{who}-")
    assert (await publish(n1, ch, "legit"))["ack"] == "log"
    before = slot_log_length(doc, ch)
    node_id, epoch, secret = {
        "new-id-no-secret": ("sg/a0", 1, None),
        "live-id-no-secret": (n1["id"], lease(doc, n1["id"]).epoch, None),
        "live-id-wrong-secret": (n1["id"], lease(doc, n1["id"]).epoch, "w" * 43),
        # The right secret, but the live node's own id and epoch: never replaces it.
        "live-id-same-epoch": (n1["id"], lease(doc, n1["id"]).epoch, cluster.mesh_secret("sg")),
    }[who]
    assert await asyncio.to_thread(attack, mesh_port(doc, n2["id"]), node_id, epoch, secret, ch)
    # Nothing stored, nothing acked away, and the real n1 → n2 path still works.
    assert slot_log_length(doc, ch) == before
    assert await pending(doc, ch) == 1
    assert (await publish(n1, ch, "after"))["ack"] == "log"
    assert await pending(doc, ch) == 2


@aio
async def test_a_peer_with_the_secret_but_no_live_lease_is_refused(region2: Any) -> None:
    cluster, doc = region2
    _n1, n2 = doc["regions"]["sg"]["nodes"]
    ch = channel_owned_by(doc, n2["id"], "inbox:nolease-")
    secret = cluster.mesh_secret("sg")
    assert await asyncio.to_thread(attack, mesh_port(doc, n2["id"]), "sg/a1", 99, secret, ch)
    assert await pending(doc, ch) == 0


def admitted_requests(port: int, epoch: int, secret: str, ch: str) -> dict[str, Any]:
    p = MeshPeer(port)
    try:
        auth = p.handshake("sg/a2", epoch, secret)
        assert auth is not None and auth[0] == Kind.AUTH
        good = {"ch": ch, "id": "ok-1", "body": b"x", "from": "alice", "ttl_ms": 60_000}
        bad = {
            "long-id": {**good, "id": "i" * 65},
            "ttl-past-cap": {**good, "id": "t", "ttl_ms": 10**13},
            "control-in-from": {**good, "id": "f", "from": "al\x00ice"},
            "body-too-large": {**good, "id": "b", "body": b"x" * 70_000},
            "star-channel": {**good, "id": "s", "ch": "inbox:*"},
            "not-a-map": [1, 2],
        }
        out: dict[str, Any] = {}
        for i, (name, args) in enumerate(bad.items(), start=10):
            p.send(
                [Kind.REQUEST, i, "pub", {**args, "ack": "log"} if name != "not-a-map" else args]
            )
        replies: dict[int, Any] = {}
        while len(replies) < len(bad):
            p.sock.settimeout(10)
            m = p.recv()
            assert m is not None, "the node closed an admitted peer's connection"
            if m[0] == Kind.PING:
                p.send([Kind.PONG, m[1]])
            elif m[0] == Kind.REPLY:
                replies[m[1]] = m
        for i, name in enumerate(bad, start=10):
            out[name] = replies[i][3][0] if not replies[i][2] else "accepted"
        r = p.request(1, "pub", {**good, "ack": "log"})
        out["good"] = r[3]["ack"] if r and r[2] else r
        r = p.request(2, "sub", {"ch": "x" * 300})
        out["sub-long-channel"] = r[3][0] if r and not r[2] else "accepted"
        r = p.request(3, "ack", {"ch": ch, "ids": []})
        out["ack-no-ids"] = r[3][0] if r and not r[2] else "accepted"
        return out
    finally:
        p.close()


@aio
async def test_an_admitted_peers_arguments_are_checked_like_a_clients(region2: Any) -> None:
    cluster, doc = region2
    _n1, n2 = doc["regions"]["sg"]["nodes"]
    ch = channel_owned_by(doc, n2["id"], "inbox:args-")
    epoch = fake_member(doc, "sg/a2")
    got = await asyncio.to_thread(
        admitted_requests, mesh_port(doc, n2["id"]), epoch, cluster.mesh_secret("sg"), ch
    )
    assert got == {
        "long-id": "bad_request",
        "ttl-past-cap": "bad_request",
        "control-in-from": "bad_request",
        "body-too-large": "too_large",
        "star-channel": "bad_request",
        "not-a-map": "bad_request",
        "good": "log",
        "sub-long-channel": "bad_request",
        "ack-no-ids": "bad_request",
    }
    # The good pub is stored; none of the bad ones.
    assert await pending(doc, ch) == 1
    status = await asyncio.to_thread(admin_status, n2["admin"])
    assert status["cluster"]["batcher"]["in_flight"] == 0
