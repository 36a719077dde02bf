"""relay.client (the asyncio SDK) against a real in-process node."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from twisted.internet.defer import Deferred

from relay.client import (
    BatchError,
    ClientError,
    ClientTimeout,
    ClosedError,
    ConnectError,
    ConnectionLostError,
    Limits,
    Message,
    Pub,
    RelayClient,
    RelayErrorReply,
    RetryPolicy,
    Subscription,
    UsageError,
)
from relay.server import RelayServer
from relay.session import Outcome, Session
from relay.ws import RelayProtocol
from tests.conftest import aio, until

ROOT = Path(__file__).resolve().parents[2]
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.02, reconnect_attempts=3)


async def connect(node: RelayServer, **kw: Any) -> RelayClient:
    return await RelayClient.connect(node.ws_url, **kw)


async def take(sub: Subscription, n: int, timeout_s: float = 5.0) -> list[Message]:
    return [await asyncio.wait_for(anext(sub), timeout_s) for _ in range(n)]


async def pending_ids(node: RelayServer, ch: str) -> list[str]:
    """What a fresh subscriber is sent: the channel's pending messages, oldest first."""
    async with await connect(node) as c:
        sub = await c.subscribe(ch)
        return [m.id for m in await take(sub, sub.pending)]


def server_proto(node: RelayServer, client: RelayClient) -> RelayProtocol:
    [proto] = [p for p in node.factory.connections if p.session and p.session.id == client.session]
    return proto


def reconnected(client: RelayClient, times: int) -> Callable[[], bool]:
    return lambda: client.reconnects == times and client.connected


def record_pub_ids(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count the ids of every ``pub`` the node receives (JSON clients)."""
    seen: Counter[str] = Counter()
    original = Session.receive

    def receive(self: Session, payload: bytes, now_s: float, now_ms: int) -> Outcome:
        data = json.loads(payload)
        for obj in data if isinstance(data, list) else [data]:
            if obj.get("op") == "pub":
                seen[obj["id"]] += 1
        return original(self, payload, now_s, now_ms)

    monkeypatch.setattr(Session, "receive", receive)
    return seen


def swallow_puback(
    monkeypatch: pytest.MonkeyPatch, msg_id: str, then: Callable[[RelayProtocol], None]
) -> list[int]:
    """The node handles the pub named ``msg_id`` but its replies never leave, once;
    ``then(proto)`` runs instead. Returns a list that gets one entry when it happened."""
    done: list[int] = []
    original = RelayProtocol.carry_out

    def carry_out(self: RelayProtocol, out: Outcome) -> None:
        if not done and any(r.get("id") == msg_id for r in out.replies):
            done.append(1)
            then(self)
            return
        original(self, out)

    monkeypatch.setattr(RelayProtocol, "carry_out", carry_out)
    return done


# -- connect, welcome, ping ----------------------------------------------------------


@aio
async def test_connect_exposes_welcome_and_ping(anon_node: RelayServer) -> None:
    async with await connect(anon_node, client="pytest") as c:
        assert c.node == "test/n1" and c.region == "test"
        assert isinstance(c.session, str) and c.session
        assert c.limits == Limits(max_body=65536, max_frame=1048576, rate_per_s=1000.0, burst=2000)
        assert c.welcome["op"] == "welcome"
        assert await c.ping() > 1_600_000_000_000
        assert c.connected
    assert c.closed and not c.connected


def test_client_module_imports_no_twisted() -> None:
    code = (
        "import sys, relay.client; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'autobahn')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@aio
async def test_connect_refused_is_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectError):
        await RelayClient.connect(f"ws://127.0.0.1:{port}/v1/ws", open_timeout_s=5)


@aio
async def test_missing_token_is_unauthorized(make_node: Any) -> None:
    node = make_node()  # anonymous clients not allowed
    with pytest.raises(RelayErrorReply) as e:
        await connect(node)
    assert e.value.code == "unauthorized"


@aio
async def test_token_grants_and_forbidden_is_not_retried(make_node: Any) -> None:
    secret = "a-test-secret-that-is-long-enough-for-hs256"
    node = make_node(auth={"hs256_secret": secret})
    claims = {"sub": "alice", "exp": time.time() + 300, "can_pub": ["inbox:*"]}
    claims["can_sub"] = ["inbox:alice"]
    tok = jwt.encode(claims, secret, algorithm="HS256")
    async with await connect(node, token=tok) as c:
        sub = await c.subscribe("inbox:alice")
        a = await c.publish("inbox:alice", "me")
        [m] = await take(sub, 1)
        assert (m.id, m.sender, m.body) == (a.id, "alice", "me")
        with pytest.raises(RelayErrorReply) as e:
            await c.publish("room:1", "hi", id="f1")
        assert (e.value.code, e.value.id, e.value.ch) == ("forbidden", "f1", "room:1")
        with pytest.raises(RelayErrorReply) as e:
            await c.subscribe("inbox:bob")
        assert e.value.code == "forbidden" and e.value.ch == "inbox:bob"
    assert node.status()["errors"] == {"forbidden": 2}


@aio
async def test_wss_with_ssl_context(wss_node: Any) -> None:
    node, certs = wss_node
    ctx = ssl.create_default_context(cafile=str(certs.ca_path))
    async with await connect(node, ssl=ctx) as c:
        assert (await c.publish("tls", "secret")).dup is False


# -- publish and subscribe -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@aio
async def test_publish_subscribe_round_trip(anon_node: RelayServer, fmt: Any) -> None:
    async with await connect(anon_node, fmt=fmt) as rcpt, await connect(anon_node, fmt=fmt) as s:
        sub = await rcpt.subscribe("rt")
        assert sub.pending == 0
        a = await s.publish("rt", "hello", ack="mem", ttl_s=60)
        b = await s.publish("rt", "café".encode())
        assert a.ch == "rt" and a.origin == "test" and a.dup is False
        assert isinstance(a.ack, str) and isinstance(a.ts, int) and len(a.id) <= 64
        assert a.id != b.id
        m1, m2 = await take(sub, 2)
        assert (m1.id, m1.ch, m1.sender, m1.origin, m1.ts) == (a.id, "rt", "anon", "test", a.ts)
        if fmt == "json":
            assert (m1.body, m2.body) == ("hello", "café")
        else:
            assert (m1.body, m2.body) == (b"hello", "café".encode())


@aio
async def test_binary_body_reaches_json_subscriber_as_bytes(anon_node: RelayServer) -> None:
    async with await connect(anon_node) as js, await connect(anon_node, fmt="msgpack") as mp:
        sub = await js.subscribe("bin")
        await mp.publish("bin", b"\xff\x00\x01", id="raw")
        [m] = await take(sub, 1)
        assert m.body == b"\xff\x00\x01"
        with pytest.raises(UsageError):
            await js.publish("bin", b"\xff")


@aio
async def test_pending_then_live_and_ack_removes(anon_node: RelayServer) -> None:
    async with await connect(anon_node) as c:
        for i in range(3):
            await c.publish("pl", f"m{i}", id=f"p{i}")
        sub = await c.subscribe("pl")
        assert sub.pending == 3
        assert [m.body for m in await take(sub, 3)] == ["m0", "m1", "m2"]
        await c.publish("pl", "now", id="live")
        [live] = await take(sub, 1)
        assert live.id == "live" and live.body == "now"
        assert await sub.ack("p0", "p1", "nope") == 2
        assert await c.ack("pl", ["p1", "live"]) == 1
    assert await pending_ids(anon_node, "pl") == ["p2"]


@aio
async def test_duplicate_id_is_dup_and_never_yielded_twice(anon_node: RelayServer) -> None:
    async with await connect(anon_node) as rcpt, await connect(anon_node) as s:
        sub = await rcpt.subscribe("dup")
        first = await s.publish("dup", "one", id="x")
        again = await s.publish("dup", "other", id="x")
        assert first.dup is False and again.dup is True and again.ts == first.ts
        await s.publish("dup", "marker", id="y")
        assert [m.id for m in await take(sub, 2)] == ["x", "y"]
        # The node sends every unacked message again on a second sub: the client drops
        # what it already yielded (here the reconnect does it: see below).
        server_proto(anon_node, rcpt).dropConnection(abort=True)
        await until(reconnected(rcpt, 1), what="reconnected")
        await s.publish("dup", "after", id="z")
        assert [m.id for m in await take(sub, 1)] == ["z"]
    assert anon_node.status()["counters"]["duplicates"] == 1


@aio
async def test_many_publishes_in_flight_are_matched(anon_node: RelayServer) -> None:
    async with await connect(anon_node, fmt="msgpack") as c:
        ids = [f"f{i}" for i in range(300)]
        work = [c.publish("fl" if i % 2 else "fl2", "b", id=ids[i]) for i in range(300)]
        acks, pongs = await asyncio.gather(
            asyncio.gather(*work), asyncio.gather(*(c.ping() for _ in range(20)))
        )
        assert [a.id for a in acks] == ids
        assert [a.ch for a in acks] == ["fl" if i % 2 else "fl2" for i in range(300)]
        assert all(isinstance(p, int) for p in pongs)
        assert len(c._replies) == 0


@aio
async def test_publish_many_is_one_frame(anon_node: RelayServer) -> None:
    async with await connect(anon_node) as c:
        frames = anon_node.factory.stats["frames_in"]
        acks = await c.publish_many(
            [("pm", "a"), Pub("pm", "b", id="mine"), Pub("pm2", "c", ttl_s=30), ("pm", b"d")]
        )
        assert anon_node.factory.stats["frames_in"] == frames + 1
        assert [a.ch for a in acks] == ["pm", "pm", "pm2", "pm"]
        assert acks[1].id == "mine" and len(set(a.id for a in acks)) == 4
        assert not any(a.dup for a in acks)
        assert await c.publish_many([]) == []
        assert [a.dup for a in await c.publish_many([Pub("pm", "again", id="mine")])] == [True]
    assert await pending_ids(anon_node, "pm") == [acks[0].id, "mine", acks[3].id]


@aio
async def test_publish_many_splits_frames_by_max_frame(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True, "max_frame": 8192, "max_body": 1000})
    async with await connect(node) as c:
        frames = node.factory.stats["frames_in"]
        acks = await c.publish_many([("big", "x" * 900) for _ in range(20)])
        assert node.factory.stats["frames_in"] - frames >= 3  # 20 x 900 B in 8 KiB frames
        assert len({a.id for a in acks}) == 20
        assert c.reconnects == 0  # no frame over max_frame (the node would close, 1009)


@aio
async def test_publish_many_and_ack_split_at_1000_objects(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True, "rate_per_s": 100_000.0, "burst": 100_000})
    async with await connect(node, fmt="msgpack") as c:
        frames = node.factory.stats["frames_in"]
        acks = await c.publish_many([("many", "y") for _ in range(2500)])
        assert node.factory.stats["frames_in"] - frames == 3
        ids = [a.id for a in acks]
        assert len(set(ids)) == 2500
        frames = node.factory.stats["frames_in"]
        assert await c.ack("many", [*ids, "unknown"]) == 2500
        assert node.factory.stats["frames_in"] - frames == 1  # 3 ack objects, one frame
        assert node.node.store.messages == 0


# -- retries -------------------------------------------------------------------------


@aio
async def test_retry_after_rate_limited_reuses_the_id(
    make_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node(client={"allow_anonymous": True, "rate_per_s": 1, "burst": 5})
    seen = record_pub_ids(monkeypatch)
    async with await connect(node, pace=False) as c:  # hello spends one token
        await c.publish_many([("drain", "x") for _ in range(4)])  # and these the rest
        a = await c.publish("rl", "once", id="solo")
        assert a.id == "solo" and a.dup is False
    assert node.status()["errors"]["rate_limited"] >= 1
    assert seen["solo"] >= 2  # refused, then sent again with the same id
    assert await pending_ids(node, "rl") == ["solo"]


@aio
async def test_batch_items_refused_by_rate_are_retried_alone(
    make_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node(client={"allow_anonymous": True, "rate_per_s": 5, "burst": 5})
    seen = record_pub_ids(monkeypatch)
    async with await connect(node, pace=False) as c:
        # One frame, handled at one instant: 4 tokens left, so the last 2 are refused.
        acks = await c.publish_many([Pub("rb", str(i), id=f"b{i}") for i in range(6)])
    assert [a.id for a in acks] == [f"b{i}" for i in range(6)]
    assert [seen[f"b{i}"] for i in range(4)] == [1, 1, 1, 1]
    assert seen["b4"] >= 2 and seen["b5"] >= 2
    assert node.status()["errors"]["rate_limited"] >= 2
    assert await pending_ids(node, "rb") == [f"b{i}" for i in range(6)]


@aio
async def test_pacing_keeps_under_the_node_rate(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True, "rate_per_s": 40, "burst": 5})
    async with await connect(node) as c:
        start = time.monotonic()
        acks = await c.publish_many([("pace", str(i)) for i in range(30)])
        acks += await asyncio.gather(*(c.publish("pace", "more") for _ in range(10)))
        assert await c.ping() > 0
        # 41 objects after hello, 4 tokens at hand: the rest come at 40 a second.
        assert time.monotonic() - start >= (41 - 4) / 40 * 0.9
    assert len({a.id for a in acks}) == 40
    assert "rate_limited" not in node.status()["errors"]


@aio
async def test_overloaded_is_retried_then_raised(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True}, store={"memory_high_watermark_bytes": 1})
    async with await connect(node, retry=FAST_RETRY) as c:
        with pytest.raises(RelayErrorReply) as e:
            await c.publish("ov", "x", id="o1")
        assert (e.value.code, e.value.id, e.value.ch) == ("overloaded", "o1", "ov")
        with pytest.raises(BatchError) as b:
            await c.publish_many([("ov", "y")])
        [err] = b.value.results
        assert isinstance(err, RelayErrorReply) and err.code == "overloaded"
        with pytest.raises(RelayErrorReply) as e:
            await c.subscribe("ov")  # a new subscription costs memory too
        assert (e.value.code, e.value.ch) == ("overloaded", "ov")
    assert node.status()["errors"]["overloaded"] >= 2 * FAST_RETRY.max_attempts + 1


@aio
async def test_non_retryable_errors_raise_with_code(anon_node: RelayServer) -> None:
    async with await connect(anon_node) as c:
        with pytest.raises(RelayErrorReply) as e:
            await c.publish("nr", "x" * 65537, id="big")
        assert (e.value.code, e.value.id, e.value.ch) == ("too_large", "big", "nr")
        with pytest.raises(RelayErrorReply) as e:
            await c.publish("nr", "x", ttl_s=10**9)
        assert e.value.code == "bad_request" and "ttl_s" in e.value.reason
        with pytest.raises(RelayErrorReply) as e:
            await c.publish("c" * 201, "x", id="longch")
        assert e.value.code == "bad_request" and e.value.id == "longch"
        with pytest.raises(UsageError):
            await c.publish("nr", "x", id="i" * 65)
        with pytest.raises(UsageError):
            await c.publish("nr", "x", ack="disk")
        # The connection stayed open; nothing was retried.
        assert (await c.publish("nr", "fits")).dup is False
        assert c.reconnects == 0
    assert anon_node.status()["errors"] == {"too_large": 1, "bad_request": 2}


@aio
async def test_no_answer_is_client_timeout(
    anon_node: RelayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    swallow_puback(monkeypatch, "never", lambda proto: None)
    async with await connect(anon_node) as c:
        with pytest.raises(ClientTimeout) as e:
            await c.publish("to", "x", id="never", timeout_s=0.3)
        assert isinstance(e.value, TimeoutError)
        assert len(c._replies) == 0
        assert await c.ping() > 0


# -- reconnects ----------------------------------------------------------------------


@aio
async def test_reconnect_after_drop_publishes_once_and_resumes(anon_node: RelayServer) -> None:
    async with await connect(anon_node) as c, await connect(anon_node) as other:
        sub = await c.subscribe("rc")
        await c.publish("rc", "before", id="a")
        assert [m.id for m in await take(sub, 1)] == ["a"]  # yielded, not acked
        old_session = c.session
        server_proto(anon_node, c).dropConnection(abort=True)
        ack = await c.publish("rc", "during", id="b")
        assert ack.id == "b" and ack.dup is False
        assert c.reconnects == 1 and c.session != old_session
        # The node replays "a" on the new sub; the client drops it. Live messages from
        # others reach the restored subscription.
        await other.publish("rc", "after", id="c")
        assert [m.id for m in await take(sub, 2)] == ["b", "c"]
    assert await pending_ids(anon_node, "rc") == ["a", "b", "c"]


@aio
async def test_lost_puback_is_retried_with_same_id_and_answered_dup(
    anon_node: RelayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The node stores the message, then the connection dies before the puback leaves.
    happened = swallow_puback(
        monkeypatch, "lost-ack", lambda proto: proto.dropConnection(abort=True)
    )
    async with await connect(anon_node) as c:
        sub = await c.subscribe("la")
        ack = await c.publish("la", "x", id="lost-ack")
        assert happened and ack.id == "lost-ack" and ack.dup is True
        assert c.reconnects == 1
        await c.publish("la", "y", id="next")
        assert [m.id for m in await take(sub, 2)] == ["lost-ack", "next"]
    assert anon_node.status()["counters"]["duplicates"] == 1
    assert await pending_ids(anon_node, "la") == ["lost-ack", "next"]


@aio
async def test_subscription_resumes_after_several_drops(anon_node: RelayServer) -> None:
    async with await connect(anon_node, fmt="msgpack") as c, await connect(anon_node) as s:
        subs = [await c.subscribe(f"many:{i}") for i in range(3)]
        for round_ in range(3):
            server_proto(anon_node, c).dropConnection(abort=True)
            await until(reconnected(c, round_ + 1), what="reconnect")
            await s.publish_many([(f"many:{i}", f"r{round_}") for i in range(3)])
            for sub in subs:
                [m] = await take(sub, 1)
                assert m.body == f"r{round_}".encode()
                await sub.ack(m.id)


@aio
async def test_gives_up_when_the_node_is_gone(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True})
    c = await connect(node, retry=FAST_RETRY)
    sub = await c.subscribe("gone")
    await Deferred.asFuture(node.stop(), asyncio.get_running_loop())
    with pytest.raises(ConnectionLostError) as e:
        await take(sub, 1)
    assert isinstance(e.value.__cause__, ConnectError)
    with pytest.raises(ConnectionLostError):
        await c.publish("gone", "x")
    await c.close()


# -- unsubscribe, close --------------------------------------------------------------


@aio
async def test_unsubscribe_ends_iteration(anon_node: RelayServer) -> None:
    async with await connect(anon_node) as c:
        async with await c.subscribe("u") as sub:
            await c.publish("u", "1", id="u1")
            assert [m.id for m in await take(sub, 1)] == ["u1"]
            with pytest.raises(UsageError):
                await c.subscribe("u")
        assert not sub.active
        assert [m async for m in sub] == []
        await c.publish("u", "2", id="u2")
        again = await c.subscribe("u")  # allowed once the first ended
        assert again.pending == 2 and [m.id for m in await take(again, 2)] == ["u1", "u2"]


@aio
async def test_close_ends_everything_and_leaves_no_tasks(anon_node: RelayServer) -> None:
    c = await connect(anon_node)
    sub = await c.subscribe("cl")
    await c.publish("cl", "x")
    await c.close()
    assert [m.ch for m in [m async for m in sub]] == ["cl"]  # queued ones, then the end
    with pytest.raises(ClosedError):
        await c.publish("cl", "y")
    assert isinstance(ClosedError("x"), ClientError)
    await c.close()  # twice is fine
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and t.get_name().startswith("relay-")]
    assert left == []
    await until(lambda: not anon_node.factory.connections, what="server saw the close")
