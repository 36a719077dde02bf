"""PROTOCOL.md over real sockets, with an independent client (``websockets``)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import msgspec
import pytest
import websockets

from relay.server import RelayServer
from tests.conftest import aio, until
from tests.wsclient import Client


async def anon(server: RelayServer, fmt: str = "json") -> Client:
    c = await Client.connect(server.ws_url, fmt)
    await c.request({"op": "hello", "client": "test"}, "welcome")
    return c


def pub(i: Any, ch: str = "inbox:alice", body: Any = "hi", **kw: Any) -> dict[str, Any]:
    return {"op": "pub", "id": str(i), "ch": ch, "body": body, **kw}


def status(server: RelayServer) -> dict[str, Any]:
    """The node's /status document (read in-process; tests/integration/test_admin.py
    reads it over HTTP)."""
    return server.status()


# -- hello, welcome, ping ------------------------------------------------------------


@aio
async def test_hello_gets_welcome_with_limits(anon_node: RelayServer) -> None:
    c = await Client.connect(anon_node.ws_url)
    w = await c.request({"op": "hello", "client": "pytest"}, "welcome")
    assert w["node"] == "test/n1" and w["region"] == "test"
    assert isinstance(w["session"], str) and w["session"]
    assert w["limits"] == {
        "max_body": 65536,
        "max_frame": 1048576,
        "rate_per_s": 1000.0,
        "burst": 2000,
    }
    await c.close()


@aio
async def test_ping_before_hello_is_answered(anon_node: RelayServer) -> None:
    c = await Client.connect(anon_node.ws_url)
    p = await c.request({"op": "ping"}, "pong")
    assert isinstance(p["ts"], int) and p["ts"] > 1_600_000_000_000
    await c.close()


@aio
async def test_first_other_op_is_implicit_anonymous_hello(anon_node: RelayServer) -> None:
    c = await Client.connect(anon_node.ws_url)
    await c.send(pub(1))
    await c.expect("welcome")
    ack = await c.expect("puback")
    assert ack["id"] == "1"
    await c.close()


@aio
async def test_no_subprotocol_means_json(anon_node: RelayServer) -> None:
    c = await Client.connect(anon_node.ws_url, subprotocol=False)
    assert c.conn.subprotocol is None
    await c.request({"op": "hello"}, "welcome")
    await c.close()


@aio
async def test_wrong_path_is_refused(anon_node: RelayServer) -> None:
    url = anon_node.ws_url.replace("/v1/ws", "/other")
    with pytest.raises(websockets.InvalidStatus) as e:
        await websockets.connect(url)
    assert e.value.response.status_code == 404


# -- pub, sub, ack -------------------------------------------------------------------


@aio
async def test_puback_fields(anon_node: RelayServer) -> None:
    c = await anon(anon_node)
    a = await c.request(pub("m1", ack="mem"), "puback")
    assert a["id"] == "m1" and a["ch"] == "inbox:alice"
    assert a["origin"] == "test" and a["dup"] is False
    assert a["ack"] == "mem"
    assert isinstance(a["ts"], int)
    await c.close()


@aio
async def test_pending_then_live_in_order_and_ack_removes(anon_node: RelayServer) -> None:
    sender = await anon(anon_node)
    for i in range(5):
        await sender.request(pub(i, body=f"m{i}"), "puback")
    rcpt = await anon(anon_node)
    s = await rcpt.request({"op": "sub", "ch": "inbox:alice"}, "subscribed")
    assert s["pending"] == 5
    got = [await rcpt.expect("msg") for _ in range(5)]
    assert [m["body"] for m in got] == [f"m{i}" for i in range(5)]
    assert [m["from"] for m in got] == ["anon"] * 5
    ts = [m["ts"] for m in got]
    assert ts == sorted(ts)
    await sender.request(pub("live", body="now"), "puback")
    live = await rcpt.expect("msg")
    assert live["id"] == "live" and live["body"] == "now" and live["origin"] == "test"
    acked = await rcpt.request(
        {"op": "ack", "ch": "inbox:alice", "ids": ["0", "1", "2", "nope"]}, "acked"
    )
    assert acked == {"op": "acked", "ch": "inbox:alice", "n": 3}
    # Unacked messages come again on the next sub; acked ones never.
    again = await anon(anon_node)
    s = await again.request({"op": "sub", "ch": "inbox:alice"}, "subscribed")
    assert s["pending"] == 3
    assert [(await again.expect("msg"))["id"] for _ in range(3)] == ["3", "4", "live"]
    for c in (sender, rcpt, again):
        await c.close()


@aio
async def test_duplicate_id_is_acknowledged_dup_and_delivered_once(anon_node: RelayServer) -> None:
    rcpt = await anon(anon_node)
    await rcpt.request({"op": "sub", "ch": "c"}, "subscribed")
    sender = await anon(anon_node)
    first = await sender.request(pub("x", ch="c"), "puback")
    again = await sender.request(pub("x", ch="c", body="other"), "puback")
    assert first["dup"] is False and again["dup"] is True
    assert again["ts"] == first["ts"]
    assert (await rcpt.expect("msg"))["id"] == "x"
    # Nothing else arrives: the next object is the pong, not a second copy.
    await rcpt.send({"op": "ping"})
    assert (await rcpt.recv())["op"] == "pong"
    # Still a duplicate after it was acked (the dedupe window), and not stored again.
    await rcpt.request({"op": "ack", "ch": "c", "ids": ["x"]}, "acked")
    third = await sender.request(pub("x", ch="c"), "puback")
    assert third["dup"] is True
    fresh = await anon(anon_node)
    assert (await fresh.request({"op": "sub", "ch": "c"}, "subscribed"))["pending"] == 0
    assert status(anon_node)["counters"]["duplicates"] == 2
    for c in (rcpt, sender, fresh):
        await c.close()


@aio
async def test_same_id_on_two_channels_is_two_messages(anon_node: RelayServer) -> None:
    c = await anon(anon_node)
    a = await c.request(pub("same", ch="a"), "puback")
    b = await c.request(pub("same", ch="b"), "puback")
    assert a["dup"] is False and b["dup"] is False
    await c.close()


@aio
async def test_unsub_stops_live_messages(anon_node: RelayServer) -> None:
    c = await anon(anon_node)
    await c.request({"op": "sub", "ch": "u"}, "subscribed")
    assert await c.request({"op": "unsub", "ch": "u"}, "unsubscribed") == {
        "op": "unsubscribed",
        "ch": "u",
    }
    other = await anon(anon_node)
    await other.request(pub(1, ch="u"), "puback")
    await c.send({"op": "ping"})
    assert (await c.recv())["op"] == "pong"
    await c.close()
    await other.close()


@aio
async def test_ttl_expires(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True})
    c = await anon(node)
    await c.request(pub("short", ch="t", ttl_s=1), "puback")
    await c.request(pub("long", ch="t"), "puback")

    async def pending() -> int:
        s = await c.request({"op": "sub", "ch": "t"}, "subscribed")
        for _ in range(s["pending"]):
            await c.expect("msg")
        n: int = s["pending"]
        return n

    assert await pending() == 2
    deadline = asyncio.get_running_loop().time() + 10
    while await pending() != 1:
        assert asyncio.get_running_loop().time() < deadline, "TTL did not expire"
        await asyncio.sleep(0.1)  # poll interval
    await until(lambda: status(node)["counters"]["expired"] == 1, what="expired counted")
    await c.close()


@aio
async def test_channel_cap_evicts_oldest_and_counts(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True}, store={"channel_max_messages": 3})
    c = await anon(node)
    for i in range(5):
        await c.request(pub(i, ch="cap"), "puback")
    s = await c.request({"op": "sub", "ch": "cap"}, "subscribed")
    assert s["pending"] == 3
    assert [(await c.expect("msg"))["id"] for _ in range(3)] == ["2", "3", "4"]
    assert status(node)["counters"]["evicted"] == 2
    await c.close()


@aio
async def test_batched_frame_gets_replies_in_order(anon_node: RelayServer) -> None:
    c = await anon(anon_node)
    await c.send([pub(i, ch="batch", ack="mem") for i in range(100)] + [{"op": "ping"}])
    acks = [await c.expect("puback") for _ in range(100)]
    assert [a["id"] for a in acks] == [str(i) for i in range(100)]
    await c.expect("pong")
    await c.close()


@aio
async def test_msgpack_bodies_are_bytes_and_reach_json_clients(anon_node: RelayServer) -> None:
    mp = await anon(anon_node, "msgpack")
    js = await anon(anon_node, "json")
    sender = await anon(anon_node, "msgpack")
    await js.request({"op": "sub", "ch": "bin"}, "subscribed")
    await mp.request({"op": "sub", "ch": "bin"}, "subscribed")
    await sender.request(pub("u", ch="bin", body=b"caf\xc3\xa9"), "puback")
    await sender.request(pub("raw", ch="bin", body=b"\xff\x00\x01"), "puback")
    m1, m2 = await mp.expect("msg"), await mp.expect("msg")
    assert m1["body"] == b"caf\xc3\xa9" and m2["body"] == b"\xff\x00\x01"
    j1, j2 = await js.expect("msg"), await js.expect("msg")
    assert j1["body"] == "café" and "body_enc" not in j1
    assert j2["body_enc"] == "base64" and base64.b64decode(j2["body"]) == b"\xff\x00\x01"
    await sender.request(pub("s", ch="bin", body="text"), "puback")
    assert (await mp.expect("msg"))["body"] == b"text"
    await sender.close()
    await mp.close()
    await js.close()


# -- errors --------------------------------------------------------------------------


BAD_OBJECTS = [
    ({"op": "nope"}, "unknown op"),
    ({"no": "op"}, "op is missing"),
    ({"op": 5}, "op is missing"),
    ({"op": "pub", "ch": "c", "body": "x"}, "id must be"),
    ({"op": "pub", "id": "", "ch": "c", "body": "x"}, "id must be"),
    ({"op": "pub", "id": "x" * 65, "ch": "c", "body": "x"}, "id must be"),
    ({"op": "pub", "id": 7, "ch": "c", "body": "x"}, "id must be"),
    ({"op": "pub", "id": "a", "ch": "", "body": "x"}, "ch must be"),
    ({"op": "pub", "id": "a", "ch": "c" * 201, "body": "x"}, "ch must be"),
    ({"op": "pub", "id": "a", "ch": "bad\x00ch", "body": "x"}, "control"),
    ({"op": "pub", "id": "a", "ch": 3, "body": "x"}, "ch must be a string"),
    ({"op": "pub", "id": "a", "ch": "c"}, "body must be"),
    ({"op": "pub", "id": "a", "ch": "c", "body": 5}, "body must be"),
    ({"op": "pub", "id": "a", "ch": "c", "body": "x", "ack": "disk"}, "ack must be"),
    ({"op": "pub", "id": "a", "ch": "c", "body": "x", "ttl_s": "1"}, "ttl_s"),
    ({"op": "pub", "id": "a", "ch": "c", "body": "x", "ttl_s": True}, "ttl_s"),
    ({"op": "pub", "id": "a", "ch": "c", "body": "x", "ttl_s": -1}, "ttl_s"),
    ({"op": "sub"}, "ch must be"),
    ({"op": "ack", "ch": "c"}, "ids must be"),
    ({"op": "ack", "ch": "c", "ids": []}, "ids must be"),
    ({"op": "ack", "ch": "c", "ids": ["a"] * 1001}, "ids must be"),
    ({"op": "ack", "ch": "c", "ids": [1]}, "id must be"),
    ({"op": "unsub", "ch": None}, "ch must be"),
    ({"op": "hello", "token": 5}, "token must be"),
]


@pytest.mark.parametrize(("obj", "reason"), BAD_OBJECTS)
@aio
async def test_bad_object_is_bad_request_and_connection_stays(
    anon_node: RelayServer, obj: dict[str, Any], reason: str
) -> None:
    c = await anon(anon_node)
    e = await c.request(obj, "error")
    assert e["code"] == "bad_request"
    assert reason in e["reason"]
    await c.request({"op": "ping"}, "pong")
    await c.close()


@pytest.mark.parametrize(
    "frame",
    ["{", "[]", "42", '"str"', "null", "[1, 2]", '{"op": "ping"', "\ufeff{}", "[" * 5000],
)
@aio
async def test_malformed_json_frames(anon_node: RelayServer, frame: str) -> None:
    c = await anon(anon_node)
    await c.send_raw(frame)
    await c.send({"op": "ping"})
    replies = []
    while (r := await c.recv())["op"] != "pong":
        replies.append(r)
    assert replies and all(r["op"] == "error" for r in replies)
    assert {r["code"] for r in replies} == {"bad_request"}
    await c.close()


@pytest.mark.parametrize(
    "frame", [b"\xc1", b"\x92\x01", b"\x81\xa2op", b"\xdd\xff\xff\xff\xff", b"\x07", b"\xc4\x05ab"]
)
@aio
async def test_malformed_msgpack_frames(anon_node: RelayServer, frame: bytes) -> None:
    c = await anon(anon_node, "msgpack")
    await c.send_raw(frame)
    assert (await c.expect("error"))["code"] == "bad_request"
    await c.request({"op": "ping"}, "pong")
    await c.close()


@aio
async def test_error_names_id_and_channel(anon_node: RelayServer) -> None:
    c = await anon(anon_node)
    e = await c.request({"op": "pub", "id": "q", "ch": "c", "body": "x", "ack": 3}, "error")
    assert e["id"] == "q" and e["ch"] == "c"
    await c.close()


@aio
async def test_too_large_body_keeps_connection(anon_node: RelayServer) -> None:
    c = await anon(anon_node)
    e = await c.request(pub("big", body="x" * 65537), "error")
    assert e["code"] == "too_large" and e["id"] == "big"
    await c.request(pub("fits", body="x" * 65536), "puback")
    await c.close()


@aio
async def test_frame_over_max_frame_closes_1009(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True, "max_frame": 100_000, "max_body": 1000})
    c = await anon(node)
    await c.send_raw("x" * 100_001)
    code, _ = await c.closed()
    assert code == 1009


@aio
async def test_repeated_bad_requests_close_1002(anon_node: RelayServer) -> None:
    c = await anon(anon_node)
    await c.send([{"op": "nope"}] * 50)
    code, _ = await c.closed()
    assert code == 1002
    # The node still serves others.
    other = await anon(anon_node)
    await other.request({"op": "ping"}, "pong")
    await other.close()


@aio
async def test_rate_limited_then_closed_1008(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True, "rate_per_s": 1, "burst": 5})
    c = await anon(node)  # hello spends one token
    await c.send([{"op": "ping"}] * 6)
    replies = [await c.recv() for _ in range(6)]
    assert [r["op"] for r in replies] == ["pong"] * 4 + ["error"] * 2
    assert replies[-1]["code"] == "rate_limited"
    await c.send([{"op": "ping"}] * 400)
    code, _ = await c.closed()
    assert code == 1008
    assert status(node)["errors"]["rate_limited"] >= 200


@aio
async def test_overloaded_node_refuses_pub_and_sub_not_unsub_or_ack(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True}, store={"memory_high_watermark_bytes": 1})
    c = await anon(node)
    e = await c.request(pub("o"), "error")
    assert e["code"] == "overloaded" and e["id"] == "o"
    e = await c.request({"op": "sub", "ch": "inbox:alice"}, "error")
    assert e["code"] == "overloaded" and e["ch"] == "inbox:alice"
    await c.request({"op": "unsub", "ch": "inbox:alice"}, "unsubscribed")
    await c.request({"op": "ack", "ch": "inbox:alice", "ids": ["o"]}, "acked")
    await c.close()


@aio
async def test_internal_error_has_correlation_id_and_node_serves(
    anon_node: RelayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*a: Any, **kw: Any) -> Any:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(anon_node.node, "publish", broken)
    c = await anon(anon_node)
    e = await c.request(pub(1), "error")
    assert e["code"] == "internal" and "correlation id" in e["reason"]
    await c.request({"op": "ping"}, "pong")
    await c.close()


# -- origins, shutdown ---------------------------------------------------------------


@aio
async def test_disallowed_origin_is_refused(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True, "allowed_origins": ("https://chat.example",)})
    ok = await Client.connect(node.ws_url, origin="https://chat.example")
    await ok.request({"op": "ping"}, "pong")
    await ok.close()
    with pytest.raises(websockets.InvalidStatus) as e:
        await websockets.connect(node.ws_url, origin="https://evil.example")
    assert e.value.response.status_code == 403


@aio
async def test_stop_closes_clients_with_1001(make_node: Any) -> None:
    from twisted.internet.defer import Deferred

    node = make_node(client={"allow_anonymous": True})
    c = await anon(node)
    closing = asyncio.ensure_future(c.closed())
    await Deferred.asFuture(node.stop(), asyncio.get_running_loop())
    code, _ = await closing
    assert code == 1001
    with pytest.raises(OSError):
        await websockets.connect(node.ws_url)


# -- fragmented and byte-at-a-time frames --------------------------------------------


@aio
async def test_fragmented_message_is_reassembled(anon_node: RelayServer) -> None:
    c = await anon(anon_node)
    text = json.dumps([pub(i, ch="frag") for i in range(10)])
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    await c.conn.send(iter(pieces))
    assert [(await c.expect("puback"))["id"] for _ in range(10)] == [str(i) for i in range(10)]
    await c.close()


def _masked_frame(payload: bytes, opcode: int = 1) -> bytes:
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _raw_connection(
    node: RelayServer,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A TCP connection to ``node``'s client port and the opening handshake to send on it
    (JSON subprotocol), for tests that write WebSocket frames byte by byte."""
    host, port = node.ws_url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    handshake = (
        f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relay.v1.json\r\n\r\n"
    ).encode()
    return reader, writer, handshake


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 16, 64, 10_000])
@aio
async def test_handshake_and_frames_fed_in_chunks(anon_node: RelayServer, chunk: int) -> None:
    reader, writer, handshake = await _raw_connection(anon_node)
    frames = _masked_frame(json.dumps({"op": "hello"}).encode()) + _masked_frame(
        json.dumps([pub("c1", ch="chunk"), {"op": "ping"}]).encode()
    )
    for data in (handshake, frames):
        for i in range(0, len(data), chunk):
            writer.write(data[i : i + chunk])
            await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    got: list[dict[str, Any]] = []
    while len(got) < 3:
        _b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        data = json.loads(await reader.readexactly(n))
        got.extend(data if isinstance(data, list) else [data])
    assert [g["op"] for g in got] == ["welcome", "puback", "pong"]
    writer.close()


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
@aio
async def test_whole_frames_control_frames_and_fragments_mixed_in_one_stream(
    anon_node: RelayServer, chunk: int
) -> None:
    # Whole frames take the node's one-pass reader (relay/wsread.py), a ping and a
    # fragmented message take Autobahn's; in any chunking, the order holds.
    reader, writer, handshake = await _raw_connection(anon_node)
    writer.write(handshake)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")

    def one(i: str) -> bytes:
        return json.dumps(pub(i, ch="mix")).encode()

    frag = one("c")
    stream = (
        _masked_frame(json.dumps({"op": "hello"}).encode())
        + _masked_frame(one("a"))
        + _masked_frame(b"are you there", opcode=9)
        + _masked_frame(one("b"))
        + bytes([0x01, 0x80 | 5])
        + b"\x01\x02\x03\x04"
        + bytes(b ^ (1, 2, 3, 4)[i % 4] for i, b in enumerate(frag[:5]))
        + _masked_frame(frag[5:], opcode=0)
        + _masked_frame(one("d"))
        + _masked_frame(one("e"))
    )
    for i in range(0, len(stream), chunk):
        writer.write(stream[i : i + chunk])
        await writer.drain()
    got: list[str] = []
    pong = None
    while len(got) < 6 or pong is None:
        b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        body = await reader.readexactly(n)
        if b0 & 0x0F == 0x0A:
            pong = body
            continue
        data = json.loads(body)
        for d in data if isinstance(data, list) else [data]:
            got.append(d["op"] if d["op"] != "puback" else d["id"])
    assert got == ["welcome", "a", "b", "c", "d", "e"]
    assert pong == b"are you there"
    writer.close()


# -- slow consumers ------------------------------------------------------------------


@aio
async def test_slow_consumer_is_cut_off_and_keeps_its_messages(make_node: Any) -> None:
    node = make_node(client={"allow_anonymous": True, "max_outbound_bytes": 256 * 1024})
    slow = await Client.connect(node.ws_url, max_queue=1)
    await slow.request({"op": "hello"}, "welcome")
    await slow.request({"op": "sub", "ch": "flood"}, "subscribed")
    # From here `slow` reads nothing: the node's send buffer for it fills up.
    sender = await anon(node)
    body = "x" * 60_000
    n = 0
    while not status(node)["disconnects"].get("slow_consumer"):
        n += 1
        assert n < 2000, "slow consumer was never cut off"
        await sender.request(pub(f"f{n}", ch="flood", body=body, ack="mem"), "puback")
    # Every message stays pending for the next subscriber.
    fresh = await anon(node)
    s = await fresh.request({"op": "sub", "ch": "flood"}, "subscribed")
    assert s["pending"] == n
    await fresh.close()
    await sender.close()


@aio
async def test_subs_from_a_client_that_reads_nothing_cannot_copy_a_backlog_without_end(
    make_node: Any,
) -> None:
    # Each sub of a channel queues a copy of its pending messages for the connection; a
    # client that sends sub after sub and reads nothing made the node copy a channel's
    # backlog without end (GBs of RSS, then every client's pub refused `overloaded`).
    node = make_node(client={"allow_anonymous": True}, store={"channel_max_bytes": 4 * 1024 * 1024})
    sender = await anon(node)
    body = "x" * 60_000
    for k in range(4):  # 3.6 MB pending, within the channel's 4 MiB
        await sender.send([pub(f"b{k}-{i}", ch="big", body=body, ack="mem") for i in range(15)])
        for _ in range(15):
            await sender.expect("puback")
    hog = await Client.connect(node.ws_url, max_queue=1)
    await hog.request({"op": "hello"}, "welcome")
    await hog.send([{"op": "sub", "ch": "big"}] * 100)  # one frame; nothing read meanwhile

    def holding() -> list[Any]:
        return [p for p in node.factory.connections if p.session and "big" in p.session.held]

    await until(lambda: len(holding()) == 1, what="the frame handled")
    proto = holding()[0]
    limit = 2 * 4 * 1024 * 1024  # twice the channel's byte cap
    assert proto.outbox.replay_bytes <= limit + 4 * 1024 * 1024
    # Read it all: a few subs answered, the rest refused with a code that says why.
    answers: list[dict[str, Any]] = []
    msgs = 0
    while len(answers) < 100 or msgs < 60 * sum(a["op"] == "subscribed" for a in answers):
        obj = await hog.recv()
        if obj["op"] == "msg":
            msgs += 1
        else:
            answers.append(obj)
    subscribed = [a for a in answers if a["op"] == "subscribed"]
    refused = [a for a in answers if a.get("code") == "overloaded"]
    assert 1 <= len(subscribed) <= 4 and len(subscribed) + len(refused) == 100
    assert "still queued for this connection" in refused[0]["reason"]
    # Once read, a sub is answered again.
    again = await hog.request({"op": "sub", "ch": "big"}, "subscribed")
    assert again["pending"] == 60
    for _ in range(60):
        await hog.expect("msg")
    await hog.close()
    await sender.close()


# -- no memory growth under bad input ------------------------------------------------


@aio
async def test_bad_input_does_not_grow_memory(anon_node: RelayServer) -> None:
    import gc
    import tracemalloc

    async def abuse() -> None:
        for _ in range(20):
            c = await anon(anon_node)
            await c.send_raw("{not json")
            await c.expect("error")
            await c.send(
                [
                    {"op": "pub", "id": "x" * 100, "ch": "c", "body": "b"},
                    {"op": "nope"},
                    {"op": "sub", "ch": 1},
                ]
            )
            for _ in range(3):
                await c.expect("error")
            await c.close()
        await until(lambda: not anon_node.factory.connections, what="connections closed")

    await abuse()  # warm caches
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    await abuse()
    await abuse()
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    relay_growth = sum(
        s.size_diff
        for s in after.compare_to(before, "filename")
        if "/relay/" in s.traceback[0].filename
    )
    assert relay_growth < 64 * 1024, f"relay code kept {relay_growth} bytes"
    assert anon_node.node.store.messages == 0


def test_msgspec_roundtrip_helper() -> None:
    assert msgspec.msgpack.decode(msgspec.msgpack.encode({"a": b"b"})) == {"a": b"b"}


# -- invalid UTF-8 in channel names --------------------------------------------------


@aio
async def test_lone_surrogate_channel_in_json_is_bad_request(anon_node: RelayServer) -> None:
    c = await anon(anon_node)
    await c.send_raw('{"op": "sub", "ch": "inbox:\\ud800"}')
    e = await c.expect("error")
    assert e["code"] == "bad_request"
    await c.request({"op": "ping"}, "pong")
    await c.close()


@aio
async def test_invalid_utf8_channel_in_msgpack_is_bad_request(anon_node: RelayServer) -> None:
    c = await anon(anon_node, "msgpack")
    # {"op": "sub", "ch": <str with bytes ff fe>}
    await c.send_raw(b"\x82\xa2op\xa3sub\xa2ch\xa2\xff\xfe")
    assert (await c.expect("error"))["code"] == "bad_request"
    # The channel as bytes, not a string.
    await c.send({"op": "sub", "ch": b"inbox:alice"})
    assert (await c.expect("error"))["code"] == "bad_request"
    await c.request({"op": "ping"}, "pong")
    await c.close()


@aio
async def test_invalid_utf8_text_frame_closes_1007(anon_node: RelayServer) -> None:
    host, port = anon_node.ws_url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        + _masked_frame(b'{"op": "sub", "ch": "\xff\xfe"}')
    )
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    assert b0 & 0x0F == 8  # a close frame
    payload = await reader.readexactly(b1 & 0x7F)
    assert int.from_bytes(payload[:2], "big") == 1007
    writer.close()
    # The node still serves others.
    other = await anon(anon_node)
    await other.request({"op": "ping"}, "pong")
    await other.close()
