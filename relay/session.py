"""One client connection, as a state machine with no I/O (PROTOCOL.md).

The edge feeds each received frame to :meth:`Session.receive` with the current time, then
sends :attr:`Outcome.replies` back as one frame, delivers each of
:attr:`Outcome.deliveries` to the subscribers named, and closes the connection when
:attr:`Outcome.close` is set.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.auth import Grants, TokenError, TokenVerifier
from relay.errors import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    Code,
    FrameError,
)
from relay.frames import (
    BadObject,
    Format,
    Pub,
    body_field,
    check_channel,
    decode_frame,
    parse_ids,
    parse_pub,
)
from relay.hlc import physical_ms
from relay.node import Node
from relay.publish import STANDALONE, puback
from relay.ratelimit import TokenBucket
from relay.store import Message

log = logging.getLogger(__name__)

# A client may send this many bad objects in a burst (then one a second) before it is
# closed with 1002; and this many rate-limited ops before it is closed with 1008.
ABUSE_BURST = 20
ABUSE_REFILL_PER_S = 1.0
RATE_ABUSE_BURST = 200
RATE_ABUSE_REFILL_PER_S = 20.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What a node allows each connection (``welcome.limits`` shows the first four)."""

    max_body: int = 65536
    max_frame: int = 1048576
    rate_per_s: float = 1000.0
    burst: int = 2000
    default_ttl_s: int = 604800
    max_ttl_s: int = 2592000
    allow_anonymous: bool = False
    max_subscriptions: int = 1000  # per connection
    # Pending messages still queued for the connection by earlier subs (bytes) above
    # which a sub is refused: a client that does not read cannot make the node copy a
    # channel's backlog again and again (server.py: twice the channel byte cap).
    max_replay_backlog: int = 32 * 1024 * 1024


class SubscriptionBudget:
    """Subscriptions held by all the sessions of a node, against a node-wide cap; the
    sessions take and give back (``taken`` is what /metrics shows)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self.refused = 0

    def take(self) -> bool:
        if self.taken >= self.limit:
            self.refused += 1
            return False
        self.taken += 1
        return True

    def give_back(self, n: int = 1) -> None:
        self.taken = max(0, self.taken - n)


class Sink(Protocol):
    """Where a session's deliveries go: the edge's connection."""

    def deliver(self, message: Message) -> None: ...

    def send_objects(self, objs: list[dict[str, Any]], errors: list[Code]) -> None:
        """Send replies that were not ready when their frame was handled."""
        ...

    def replay(self, messages: list[Message]) -> None:
        """Send pending messages after a ``subscribed`` sent with :meth:`send_objects`."""
        ...

    def replay_backlog(self) -> int:
        """Bytes of replayed messages queued for the connection, not yet written."""
        ...


# What a router calls back with: (result, None, "") or (None, error code, reason).
Reply = Callable[[Any, Code | None, str], None]


class ChannelRouter(Protocol):
    """Routes channel ops to the owner of the channel's slot (a cluster's node).

    Each call answers through ``reply`` exactly once, either before it returns (the
    answer goes into the frame's replies) or later (the session sends it through its
    sink). Without a router, the session's own node owns every channel.
    """

    def publish(
        self,
        *,
        ch: str,
        msg_id: str,
        body: bytes,
        sender: str,
        ttl_ms: int,
        ack: str,
        reply: Reply,
    ) -> None: ...

    def subscribe(self, handle: Hashable, ch: str, reply: Reply) -> None: ...

    def unsubscribe(self, handle: Hashable, ch: str) -> None: ...

    def ack(self, ch: str, ids: list[str], reply: Reply) -> None: ...


@dataclass(slots=True)
class Outcome:
    """What the edge must do after a frame."""

    replies: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[tuple[Message, tuple[Hashable, ...]]] = field(default_factory=list)
    # Pending messages to replay after the replies (a ``sub``), oldest first; the edge
    # paces them by the connection's backpressure.
    replay: list[Message] = field(default_factory=list)
    replay_bytes: int = 0  # replay_size(replay)
    close: tuple[int, str] | None = None
    errors: list[Code] = field(default_factory=list)


_session_ids = itertools.count(1)


def replay_size(messages: list[Message]) -> int:
    """What a replay holds, roughly: bodies, ids, senders and per-message overhead."""
    return sum(len(m.body) + len(m.id) + len(m.sender) for m in messages) + 64 * len(messages)


class Session:
    """The protocol state of one connection."""

    def __init__(
        self,
        *,
        node: Node,
        fmt: Format,
        limits: Limits,
        verifier: TokenVerifier | None,
        now_s: float,
        overloaded: Callable[[], bool] = lambda: False,
        sink: Sink | None = None,
        router: ChannelRouter | None = None,
        budget: SubscriptionBudget | None = None,
    ) -> None:
        self.node = node
        self.budget = budget or SubscriptionBudget(2**62)
        # Channels subscribed or being subscribed (a routed sub is answered later): what
        # counts against max_subscriptions and the node's budget.
        self.held: set[str] = set()
        self.router = router
        self.fmt = fmt
        self.limits = limits
        self.verifier = verifier
        self.overloaded = overloaded
        self.sink = sink
        self.id = f"{node.node_id}#{next(_session_ids)}"
        self.grants: Grants | None = None
        self.expires_s: float | None = None
        self.subscriptions: set[str] = set()
        # Channels whose sub went to their owner and is not answered yet: one at a time
        # (each answer carries the channel's whole backlog).
        self.subs_in_flight: set[str] = set()
        self.rate = TokenBucket(limits.rate_per_s, limits.burst, now_s)
        self._abuse = TokenBucket(ABUSE_REFILL_PER_S, ABUSE_BURST, now_s)
        self._rate_abuse = TokenBucket(RATE_ABUSE_REFILL_PER_S, RATE_ABUSE_BURST, now_s)
        self.closed = False
        self._overloaded: bool | None = None  # the overloaded() answer for this frame

    # -- entry point ---------------------------------------------------------------

    def receive(self, payload: bytes, now_s: float, now_ms: int) -> Outcome:
        """Handle one frame from the client."""
        out = Outcome()
        if self.closed:
            return out
        try:
            objs = decode_frame(payload, self.fmt)
        except FrameError as e:
            self._bad(out, now_s, BadObject(Code.BAD_REQUEST, str(e)))
            if out.close is not None:
                self.closed = True
            return out
        self._overloaded = None
        for obj in objs:
            if out.close is not None:
                break
            try:
                self._one(obj, out, now_s, now_ms)
            except BadObject as e:
                if e.code is Code.BAD_REQUEST:
                    self._bad(out, now_s, e)
                else:
                    self._error(out, e.code, e.reason, e.id, e.ch)
            except Exception:
                # A bug, not the client's fault: answer with a correlation id, keep serving.
                cid = uuid.uuid4().hex[:12]
                log.exception("internal error (correlation id %s) on %r", cid, obj)
                self._error(out, Code.INTERNAL, f"internal error, correlation id {cid}")
        if out.close is not None:
            self.closed = True
        return out

    def expire(self, now_ms: int) -> Outcome:
        """The edge's timer for :attr:`expires_s` fired: close with 1008 ``token expired``
        if the token has run out (a newer ``hello`` may have moved the time on)."""
        out = Outcome()
        if not self.closed and self.expires_s is not None and now_ms / 1000 >= self.expires_s:
            self._error(out, Code.UNAUTHORIZED, "token expired")
            out.close = (CLOSE_POLICY_VIOLATION, "token expired")
            self.closed = True
        return out

    def connection_lost(self) -> None:
        """The connection is gone: drop its subscriptions (messages stay pending)."""
        if self.router is not None:
            for ch in self.subscriptions:
                self.router.unsubscribe(self, ch)
        self.node.drop(self, self.subscriptions)
        self.subscriptions.clear()
        self.budget.give_back(len(self.held))
        self.held.clear()
        self.closed = True

    # -- dispatch ------------------------------------------------------------------

    def _one(self, obj: Any, out: Outcome, now_s: float, now_ms: int) -> None:
        if not isinstance(obj, dict):
            raise BadObject(Code.BAD_REQUEST, "each element of a frame must be an object")
        op = obj.get("op")
        if not self.rate.take(now_s):
            self._error(out, Code.RATE_LIMITED, "over the connection's rate", *_hints(obj))
            if not self._rate_abuse.take(now_s):
                out.close = (CLOSE_POLICY_VIOLATION, "rate limit exceeded repeatedly")
            return
        if op == "ping":
            out.replies.append({"op": "pong", "ts": now_ms})
            return
        if op == "hello":
            self._hello(obj, out, now_ms / 1000)
            return
        if self.grants is None:
            if not self.limits.allow_anonymous:
                self._error(out, Code.UNAUTHORIZED, "send hello with a token first")
                out.close = (CLOSE_POLICY_VIOLATION, "unauthorized")
                return
            self._welcome(out, Grants.anonymous(), None)
        elif self.expires_s is not None and now_ms / 1000 >= self.expires_s:
            self._error(out, Code.UNAUTHORIZED, "token expired")
            out.close = (CLOSE_POLICY_VIOLATION, "token expired")
            return
        if op == "pub":
            self._pub(obj, out, now_ms)
        elif op == "sub":
            self._sub(obj, out, now_ms)
        elif op == "ack":
            self._ack(obj, out, now_ms)
        elif op == "unsub":
            self._unsub(obj, out)
        elif isinstance(op, str):
            raise BadObject(Code.BAD_REQUEST, f"unknown op {op[:40]!r}")
        else:
            raise BadObject(Code.BAD_REQUEST, "op is missing or not a string")

    def _hello(self, obj: dict[str, Any], out: Outcome, wall_s: float) -> None:
        token = obj.get("token")
        if token is None:
            if not self.limits.allow_anonymous:
                self._error(out, Code.UNAUTHORIZED, "this node needs a token")
                out.close = (CLOSE_POLICY_VIOLATION, "unauthorized")
                return
            self._welcome(out, Grants.anonymous(), None)
            return
        if not isinstance(token, str):
            raise BadObject(Code.BAD_REQUEST, "token must be a string")
        if self.verifier is None:
            self._error(out, Code.UNAUTHORIZED, "this node accepts no tokens")
            out.close = (CLOSE_POLICY_VIOLATION, "unauthorized")
            return
        try:
            grants = self.verifier.verify(token, wall_s)
        except TokenError as e:
            self._error(out, Code.UNAUTHORIZED, f"token refused: {e}")
            out.close = (CLOSE_POLICY_VIOLATION, "unauthorized")
            return
        self._welcome(out, grants, grants.expires_s)

    def _welcome(self, out: Outcome, grants: Grants, expires_s: float | None) -> None:
        self.grants = grants
        self.expires_s = expires_s
        # A new hello replaces the grants: subscriptions they no longer cover end here.
        dropped = sorted(ch for ch in self.subscriptions if not grants.may_sub(ch))
        for ch in dropped:
            self._drop_subscription(ch)
        lim = self.limits
        out.replies.append(
            {
                "op": "welcome",
                "node": self.node.node_id,
                "region": self.node.region,
                "session": self.id,
                "limits": {
                    "max_body": lim.max_body,
                    "max_frame": lim.max_frame,
                    "rate_per_s": lim.rate_per_s,
                    "burst": lim.burst,
                },
            }
        )
        out.replies.extend(
            {"op": "unsubscribed", "ch": ch, "reason": "not granted by the new token"}
            for ch in dropped
        )

    def _pub(self, obj: dict[str, Any], out: Outcome, now_ms: int) -> None:
        p = parse_pub(obj, self.fmt, self.limits.max_body, self.limits.max_ttl_s)
        grants = self.grants
        assert grants is not None
        if not grants.may_pub(p.ch):
            raise BadObject(Code.FORBIDDEN, "token does not grant pub here", id=p.id, ch=p.ch)
        overloaded = self._overloaded
        if overloaded is None:
            # Asked once a frame: the answer moves with the node's periodic RSS sample.
            overloaded = self._overloaded = self.overloaded()
        if overloaded:
            raise BadObject(Code.OVERLOADED, "node memory is high; retry later", id=p.id, ch=p.ch)
        ttl_s = p.ttl_s if p.ttl_s is not None else self.limits.default_ttl_s
        if self.router is not None:
            self._routed_pub(p, grants.subject, ttl_s, out)
            return
        acc = self.node.publish(
            p.ch, p.id, p.body, sender=grants.subject, ttl_ms=ttl_s * 1000, now_ms=now_ms
        )
        # Without a region there is no slot log: RAM is the level reached, and puback says
        # so honestly (plan_pub's answer for every standalone publish, relay/publish.py).
        out.replies.append(puback(p.id, p.ch, acc, STANDALONE.level))
        if acc.message is not None:
            out.deliveries.append((acc.message, acc.subscribers))

    def _sub(self, obj: dict[str, Any], out: Outcome, now_ms: int) -> None:
        ch = check_channel(obj.get("ch"))
        assert self.grants is not None
        if not self.grants.may_sub(ch):
            raise BadObject(Code.FORBIDDEN, "token does not grant sub here", ch=ch)
        backlog = out.replay_bytes + (self.sink.replay_backlog() if self.sink else 0)
        if backlog > self.limits.max_replay_backlog:
            raise BadObject(
                Code.OVERLOADED,
                f"{backlog} bytes of pending messages are still queued for this connection "
                "by earlier subs: read them, then sub again",
                ch=ch,
            )
        if ch in self.subs_in_flight:
            raise BadObject(
                Code.OVERLOADED, "a sub of this channel is already under way; wait for it", ch=ch
            )
        if ch not in self.held:
            self._hold(ch)
        if self.router is not None:
            self._routed_sub(ch, out)
            return
        pending = self.node.subscribe(self, ch, now_ms)
        self.subscriptions.add(ch)
        out.replies.append({"op": "subscribed", "ch": ch, "pending": len(pending)})
        out.replay.extend(pending)
        out.replay_bytes += replay_size(pending)

    def _ack(self, obj: dict[str, Any], out: Outcome, now_ms: int) -> None:
        ch = check_channel(obj.get("ch"))
        ids = parse_ids(obj, ch)
        assert self.grants is not None
        if not self.grants.may_sub(ch):
            raise BadObject(Code.FORBIDDEN, "token does not grant ack here", ch=ch)
        if self.router is not None:
            self._routed_ack(ch, ids, out)
            return
        n = self.node.ack(ch, ids, now_ms)
        out.replies.append({"op": "acked", "ch": ch, "n": n})

    def _unsub(self, obj: dict[str, Any], out: Outcome) -> None:
        # Always allowed: leaving a channel needs no grant (the token may have changed).
        ch = check_channel(obj.get("ch"))
        self._drop_subscription(ch)
        out.replies.append({"op": "unsubscribed", "ch": ch})

    def _hold(self, ch: str) -> None:
        """Count a new subscription against the limits, or refuse it."""
        lim = self.limits.max_subscriptions
        if len(self.held) >= lim:
            raise BadObject(
                Code.TOO_MANY, f"over max_subscriptions ({lim}) on this connection", ch=ch
            )
        overloaded = self._overloaded
        if overloaded is None:
            overloaded = self._overloaded = self.overloaded()
        if overloaded:
            raise BadObject(Code.OVERLOADED, "node memory is high; retry later", ch=ch)
        if not self.budget.take():
            raise BadObject(Code.OVERLOADED, "node is at its subscription limit", ch=ch)
        self.held.add(ch)

    def _release(self, ch: str) -> None:
        if ch in self.held:
            self.held.discard(ch)
            self.budget.give_back()

    def _drop_subscription(self, ch: str) -> None:
        if self.router is not None:
            self.router.unsubscribe(self, ch)
        else:
            self.node.unsubscribe(self, ch)
        self.subscriptions.discard(ch)
        self._release(ch)

    # -- routed ops (a cluster node: the owner may be elsewhere) -------------------

    def _answer(
        self,
        out: Outcome,
        now: list[bool],
        obj: dict[str, Any],
        code: Code | None,
        replay: list[Message] | None = None,
    ) -> None:
        """Put a router's answer in this frame's replies, or send it on its own later."""
        if now[0]:
            out.replies.append(obj)
            if code is not None:
                out.errors.append(code)
            if replay:
                out.replay.extend(replay)
                out.replay_bytes += replay_size(replay)
        elif not self.closed and self.sink is not None:
            self.sink.send_objects([obj], [code] if code is not None else [])
            if replay:
                self.sink.replay(replay)

    @staticmethod
    def _error_obj(code: Code, reason: str, msg_id: str | None, ch: str) -> dict[str, Any]:
        obj: dict[str, Any] = {"op": "error", "code": code.value, "reason": reason, "ch": ch}
        if msg_id is not None:
            obj["id"] = msg_id
        return obj

    def _routed_pub(self, p: Pub, sender: str, ttl_s: int, out: Outcome) -> None:
        now = [True]
        assert self.router is not None

        def reply(fields: Any, code: Code | None, reason: str) -> None:
            if code is not None:
                self._answer(out, now, self._error_obj(code, reason, p.id, p.ch), code)
            else:
                obj = {"op": "puback", "id": p.id, "ch": p.ch, **fields}
                self._answer(out, now, obj, None)

        self.router.publish(
            ch=p.ch,
            msg_id=p.id,
            body=p.body,
            sender=sender,
            ttl_ms=ttl_s * 1000,
            ack=p.ack,
            reply=reply,
        )
        now[0] = False

    def _routed_sub(self, ch: str, out: Outcome) -> None:
        now = [True]
        assert self.router is not None

        def reply(pending: Any, code: Code | None, reason: str) -> None:
            self.subs_in_flight.discard(ch)
            if code is not None:
                if ch not in self.subscriptions:
                    self._release(ch)
                self._answer(out, now, self._error_obj(code, reason, None, ch), code)
                return
            if self.closed:
                # Gone while the owner answered: do not leave a subscription behind.
                assert self.router is not None
                self.router.unsubscribe(self, ch)
                return
            self.subscriptions.add(ch)
            obj = {"op": "subscribed", "ch": ch, "pending": len(pending)}
            self._answer(out, now, obj, None, list(pending))

        self.subs_in_flight.add(ch)
        try:
            self.router.subscribe(self, ch, reply)
        except BaseException:
            self.subs_in_flight.discard(ch)
            raise
        now[0] = False

    def _routed_ack(self, ch: str, ids: list[str], out: Outcome) -> None:
        now = [True]
        assert self.router is not None

        def reply(n: Any, code: Code | None, reason: str) -> None:
            if code is not None:
                self._answer(out, now, self._error_obj(code, reason, None, ch), code)
            else:
                self._answer(out, now, {"op": "acked", "ch": ch, "n": n}, None)

        self.router.ack(ch, ids, reply)
        now[0] = False

    # -- errors --------------------------------------------------------------------

    def _error(
        self,
        out: Outcome,
        code: Code,
        reason: str,
        msg_id: str | None = None,
        ch: str | None = None,
    ) -> None:
        err: dict[str, Any] = {"op": "error", "code": code.value, "reason": reason}
        if msg_id is not None:
            err["id"] = msg_id
        if ch is not None:
            err["ch"] = ch
        out.replies.append(err)
        out.errors.append(code)

    def _bad(self, out: Outcome, now_s: float, e: BadObject) -> None:
        self._error(out, e.code, e.reason, e.id, e.ch)
        if not self._abuse.take(now_s):
            out.close = (CLOSE_PROTOCOL_ERROR, "too many bad requests")


def _hints(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    i, c = obj.get("id"), obj.get("ch")
    return (i if isinstance(i, str) else None, c if isinstance(c, str) else None)


def message_object(m: Message, fmt: Format) -> dict[str, Any]:
    """The ``msg`` object for a pending or live message."""
    out: dict[str, Any] = {
        "op": "msg",
        "id": m.id,
        "ch": m.ch,
        "from": m.sender,
        "ts": physical_ms(m.hlc),
        "origin": m.origin,
    }
    body_field(m.body, fmt, out)
    return out
