"""The fault proxy over real loopback sockets, in front of an echo server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from cluster.faultproxy import FaultProxy
from cluster.shaping import ShapeError
from tests.conftest import aio, until

T = TypeVar("T")
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Backend:
    """A TCP server on the test loop: echoes, or (``echo=False``) reads nothing."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.readers: list[asyncio.StreamReader] = []
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.readers.append(reader)
        self.writers.append(writer)
        if not self.echo:
            return
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor as r

    return r


@pytest.fixture
def make_proxy(reactor: Any) -> Iterator[Callable[..., FaultProxy]]:
    """Proxies in front of a port; each stopped at the end, leaving no delayed call."""
    made: list[FaultProxy] = []
    before = set(reactor.getDelayedCalls())

    def make(target_port: int, **kw: Any) -> FaultProxy:
        proxy = FaultProxy(reactor, "127.0.0.1", 0, "127.0.0.1", target_port, **kw)
        proxy.start()
        made.append(proxy)
        return proxy

    yield make
    for p in made:
        pytest_twisted.blockon(p.stop())
    leaked = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
    assert leaked == []


def on_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the reactor's asyncio loop from a (synchronous) fixture."""
    result: T = pytest_twisted.blockon(Deferred.fromFuture(asyncio.ensure_future(coro)))
    return result


@pytest.fixture
def echo() -> Iterator[Backend]:
    b = Backend()
    on_loop(b.start())
    yield b
    on_loop(b.stop())


async def connect(proxy: FaultProxy) -> Streams:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout_s: float = 10.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout_s)


async def round_trip(streams: Streams, payload: bytes = b"ping") -> float:
    reader, writer = streams
    t0 = time.monotonic()
    writer.write(payload)
    await writer.drain()
    assert await read_exactly(reader, len(payload)) == payload
    return time.monotonic() - t0


def own_delayed_calls(reactor: Any) -> list[Any]:
    return [
        c
        for c in reactor.getDelayedCalls()
        if getattr(getattr(c.func, "__self__", None), "__module__", "") == "cluster.faultproxy"
    ]


# -- plain forwarding --------------------------------------------------------------


@aio
async def test_bytes_pass_both_ways_and_are_counted(
    echo: Backend, make_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = make_proxy(echo.port)
    streams = await connect(proxy)
    payload = bytes(range(256)) * 400
    streams[1].write(payload)
    assert await read_exactly(streams[0], len(payload)) == payload
    s = proxy.stats
    assert (s.bytes_from_client, s.bytes_to_target) == (len(payload), len(payload))
    assert (s.bytes_from_target, s.bytes_to_client) == (len(payload), len(payload))
    assert (s.connections_total, s.connections_open, s.held_bytes) == (1, 1, 0)
    streams[1].close()
    await until(lambda: proxy.stats.connections_open == 0, what="the link to close")


@aio
async def test_a_close_from_the_target_reaches_the_client(
    make_proxy: Callable[..., FaultProxy],
) -> None:
    async def say_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(say_bye, "127.0.0.1", 0)
    try:
        proxy = make_proxy(server.sockets[0].getsockname()[1], latency_ms=30)
        reader, writer = await connect(proxy)
        # The close travels behind the bytes, not ahead of them.
        assert await asyncio.wait_for(reader.read(), 5) == b"bye"
        await until(lambda: proxy.stats.connections_open == 0, what="the link to close")
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


@aio
async def test_an_unreachable_target_resets_the_client(
    make_proxy: Callable[..., FaultProxy],
) -> None:
    b = Backend()
    port = await b.start()
    await b.stop()  # nothing listens there now
    proxy = make_proxy(port)
    reader, writer = await connect(proxy)
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await read_exactly(reader, 1)
    await until(lambda: proxy.stats.connections_open == 0, what="the link to be dropped")
    writer.close()


# -- latency and jitter --------------------------------------------------------------


@aio
async def test_round_trip_grows_by_twice_the_latency(
    echo: Backend, make_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = make_proxy(echo.port, latency_ms=60)
    streams = await connect(proxy)
    for _ in range(3):
        assert await round_trip(streams) >= 0.120
    proxy.set_latency(150)
    assert await round_trip(streams) >= 0.300
    streams[1].close()


@aio
async def test_bytes_arrive_in_order_under_jitter(
    echo: Backend, make_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = make_proxy(echo.port, latency_ms=20, jitter_ms=20, seed=3)
    reader, writer = await connect(proxy)
    sent = bytearray()
    for i in range(200):
        piece = f"<{i}>".encode()
        sent += piece
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.001)  # pace the sender so the proxy sees many small chunks
    assert await read_exactly(reader, len(sent)) == bytes(sent)
    writer.close()


# -- bandwidth -----------------------------------------------------------------------


@aio
async def test_the_bandwidth_cap_paces_a_transfer(
    echo: Backend, make_proxy: Callable[..., FaultProxy]
) -> None:
    bps, n = 200_000, 100_000
    proxy = make_proxy(echo.port, bandwidth_bytes_per_s=bps)
    reader, writer = await connect(proxy)
    payload = bytes(i % 251 for i in range(n))
    t0 = time.monotonic()
    writer.write(payload)
    assert await read_exactly(reader, n) == payload
    assert time.monotonic() - t0 >= n / bps
    assert proxy.stats.bytes_to_target == proxy.stats.bytes_to_client == n
    # Lifting the cap mid-connection leaves the stream intact.
    proxy.set_bandwidth(None)
    writer.write(payload)
    assert await read_exactly(reader, n) == payload
    writer.close()


def test_bad_settings_are_refused(reactor: Any) -> None:
    with pytest.raises(ShapeError) as caught:
        FaultProxy(reactor, "127.0.0.1", 0, "127.0.0.1", 1, latency_ms=-1, jitter_ms=-1)
    assert len(caught.value.problems) == 2
    proxy = FaultProxy(reactor, "127.0.0.1", 0, "127.0.0.1", 1)
    with pytest.raises(ShapeError):
        proxy.set_bandwidth(0)
    with pytest.raises(ShapeError):
        proxy.set_latency(float("nan"))


# -- blackhole -----------------------------------------------------------------------


@aio
async def test_blackhole_holds_traffic_until_lifted(
    echo: Backend, make_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = make_proxy(echo.port)
    reader, writer = await connect(proxy)
    assert await round_trip((reader, writer), b"before") >= 0

    proxy.blackhole(True)
    writer.write(b"during")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.3)
    await until(lambda: proxy.stats.held_bytes == len(b"during"), what="the bytes to be held")
    assert proxy.stats.bytes_to_target == len(b"before")  # nothing reached the target
    # A connection opened during the blackhole is accepted but carries nothing either.
    late_reader, late_writer = await connect(proxy)
    late_writer.write(b"late")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(late_reader.read(1), 0.3)

    proxy.blackhole(False)
    writer.write(b"after")
    # What was held is delivered first, then the new bytes: the stream stays intact.
    assert await read_exactly(reader, len(b"duringafter")) == b"duringafter"
    assert await read_exactly(late_reader, 4) == b"late"
    assert proxy.stats.held_bytes == 0
    writer.close()
    late_writer.close()


@aio
async def test_blackhole_holds_a_close_too(
    echo: Backend, make_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = make_proxy(echo.port)
    reader, writer = await connect(proxy)
    await round_trip((reader, writer))
    proxy.blackhole(True)
    writer.write(b"last words")
    writer.close()
    await until(lambda: proxy.stats.held_bytes == 10, what="the bytes to be held")
    assert proxy.stats.connections_open == 1  # the target has not heard of the close
    proxy.blackhole(False)
    await until(lambda: proxy.stats.connections_open == 0, what="the close to pass")
    assert proxy.stats.bytes_to_target == len(b"ping") + 10


# -- reset ---------------------------------------------------------------------------


@aio
async def test_reset_all_resets_every_connection(
    echo: Backend, make_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = make_proxy(echo.port, latency_ms=100)
    a = await connect(proxy)
    b = await connect(proxy)
    await round_trip(a)
    await round_trip(b)
    a[1].write(b"in flight")  # held by the latency when the reset comes
    proxy.reset_all()
    for reader, writer in (a, b):
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
        writer.close()
    await until(lambda: proxy.stats.connections_open == 0, what="the links to go")
    assert proxy.stats.resets == 2
    assert own_delayed_calls(proxy.reactor) == []
    # The proxy itself carries on.
    assert await round_trip(await connect(proxy)) >= 0.2


# -- backpressure --------------------------------------------------------------------


@pytest.mark.parametrize("blackholed", [False, True], ids=["slow-target", "blackhole"])
@aio
async def test_a_far_side_that_takes_nothing_stops_the_proxy_reading(
    make_proxy: Callable[..., FaultProxy], blackholed: bool
) -> None:
    """Memory stays bounded whether the target stops reading or a blackhole holds it all."""
    sink = Backend(echo=False)
    await sink.start()
    try:
        proxy = make_proxy(sink.port, max_buffer_bytes=256 * 1024)
        proxy.blackhole(blackholed)
        _reader, writer = await connect(proxy)
        total = 64 * 1024 * 1024
        block = bytes(i % 253 for i in range(1024 * 1024))

        async def send_all() -> None:
            for _ in range(total // len(block)):
                writer.write(block)
                await writer.drain()

        sending = asyncio.ensure_future(send_all())
        await until(lambda: proxy.stats.paused_reads == 1, what="the proxy to stop reading")
        # The kernel's socket buffers hold some megabytes; the proxy holds little more than
        # its limit, and the rest stays with the sender.
        assert proxy.stats.held_bytes <= 256 * 1024 + 65536
        assert proxy.stats.bytes_from_client < total // 2
        assert not sending.done()

        # Once the target reads (and the blackhole lifts), everything arrives, in order.
        proxy.blackhole(False)
        await until(lambda: sink.readers, what="the target to see the connection")
        got = 0
        while got < total:
            chunk = await asyncio.wait_for(sink.readers[0].read(1 << 20), 10)
            assert chunk, "stream ended early"
            assert chunk == (block * 2)[got % len(block) :][: len(chunk)]
            got += len(chunk)
        await asyncio.wait_for(sending, 10)
        assert proxy.stats.paused_reads == 0
        writer.close()
    finally:
        await sink.stop()


# -- stop ----------------------------------------------------------------------------


@pytest.mark.parametrize("blackholed", [False, True], ids=["in-flight", "held"])
@aio
async def test_stop_closes_everything_and_leaves_no_delayed_call(
    echo: Backend, reactor: Any, blackholed: bool
) -> None:
    before = set(reactor.getDelayedCalls())
    proxy = FaultProxy(reactor, "127.0.0.1", 0, "127.0.0.1", echo.port, latency_ms=500)
    port = proxy.start()
    idle = await connect(proxy)
    busy = await connect(proxy)
    await until(lambda: proxy.stats.connections_open == 2, what="the links")
    proxy.blackhole(blackholed)
    busy[1].write(b"x" * 1000)  # waits 500 ms in the proxy, or as long as the blackhole
    if blackholed:
        await until(lambda: proxy.stats.held_bytes == 1000, what="the bytes to be held")
    else:
        await until(lambda: own_delayed_calls(reactor), what="a release timer")

    await proxy.stop().asFuture(asyncio.get_running_loop())

    assert proxy.stats.connections_open == 0
    assert own_delayed_calls(reactor) == []
    assert [c for c in reactor.getDelayedCalls() if c not in before and c.active()] == []
    for reader, writer in (idle, busy):
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
        writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await proxy.stop().asFuture(asyncio.get_running_loop())  # a second stop is harmless
