"""One mesh connection, either end: :class:`MeshProtocol` (the ``HELLO``/``AUTH``
handshake and the lease check before a peer is admitted, serving its requests, replies,
deliveries and interest, ``BATCH`` frames gathered per reactor turn, pings, a peer that
stops reading cut off) and the Twisted factories that make it. The connections belong
to a :class:`~cluster.mesh.Mesh` (:mod:`cluster.mesh`), which the module docstring there
describes as a whole."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from twisted.internet import protocol, task
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from cluster import meshauth
from cluster.wire import FrameReader, Kind, WireError, encode
from relay.turn import soon

if TYPE_CHECKING:
    from cluster.mesh import Mesh

log = logging.getLogger("cluster.mesh")  # one logger for the whole mesh


@implementer(IPushProducer)
class _Pressure:
    def __init__(self) -> None:
        self.paused = False
        self.queued = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.queued = 0

    def stopProducing(self) -> None:
        self.paused = True


# Messages a peer may have in flight while its admission is checked (it admitted us
# first and started sending); more than this and it is cut off.
MAX_QUEUED_BEFORE_ADMISSION = 10_000


class MeshProtocol(protocol.Protocol):
    """One mesh connection (either end)."""

    factory: MeshFactory
    transport: Any

    def __init__(self) -> None:
        self.reader: FrameReader | None = None
        self.peer: str | None = None
        self.peer_epoch = 0
        self.pressure = _Pressure()
        self._pinger: task.LoopingCall | None = None
        self._ping_seq = 0
        self._last_pong = 0.0
        # Handshake: hello → auth → admitting → open.
        self.state = "hello"
        self.dialled: str | None = None  # the peer we dialled (None: it dialled us)
        self._nonce = b""
        self._peer_nonce = b""
        self._claimed: str | None = None
        self._queued: list[list[Any]] = []
        self._started = 0.0
        # Batching: on once the peer's PONG says it reads BATCH frames.
        self.batching = False
        self._outbox: list[list[Any]] = []
        self._flush_due = False

    @property
    def role(self) -> str:
        return meshauth.DIAL if self.dialled is not None else meshauth.LISTEN

    # Twisted hooks delegate.
    def connectionMade(self) -> None:
        self.connection_made()

    def dataReceived(self, data: bytes) -> None:
        self.data_received(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.connection_lost(str(reason.value) if reason is not None else "closed")

    # -- behaviour -----------------------------------------------------------------

    def connection_made(self) -> None:
        f = self.factory
        self.dialled = getattr(f, "peer", None)
        self.reader = FrameReader(f.mesh.max_frame, handshake=2)  # HELLO, AUTH: small
        # Mesh messages are small and latency-bound: no Nagle delay.
        with contextlib.suppress(AttributeError, OSError):
            self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self.pressure, True)
        self._nonce = os.urandom(meshauth.NONCE_BYTES)
        self.send([Kind.HELLO, f.mesh.node_id, f.mesh.epoch, self._nonce])
        self._started = self._last_pong = f.mesh.clock()
        self._pinger = task.LoopingCall(self._ping)
        self._pinger.clock = f.mesh.reactor
        self._pinger.start(f.mesh.ping_interval_s, now=False)

    def data_received(self, data: bytes) -> None:
        assert self.reader is not None
        try:
            messages = self.reader.feed(data)
        except WireError as e:
            self.refuse(str(e))
            return
        for m in messages:
            if self.state == "closed":
                return
            try:
                self.handle(m)
            except WireError as e:
                self.refuse(str(e))
                return
            except Exception:
                log.exception("mesh: bad message from %s: %r", self.peer, m[:3])
                self.refuse("bad message")
                return

    def refuse(self, why: str) -> None:
        """Cut the connection off for breaking the protocol or failing the handshake."""
        if self.state == "closed":
            return
        mesh = self.factory.mesh
        who = self.peer or self._claimed or "unknown peer"
        if self.state != "open":
            mesh.counters["refused"] += 1
            address = getattr(self.transport.getPeer(), "host", "?")
            log.warning("mesh: refused %s from %s: %s", who, address, why)
        else:
            log.warning("mesh: dropping %s: %s", who, why)
        self.state = "closed"
        self._queued.clear()
        self.transport.abortConnection()

    def handle(self, m: list[Any]) -> None:
        if self.state == "hello":
            self._hello(m)
        elif self.state == "auth":
            self._auth(m)
        elif self.state == "admitting":
            if len(self._queued) >= MAX_QUEUED_BEFORE_ADMISSION:
                raise WireError("too many messages before admission")
            self._queued.append(m)
        elif self.state == "open":
            self._serve(m)

    def _hello(self, m: list[Any]) -> None:
        mesh = self.factory.mesh
        if (
            m[0] != Kind.HELLO
            or len(m) != 4
            or not isinstance(m[1], str)
            or type(m[2]) is not int
            or not isinstance(m[3], bytes)
            or len(m[3]) != meshauth.NONCE_BYTES
        ):
            raise WireError("first message must be HELLO [id, epoch, nonce]")
        peer, epoch = m[1], m[2]
        region = mesh.node_id.partition("/")[0]
        if (
            peer == mesh.node_id
            or peer.partition("/")[0] != region
            or len(peer) > 80
            or not peer.isprintable()
        ):
            raise WireError(f"{peer[:80]!r} is not another node of region {region}")
        self._claimed = peer  # checked: it may go into the log
        if self.dialled is not None and peer != self.dialled:
            raise WireError(f"dialled {self.dialled} but {peer!r} answered")
        if self.dialled is None and not peer < mesh.node_id:
            raise WireError("the node with the larger id never dials")
        self.peer_epoch = epoch
        self._peer_nonce = m[3]
        self.state = "auth"
        proof = meshauth.proof(
            mesh.keys[0],
            role=self.role,
            sender=mesh.node_id,
            receiver=peer,
            sender_nonce=self._nonce,
            receiver_nonce=self._peer_nonce,
        )
        self.send([Kind.AUTH, proof])

    def _auth(self, m: list[Any]) -> None:
        mesh = self.factory.mesh
        if m[0] != Kind.AUTH or len(m) != 2:
            raise WireError("second message must be AUTH")
        assert self._claimed is not None
        peer_role = meshauth.LISTEN if self.role == meshauth.DIAL else meshauth.DIAL
        if not meshauth.verify(
            mesh.keys,
            m[1],
            role=peer_role,
            sender=self._claimed,
            receiver=mesh.node_id,
            sender_nonce=self._peer_nonce,
            receiver_nonce=self._nonce,
        ):
            raise WireError("its proof does not match the region's mesh secret")
        self.state = "admitting"
        admitted = mesh.handler.admit_peer(self._claimed, self.peer_epoch)
        if isinstance(admitted, bool):
            self._admitted(admitted)
        else:
            fut = asyncio.ensure_future(admitted)
            fut.add_done_callback(
                lambda f: self._admitted(not f.cancelled() and f.exception() is None and f.result())
            )

    def _admitted(self, ok: bool) -> None:
        if self.state != "admitting":
            return
        if not ok:
            self.refuse(f"no live lease for it at epoch {self.peer_epoch}")
            return
        self.peer = self._claimed
        if not self.factory.mesh.attach(self):
            self.refuse("a live connection for this id exists")
            return
        self.state = "open"
        queued, self._queued = self._queued, []
        for m in queued:
            if self.state != "open":
                return
            try:
                self._serve(m)
            except Exception:
                log.exception("mesh: bad message from %s: %r", self.peer, m[:3])
                self.refuse("bad message")
                return

    def _serve(self, m: list[Any]) -> None:
        kind = m[0]
        mesh = self.factory.mesh
        assert self.peer is not None
        if kind == Kind.PING:
            self.send([Kind.PONG, m[1], 1])  # 1: this node reads BATCH frames
        elif kind == Kind.PONG:
            self._last_pong = mesh.clock()
            if len(m) > 2 and m[2] == 1 and not self.batching:
                self.batching = True
        elif kind == Kind.BATCH:
            _, messages = m
            if not isinstance(messages, list):
                raise WireError("BATCH holds a list of messages")
            for x in messages:
                if (
                    not isinstance(x, list)
                    or not x
                    or type(x[0]) is not int
                    or x[0] in (Kind.BATCH, Kind.HELLO, Kind.AUTH)
                ):
                    raise WireError("a BATCH holds mesh messages, none of them a BATCH")
                self._serve(x)
                if self.state != "open":
                    return
        elif kind == Kind.REQUEST:
            _, req_id, op, args = m
            mesh.serve_request(self, int(req_id), str(op), args)
        elif kind == Kind.REPLY:
            _, req_id, ok, result = m
            mesh.complete(int(req_id), bool(ok), result)
        elif kind == Kind.DELIVER:
            _, ch, fields = m
            if isinstance(ch, str) and isinstance(fields, list):
                mesh.handler.on_deliver(self.peer, ch, fields)
        elif kind == Kind.INTEREST:
            _, ch, on = m
            if isinstance(ch, str):
                mesh.handler.on_interest(self.peer, ch, bool(on))
        else:
            raise WireError(f"unknown message kind {kind}")

    def send(self, message: list[Any]) -> None:
        if self.batching:
            # Gathered until the end of this reactor turn, then one frame for all.
            self._outbox.append(message)
            if not self._flush_due:
                soon(self.factory.mesh.reactor, self._flush_outbox)
                self._flush_due = True
            return
        self._write(encode(message))

    def _flush_outbox(self) -> None:
        self._flush_due = False
        messages, self._outbox = self._outbox, []
        if not messages or self.state == "closed":
            return
        if len(messages) == 1:
            self._write(encode(messages[0]))
            return
        self._write_batch(messages)

    def _write_batch(self, messages: list[list[Any]]) -> None:
        data = encode([Kind.BATCH, messages])
        if len(data) > self.factory.mesh.max_frame // 2 and len(messages) > 1:
            # Far from the peer's frame limit in any case: halve until it fits.
            half = len(messages) // 2
            self._write_batch(messages[:half])
            self._write_batch(messages[half:])
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        p = self.pressure
        if p.paused:
            p.queued += len(data)
            if p.queued > self.factory.mesh.max_outbound_bytes:
                log.warning("mesh: %s is not reading; cutting it off", self.peer)
                self.transport.abortConnection()
                return
        self.transport.write(data)

    def _ping(self) -> None:
        mesh = self.factory.mesh
        if self.state != "open":
            # No pings before admission; the handshake gets the same time a ping does.
            if mesh.clock() - self._started > mesh.ping_interval_s + mesh.ping_timeout_s:
                self.refuse("did not finish the handshake in time")
            return
        if mesh.clock() - self._last_pong > mesh.ping_interval_s + mesh.ping_timeout_s:
            log.warning("mesh: %s missed its pings; dropping the connection", self.peer)
            self.transport.abortConnection()
            return
        self._ping_seq += 1
        self.send([Kind.PING, self._ping_seq])

    def connection_lost(self, reason: str) -> None:
        self._outbox.clear()
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        mesh = self.factory.mesh
        # Open, or cut off by refuse() after it was open: either way it is attached.
        was_open = self.peer is not None and mesh.connections.get(self.peer) is self
        self.state = "closed"
        if was_open:
            mesh.detach(self, reason)
        elif self.dialled is not None:
            mesh.dial_failed(self.dialled)  # refused or cut during the handshake: retry


class MeshFactory(protocol.Factory):
    protocol = MeshProtocol  # type: ignore[assignment]

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh


class _Dialer(protocol.ClientFactory):
    protocol = MeshProtocol  # type: ignore[assignment]

    def __init__(self, mesh: Mesh, peer: str) -> None:
        self.mesh = mesh
        self.peer = peer

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.mesh.dial_failed(self.peer)
