"""The mesh over real loopback sockets: requests, ordered one-way sends, bad peers."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from cluster import meshauth
from cluster.mesh import Mesh, PeerUnavailable, RemoteError
from cluster.wire import FrameReader, Kind, encode
from relay.errors import Code
from tests.conftest import aio, next_turn, until

SECRET = "s" * 32


class Recorder:
    def __init__(self) -> None:
        self.delivered: list[tuple[str, str, list[Any]]] = []
        self.interest: list[tuple[str, str, bool]] = []
        self.up: list[str] = []
        self.down: list[str] = []
        self.mesh: Any = None
        self.seen: list[tuple[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self.leases: dict[str, int] | None = None  # None: admit every peer

    def admit_peer(self, peer: str, epoch: int) -> bool:
        return self.leases is None or self.leases.get(peer) == epoch

    def on_request(self, peer: str, op: str, args: Any) -> Any:
        self.requests.append((peer, op))
        if op == "echo":
            return args
        if op == "slow":
            return self._slow(args)
        if op == "refuse":
            raise RemoteError(Code.UNAVAILABLE, "not the owner")
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

    kw.setdefault("secrets", (SECRET,))
    return Mesh(node_id=node_id, epoch=1, handler=rec, reactor=reactor, clock=time.monotonic, **kw)


def listening(**kw: Any) -> tuple[Recorder, Mesh, int]:
    """Node sg/b (``make`` arguments ``kw``) listening on a free loopback port: its
    recorder, its mesh and the port, for a hand-made peer to dial."""
    rb = Recorder()
    b = make("sg/b", rb, **kw)
    return rb, b, b.listen("127.0.0.1", 0)


async def raw_peer(
    port: int, node_id: str = "sg/a", secret: str | None = SECRET, epoch: int = 1
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-made peer that dials ``port`` as ``node_id`` and proves ``secret``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    frames = FrameReader()
    hello: list[Any] = []
    while not hello:
        hello = frames.feed(await reader.read(4096))
    nonce = b"n" * meshauth.NONCE_BYTES
    writer.write(encode([Kind.HELLO, node_id, epoch, nonce]))
    if secret is not None:
        key = meshauth.secret_key(secret)
        proof = meshauth.proof(
            key,
            role=meshauth.DIAL,
            sender=node_id,
            receiver=hello[0][1],
            sender_nonce=nonce,
            receiver_nonce=hello[0][3],
        )
        writer.write(encode([Kind.AUTH, proof]))
    return reader, writer


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
        encode([Kind.HELLO, "sg/a", 1, b"n" * 16]) + encode([Kind.REQUEST, 1, "echo", 1]),
        encode([Kind.HELLO, "sg/a", 1, b"n" * 16]) + encode([Kind.AUTH, b"p" * 32]),
    ],
    ids=["http", "huge-length", "no-hello", "garbage-after-hello", "no-auth", "bad-proof"],
)
@aio
async def test_garbage_peers_are_cut_off_and_node_keeps_serving(pair: Any, payload: bytes) -> None:
    a, _b, _, _, pb = pair
    assert await asyncio.to_thread(_garbage_peer, pb, payload)
    await until(lambda: "sg/b" in a.connections, what="connected")
    assert await a.request("sg/b", "echo", "still") == "still"


@aio
async def test_peer_that_stops_reading_is_cut_off() -> None:
    rb, b, port = listening(max_outbound_bytes=1_000_000, ping_timeout_s=60)
    # A peer that says hello and then never reads.
    _reader, writer = await raw_peer(port)
    writer.transport.pause_reading()  # type: ignore[attr-defined]
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
    rb, b, port = listening(ping_interval_s=0.05, ping_timeout_s=0.2)
    _reader, writer = await raw_peer(port)  # then never answers a ping
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


@aio
async def test_request_soon_resolves_its_future_and_forgets_every_request(pair: Any) -> None:
    """The task-free request (a forwarded op): results and errors land on the future, and
    nothing is left behind for answered, refused, failed or abandoned requests."""
    a, b, _ra, rb, _ = pair
    rb.mesh = b
    await until(lambda: "sg/b" in a.connections and "sg/a" in b.connections, what="connected")
    seen: list[Any] = []
    futs = [
        a.request_soon("sg/b", "echo", 1),
        a.request_soon("sg/b", "slow", 2),
        a.request_soon("sg/b", "refuse", None, on_result=seen.append),
        a.request_soon("sg/b", "crash", None),
        a.request_soon("sg/b", "sub", None, on_result=seen.append),
    ]
    abandoned = a.request_soon("sg/b", "slow", 3)
    abandoned.cancel()
    await until(lambda: all(f.done() for f in futs), what="every reply")
    assert futs[0].result() == 1 and futs[1].result() == {"slow": 2}
    refused, crashed = futs[2].exception(), futs[3].exception()
    assert isinstance(refused, RemoteError) and refused.code == "unavailable"
    assert isinstance(crashed, RemoteError) and crashed.code == "internal"
    assert seen == [["pending"]]  # on_result only for a success
    await until(lambda: rb.requests.count(("sg/a", "slow")) == 2, what="the abandoned one")
    await until(lambda: not a._pending and not a._on_result, what="nothing left")
    with pytest.raises(PeerUnavailable):
        a.request_soon("sg/zz", "echo", 1)


async def _closed(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> bool:
    """Whether the node closes the connection in time (what it sends is dropped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        except (ConnectionResetError, TimeoutError):
            return True
        if not data:
            return True
    return False


@pytest.mark.parametrize("secret", [None, "w" * 32], ids=["unauthenticated", "wrong-secret"])
@aio
async def test_a_peer_without_the_secret_is_refused_before_any_op(
    pair: Any, secret: str | None
) -> None:
    """An impostor of the live peer sg/a, without the secret: its requests never reach the
    handler, and the real sg/a keeps its connection."""
    a, b, _ra, rb, pb = pair
    await until(lambda: "sg/a" in b.connections, what="connected")
    live = b.connections["sg/a"]
    reader, writer = await raw_peer(pb, "sg/a", secret)
    writer.write(encode([Kind.REQUEST, 1, "echo", "forged"]))
    writer.write(encode([Kind.INTEREST, "inbox:x", True]))
    assert await _closed(reader)
    assert rb.requests == [] and rb.interest == []
    assert b.connections["sg/a"] is live and b.counters["refused"] == 1
    assert await a.request("sg/b", "echo", "still") == "still"
    writer.close()


@aio
async def test_a_hello_with_a_forged_log_line_in_its_id_is_refused_quoted(
    pair: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A stranger's claimed id goes into the log only quoted: no line of its own."""
    _a, _b, _ra, rb, pb = pair
    reader, writer = await asyncio.open_connection("127.0.0.1", pb)
    forged = "sg/\n2026-12-08 00:00:00,000 CRITICAL relay: FORGED"
    writer.write(encode([Kind.HELLO, forged, 1, b"n" * meshauth.NONCE_BYTES]))
    assert await _closed(reader)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused and all("\n" not in m for m in refused), refused
    assert rb.requests == []
    writer.close()


@aio
async def test_a_second_connection_never_replaces_the_live_one(pair: Any) -> None:
    """Even with the secret: same id and epoch as the live connection is refused."""
    a, b, _ra, rb, pb = pair
    await until(lambda: "sg/a" in b.connections, what="connected")
    live = b.connections["sg/a"]
    reader, writer = await raw_peer(pb, "sg/a", SECRET, epoch=1)
    writer.write(encode([Kind.REQUEST, 1, "echo", "forged"]))
    assert await _closed(reader)
    assert b.connections["sg/a"] is live and rb.requests == []
    assert await a.request("sg/b", "echo", "still") == "still"
    writer.close()


@aio
async def test_a_peer_without_a_live_lease_at_its_epoch_is_refused() -> None:
    rb = Recorder()
    rb.leases = {"sg/a": 7}
    b = make("sg/b", rb)
    port = b.listen("127.0.0.1", 0)
    reader, writer = await raw_peer(port, "sg/a", SECRET, epoch=6)
    writer.write(encode([Kind.REQUEST, 1, "echo", 1]))
    assert await _closed(reader)
    assert rb.requests == [] and "sg/a" not in b.connections
    writer.close()
    reader, writer = await raw_peer(port, "sg/a", SECRET, epoch=7)
    writer.write(encode([Kind.REQUEST, 1, "echo", 1]))
    await until(lambda: rb.requests == [("sg/a", "echo")], what="the admitted peer's request")
    writer.close()
    await b.stop()


@aio
async def test_a_peer_that_never_finishes_the_handshake_is_cut_off() -> None:
    _, b, port = listening(ping_interval_s=0.05, ping_timeout_s=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)  # says nothing
    assert await _closed(reader, 3.0)
    assert b.counters["refused"] == 1
    writer.close()
    await b.stop()


@aio
async def test_secrets_during_a_rotation() -> None:
    """A node proving the new secret talks to one that still proves the old, as long as
    each accepts the other's."""
    ra, rb = Recorder(), Recorder()
    old, new = "o" * 32, "n" * 32
    a = make("sg/a", ra, secrets=(new, old))
    b = make("sg/b", rb, secrets=(old, new))
    pb = b.listen("127.0.0.1", 0)
    a.listen("127.0.0.1", 0)
    a.want("sg/b", f"127.0.0.1:{pb}")
    await until(lambda: "sg/b" in a.connections and "sg/a" in b.connections, what="connected")
    assert await a.request("sg/b", "echo", 1) == 1
    for m in (a, b):
        await m.stop()


async def _frames_until(
    reader: asyncio.StreamReader, frames: FrameReader, cond: Any, timeout_s: float = 5.0
) -> list[list[Any]]:
    """Read frames until ``cond(frames_so_far)``; all of them."""
    got: list[list[Any]] = []
    deadline = time.monotonic() + timeout_s
    while not cond(got):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; frames so far: {got!r}"
        data = await asyncio.wait_for(reader.read(65536), left)
        assert data, f"connection closed; frames so far: {got!r}"
        got += frames.feed(data)
    return got


@aio
async def test_batches_once_the_peer_says_it_reads_them() -> None:
    rec = Recorder()
    m = make("sg/m", rec, ping_interval_s=0.05)
    port = m.listen("127.0.0.1", 0)
    reader, writer = await raw_peer(port)
    frames = FrameReader()
    try:
        await until(lambda: "sg/a" in m.connections, what="admitted")
        # The node's first ping; its pong to ours says that it reads BATCH frames.
        got = await _frames_until(reader, frames, lambda g: any(x[0] == Kind.PING for x in g))
        writer.write(encode([Kind.PING, 7]))
        got = await _frames_until(reader, frames, lambda g: any(x[0] == Kind.PONG for x in g))
        assert [Kind.PONG, 7, 1] in got
        assert not m.connections["sg/a"].batching  # we have not said so yet
        writer.write(encode([Kind.PONG, 1, 1]))
        await until(lambda: m.connections["sg/a"].batching, what="batching on")
        # Three requests in one BATCH frame; the three replies come back in one, in order.
        reqs = [[Kind.REQUEST, i, "echo", f"x{i}"] for i in (1, 2, 3)]
        writer.write(encode([Kind.BATCH, reqs]))
        got = await _frames_until(reader, frames, lambda g: any(x[0] == Kind.BATCH for x in g))
        [batch] = [x for x in got if x[0] == Kind.BATCH]
        replies = [x for x in batch[1] if x[0] == Kind.REPLY]
        assert replies == [[Kind.REPLY, i, True, f"x{i}"] for i in (1, 2, 3)]
        assert rec.requests == [("sg/a", "echo")] * 3
        # A BATCH inside a BATCH breaks the protocol: cut off.
        writer.write(encode([Kind.BATCH, [[Kind.BATCH, [[Kind.PING, 1]]]]]))
        await until(lambda: "sg/a" not in m.connections, what="cut off")
    finally:
        writer.close()
        await m.stop()


@aio
async def test_two_nodes_batch_and_keep_order() -> None:
    ra, rb = Recorder(), Recorder()
    a = make("sg/a", ra, ping_interval_s=0.05)
    b = make("sg/b", rb, ping_interval_s=0.05)
    a.listen("127.0.0.1", 0)
    pb = b.listen("127.0.0.1", 0)
    a.want("sg/b", f"127.0.0.1:{pb}")
    try:
        await until(
            lambda: (
                "sg/b" in a.connections
                and "sg/a" in b.connections
                and a.connections["sg/b"].batching
                and b.connections["sg/a"].batching
            ),
            what="both ends batching",
        )
        answers = await asyncio.gather(*(a.request("sg/b", "echo", i) for i in range(200)))
        assert answers == list(range(200))
        for i in range(300):
            b.deliver("sg/a", "c", [i])
        await until(lambda: len(ra.delivered) == 300, what="deliveries")
        assert [f[0] for _, _, f in ra.delivered] == list(range(300))
    finally:
        await a.stop()
        await b.stop()


@aio
async def test_a_request_the_peer_never_answers_fails_unavailable() -> None:
    rec = Recorder()
    m = make("sg/m", rec, request_timeout_s=0.2)
    port = m.listen("127.0.0.1", 0)
    _reader, writer = await raw_peer(port)  # admitted, then never answers anything
    try:
        await until(lambda: "sg/a" in m.connections, what="admitted")
        # A patient request (a pub at ack=remote: the owner may rightly wait for another
        # region) outlives the ordinary deadline; an ordinary one sent after it does not.
        patient = m.request_soon("sg/a", "pub", {"ack": "remote"}, patient=True)
        with pytest.raises(PeerUnavailable, match="did not answer echo in time"):
            await asyncio.wait_for(m.request("sg/a", "echo", 1), 5)
        assert not patient.done() and len(m._pending) == 1 and m._sweeper is not None
        m._patient[0] = (0.0, *m._patient[0][1:])  # its deadline, brought forward
        with pytest.raises(PeerUnavailable, match="did not answer pub in time"):
            await asyncio.wait_for(patient, 5)
        assert not m._pending
    finally:
        writer.close()
        await m.stop()
    assert m._sweeper is None
