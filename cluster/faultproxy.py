"""A fault-injecting TCP proxy: latency, jitter, a bandwidth cap, blackholes and resets.

It sits in front of one target (a region's Redis, a node) so that tests and ``relay dev``
see a local link behave like one across continents. Every accepted connection is dialled
through to the target; bytes in each direction are released in order at the times
``cluster.shaping`` computes from the live :class:`~cluster.shaping.Shape` (the same shape
applies to both directions: a round trip costs twice the latency).

Blackhole *holds* bytes, it does not drop them. A TCP stream never loses bytes in the
middle: during a real partition the sender's kernel keeps them and retransmits, and they
arrive after the partition heals unless an end gave up first. Dropping a slice of a Redis
connection's stream would desynchronise requests and replies, which no real network does.
So while the blackhole is on, connections stay open, nothing passes either way (closes
included), new connections are accepted and dialled but carry nothing, and the link's client
times out as it would in a partition. When it lifts, what was held is released (after the
latency, in order), just as retransmissions land. To model a partition that also kills the
connections, call :meth:`FaultProxy.reset_all` before lifting the blackhole.

Memory is bounded by backpressure: a direction stops reading from its source while more
than ``max_buffer_bytes`` wait in the proxy (in flight or held) or while the far side's
transport asks it to pause (Twisted's producer/consumer), as a full TCP window would.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from cluster.shaping import Pacing, Shape, release, slice_sizes

DEFAULT_MAX_BUFFER_BYTES = 1024 * 1024
DEFAULT_CONNECT_TIMEOUT_S = 5.0

_NEW, _OPEN, _CLOSING, _LOST = "new", "open", "closing", "lost"


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """Counters since ``start()``. "Delivered" bytes are those written to the far side."""

    bytes_from_client: int = 0  # read from accepted connections
    bytes_to_target: int = 0  # of those, delivered to the target
    bytes_from_target: int = 0
    bytes_to_client: int = 0
    held_bytes: int = 0  # read but not yet delivered: in flight or blackholed
    paused_reads: int = 0  # directions not reading now, because of backpressure
    connections_total: int = 0  # accepted
    connections_open: int = 0  # accepted and not yet fully closed
    resets: int = 0  # connections aborted by reset_all()


@dataclass(frozen=True, slots=True)
class _Close:
    """The source end went away: pass that on after the bytes before it."""

    abort: bool


class _End(protocol.Protocol):
    """One socket of a proxied connection: the accepted one (near) or the dialled one (far)."""

    transport: Any

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.state = _NEW

    # Twisted hooks delegate.
    def connectionMade(self) -> None:
        self.link.end_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.link.data_from(self, data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.link.end_lost(self, reason)

    def close(self, abort: bool) -> None:
        """Close this socket (with RST when ``abort``); ``end_lost`` follows."""
        if self.state != _OPEN:
            return
        self.state = _CLOSING
        if abort:
            self.transport.abortConnection()
        else:
            # A streaming producer still registered can keep loseConnection from finishing.
            self.transport.unregisterProducer()
            self.transport.loseConnection()


@implementer(IPushProducer)
class _Pipe:
    """One direction of a proxied connection: read from ``source``, release into ``sink``.

    Registered as the sink transport's producer, so a sink whose buffer fills pauses it.
    """

    def __init__(self, proxy: FaultProxy, source: _End, sink: _End, upstream: bool) -> None:
        self.proxy = proxy
        self.source = source
        self.sink = sink
        self.upstream = upstream  # client → target
        self.queue: deque[tuple[float, bytes | _Close]] = deque()  # release time, item
        self.held: deque[bytes | _Close] = deque()  # arrived while blackholed
        self.queued_bytes = 0
        self.pacing = Pacing()
        self.timer: DelayedCall | None = None
        self.sink_paused = False
        self.over_limit = False
        self.reading_paused = False

    # IPushProducer, called by the sink's transport.
    def pauseProducing(self) -> None:
        self.sink_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self.sink_paused = False
        self._update_reading()

    def stopProducing(self) -> None:
        self.discard()

    # -- behaviour -----------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        self.proxy.count_received(self.upstream, len(data))
        if self.sink.state != _OPEN:
            return  # the far side is gone; its close is on the way to the source
        self.queued_bytes += len(data)
        self._enqueue(data)
        self._update_reading()

    def source_ended(self, abort: bool) -> None:
        if self.sink.state != _OPEN:
            self.discard()
            return
        self._enqueue(_Close(abort))

    def _enqueue(self, item: bytes | _Close) -> None:
        if self.proxy.blackholed:
            self.held.append(item)
            return
        self._schedule(item, self.proxy.reactor.seconds())
        self._arm()

    def _schedule(self, item: bytes | _Close, now: float) -> None:
        shape, rng = self.proxy.shape, self.proxy.rng
        if isinstance(item, _Close):
            r = release(self.pacing, now, 0, shape, rng)
            self.pacing = r.pacing
            self.queue.append((r.at_s, item))
            return
        offset = 0
        for size in slice_sizes(len(item), shape):
            r = release(self.pacing, now, size, shape, rng)
            self.pacing = r.pacing
            self.queue.append((r.at_s, item[offset : offset + size]))
            offset += size

    def _arm(self) -> None:
        if self.timer is not None or not self.queue or self.proxy.blackholed:
            return
        delay_s = max(0.0, self.queue[0][0] - self.proxy.reactor.seconds())
        self.timer = self.proxy.reactor.callLater(delay_s, self._release_due)

    def _release_due(self) -> None:
        self.timer = None
        now = self.proxy.reactor.seconds()
        while self.queue and self.queue[0][0] <= now:
            _, item = self.queue.popleft()
            if isinstance(item, _Close):
                self.discard()
                self.sink.close(item.abort)
                return
            self.queued_bytes -= len(item)
            self.proxy.count_delivered(self.upstream, len(item))
            self.sink.transport.write(item)
        self._update_reading()
        self._arm()

    def freeze(self) -> None:
        """Blackhole on: release nothing until :meth:`thaw`."""
        self.cancel_timer()

    def thaw(self) -> None:
        """Blackhole off: what was held travels now, after what was already in flight."""
        now = self.proxy.reactor.seconds()
        while self.held:
            self._schedule(self.held.popleft(), now)
        self._arm()

    def cancel_timer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def discard(self) -> None:
        """The sink is gone: drop what waits for it and stop the timer."""
        self.cancel_timer()
        self.queue.clear()
        self.held.clear()
        self.queued_bytes = 0
        self.sink_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        limit = self.proxy.max_buffer_bytes
        if self.queued_bytes > limit:
            self.over_limit = True
        elif self.queued_bytes <= limit // 2:
            self.over_limit = False
        pause = (self.sink_paused or self.over_limit) and self.source.state == _OPEN
        if pause == self.reading_paused:
            return
        self.reading_paused = pause
        if self.source.state == _OPEN:
            if pause:
                self.source.transport.pauseProducing()
            else:
                self.source.transport.resumeProducing()


class _Link:
    """One proxied connection: the accepted socket, the dialled one, a pipe each way."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.near = _End(self)
        self.far = _End(self)
        self.upstream: _Pipe | None = None
        self.downstream: _Pipe | None = None
        self.connector: Any = None

    def pipes(self) -> list[_Pipe]:
        return [p for p in (self.upstream, self.downstream) if p is not None]

    def end_made(self, end: _End) -> None:
        end.state = _OPEN
        end.transport.setTcpNoDelay(True)  # the proxy adds only the delay it is told to
        if end is self.near:
            end.transport.pauseProducing()  # until the far end is there to take the bytes
            self.connector = self.proxy.dial(self)
            return
        if self.near.state != _OPEN:
            end.close(abort=True)
            return
        self.upstream = _Pipe(self.proxy, self.near, self.far, upstream=True)
        self.downstream = _Pipe(self.proxy, self.far, self.near, upstream=False)
        self.far.transport.registerProducer(self.upstream, True)
        self.near.transport.registerProducer(self.downstream, True)
        self.near.transport.resumeProducing()

    def data_from(self, end: _End, data: bytes) -> None:
        pipe = self.upstream if end is self.near else self.downstream
        if pipe is not None and end.state == _OPEN:
            pipe.receive(data)

    def end_lost(self, end: _End, reason: Failure) -> None:
        end.state = _LOST
        if end is self.near and self.far.state == _NEW and self.connector is not None:
            self.connector.disconnect()  # far_failed follows
        # ``onward`` carries what ``end`` sent, its close last; ``back`` has no one to reach.
        onward, back = (
            (self.upstream, self.downstream)
            if end is self.near
            else (self.downstream, self.upstream)
        )
        if back is not None:
            back.discard()
        if onward is not None:
            onward.source_ended(abort=not isinstance(reason.value, error.ConnectionDone))
        self._maybe_done()

    def far_failed(self) -> None:
        self.far.state = _LOST
        self.connector = None
        self.near.close(abort=True)  # as a refused connection would
        self._maybe_done()

    def reset(self) -> None:
        for pipe in self.pipes():
            pipe.discard()
        if self.far.state == _NEW and self.connector is not None:
            self.connector.disconnect()
        self.near.close(abort=True)
        self.far.close(abort=True)

    def _maybe_done(self) -> None:
        if self.near.state == _LOST and self.far.state == _LOST:
            self.proxy.link_done(self)


class _Listener(protocol.Factory):
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: Any) -> protocol.Protocol | None:
        return self.proxy.accept()


class _Dialer(protocol.ClientFactory):
    def __init__(self, link: _Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.link.far

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.link.far_failed()


class FaultProxy:
    """A TCP proxy from ``listen_host:listen_port`` to ``target_host:target_port``.

    Call :meth:`start` to listen (it returns the bound port; pass ``listen_port=0`` for a
    free one) and :meth:`stop` when done. The controls act at once on live connections;
    a new latency, jitter or cap applies to bytes read from then on (bytes already in
    flight keep their times, and nothing overtakes them). ``seed`` seeds the jitter.
    """

    def __init__(
        self,
        reactor: Any,
        listen_host: str,
        listen_port: int,
        target_host: str,
        target_port: int,
        *,
        latency_ms: float = 0,
        jitter_ms: float = 0,
        bandwidth_bytes_per_s: float | None = None,
        seed: int = 0,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        self.reactor = reactor
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.shape = Shape(latency_ms, jitter_ms, bandwidth_bytes_per_s).validated()
        self.rng = random.Random(seed)
        self.max_buffer_bytes = max_buffer_bytes
        self.connect_timeout_s = connect_timeout_s
        self.blackholed = False
        self.links: set[_Link] = set()
        self._port: Any = None
        self._stopping: defer.Deferred[Any] | None = None
        self._idle: list[defer.Deferred[None]] = []
        # [from client, to target, from target, to client]
        self._bytes = [0, 0, 0, 0]
        self._connections_total = 0
        self._resets = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> int:
        """Listen; return the bound port."""
        self._port = self.reactor.listenTCP(
            self.listen_port, _Listener(self), interface=self.listen_host
        )
        bound: int = self._port.getHost().port
        return bound

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        bound: int = self._port.getHost().port
        return bound

    def stop(self) -> defer.Deferred[None]:
        """Stop listening and abort every connection; fires when all are gone.

        Leaves no delayed call behind. Safe to call more than once. From asyncio code,
        ``await proxy.stop().asFuture(loop)``.
        """
        if self._stopping is None:
            steps: list[defer.Deferred[Any]] = []
            if self._port is not None:
                steps.append(defer.maybeDeferred(self._port.stopListening))
            for link in list(self.links):
                link.reset()
            if self.links:
                idle: defer.Deferred[None] = defer.Deferred()
                self._idle.append(idle)
                steps.append(idle)
            self._stopping = defer.gatherResults(steps, consumeErrors=True)
        d: defer.Deferred[None] = defer.Deferred()

        def done(result: object) -> object:
            d.callback(None)
            return result

        self._stopping.addBoth(done)
        return d

    # -- live controls ---------------------------------------------------------------

    def set_latency(self, ms: float, jitter_ms: float = 0) -> None:
        """One-way latency and jitter (uniform ±jitter, never below zero) from now on."""
        self.shape = replace(self.shape, latency_ms=ms, jitter_ms=jitter_ms).validated()

    def set_bandwidth(self, bytes_per_s: float | None) -> None:
        """Cap each direction of each connection at ``bytes_per_s``; ``None`` lifts it."""
        self.shape = replace(self.shape, bandwidth_bytes_per_s=bytes_per_s).validated()

    def blackhole(self, on: bool) -> None:
        """Hold every byte (and close) in both directions while on; see the module doc."""
        if on == self.blackholed:
            return
        self.blackholed = on
        for link in self.links:
            for pipe in link.pipes():
                if on:
                    pipe.freeze()
                else:
                    pipe.thaw()

    def reset_all(self) -> None:
        """Abort every proxied connection now, with RST to both ends; drop what was held."""
        for link in list(self.links):
            self._resets += 1
            link.reset()

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        pipes = [p for link in self.links for p in link.pipes()]
        from_client, to_target, from_target, to_client = self._bytes
        return ProxyStats(
            bytes_from_client=from_client,
            bytes_to_target=to_target,
            bytes_from_target=from_target,
            bytes_to_client=to_client,
            held_bytes=sum(p.queued_bytes for p in pipes),
            paused_reads=sum(p.reading_paused for p in pipes),
            connections_total=self._connections_total,
            connections_open=len(self.links),
            resets=self._resets,
        )

    # -- called by links -----------------------------------------------------------

    def accept(self) -> _End | None:
        if self._stopping is not None:
            return None
        link = _Link(self)
        self.links.add(link)
        self._connections_total += 1
        return link.near

    def dial(self, link: _Link) -> Any:
        return self.reactor.connectTCP(
            self.target_host, self.target_port, _Dialer(link), timeout=self.connect_timeout_s
        )

    def link_done(self, link: _Link) -> None:
        self.links.discard(link)
        if not self.links:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def count_received(self, upstream: bool, n: int) -> None:
        self._bytes[0 if upstream else 2] += n

    def count_delivered(self, upstream: bool, n: int) -> None:
        self._bytes[1 if upstream else 3] += n
