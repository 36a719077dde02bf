"""The mesh port from the outside: real node processes, a raw TCP peer, a real Redis.

A peer that cannot prove the region's mesh secret, or that claims a live node's id, is
refused before any op and nothing it sent is stored; an admitted peer's arguments pass
the same checks as a client's, and a bad one fails alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.keys import epoch_key, lease_key
from cluster.membership import Member
from cluster.ring import slot_of
from cluster.status import owners
from cluster.wire import Kind
from relay.codec import AckEvent, MessageEvent, decode_batch
from relay.dev import DevCluster
from tests.cluster.conftest import FAST, admin_status, running
from tests.conftest import aio
from tests.meshpeer import MeshPeer
from tests.wsclient import Client


@pytest.fixture(scope="module")
def region2() -> Iterator[tuple[DevCluster, dict[str, Any]]]:
    with running(["sg"], nodes_per_region=2, cluster_settings=FAST) as world:
        yield world


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


def log_top(doc: dict[str, Any], ch: str) -> bytes:
    """The id of the newest entry of ``ch``'s slot log."""
    with redis.Redis.from_url(doc["regions"]["sg"]["redis"]) as r:
        top = r.xrevrange(f"relay:{{sg:{slot_of(ch, 256)}}}:log", count=1)
    return bytes(top[0][0]) if top else b"0-0"


def logged_since(doc: dict[str, Any], ch: str, after: bytes) -> set[str]:
    """The message ids in ``ch``'s slot log after entry ``after`` (trims only remove
    entries older than the newest checkpoint, so none after ``after`` is lost)."""
    with redis.Redis.from_url(doc["regions"]["sg"]["redis"]) as r:
        entries = r.xrange(f"relay:{{sg:{slot_of(ch, 256)}}}:log", min=b"(" + after)
    ids = set()
    for _, fields in entries:
        for ev in decode_batch(fields[b"d"]):
            if isinstance(ev, MessageEvent):
                ids.add(ev.id)
            elif isinstance(ev, AckEvent):
                ids.update(f"ack:{i}" for i in ev.ids)
    return ids


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
    """Publish as a client does: sent again (same id) while the node answers
    ``unavailable``, e.g. before its mesh connection to the owner is up."""
    c = await Client.connect(node["ws"])
    await c.request({"op": "hello"}, "welcome")
    deadline = time.monotonic() + 10
    pub = {"op": "pub", "id": msg_id, "ch": ch, "body": "hi", "ack": "log"}
    while True:
        await c.send(pub)
        reply: dict[str, Any] = await c.recv()
        if reply.get("op") == "error" and reply.get("code") == "unavailable":
            assert time.monotonic() < deadline, reply
            await asyncio.sleep(0.1)  # retry interval, as a client backs off
            continue
        assert reply.get("op") == "puback", reply
        break
    await c.close()
    return reply


def attack(port: int, node_id: str, epoch: int, secret: str | None, ch: str) -> bool:
    """Say hello as ``node_id`` (this protocol's handshake, and the bare
    ``[HELLO, id, epoch]`` of before it), then forge a pub, a sub, an ack and an interest;
    whether the node cut both connections off without answering any of them."""
    for legacy in (False, True):
        p = MeshPeer(port)
        try:
            if legacy:
                p.send([Kind.HELLO, node_id, epoch])
            else:
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
                    break
                if m[0] == Kind.REPLY:
                    return False
        finally:
            p.close()
    return True


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
    before = log_top(doc, ch)
    live_epoch = lease(doc, n1["id"]).epoch
    node_id, epoch, secret = {
        "new-id-no-secret": ("sg/a0", 1, None),
        "live-id-no-secret": (n1["id"], live_epoch, None),
        "live-id-wrong-secret": (n1["id"], live_epoch, "w" * 43),
        # The right secret, but the live node's own id and epoch: never replaces it.
        "live-id-same-epoch": (n1["id"], live_epoch, "right"),
    }[who]
    if secret == "right":
        secret = cluster.mesh_secret("sg")
    assert await asyncio.to_thread(attack, mesh_port(doc, n2["id"]), node_id, epoch, secret, ch)
    # Nothing stored, nothing acked away, and the real n1 → n2 path still works.
    assert await pending(doc, ch) == 1
    assert (await publish(n1, ch, "after"))["ack"] == "log"
    assert await pending(doc, ch) == 2
    assert logged_since(doc, ch, before) == {"after"}


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


# -- fuzz: an admitted peer sending anything ---------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=80),
    st.binary(max_size=200),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_pub_args = st.fixed_dictionaries(
    {
        "ch": st.one_of(
            st.sampled_from(["inbox:fuzz", "inbox:*", "", "x" * 201]), st.text(max_size=20), _values
        ),
        "id": st.one_of(st.text(max_size=70), _values),
        "body": st.one_of(st.binary(max_size=300), _values),
        "from": st.one_of(st.text(max_size=30), _values),
        "ttl_ms": st.one_of(st.integers(-10, 10**14), _values),
        "ack": st.sampled_from(["mem", "log", "remote", "x"]),
    }
)
_ack_args = st.fixed_dictionaries(
    {
        "ch": st.one_of(st.just("inbox:fuzz"), _values),
        "ids": st.one_of(st.lists(st.text(max_size=70), max_size=5), _values),
    }
)
_messages = st.one_of(
    st.tuples(
        st.just(int(Kind.REQUEST)),
        st.integers(0, 2**40),
        st.sampled_from(["pub", "sub", "ack", "unknown"]),
        st.one_of(_pub_args, _ack_args, _values),
    ).map(list),
    st.tuples(st.just(int(Kind.DELIVER)), _values, _values).map(list),
    st.tuples(st.just(int(Kind.INTEREST)), _values, _values).map(list),
    st.tuples(st.sampled_from([int(k) for k in Kind] + [0, 99]), _values).map(list),
    st.lists(_values, max_size=6).map(lambda xs: [int(Kind.REQUEST), *xs]),
)
_frames = st.lists(
    st.one_of(
        _messages.map(lambda m: ("msg", m)), st.binary(max_size=40).map(lambda b: ("raw", b))
    ),
    min_size=1,
    max_size=12,
)


def _fuzz_once(
    doc: dict[str, Any], secret: str, port: int, peer_id: str, frames: list[Any]
) -> None:
    epoch = fake_member(doc, peer_id)
    p = MeshPeer(port)
    try:
        auth = p.handshake(peer_id, epoch, secret)
        assert auth is not None and auth[0] == Kind.AUTH, auth
        for kind, item in frames:
            if kind == "raw":
                p.send_raw(len(item).to_bytes(4, "big") + item)
            else:
                p.send(item)
        # Read what comes back for a moment (or until the node cuts us off).
        p.closed_within(0.2)
    except (ConnectionResetError, BrokenPipeError):
        pass  # cut off for garbage: allowed
    finally:
        p.close()


def _legit_pub(node: dict[str, Any], ch: str, msg_id: str) -> str:
    from websockets.sync.client import connect

    with connect(node["ws"], open_timeout=5) as ws:
        ws.send(json.dumps({"op": "hello"}))
        assert json.loads(ws.recv(timeout=5))["op"] == "welcome"
        ws.send(json.dumps({"op": "pub", "id": msg_id, "ch": ch, "body": "keep", "ack": "log"}))
        reply = json.loads(ws.recv(timeout=10))
    assert reply["op"] == "puback", reply
    return str(reply["ack"])


def test_fuzzed_mesh_frames_never_stop_a_node_or_lose_an_acked_message(region2: Any) -> None:
    """Anything an admitted peer sends: the node keeps answering clients (a pub through
    the other node, forwarded to it, is acked at log after every example) and every
    acknowledged message is still pending at the end."""
    cluster, doc = region2
    n1, n2 = doc["regions"]["sg"]["nodes"]
    port, secret = mesh_port(doc, n2["id"]), cluster.mesh_secret("sg")
    ch = channel_owned_by(doc, n2["id"], "inbox:kept-")
    acked: list[str] = []
    counter = iter(range(10**6))

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=True,
    )
    @given(frames=_frames)
    def run(frames: list[Any]) -> None:
        i = next(counter)
        _fuzz_once(doc, secret, port, f"sg/f{i}", frames)
        msg_id = f"kept-{i}"
        assert _legit_pub(n1, ch, msg_id) == "log"
        acked.append(msg_id)

    run()
    for n in cluster.nodes:
        assert n.proc.poll() is None, f"{n.id} exited"
    from websockets.sync.client import connect

    with connect(n1["ws"], open_timeout=5) as ws:
        ws.send(json.dumps({"op": "hello"}))
        ws.recv(timeout=5)
        ws.send(json.dumps({"op": "sub", "ch": ch}))
        sub = json.loads(ws.recv(timeout=10))
        assert sub["op"] == "subscribed" and sub["pending"] == len(acked)
        got = set()
        while len(got) < len(acked):
            data = json.loads(ws.recv(timeout=10))
            for o in data if isinstance(data, list) else [data]:
                if o["op"] == "msg":
                    got.add(o["id"])
    assert got == set(acked)
