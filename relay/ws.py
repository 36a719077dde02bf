"""The WebSocket edge: Autobahn on Twisted, at ``/v1/ws`` (PROTOCOL.md).

The protocol class only moves bytes: every frame goes to a :class:`~relay.session.Session`
and what it returns is carried out here. Deliveries to many subscribers encode the frame
once per format and send it as an Autobahn prepared message.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections import deque
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import IPushProducer
from twisted.internet.tcp import Server as _tcp_server
from zope.interface import implementer

from relay.errors import CLOSE_GOING_AWAY, CLOSE_POLICY_VIOLATION, Code
from relay.frames import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, Format, encode_frame
from relay.loopback import host_header_is_loopback
from relay.session import (
    ChannelRouter,
    Limits,
    Outcome,
    Session,
    SubscriptionBudget,
    message_object,
    replay_size,
)
from relay.store import Message
from relay.turn import soon
from relay.wsread import read_frame

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from relay.auth import TokenVerifier
    from relay.node import Node

WS_PATH = "/v1/ws"
# Close code for a slow consumer is never seen by it (it is not reading); the connection
# is aborted and counted under this label.
SLOW_CONSUMER = "slow_consumer"


def split_frames(objs: list[dict[str, Any]], fmt: Format, budget: int) -> list[bytes]:
    """Encode ``objs`` as several frames of about ``budget`` bytes at most each."""
    frames: list[bytes] = []
    group: list[dict[str, Any]] = []
    size = 0
    for obj in objs:
        n = len(encode_frame([obj], fmt))
        if group and size + n > budget:
            frames.append(encode_frame(group, fmt))
            group, size = [], 0
        group.append(obj)
        size += n + 1
    if group:
        frames.append(encode_frame(group, fmt))
    return frames


REPLAY_CHUNK = 64  # pending messages encoded per frame while replaying a channel
# A token's expiry timer waits at most this long before it looks at the wall clock again
# (a forward step of the wall clock is seen by then). Every connection with a long-lived
# token wakes once per period: 100,000 of them, ~330 wakes a second.
EXPIRY_RECHECK_S = 300.0


@implementer(IPushProducer)
class _Outbox:
    """What waits to be written to one peer while its transport is full.

    Twisted pauses us when the socket's send buffer is over its size; from then on
    frames queue here in order. Queued *live* bytes (replies, deliveries) are bounded by
    ``max_outbound_bytes``: past it the peer is a slow consumer and is cut off. Replays
    of pending messages queue as message lists, encoded only when sent; they are copies
    of what the store holds, counted in ``replay_bytes``, and a ``sub`` is refused while
    those are over ``Limits.max_replay_backlog`` (relay/session.py).
    """

    def __init__(self, proto: RelayProtocol) -> None:
        self.proto = proto
        self.paused = False
        self.queue: deque[bytes | tuple[Any, int] | list[Message]] = deque()
        self.live_bytes = 0
        self.replay_bytes = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.proto.drain()

    def stopProducing(self) -> None:
        self.paused = True
        self.queue.clear()
        self.live_bytes = self.replay_bytes = 0


class RelayProtocol(WebSocketServerProtocol):
    factory: RelayFactory
    session: Session | None = None
    fmt: Format = Format.JSON

    def __init__(self) -> None:
        super().__init__()
        # Frames sent this turn, written by flush_out() at its end.
        self.out_chunks: list[bytes] = []
        # While draining the outbox, frames go to Twisted one by one so that its
        # buffer fills and pauses us (the replay is paced, not encoded all at once).
        self.pacing = False
        # The token's expiry this connection is closed at (relay/session.py).
        self._expiry_at: float | None = None
        self._expiry_timer: Any = None
        self._hello_timer: Any = None
        self._ip: str | None = None  # counted against the connection caps
        # Replies a router answered after their frame (a pub's puback once its append is
        # done): gathered for one frame at the turn's end, sent before anything else.
        self.late: list[dict[str, Any]] = []
        self._handshake_bytes = 0

    # -- Twisted and Autobahn hooks (delegate only) --------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.on_connection_made()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.on_connection_lost()

    def dataReceived(self, data: bytes) -> None:
        if self.state == WebSocketServerProtocol.STATE_CONNECTING and not self.handshake_fits(
            len(data)
        ):
            return
        # Autobahn's own dataReceived only logs at debug level, evaluating the log line's
        # arguments (an inspect walk and two click.style calls) on every read whether or
        # not debug is on: ~3 % of a node's CPU at 5 k msgs/s. Straight to the parser.
        self._dataReceived(data)

    def processData(self) -> bool:
        # Whole simple frames (relay/wsread.py) are read here in one pass; anything
        # else, and whatever follows a partial frame, is Autobahn's.
        if (
            self.current_frame is None
            and not self.inside_message
            and self.state == WebSocketServerProtocol.STATE_OPEN
            and self._perMessageCompress is None
        ):
            data = self.data
            pos = 0
            limit = self.factory.limits.max_frame
            while (got := read_frame(data, pos, limit)) is not None:
                pos, binary, payload = got
                self.onMessage(payload, binary)
                if self.failedByMe or self.state != WebSocketServerProtocol.STATE_OPEN:
                    break
            if pos:
                self.data = data[pos:]
                if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                    self._cancelAutoPingTimeoutCall()
                return len(self.data) > 0
        return bool(super().processData())

    def onConnect(self, request: Any) -> str | None:
        host = request.headers.get("host")
        return self.on_connect(request.path, request.protocols, request.origin, host)

    def onOpen(self) -> None:
        self.on_open()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # Autobahn's own incremental validator is off (it costs ~4 ns a byte); one
        # check of the whole text message here gives the same 1007 close.
        if not isBinary and not payload.isascii():
            try:
                payload.decode()
            except UnicodeDecodeError as e:
                self._invalid_payload(f"invalid UTF-8 in text message: {e.reason}")
                return
        self.on_message(payload)

    def onMessageEnd(self) -> None:
        # Autobahn's, minus firing a "message" event nobody observes here.
        if not self.failedByMe:
            parts = self.message_data
            self.onMessage(parts[0] if len(parts) == 1 else b"".join(parts), self.message_is_binary)
        self.message_data = None  # type: ignore[assignment]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Open connections: queue for this turn's flush. Anything else (handshake,
        # chopped or synced sends) takes Autobahn's path, after what is queued.
        if (
            sync
            or chopsize
            or self.state != WebSocketServerProtocol.STATE_OPEN
            or self.send_queue
            or self.pacing
        ):
            self.flush_out()
            super().sendData(data, sync, chopsize)
            return
        out = self.out_chunks
        if not out:
            self.factory.dirty.append(self)
            self.factory.schedule_flush()
        out.append(data)

    def _closeConnection(self, abort: bool = False) -> None:
        if not abort:
            self.flush_out()
        super()._closeConnection(abort)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.on_close(code)

    # -- behaviour -----------------------------------------------------------------

    def on_connection_made(self) -> None:
        """Count the socket against client.max_connections(_per_ip), or refuse it."""
        f = self.factory
        transport: Any = self.transport
        ip = str(getattr(transport.getPeer(), "host", ""))
        why = f.admit(ip)
        if why is not None:
            f.refused[why] = f.refused.get(why, 0) + 1
            transport.abortConnection()
            return
        self._ip = ip

    def on_connection_lost(self) -> None:
        if self._ip is not None:
            self.factory.release(self._ip)
            self._ip = None
        for timer in (self._hello_timer, self._expiry_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._hello_timer = self._expiry_timer = None

    def handshake_fits(self, n: int) -> bool:
        """Bound the opening handshake's bytes (Autobahn rescans its whole buffer on every
        read): over client.max_handshake_bytes answers 431 and closes."""
        f = self.factory
        self._handshake_bytes += n
        if self._handshake_bytes <= f.max_handshake_bytes:
            return True
        f.refused["handshake_too_large"] = f.refused.get("handshake_too_large", 0) + 1
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"Connection: close\r\nContent-Length: 0\r\n\r\n"
        )
        self.state = WebSocketServerProtocol.STATE_CLOSED
        transport.loseConnection()
        return False

    def _hello_due(self) -> None:
        self._hello_timer = None
        s = self.session
        if s is not None and s.grants is None and not s.closed:
            f = self.factory
            f.refused["hello_timeout"] = f.refused.get("hello_timeout", 0) + 1
            s.closed = True
            self.close_with(CLOSE_POLICY_VIOLATION, "no hello in time")

    def on_connect(
        self, path: str, protocols: list[str], origin: str | None, host: str | None = None
    ) -> str | None:
        f = self.factory
        if f.loopback_only and not host_header_is_loopback(host):
            # Bound to loopback: another Host is DNS rebinding, never a local client.
            raise ConnectionDeny(421, "this port answers loopback hosts only")
        if path != WS_PATH:
            raise ConnectionDeny(404, f"no WebSocket here; use {WS_PATH}")
        # Autobahn gives "" when there is no Origin header: not a browser, not checked.
        if origin and not f.origin_allowed(origin):
            raise ConnectionDeny(403, "origin not allowed")
        if f.draining:
            raise ConnectionDeny(503, "node is shutting down")
        if SUBPROTOCOL_MSGPACK in protocols:
            self.fmt = Format.MSGPACK
            return SUBPROTOCOL_MSGPACK
        self.fmt = Format.JSON
        return SUBPROTOCOL_JSON if SUBPROTOCOL_JSON in protocols else None

    def on_open(self) -> None:
        f = self.factory
        # Autobahn's own tcpNoDelay option is applied before the factory's options reach
        # the protocol, so Nagle stayed on: chat frames are small and must go out now.
        transport: Any = self.transport
        with contextlib.suppress(AttributeError, OSError):
            transport.setTcpNoDelay(True)
        self.session = Session(
            node=f.node,
            fmt=self.fmt,
            limits=f.limits,
            verifier=f.verifier,
            now_s=f.clock_s(),
            overloaded=f.overloaded,
            sink=self,
            router=f.router,
            budget=f.budget,
        )
        self._hello_timer = f.reactor.callLater(f.hello_timeout_s, self._hello_due)
        self.outbox = _Outbox(self)
        self.registerProducer(self.outbox, True)
        f.connections.add(self)
        f.stats["connections_opened"] += 1

    def on_message(self, payload: bytes) -> None:
        session = self.session
        if session is None:
            return
        f = self.factory
        out = session.receive(payload, f.clock_s(), f.clock_ms())
        f.stats["frames_in"] += 1
        self.carry_out(out)

    def carry_out(self, out: Outcome) -> None:
        if self.late:
            self.flush_late()
        f = self.factory
        self._watch_expiry()
        if out.replies:
            payload = encode_frame(out.replies, self.fmt)
            if len(payload) <= f.out_frame_budget:
                self.send_payload(payload)
            else:
                for chunk in split_frames(out.replies, self.fmt, f.out_frame_budget):
                    self.send_payload(chunk)
        if out.replay:
            ob = self.outbox
            for i in range(0, len(out.replay), REPLAY_CHUNK):
                part = out.replay[i : i + REPLAY_CHUNK]
                ob.queue.append(part)
                ob.replay_bytes += replay_size(part)
            self.drain()
        for err in out.errors:
            f.errors[err.value] = f.errors.get(err.value, 0) + 1
        for message, handles in out.deliveries:
            f.fan_out(message, handles)
        if out.close is not None:
            code, reason = out.close
            self.close_with(code, reason)

    def _watch_expiry(self) -> None:
        """Close the connection when its token runs out, not at its next op."""
        s = self.session
        expires_s = s.expires_s if s is not None and not s.closed else None
        if expires_s == self._expiry_at:
            return
        if self._expiry_timer is not None and self._expiry_timer.active():
            self._expiry_timer.cancel()
        self._expiry_timer = None
        self._expiry_at = expires_s
        if expires_s is not None:
            # At least a millisecond (the wall clock is read in whole ms: a shorter wait
            # would find it unchanged), at most EXPIRY_RECHECK_S (the timer runs on the
            # monotonic clock: a forward step of the wall clock is seen by then).
            left = expires_s - self.factory.clock_ms() / 1000
            delay = min(EXPIRY_RECHECK_S, max(0.001, left)) if left > 0 else 0.0
            self._expiry_timer = self.factory.reactor.callLater(delay, self._expired)

    def _expired(self) -> None:
        # The timer runs on the reactor's clock (monotonic: relay/entry.py), the check on
        # the wall clock in whole milliseconds: if it fired before that reached exp, the
        # next _watch_expiry sets it again for what is left.
        self._expiry_timer = None
        self._expiry_at = None
        if self.session is not None:
            out = self.session.expire(self.factory.clock_ms())
            if out.close is not None:
                self.factory.stats["expired"] += 1
            self.carry_out(out)

    def close_with(self, code: int, reason: str) -> None:
        """Close with a protocol close code (1001, 1002, 1008: Autobahn's public
        ``sendClose`` allows only 1000 and 3000-4999)."""
        if self.late:
            self.flush_late()
        f = self.factory
        f.disconnects[str(code)] = f.disconnects.get(str(code), 0) + 1
        self.sendCloseFrame(code, reason.encode()[:123], isReply=False)

    def deliver(self, message: Message) -> None:
        self.send_payload(encode_frame([message_object(message, self.fmt)], self.fmt))

    def send_payload(self, payload: bytes) -> None:
        """Send a frame now, or queue it behind what is already waiting."""
        if self.late:
            self.flush_late()
        ob = self.outbox
        if ob.paused or ob.queue:
            self.enqueue_live(payload, len(payload))
        else:
            self.sendMessage(payload, self.fmt is Format.MSGPACK)

    def send_prepared(self, prepared: Any, size: int) -> None:
        if self.late:
            self.flush_late()
        ob = self.outbox
        if ob.paused or ob.queue:
            self.enqueue_live((prepared, size), size)
        elif (
            self._perMessageCompress is None
            and self.state == WebSocketServerProtocol.STATE_OPEN
            and not self.send_queue
            and not self.pacing
        ):
            # sendPreparedMessage → sendData, minus two calls: this runs per subscriber.
            out = self.out_chunks
            if not out:
                self.factory.dirty.append(self)
                self.factory.schedule_flush()
            out.append(prepared.payloadHybi)
        else:
            self.sendPreparedMessage(prepared)

    def enqueue_live(self, item: bytes | tuple[Any, int], size: int) -> None:
        ob = self.outbox
        ob.queue.append(item)
        ob.live_bytes += size
        if ob.live_bytes > self.factory.max_outbound_bytes:
            self.cut_slow_consumer()

    def drain(self) -> None:
        """Write queued frames until the transport is full again or the queue is empty."""
        ob = self.outbox
        binary = self.fmt is Format.MSGPACK
        budget = self.factory.out_frame_budget
        self.flush_out()
        self.pacing = True
        try:
            while ob.queue and not ob.paused and self.state == WebSocketServerProtocol.STATE_OPEN:
                item = ob.queue.popleft()
                if isinstance(item, bytes):
                    ob.live_bytes -= len(item)
                    self.sendMessage(item, binary)
                elif isinstance(item, tuple):
                    ob.live_bytes -= item[1]
                    self.sendPreparedMessage(item[0])
                else:
                    ob.replay_bytes -= replay_size(item)
                    objs = [message_object(m, self.fmt) for m in item]
                    for frame in split_frames(objs, self.fmt, budget):
                        self.sendMessage(frame, binary)
        finally:
            self.pacing = False

    def flush_out(self) -> None:
        """Write what this turn queued: straight to the socket when Twisted holds
        nothing for it, the rest (or all of it) through the transport."""
        out = self.out_chunks
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        t: Any = self.transport
        if t is None:
            return
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        sock = _idle_socket(t)
        if sock is not None:
            try:
                n = sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                n = 0  # let Twisted meet the error on its own write path
            if n == len(data):
                return
            data = data[n:]
        t.write(data)

    def cut_slow_consumer(self) -> None:
        f = self.factory
        f.disconnects[SLOW_CONSUMER] = f.disconnects.get(SLOW_CONSUMER, 0) + 1
        self.outbox.queue.clear()
        self.outbox.live_bytes = self.outbox.replay_bytes = 0
        self.out_chunks.clear()
        self.wasClean = False
        self.wasNotCleanReason = "slow consumer: outbound buffer over max_outbound_bytes"
        self.dropConnection(abort=True)

    def send_objects(self, objs: list[dict[str, Any]], errors: list[Code]) -> None:
        """Replies a router answered after their frame was handled: the turn's go out
        as one frame at its end (a group-commit round answers many pubs at once), or
        sooner, ahead of anything else this connection sends."""
        if self.session is None:
            return
        f = self.factory
        for err in errors:  # counted now: the connection may be gone by the turn's end
            f.errors[err.value] = f.errors.get(err.value, 0) + 1
        if not self.late:
            f.late.append(self)
            f.schedule_flush()
        self.late.extend(objs)

    def flush_late(self) -> None:
        objs = self.late
        if not objs:
            return
        self.late = []
        # A connection closing (its Close sent or received, failed, cut) takes no more
        # frames: its late replies are dropped, as a send to it would be refused.
        if self.session is not None and self.state == WebSocketServerProtocol.STATE_OPEN:
            self.carry_out(Outcome(replies=objs))

    def replay(self, messages: list[Message]) -> None:
        if self.session is not None and messages:
            self.carry_out(Outcome(replay=list(messages)))

    def replay_backlog(self) -> int:
        return self.outbox.replay_bytes

    def on_close(self, code: int | None) -> None:
        f = self.factory
        f.connections.discard(self)
        if self.session is not None:
            self.session.connection_lost()
            self.session = None


def _idle_socket(t: Any) -> Any:
    """The socket of a plain TCP transport with nothing buffered, else None."""
    if (
        type(t) is not _tcp_server
        or t.TLS
        or not t.connected
        or t.disconnecting
        or t._writeDisconnected
        or t._tempDataBuffer
        or t.offset != len(t.dataBuffer)
        or t.producerPaused
    ):
        return None
    return t.socket


class RelayFactory(WebSocketServerFactory):
    protocol = RelayProtocol  # type: ignore[assignment]

    def __init__(
        self,
        *,
        url: str,
        node: Node,
        limits: Limits,
        verifier: TokenVerifier | None,
        clock_s: Callable[[], float],
        clock_ms: Callable[[], int],
        overloaded: Callable[[], bool],
        max_outbound_bytes: int,
        allowed_origins: list[str],
        ping_interval_s: float,
        ping_timeout_s: float,
        handshake_timeout_s: float,
        max_handshake_bytes: int = 16384,
        hello_timeout_s: float = 10.0,
        max_connections: int = 50000,
        max_connections_per_ip: int = 0,
        max_subscriptions: int = 1000000,
    ) -> None:
        super().__init__(url, protocols=[SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK])
        self.node = node
        self.limits = limits
        self.verifier = verifier
        self.clock_s = clock_s
        self.clock_ms = clock_ms
        self.overloaded = overloaded
        self.max_outbound_bytes = max_outbound_bytes
        self.connections: set[RelayProtocol] = set()
        # Our own frames stay well under the max_frame we announce to clients.
        self.out_frame_budget = max(1024, limits.max_frame // 2)
        self.draining = False
        self.stats: dict[str, int] = {
            "connections_opened": 0,
            "frames_in": 0,
            "delivered": 0,
            "expired": 0,
        }
        self.errors: dict[str, int] = {}
        self.disconnects: dict[str, int] = {}
        self.allowed_origin_patterns = allowed_origins
        self.max_handshake_bytes = max_handshake_bytes
        # Set by the server when the client port is bound to loopback: Host is checked.
        self.loopback_only = False
        self.hello_timeout_s = hello_timeout_s
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.sockets = 0  # open TCP connections, handshaken or not
        self.per_ip: dict[str, int] = {}
        self.budget = SubscriptionBudget(max_subscriptions)
        # Connections refused or closed by a limit, by reason (relay_connections_refused_total).
        self.refused: dict[str, int] = {}
        # Set by the server in cluster mode: routes channel ops to slot owners.
        self.router: ChannelRouter | None = None
        # Connections with frames queued this turn, and whether a flush is scheduled.
        self.dirty: list[RelayProtocol] = []
        # Connections with late replies gathered this turn (RelayProtocol.send_objects).
        self.late: list[RelayProtocol] = []
        self._flush_scheduled = False
        options: dict[str, Any] = {
            "maxFramePayloadSize": limits.max_frame,
            "maxMessagePayloadSize": limits.max_frame,
            "openHandshakeTimeout": handshake_timeout_s,
            "closeHandshakeTimeout": 5,
            "autoPingInterval": ping_interval_s,
            "autoPingTimeout": ping_timeout_s,
            "utf8validateIncoming": False,  # RelayProtocol.onMessage checks
            "failByDrop": False,
            "echoCloseCodeReason": False,
            "tcpNoDelay": True,
        }
        self.setProtocolOptions(**options)

    def admit(self, ip: str) -> str | None:
        """Take a connection slot for ``ip``; the reason it is refused, else None."""
        if self.sockets >= self.max_connections:
            return "max_connections"
        n = self.per_ip.get(ip, 0)
        if self.max_connections_per_ip and n >= self.max_connections_per_ip:
            return "max_connections_per_ip"
        self.sockets += 1
        self.per_ip[ip] = n + 1
        return None

    def release(self, ip: str) -> None:
        self.sockets -= 1
        n = self.per_ip.get(ip, 1) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            soon(self.reactor, self.flush)
            self._flush_scheduled = True

    def flush(self) -> None:
        """Write every connection's frames of the turn that just ended. A connection
        whose flush raises (a bug) is logged and cut; the others are still written."""
        self._flush_scheduled = False
        late, self.late = self.late, []
        dirty, self.dirty = self.dirty, []
        for proto in late:
            # may queue more frames in self.dirty: flushed below
            self._each(proto, proto.flush_late)
        dirty.extend(self.dirty)
        self.dirty = []
        for proto in dirty:
            self._each(proto, proto.flush_out)

    @staticmethod
    def _each(proto: RelayProtocol, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:
            log.exception("flushing a connection's frames failed; cutting it")
            proto.out_chunks.clear()
            with contextlib.suppress(Exception):
                proto.dropConnection(abort=True)

    def origin_allowed(self, origin: str) -> bool:
        """Whether a browser's ``Origin`` matches ``client.allowed_origins`` (``*``
        wildcards; no list = any origin). Clients that send no Origin are not browsers
        and are always allowed."""
        pats = self.allowed_origin_patterns
        return not pats or any(fnmatch.fnmatchcase(origin, p) for p in pats)

    def fan_out(self, message: Message, handles: tuple[Hashable, ...]) -> None:
        """Send one message to its subscribers, encoding once per format."""
        prepared: dict[Format, Any] = {}
        sizes: dict[Format, int] = {}
        n = 0
        for h in handles:
            proto = getattr(h, "sink", None)
            if not isinstance(proto, RelayProtocol) or proto.session is None:
                continue
            fmt = proto.fmt
            pm = prepared.get(fmt)
            if pm is None:
                payload = encode_frame([message_object(message, fmt)], fmt)
                pm = prepared[fmt] = self.prepareMessage(payload, fmt is Format.MSGPACK)
                sizes[fmt] = len(payload)
            proto.send_prepared(pm, sizes[fmt])
            n += 1
        self.stats["delivered"] += n

    def close_all(self, reason: str = "node shutting down") -> None:
        """Refuse new connections and ask every client to go (1001)."""
        self.draining = True
        for proto in list(self.connections):
            proto.close_with(CLOSE_GOING_AWAY, reason)
