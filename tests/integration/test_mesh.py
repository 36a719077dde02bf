"""The mesh over real loopback sockets: requests, ordered one-way sends, bad peers."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from cluster.mesh import Mesh, PeerUnavailable, RemoteError
from cluster.wire import Kind, encode
from tests.conftest import aio, next_turn, until


class Recorder:
    def __init__(self) -> None:
        self.delivered: list[tuple[str, str, list[Any]]] = []
        self.interest: list[tuple[str, str, bool]] = []
        self.up: list[str] = []
        self.down: list[str] = []
        self.mesh: Any = None
        self.seen: list[tuple[str, Any]] = []

    def on_request(self, peer: str, op: str, args: Any) -> Any:
        if op == "echo":
            return args
        if op == "slow":
            return self._slow(args)
        if op == "refuse":
            raise RemoteError("unavailable", "not the owner")
        if op == "sub":  # answer, then at once deliver on the same connection
            asyncio.get_running_loop().call_soon(self.mesh.deliver, peer, "ch", ["after"])
            return ["pending"]
        raise ValueError("boom")

    async def _slow(self, args: Any) -> Any:
        await next_turn()  # a handler that answers in a later turn
        return {"slow": args}

    def on_deliver(self, peer: str, ch: str, fields: list[Any]) -> None:
        self.delivered.append((peer, ch, fields))
        self.seen.append(("deliver", fields))

    def on_interest(self, peer: str, ch: str, on: bool) -> None:
        self.interest.append((peer, ch, on))

    def on_peer_up(self, peer: str, epoch: int) -> None:
        self.up.append(peer)

    def on_peer_down(self, peer: str, reason: str) -> None:
        self.down.append(peer)


def make(node_id: str, rec: Recorder, **kw: Any) -> Mesh:
    from twisted.internet import reactor

    return Mesh(node_id=node_id, epoch=1, handler=rec, reactor=reactor, clock=time.monotonic, **kw)


@pytest.fixture
def pair() -> Any:
    ra, rb = Recorder(), Recorder()
    a, b = make("sg/a", ra), make("sg/b", rb)
    pa, pb = a.listen("127.0.0.1", 0), b.listen("127.0.0.1", 0)
    a.want("sg/b", f"127.0.0.1:{pb}")
    b.want("sg/a", f"127.0.0.1:{pa}")  # the larger id does not dial
    yield a, b, ra, rb, pb
    for m in (a, b):
        pytest_twisted.blockon(Deferred.fromFuture(asyncio.ensure_future(m.stop())))


@aio
async def test_requests_both_ways_and_ordered_deliveries(pair: Any) -> None:
    a, b, ra, _rb, _ = pair
    await until(lambda: "sg/b" in a.connections and "sg/a" in b.connections, what="connected")
    assert await a.request("sg/b", "echo", {"x": [1, b"\x00"]}) == {"x": [1, b"\x00"]}
    assert await b.request("sg/a", "slow", 5) == {"slow": 5}
    with pytest.raises(RemoteError) as e:
        await a.request("sg/b", "refuse", None)
    assert e.value.code == "unavailable"
    with pytest.raises(RemoteError) as e:
        await a.request("sg/b", "crash", None)
    assert e.value.code == "internal"
    for i in range(100):
        b.deliver("sg/a", "c", [i])
    b.interest("sg/a", "c", True)
    await until(lambda: len(ra.delivered) == 100 and ra.interest, what="deliveries")
    assert [f[0] for _, _, f in ra.delivered] == list(range(100))
    with pytest.raises(PeerUnavailable):
        await a.request("sg/zz", "echo", 1)


@aio
async def test_reconnects_after_the_connection_drops(pair: Any) -> None:
    a, _b, ra, _, _ = pair
    await until(lambda: "sg/b" in a.connections, what="connected")
    a.connections["sg/b"].transport.abortConnection()
    await until(lambda: "sg/b" in ra.down, what="down seen")
    await until(lambda: "sg/b" in a.connections and ra.up.count("sg/b") == 2, what="back")
    assert await a.request("sg/b", "echo", 1) == 1


def _garbage_peer(port: int, payload: bytes) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
    return True


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\xff\xff\xff\xff",
        encode([Kind.PING, 1]),
        encode([Kind.HELLO, "sg/x", 1]) + (5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1",
    ],
    ids=["http", "huge-length", "no-hello", "garbage-after-hello"],
)
@aio
async def test_garbage_peers_are_cut_off_and_node_keeps_serving(pair: Any, payload: bytes) -> None:
    a, _b, _, _, pb = pair
    assert await asyncio.to_thread(_garbage_peer, pb, payload)
    await until(lambda: "sg/b" in a.connections, what="connected")
    assert await a.request("sg/b", "echo", "still") == "still"


@aio
async def test_peer_that_stops_reading_is_cut_off() -> None:
    rb = Recorder()
    b = make("sg/b", rb, max_outbound_bytes=1_000_000, ping_timeout_s=60)
    port = b.listen("127.0.0.1", 0)
    # A peer that says hello and then never reads.
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    writer.write(encode([Kind.HELLO, "sg/a", 1]))
    await until(lambda: "sg/a" in b.connections, what="hello")
    body = b"x" * 60_000
    sent = 0
    while "sg/a" in b.connections:
        b.deliver("sg/a", "c", [body])
        sent += 1
        assert sent < 10_000, "never cut off"
        if sent % 50 == 0:
            await next_turn()  # let the reactor flush and see the socket is full
    assert "sg/a" in rb.down
    writer.close()
    await b.stop()


@aio
async def test_silent_peer_is_dropped_by_pings() -> None:
    rb = Recorder()
    b = make("sg/b", rb, ping_interval_s=0.05, ping_timeout_s=0.2)
    port = b.listen("127.0.0.1", 0)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode([Kind.HELLO, "sg/a", 1]))  # then never answers a ping
    await until(lambda: "sg/a" in rb.down, timeout_s=5, what="dropped for missed pings")
    writer.close()
    await b.stop()


@aio
async def test_on_result_runs_before_the_deliveries_that_follow_the_reply(pair: Any) -> None:
    a, b, ra, rb, _ = pair
    rb.mesh = b
    await until(lambda: "sg/b" in a.connections and "sg/a" in b.connections, what="connected")
    result = await a.request("sg/b", "sub", None, on_result=lambda r: ra.seen.append(("reply", r)))
    assert result == ["pending"]
    await until(lambda: len(ra.seen) == 2, what="the delivery")
    # A subscriber registered in on_result misses nothing that follows its reply.
    assert ra.seen == [("reply", ["pending"]), ("deliver", ["after"])]
