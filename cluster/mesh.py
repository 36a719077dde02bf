"""The intra-region mesh: one TCP connection per pair of nodes, msgpack frames.

The node with the smaller id dials; both ends then send on the same connection, so what
one node sends another (replies and deliveries alike) arrives in order. Each end says
``HELLO`` (node id, epoch, nonce) first, then ``AUTH``: a proof that it holds the region's
mesh secret (:mod:`cluster.meshauth`). A peer is admitted only once its proof checks out
*and* the handler confirms that its id holds a live lease at that epoch; until then no
other message of it is acted on, and a peer that breaks the handshake, or does not finish
it in time, is cut off. A second connection claiming a connected peer's id never replaces
the live one (only a newer epoch does: the peer restarted). Requests carry an id and are
answered with ``REPLY``;
``DELIVER`` and ``INTEREST`` are one-way. Once the peer has said that it reads ``BATCH``
frames (a third element, ``1``, in its ``PONG``; older nodes send two and ignore a third),
everything sent to it in one reactor turn goes out as one ``BATCH`` frame: one encode and
one frame for many forwarded publishes, replies and deliveries, in the order they were
sent. Pings run on every connection: a peer that
does not answer within ``ping_timeout_s`` is reported (a stalled reactor shows up here
before its lease expires) and the connection is dropped. A peer that stops reading is cut
off once ``max_outbound_bytes`` wait for it, so it can never stall this node.

This module holds the :class:`Mesh` (listening, dialling, requests and their deadlines,
replies, one-way sends) and its errors; one connection, with its handshake, serving,
batching and pings, is :class:`~cluster.meshconn.MeshProtocol` (:mod:`cluster.meshconn`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from cluster import meshauth
from cluster.errors import ClusterError
from cluster.meshconn import (
    MAX_QUEUED_BEFORE_ADMISSION,
    MeshFactory,
    MeshProtocol,
    _Dialer,
)
from cluster.wire import Kind
from relay.errors import Code

__all__ = [
    "MAX_QUEUED_BEFORE_ADMISSION",
    "Handler",
    "Mesh",
    "MeshFactory",
    "MeshProtocol",
    "PeerUnavailable",
    "RemoteError",
    "wire_code",
]

log = logging.getLogger(__name__)

# The deadline of a request the peer may rightly hold long: a forwarded `pub` at
# `ack=remote`, which the owner answers once another region holds it, or 30 s (the
# region core's REMOTE_WAIT_S) after it logged it, with its own reason. Well above
# that, so it does even when the append itself took a while (a claim, a failover).
PATIENT_TIMEOUT_S = 60.0


class PeerUnavailable(ClusterError):
    """No usable connection to the peer, or it went away before answering."""


class RemoteError(ClusterError):
    """The peer answered a request with an error: a :class:`~relay.errors.Code` and a
    reason. The code is a ``Code`` end to end: a string only on the wire."""

    def __init__(self, code: Code, reason: str) -> None:
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason


def wire_code(value: object) -> Code:
    """A code read off the wire: a peer's unknown code means "retry" (``unavailable``)."""
    try:
        return Code(str(value))
    except ValueError:
        return Code.UNAVAILABLE


class Handler(Protocol):
    """What the mesh calls when peers talk to this node."""

    def on_request(self, peer: str, op: str, args: Any) -> Awaitable[Any] | Any: ...

    def on_deliver(self, peer: str, ch: str, fields: list[Any]) -> None: ...

    def on_interest(self, peer: str, ch: str, on: bool) -> None: ...

    def on_peer_up(self, peer: str, epoch: int) -> None: ...

    def on_peer_down(self, peer: str, reason: str) -> None: ...

    def admit_peer(self, peer: str, epoch: int) -> Awaitable[bool] | bool:
        """Whether ``peer`` (its proof checked) holds a live lease at ``epoch``."""
        ...


class Mesh:
    """This node's end of the mesh: connections by peer id, requests, one-way sends."""

    def __init__(
        self,
        *,
        node_id: str,
        epoch: int,
        handler: Handler,
        reactor: Any,
        clock: Callable[[], float],
        ping_interval_s: float = 0.5,
        ping_timeout_s: float = 2.0,
        request_timeout_s: float = 5.0,
        max_frame: int = 8 * 1024 * 1024,
        max_outbound_bytes: int = 64 * 1024 * 1024,
        retry_s: float = 0.2,
        secrets: tuple[str, ...] = (),
    ) -> None:
        """``secrets``: the region's mesh secret first (what this node proves with), then
        any other accepted during a rotation; none = the empty secret (loopback only)."""
        self.node_id = node_id
        self.keys = tuple(meshauth.secret_key(s) for s in secrets) or (b"",)
        self._epoch = epoch
        self.handler = handler
        self.reactor = reactor
        self.clock = clock
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_frame = max_frame
        self.max_outbound_bytes = max_outbound_bytes
        self.retry_s = retry_s
        self.connections: dict[str, MeshProtocol] = {}
        self.wanted: dict[str, str] = {}  # peer → host:port, for the peers we dial
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._on_result: dict[int, Callable[[Any], None]] = {}
        # Request deadlines, oldest first (one timeout for all: insertion order is deadline
        # order); one sweep timer instead of a timer per request.
        self._deadlines: collections.deque[tuple[float, int, str]] = collections.deque()
        self._patient: collections.deque[tuple[float, int, str]] = collections.deque()
        self._sweeper: Any = None
        self._ids = itertools.count(1)
        self._port: Any = None
        self._stopped = False
        self._dialling: set[str] = set()
        # Connections cut off before admission (bad handshake, proof, lease or a duplicate).
        self.counters = {"refused": 0, "replaced": 0}

    @property
    def epoch(self) -> int:
        """The epoch this node's ``HELLO`` claims: its lease's."""
        return self._epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        # A new lease (join, rejoin): peers refuse a HELLO at the old epoch, so dial the
        # peers we lack now rather than at the next retry.
        changed = epoch != self._epoch
        self._epoch = epoch
        if changed and not self._stopped:
            for peer in list(self.wanted):
                if peer not in self.connections:
                    self._dial(peer)

    # -- listening and dialling ----------------------------------------------------

    def listen(self, host: str, port: int) -> int:
        self._port = self.reactor.listenTCP(port, MeshFactory(self), interface=host)
        bound: int = self._port.getHost().port
        return bound

    def want(self, peer: str, address: str) -> None:
        """Keep a connection to ``peer`` (we dial when our id is the smaller)."""
        if peer == self.node_id:
            return
        if self.node_id < peer:
            known = self.wanted.get(peer)
            self.wanted[peer] = address
            if known != address or peer not in self.connections:
                self._dial(peer)

    def forget(self, peer: str) -> None:
        self.wanted.pop(peer, None)
        conn = self.connections.get(peer)
        if conn is not None:
            # detach() runs when it is gone: pending requests fail, the handler is told.
            conn.transport.abortConnection()

    def _dial(self, peer: str) -> None:
        if (
            self._stopped
            or peer not in self.wanted
            or peer in self.connections
            or peer in self._dialling
        ):
            return
        self._dialling.add(peer)  # one attempt at a time: until attach() or dial_failed()
        host, port = self.wanted[peer].rsplit(":", 1)
        self.reactor.connectTCP(host, int(port), _Dialer(self, peer), timeout=5)

    def dial_failed(self, peer: str) -> None:
        self._dialling.discard(peer)
        if not self._stopped and peer in self.wanted and peer not in self.connections:
            self.reactor.callLater(self.retry_s, self._dial, peer)

    def attach(self, conn: MeshProtocol) -> bool:
        """Make ``conn`` (admitted) the connection to its peer; False when a live one is
        there already. Only a newer epoch (the peer restarted, its old connection is dead
        even if we have not noticed) replaces a connection, and that is logged."""
        assert conn.peer is not None
        old = self.connections.get(conn.peer)
        if old is not None and old is not conn:
            if conn.peer_epoch <= old.peer_epoch:
                return False
            log.warning(
                "mesh: %s reconnected at epoch %d; dropping its epoch %d connection",
                conn.peer,
                conn.peer_epoch,
                old.peer_epoch,
            )
            self.counters["replaced"] += 1
            self.detach(old, "replaced by a newer epoch")
            old.state = "closed"
            old.transport.abortConnection()
        self.connections[conn.peer] = conn
        if conn.dialled is not None:
            self._dialling.discard(conn.dialled)
        self.handler.on_peer_up(conn.peer, conn.peer_epoch)
        return True

    def detach(self, conn: MeshProtocol, reason: str) -> None:
        peer = conn.peer
        if peer is None or self.connections.get(peer) is not conn:
            return
        del self.connections[peer]
        # Requests to it will not be answered: fail them now, not at their timeout.
        for req_id, (to, fut) in list(self._pending.items()):
            if to == peer:
                if not fut.done():
                    fut.set_exception(PeerUnavailable(f"{peer} went away ({reason})"))
                del self._pending[req_id]
                self._on_result.pop(req_id, None)
        self.handler.on_peer_down(peer, reason)
        if peer in self.wanted:
            self.reactor.callLater(self.retry_s, self._dial, peer)

    async def stop(self) -> None:
        self._stopped = True
        if self._port is not None:
            await asyncio.ensure_future(_as_future(self._port.stopListening()))
        for conn in list(self.connections.values()):
            conn.transport.loseConnection()
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerUnavailable("mesh stopped"))
        self._pending.clear()
        self._on_result.clear()
        self._deadlines.clear()
        self._patient.clear()
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None

    # -- requests ------------------------------------------------------------------

    async def request(
        self,
        peer: str,
        op: str,
        args: Any,
        on_result: Callable[[Any], None] | None = None,
    ) -> Any:
        """Ask ``peer`` to do ``op``; raise PeerUnavailable or RemoteError.

        ``on_result`` is called with a successful result as soon as the reply frame is
        read, before any frame after it on the connection: deliveries that follow a
        ``sub`` reply then find the subscription registered (the awaiting coroutine only
        resumes a loop turn or two later)."""
        return await self.request_soon(peer, op, args, on_result)

    def request_soon(
        self,
        peer: str,
        op: str,
        args: Any,
        on_result: Callable[[Any], None] | None = None,
        *,
        patient: bool = False,
    ) -> asyncio.Future[Any]:
        """:meth:`request` without a coroutine: the request is sent now and its future
        returned, to be resolved with the result or PeerUnavailable / RemoteError (a
        forwarded op then costs no task). Raises PeerUnavailable at once when there is no
        connection to ``peer``. Cancelling the future abandons the request. ``patient``:
        the peer may rightly take long to answer (a ``pub`` at ``ack=remote`` waits for
        another region): its deadline is :data:`PATIENT_TIMEOUT_S`."""
        conn = self.connections.get(peer)
        if conn is None:
            raise PeerUnavailable(f"no connection to {peer}")
        req_id = next(self._ids)
        conn.send([Kind.REQUEST, req_id, op, args])  # raises before anything is kept
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = (peer, fut)
        if on_result is not None:
            self._on_result[req_id] = on_result
        # The deadline also forgets a request whose future was cancelled (see _sweep).
        # One timeout per queue, so each stays in deadline order.
        if patient:
            self._patient.append((self.clock() + PATIENT_TIMEOUT_S, req_id, op))
        else:
            self._deadlines.append((self.clock() + self.request_timeout_s, req_id, op))
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self._sweep_s, self._sweep)
        return fut

    @property
    def _sweep_s(self) -> float:
        return min(0.1, self.request_timeout_s / 4)

    def _sweep(self) -> None:
        """Fail the requests past their deadline (to within one sweep period)."""
        self._sweeper = None
        now = self.clock()
        for dq in (self._deadlines, self._patient):
            # Past their deadline, or answered already (not kept for their deadline).
            while dq and (dq[0][0] <= now or dq[0][1] not in self._pending):
                _, req_id, op = dq.popleft()
                entry = self._pending.pop(req_id, None)
                self._on_result.pop(req_id, None)
                if entry is not None and not entry[1].done():
                    why = f"{entry[0]} did not answer {op} in time"
                    entry[1].set_exception(PeerUnavailable(why))
        if (self._deadlines or self._patient) and not self._stopped:
            self._sweeper = self.reactor.callLater(self._sweep_s, self._sweep)

    def complete(self, req_id: int, ok: bool, result: Any) -> None:
        entry = self._pending.pop(req_id, None)
        on_result = self._on_result.pop(req_id, None)
        if entry is None or entry[1].done():
            return
        fut = entry[1]
        if ok:
            if on_result is not None:
                try:
                    on_result(result)
                except Exception as e:
                    fut.set_exception(e)
                    return
            fut.set_result(result)
        else:
            code, reason = (
                ([*result, Code.INTERNAL.value, ""])[:2]
                if isinstance(result, list)
                else (Code.INTERNAL.value, str(result))
            )
            fut.set_exception(RemoteError(wire_code(code), str(reason)))

    def serve_request(self, conn: MeshProtocol, req_id: int, op: str, args: Any) -> None:
        assert conn.peer is not None
        try:
            result = self.handler.on_request(conn.peer, op, args)
        except RemoteError as e:
            conn.send([Kind.REPLY, req_id, False, [e.code.value, e.reason]])
            return
        except Exception as e:
            log.exception("mesh: request %s from %s failed", op, conn.peer)
            conn.send([Kind.REPLY, req_id, False, [Code.INTERNAL.value, str(e)]])
            return
        if asyncio.isfuture(result) or asyncio.iscoroutine(result):
            fut = asyncio.ensure_future(result)
            fut.add_done_callback(lambda f: self._reply_done(conn, req_id, f))
        else:
            conn.send([Kind.REPLY, req_id, True, result])

    def _reply_done(self, conn: MeshProtocol, req_id: int, fut: asyncio.Future[Any]) -> None:
        if conn.transport is None or conn.peer not in self.connections:
            return
        exc = fut.exception()
        if exc is None:
            conn.send([Kind.REPLY, req_id, True, fut.result()])
        elif isinstance(exc, RemoteError):
            conn.send([Kind.REPLY, req_id, False, [exc.code.value, exc.reason]])
        else:
            conn.send([Kind.REPLY, req_id, False, [Code.INTERNAL.value, str(exc)]])

    # -- one-way -------------------------------------------------------------------

    def deliver(self, peer: str, ch: str, fields: list[Any]) -> bool:
        conn = self.connections.get(peer)
        if conn is None:
            return False
        conn.send([Kind.DELIVER, ch, fields])
        return True

    def interest(self, peer: str, ch: str, on: bool) -> bool:
        conn = self.connections.get(peer)
        if conn is None:
            return False
        conn.send([Kind.INTEREST, ch, on])
        return True


def _as_future(d: Any) -> Any:
    from twisted.internet.defer import Deferred

    if isinstance(d, Deferred):
        return d.asFuture(asyncio.get_running_loop())
    f: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    f.set_result(None)
    return f
