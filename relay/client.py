"""Asyncio client for relay (PROTOCOL.md, version 1), built on ``websockets``.

No Twisted: any asyncio application can use it. Connect, then publish and subscribe::

    async with await RelayClient.connect("ws://127.0.0.1:7400/v1/ws") as client:
        ack = await client.publish("inbox:alice", "hi")   # PubAck(id=..., dup=False, ...)
        async with await client.subscribe("inbox:alice") as sub:
            async for m in sub:                              # Message, never twice
                handle(m)
                await sub.ack(m.id)                          # else it comes again

Many requests may be in flight at once: one reader task matches each reply to its request
(``puback``/``error`` by channel and id, the others first come first served per channel).
``publish`` retries ``rate_limited``, ``overloaded``, ``unavailable`` and dropped
connections with the same id, so the relay's dedupe makes the retry idempotent. After a
drop the client reconnects (exponential backoff with jitter, bounded by
:class:`RetryPolicy`) and subscribes again to its live subscriptions. Sends are paced to
the rate in ``welcome.limits``, so a busy client waits instead of being refused.

Errors::

    ClientError               root of every exception this module raises on purpose
    ├── ConnectError          the connection could not be opened (network, HTTP, timeout)
    ├── ConnectionLostError   the connection dropped and was not restored; retry later
    ├── ClosedError           close() was called; connect a new client
    ├── ClientTimeout         no answer within timeout_s (also a TimeoutError)
    ├── RelayErrorReply       the relay answered ``error`` (code, reason, id, ch)
    ├── BatchError            publish_many: some items failed (results per item)
    └── UsageError            the caller misused the API (also a ValueError)

After ``ConnectionLostError`` or ``ClientTimeout`` the outcome of a publish is unknown:
publishing again with the same id is safe.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import logging
import random
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol

from relay.errors import Code
from relay.frames import (
    ACK_LEVELS,
    MAX_ACK_IDS,
    MAX_ID_CHARS,
    MAX_OBJECTS_PER_FRAME,
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
)

if TYPE_CHECKING:
    from ssl import SSLContext

log = logging.getLogger(__name__)

RETRYABLE_CODES: Final = frozenset({Code.RATE_LIMITED, Code.OVERLOADED, Code.UNAVAILABLE})
REMEMBER_IDS: Final = 10_000  # message ids remembered per subscription to drop duplicates
MAX_INCOMING_BYTES: Final = 64 * 1024 * 1024
CLOSE_TIMEOUT_S: Final = 5.0
# Pseudo-replies the client hands its own waiters (never sent by a node).
_LOST: Final = "_connection_lost"
_TIMEOUT: Final = "_timeout"

_json_decoder: Final = msgspec.json.Decoder()
_msgpack_decoder: Final = msgspec.msgpack.Decoder()

T = TypeVar("T")
Body = str | bytes
Obj = dict[str, Any]


# -- errors ----------------------------------------------------------------------------


class ClientError(Exception):
    """Root of the exceptions this client raises on purpose."""


class ConnectError(ClientError):
    """No connection could be opened: check the URL, the network, TLS, then connect again."""


class ConnectionLostError(ClientError):
    """The connection dropped and was not restored in time (``__cause__`` says why when
    the client gave up). Outcomes of requests in flight are unknown; retry them later."""


class ClosedError(ClientError):
    """The client was closed by :meth:`RelayClient.close`; connect a new one."""


class ClientTimeout(ClientError, TimeoutError):
    """No answer within ``timeout_s``. The outcome is unknown: publishing again with the
    same id is safe."""


class RelayErrorReply(ClientError):
    """The relay answered ``error``. ``code`` is one of PROTOCOL.md's; for the retryable
    codes this is raised only once the client's retries ran out."""

    def __init__(self, code: str, reason: str, id: str | None = None, ch: str | None = None):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.id = id
        self.ch = ch

    @classmethod
    def from_obj(cls, obj: Obj) -> RelayErrorReply:
        return cls(str(obj.get("code")), str(obj.get("reason", "")), obj.get("id"), obj.get("ch"))


class BatchError(ClientError):
    """Some items of :meth:`RelayClient.publish_many` failed. ``results`` holds a
    :class:`PubAck` or the error per item, in order; publish the failed ones again."""

    def __init__(self, results: list[PubAck | ClientError]):
        failed = sum(isinstance(r, ClientError) for r in results)
        super().__init__(f"{failed} of {len(results)} publishes failed")
        self.results = results


class UsageError(ClientError, ValueError):
    """The caller misused the API (a bad argument, a second subscription to a channel)."""


# -- values ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PubAck:
    """The relay accepted a message (``dup``: it had accepted this id before)."""

    id: str
    ch: str
    ts: int
    origin: str
    ack: str
    dup: bool

    @classmethod
    def from_obj(cls, o: Obj) -> PubAck:
        return cls(o["id"], o["ch"], int(o["ts"]), o["origin"], str(o["ack"]), bool(o["dup"]))


@dataclass(frozen=True, slots=True)
class Message:
    """A delivered message. ``body`` is bytes over msgpack (and for non-UTF-8 bodies over
    JSON), else a string. It stays pending until acked: call :meth:`Subscription.ack`."""

    id: str
    ch: str
    sender: str
    ts: int
    origin: str
    body: Body

    @classmethod
    def from_obj(cls, o: Obj) -> Message:
        body = o["body"]
        if o.get("body_enc") == "base64":
            body = base64.b64decode(body, validate=True)
        if not isinstance(body, str | bytes):
            raise TypeError(f"body is {type(body).__name__}")
        return cls(o["id"], o["ch"], str(o.get("from", "anon")), int(o["ts"]), o["origin"], body)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the node allows this connection (``welcome.limits``)."""

    max_body: int
    max_frame: int
    rate_per_s: float
    burst: int


@dataclass(frozen=True, slots=True)
class Pub:
    """One item of :meth:`RelayClient.publish_many`; ``id`` is generated when None."""

    ch: str
    body: Body
    id: str | None = None
    ttl_s: float | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard the client tries again. Delays double from ``base_delay_s`` up to
    ``max_delay_s``; ``max_attempts`` counts the tries of one request, the first included;
    reconnecting stops after ``reconnect_attempts`` or ``reconnect_timeout_s``."""

    max_attempts: int = 10
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0
    reconnect_attempts: int = 15
    reconnect_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.reconnect_attempts < 1:
            raise UsageError("max_attempts and reconnect_attempts must be at least 1")
        if not 0 <= self.base_delay_s <= self.max_delay_s:
            raise UsageError("need 0 <= base_delay_s <= max_delay_s")

    def delay_s(self, retry: int, rand: float) -> float:
        """The pause before retry number ``retry`` (1 = the first): half of it fixed, half
        scaled by ``rand`` in [0, 1) so that clients cut off together come back apart."""
        d = min(self.max_delay_s, self.base_delay_s * 2.0 ** min(max(retry - 1, 0), 60))
        return d / 2 + d / 2 * rand


def new_id() -> str:
    """A fresh message id: 16 random bytes, urlsafe base64 (22 characters)."""
    return secrets.token_urlsafe(16)


# -- pure parts: duplicate filter, reply matching, framing -----------------------------


class RecentIds:
    """The last ``size`` ids seen, least recently seen forgotten first."""

    def __init__(self, size: int = REMEMBER_IDS) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def seen(self, msg_id: str) -> bool:
        """Whether ``msg_id`` was seen before; remembers it either way."""
        ids = self._ids
        if msg_id in ids:
            ids.move_to_end(msg_id)
            return True
        ids[msg_id] = None
        if len(ids) > self.size:
            ids.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(slots=True)
class _Entry(Generic[T]):
    reply_op: str
    ch: str | None
    id: str | None
    token: T


class PendingReplies(Generic[T]):
    """Requests awaiting their reply, and the rules that match a reply to one.

    ``puback`` is matched by (ch, id); ``subscribed``, ``acked``, ``unsubscribed`` first
    come first served per channel, ``pong`` first come first served. An ``error`` names
    the id and channel it is about when it can: by both, a pub; by id alone, the oldest
    pub with that id; by channel alone, the oldest other request there (then pub); by
    neither, the oldest request of all (the node answers one connection in order).
    """

    def __init__(self) -> None:
        self._seq = itertools.count()
        self._entries: dict[int, _Entry[T]] = {}  # oldest first
        self._fifo: dict[tuple[str, str | None, str | None], deque[int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(
        reply_op: str, ch: str | None, msg_id: str | None
    ) -> tuple[str, str | None, str | None]:
        return (
            reply_op,
            None if reply_op == "pong" else ch,
            msg_id if reply_op == "puback" else None,
        )

    def add(self, reply_op: str, ch: str | None, msg_id: str | None, token: T) -> int:
        """Register a request sent now; returns a handle for :meth:`discard`."""
        seq = next(self._seq)
        self._entries[seq] = _Entry(reply_op, ch, msg_id, token)
        self._fifo.setdefault(self._key(reply_op, ch, msg_id), deque()).append(seq)
        return seq

    def discard(self, seq: int) -> None:
        """Forget a request (answered, timed out or abandoned); no-op when gone."""
        e = self._entries.pop(seq, None)
        if e is None:
            return
        key = self._key(e.reply_op, e.ch, e.id)
        q = self._fifo[key]
        q.remove(seq)
        if not q:
            del self._fifo[key]

    def match(self, obj: Obj) -> T | None:
        """The token of the request ``obj`` answers, forgotten from now on; or None."""
        op, ch, msg_id = obj.get("op"), obj.get("ch"), obj.get("id")
        seq: int | None = None
        if op == "error":
            seq = self._match_error(ch if isinstance(ch, str) else None, msg_id)
        elif isinstance(op, str):
            q = self._fifo.get(self._key(op, ch, msg_id))
            seq = q[0] if q else None
        if seq is None:
            return None
        token = self._entries[seq].token
        self.discard(seq)
        return token

    def _match_error(self, ch: str | None, msg_id: Any) -> int | None:
        if not isinstance(msg_id, str):
            msg_id = None
        if ch is not None and msg_id is not None:
            q = self._fifo.get(("puback", ch, msg_id))
            if q:
                return q[0]
        entries = self._entries.items()
        if msg_id is not None:
            return next((s for s, e in entries if e.reply_op == "puback" and e.id == msg_id), None)
        if ch is not None:
            other = next((s for s, e in entries if e.ch == ch and e.reply_op != "puback"), None)
            return other if other is not None else next((s for s, e in entries if e.ch == ch), None)
        return next(iter(self._entries), None)

    def drain(self) -> list[T]:
        """Every token, oldest first; forgets them all (the connection is gone)."""
        tokens = [e.token for e in self._entries.values()]
        self._entries.clear()
        self._fifo.clear()
        return tokens


def pack_frames(
    objs: Sequence[Obj], encode: Callable[[Any], bytes], *, max_objects: int, max_bytes: int
) -> list[tuple[bytes, int]]:
    """Group ``objs`` in order into as few frames as ``max_objects`` and ``max_bytes``
    allow: (frame, objects in it). Raises UsageError for one object over ``max_bytes``
    (the node would close the connection)."""
    if len(objs) == 1:
        frame = encode(objs[0])
        if len(frame) > max_bytes:
            raise UsageError(f"an object of {len(frame)} bytes is over max_frame {max_bytes}")
        return [(frame, 1)]
    frames: list[tuple[bytes, int]] = []
    group: list[Obj] = []
    size = 5  # array header (msgpack) or brackets (JSON)
    for obj in objs:
        n = len(encode(obj)) + 1
        if n - 1 > max_bytes:
            raise UsageError(f"an object of {n - 1} bytes is over max_frame {max_bytes}")
        if group and (len(group) >= max_objects or size + n > max_bytes):
            frames.append((encode(group if len(group) > 1 else group[0]), len(group)))
            group, size = [], 5
        group.append(obj)
        size += n
    frames.append((encode(group if len(group) > 1 else group[0]), len(group)))
    return frames


class Pacer:
    """The node's token bucket for this connection, mirrored: every object sent spends a
    token, ``rate_per_s`` come back a second, ``burst`` at most. Wait :meth:`wait_s`, then
    :meth:`spend` just before sending, so that the node need not refuse ``rate_limited``."""

    def __init__(
        self, rate_per_s: float, burst: int, now_s: float, spent: int = 1, margin_s: float = 0.005
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        # Timers fire a little early or late, the node reads its clock a little later than
        # we send, floats round: wait a little longer than the arithmetic says.
        self.margin_s = margin_s
        self._tokens = float(burst - spent)  # hello spent one
        self._last = now_s

    def _at(self, now_s: float) -> float:
        return min(self.burst, self._tokens + max(0.0, now_s - self._last) * self.rate_per_s)

    def wait_s(self, n: int, now_s: float) -> float:
        """Seconds until ``n`` objects (at most ``burst``) may be sent; 0 = now."""
        missing = min(n, self.burst) - self._at(now_s)
        return 0.0 if missing <= 0 else missing / self.rate_per_s + self.margin_s

    def spend(self, n: int, now_s: float) -> None:
        """``n`` objects are being sent now."""
        self._tokens = self._at(now_s) - n
        self._last = max(now_s, self._last)


def chunks(items: Sequence[T], n: int) -> list[Sequence[T]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


# -- subscription ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _End:
    error: ClientError | None


class Subscription:
    """Messages of one channel: ``async for m in sub``. Iteration ends after
    :meth:`unsubscribe` or :meth:`RelayClient.close`, and raises if the client gave up
    reconnecting. Ack what you handled (:meth:`ack`): the rest comes again on the next
    subscribe. Consume promptly: messages queue in memory until read."""

    def __init__(self, client: RelayClient, ch: str, remember_ids: int) -> None:
        self.ch = ch
        self.pending = 0  # undelivered messages the node announced at subscribe
        self._client = client
        self._queue: asyncio.Queue[Message | _End] = asyncio.Queue()
        self._recent = RecentIds(remember_ids)
        self._confirmed = False
        self._ended = False

    @property
    def active(self) -> bool:
        return not self._ended

    def _offer(self, m: Message) -> None:
        if not self._ended and not self._recent.seen(m.id):
            self._queue.put_nowait(m)

    def _end(self, error: ClientError | None) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(_End(error))

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # later calls end the same way
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    async def ack(self, *ids: str, timeout_s: float = 10.0) -> int:
        """Remove handled messages from the channel; returns how many were pending."""
        return await self._client.ack(self.ch, ids, timeout_s=timeout_s)

    async def unsubscribe(self, *, timeout_s: float = 10.0) -> None:
        """Stop live messages; iteration ends after those already queued."""
        await self._client._unsubscribe(self, timeout_s)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.active and not self._client.closed:
            await self.unsubscribe()


# -- client ----------------------------------------------------------------------------


class RelayClient:
    """A connection to one relay node that survives drops. Create with :meth:`connect`,
    end with :meth:`close` (or ``async with``)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        client: str,
        fmt: Literal["json", "msgpack"],
        ssl: SSLContext | None,
        open_timeout_s: float,
        retry: RetryPolicy,
        remember_ids: int,
        pace: bool,
    ) -> None:
        if fmt not in ("json", "msgpack"):
            raise UsageError(f"fmt must be 'json' or 'msgpack', not {fmt!r}")
        self.url = url
        self.fmt = fmt
        self.retry = retry
        self._token = token
        self._client_name = client
        self._ssl = ssl
        self._open_timeout_s = open_timeout_s
        self._remember_ids = remember_ids
        self._pace = pace
        self._pacer: Pacer | None = None
        self._encode: Callable[[Any], bytes] = (
            msgspec.json.encode if fmt == "json" else msgspec.msgpack.encode
        )
        self._conn: ClientConnection | None = None
        self._ready = asyncio.Event()  # set: connected and subscriptions restored
        self._reader: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._replies: PendingReplies[asyncio.Future[Obj]] = PendingReplies()
        self._subs: dict[str, Subscription] = {}
        self._send_lock = asyncio.Lock()  # replies come in send order: register in it too
        self._closing = False
        self._failure: ClientError | None = None
        self.welcome: Obj = {}
        self.reconnects = 0

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        client: str = "relay-py",
        fmt: Literal["json", "msgpack"] = "json",
        ssl: SSLContext | None = None,
        open_timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        remember_ids: int = REMEMBER_IDS,
        pace: bool = True,
    ) -> RelayClient:
        """Open a connection, say hello, wait for welcome. Raises ConnectError, or
        RelayErrorReply (``unauthorized``: get a valid token). Call :meth:`close` when done.

        ``pace``: send no faster than ``welcome.limits`` allow (``rate_per_s``, ``burst``),
        so that the node neither refuses ``rate_limited`` nor closes the connection for
        repeated abuse; pass False to load the node's limiter on purpose.
        ``remember_ids``: message ids each subscription remembers to drop duplicates."""
        self = cls(
            url,
            token=token,
            client=client,
            fmt=fmt,
            ssl=ssl,
            open_timeout_s=open_timeout_s,
            retry=retry or RetryPolicy(),
            remember_ids=remember_ids,
            pace=pace,
        )
        conn, welcome = await self._open()
        self._install(conn, welcome)
        self._ready.set()
        return self

    # -- what the node said ------------------------------------------------------------

    @property
    def node(self) -> str:
        return str(self.welcome["node"])

    @property
    def region(self) -> str:
        return str(self.welcome["region"])

    @property
    def session(self) -> str:
        """The node's id for the current connection (changes on reconnect)."""
        return str(self.welcome["session"])

    @property
    def limits(self) -> Limits:
        lim = self.welcome["limits"]
        return Limits(lim["max_body"], lim["max_frame"], lim["rate_per_s"], lim["burst"])

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._ready.is_set()

    @property
    def closed(self) -> bool:
        return self._closing

    # -- operations --------------------------------------------------------------------

    async def publish(
        self,
        ch: str,
        body: Body,
        *,
        ack: str = "log",
        id: str | None = None,
        ttl_s: float | None = None,
        timeout_s: float = 10.0,
    ) -> PubAck:
        """Publish one message; returns once the node accepted it (``dup`` if it had
        before). Retries transient errors and drops with the same id within ``timeout_s``.
        Raises RelayErrorReply (fix the request; for retryable codes, retry later),
        ClientTimeout or ConnectionLostError: then the outcome is unknown, and publishing
        again with the same ``id`` is safe (pass your own ids to be able to)."""
        [r] = await self._exchange([self._pub_obj(ch, body, ack, id, ttl_s)], "puback", timeout_s)
        if isinstance(r, ClientError):
            raise r
        return PubAck.from_obj(r)

    async def publish_many(
        self, items: Iterable[Pub | tuple[str, Body]], *, ack: str = "log", timeout_s: float = 10.0
    ) -> list[PubAck]:
        """Publish in as few frames as the node's limits allow; PubAcks in item order.
        Retries as :meth:`publish` does, per item. Raises BatchError when some items
        failed: its ``results`` say which (their ids are in the PubAcks of the others)."""
        objs = []
        for it in items:
            p = it if isinstance(it, Pub) else Pub(it[0], it[1])
            objs.append(self._pub_obj(p.ch, p.body, ack, p.id, p.ttl_s))
        if not objs:
            return []
        raw = await self._exchange(objs, "puback", timeout_s)
        results = [r if isinstance(r, ClientError) else PubAck.from_obj(r) for r in raw]
        if any(isinstance(r, ClientError) for r in results):
            raise BatchError(results)
        return [r for r in results if isinstance(r, PubAck)]

    async def subscribe(self, ch: str, *, timeout_s: float = 10.0) -> Subscription:
        """Subscribe; the returned Subscription yields the ``pending`` messages, then live
        ones. One subscription per channel per client (UsageError otherwise)."""
        if not isinstance(ch, str) or not ch:
            raise UsageError("ch must be a non-empty string")
        if ch in self._subs:
            raise UsageError(f"already subscribed to {ch!r}; use that Subscription")
        sub = Subscription(self, ch, self._remember_ids)
        self._subs[ch] = sub  # before sending: messages follow `subscribed` at once
        try:
            reply = await self._call({"op": "sub", "ch": ch}, "subscribed", timeout_s)
        except BaseException:
            if self._subs.get(ch) is sub:
                del self._subs[ch]
            sub._end(None)
            raise
        sub.pending = int(reply["pending"])
        sub._confirmed = True
        return sub

    async def ack(self, ch: str, ids: Iterable[str], *, timeout_s: float = 10.0) -> int:
        """Remove messages from ``ch`` (from any subscriber); returns how many were still
        pending. After a reconnect mid-way the count covers only the retried part."""
        id_list = list(ids)
        if not id_list:
            return 0
        for i in id_list:
            self._check_id(i)
        objs = [{"op": "ack", "ch": ch, "ids": list(c)} for c in chunks(id_list, MAX_ACK_IDS)]
        n = 0
        for r in await self._exchange(objs, "acked", timeout_s):
            if isinstance(r, ClientError):
                raise r
            n += int(r["n"])
        return n

    async def ping(self, *, timeout_s: float = 10.0) -> int:
        """Round trip to the node; returns its clock (ms)."""
        return int((await self._call({"op": "ping"}, "pong", timeout_s))["ts"])

    async def close(self) -> None:
        """Close the connection; subscriptions end, requests in flight raise ClosedError."""
        if self._closing:
            return
        self._closing = True
        tasks = [t for t in (self._reconnector, *self._background) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn = self._conn
        if conn is not None:
            await conn.close()
        if self._reader is not None:
            await self._reader
        self._end_all(None)
        self._ready.set()  # wake waiters: they see the client closed

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- requests ----------------------------------------------------------------------

    def _pub_obj(
        self, ch: str, body: Body, ack: str, msg_id: str | None, ttl_s: float | None
    ) -> Obj:
        if not isinstance(ch, str) or not ch:
            raise UsageError("ch must be a non-empty string")
        if ack not in ACK_LEVELS:
            raise UsageError(f"ack must be one of {ACK_LEVELS}")
        msg_id = new_id() if msg_id is None else self._check_id(msg_id)
        if isinstance(body, bytes | bytearray | memoryview):
            body = bytes(body)
            if self.fmt == "json":
                try:
                    body = body.decode()
                except UnicodeDecodeError:
                    raise UsageError("a binary body needs fmt='msgpack'") from None
        elif not isinstance(body, str):
            raise UsageError("body must be str or bytes")
        obj: Obj = {"op": "pub", "id": msg_id, "ch": ch, "body": body, "ack": ack}
        if ttl_s is not None:
            obj["ttl_s"] = ttl_s
        return obj

    @staticmethod
    def _check_id(msg_id: Any) -> str:
        if not isinstance(msg_id, str) or not 1 <= len(msg_id) <= MAX_ID_CHARS:
            raise UsageError(f"an id is a string of 1-{MAX_ID_CHARS} characters")
        return msg_id

    async def _call(
        self, obj: Obj, reply_op: str, timeout_s: float, retry_lost: bool = True
    ) -> Obj:
        [r] = await self._exchange([obj], reply_op, timeout_s, retry_lost=retry_lost)
        if isinstance(r, ClientError):
            raise r
        return r

    async def _exchange(
        self, objs: list[Obj], reply_op: str, timeout_s: float, *, retry_lost: bool = True
    ) -> list[Obj | ClientError]:
        """Send ``objs`` and collect a reply or an error for each, retrying the retryable
        ones (same objects, so the same ids) until attempts or ``timeout_s`` run out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        results: list[Obj | ClientError | None] = [None] * len(objs)
        todo = list(range(len(objs)))
        attempt = 0
        while todo:
            attempt += 1
            try:
                conn = await self._wait_ready(deadline)
            except ClientError as e:
                for i in todo:
                    results[i] = e
                break
            replies = await self._send_and_wait(conn, [objs[i] for i in todo], reply_op, deadline)
            again: list[int] = []
            for i, r in zip(todo, replies, strict=True):
                op = r.get("op")
                if op == reply_op:
                    results[i] = r
                elif op == _TIMEOUT:
                    results[i] = ClientTimeout(f"no {reply_op} within {timeout_s}s")
                elif op == _LOST and self._closing:
                    results[i] = ClosedError("the client was closed before the answer came")
                elif op == _LOST:
                    results[i] = ConnectionLostError(f"connection to {self.url} lost")
                    if retry_lost:
                        again.append(i)
                else:
                    err = RelayErrorReply.from_obj(r)
                    results[i] = err
                    if err.code in RETRYABLE_CODES:
                        again.append(i)
            todo = again
            if not todo or attempt >= self.retry.max_attempts:
                break
            delay = self.retry.delay_s(attempt, random.random())
            if loop.time() + delay >= deadline:
                break
            await asyncio.sleep(delay)
        return [r if r is not None else ClientTimeout("unanswered") for r in results]

    async def _wait_ready(self, deadline: float) -> ClientConnection:
        loop = asyncio.get_running_loop()
        while True:
            if self._closing:
                raise ClosedError("the client is closed; connect a new one")
            if self._failure is not None:
                raise ConnectionLostError("the client stopped reconnecting") from self._failure
            if self._conn is not None and self._ready.is_set():
                return self._conn
            remaining = deadline - loop.time()
            try:
                await asyncio.wait_for(self._ready.wait(), max(remaining, 0))
            except TimeoutError:
                raise ClientTimeout(f"not reconnected to {self.url} in time") from None

    async def _send_and_wait(
        self, conn: ClientConnection, objs: list[Obj], reply_op: str, deadline: float
    ) -> list[Obj]:
        """One attempt: replies in order, or the pseudo-replies _LOST / _TIMEOUT."""
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[Obj]] = []
        seqs: list[int] = []
        try:
            pacer = self._pacer
            frames = pack_frames(
                objs,
                self._encode,
                max_objects=min(MAX_OBJECTS_PER_FRAME, self.limits.burst if pacer else 1 << 30),
                max_bytes=self.limits.max_frame,
            )
            async with self._send_lock:
                for obj in objs:
                    fut: asyncio.Future[Obj] = loop.create_future()
                    futs.append(fut)
                    seqs.append(self._replies.add(reply_op, obj.get("ch"), obj.get("id"), fut))
                try:
                    for frame, n in frames:
                        while pacer is not None and loop.time() < deadline:
                            wait_s = pacer.wait_s(n, loop.time())
                            if wait_s <= 0:
                                break
                            await asyncio.sleep(min(wait_s, deadline - loop.time()))
                        if pacer is not None:
                            pacer.spend(n, loop.time())
                        await conn.send(frame.decode() if self.fmt == "json" else frame)
                except websockets.ConnectionClosed:
                    for f in futs:
                        if not f.done():
                            f.set_result({"op": _LOST})
            await asyncio.wait(futs, timeout=max(deadline - loop.time(), 0))
            return [f.result() if f.done() else {"op": _TIMEOUT} for f in futs]
        finally:
            for seq in seqs:
                self._replies.discard(seq)
            for f in futs:
                f.cancel()  # no-op when done

    async def _unsubscribe(self, sub: Subscription, timeout_s: float) -> None:
        if self._subs.get(sub.ch) is sub:
            del self._subs[sub.ch]
        try:
            if self.connected:
                await self._call({"op": "unsub", "ch": sub.ch}, "unsubscribed", timeout_s, False)
        except (ConnectionLostError, ClosedError):
            pass  # a node forgets a connection's subscriptions when it goes
        finally:
            sub._end(None)

    # -- connection ----------------------------------------------------------------------

    async def _open(self) -> tuple[ClientConnection, Obj]:
        proto = SUBPROTOCOL_JSON if self.fmt == "json" else SUBPROTOCOL_MSGPACK
        extra: dict[str, Any] = {} if self._ssl is None else {"ssl": self._ssl}
        try:
            async with asyncio.timeout(self._open_timeout_s):
                conn = await websockets.connect(
                    self.url,
                    subprotocols=[Subprotocol(proto)],
                    compression=None,
                    open_timeout=None,
                    close_timeout=CLOSE_TIMEOUT_S,
                    max_size=MAX_INCOMING_BYTES,
                    **extra,
                )
                try:
                    return conn, await self._hello(conn, proto)
                except BaseException:
                    conn.transport.abort()
                    raise
        except TimeoutError as e:
            raise ConnectError(f"no welcome from {self.url} in {self._open_timeout_s}s") from e
        except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as e:
            raise ConnectError(f"cannot connect to {self.url}: {e}") from e
        except websockets.ConnectionClosed as e:
            raise ConnectError(f"{self.url} closed the connection before welcome: {e}") from e

    async def _hello(self, conn: ClientConnection, proto: str) -> Obj:
        if (conn.subprotocol or SUBPROTOCOL_JSON) != proto:
            raise ConnectError(f"the node did not agree to {proto}")
        hello: Obj = {"op": "hello", "client": self._client_name}
        if self._token is not None:
            hello["token"] = self._token
        frame = self._encode(hello)
        await conn.send(frame.decode() if self.fmt == "json" else frame)
        while True:
            for obj in self._objects(await conn.recv()):
                if obj.get("op") == "welcome":
                    return obj
                if obj.get("op") == "error":
                    raise RelayErrorReply.from_obj(obj)

    def _install(self, conn: ClientConnection, welcome: Obj) -> None:
        self._conn = conn
        self.welcome = welcome
        lim = self.limits
        if self._pace and lim.rate_per_s > 0 and lim.burst >= 1:
            self._pacer = Pacer(lim.rate_per_s, lim.burst, asyncio.get_running_loop().time())
        self._reader = asyncio.create_task(self._read(conn), name="relay-client-reader")

    async def _read(self, conn: ClientConnection) -> None:
        try:
            async for frame in conn:
                for obj in self._objects(frame):
                    self._dispatch(obj)
        except websockets.ConnectionClosed:
            pass
        except Exception:
            log.exception("relay client reader failed; dropping the connection")
            conn.transport.abort()
        self._lost(conn)

    def _objects(self, frame: bytes | str) -> list[Obj]:
        try:
            if self.fmt == "json":
                data = _json_decoder.decode(frame)
            else:
                data = _msgpack_decoder.decode(frame.encode() if isinstance(frame, str) else frame)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            log.warning("undecodable frame from %s: %s", self.url, e)
            return []
        objs = data if isinstance(data, list) else [data]
        return [o for o in objs if isinstance(o, dict)]

    def _dispatch(self, obj: Obj) -> None:
        op = obj.get("op")
        if op == "msg":
            ch = obj.get("ch")
            sub = self._subs.get(ch) if isinstance(ch, str) else None
            if sub is not None:
                try:
                    sub._offer(Message.from_obj(obj))
                except (KeyError, TypeError, ValueError, binascii.Error) as e:
                    log.warning("malformed msg from %s: %s", self.url, e)
            return
        if op == "error" and obj.get("code") == Code.UNAUTHORIZED:
            self._failure = RelayErrorReply.from_obj(obj)  # the node closes; don't come back
        fut = self._replies.match(obj)
        if fut is not None:
            if not fut.done():
                fut.set_result(obj)
        elif op != "welcome":
            log.debug("unmatched reply from %s: %r", self.url, obj)

    def _lost(self, conn: ClientConnection) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        self._ready.clear()
        for fut in self._replies.drain():
            if not fut.done():
                fut.set_result({"op": _LOST})
        if self._closing:
            self._end_all(None)
        elif self._failure is not None:
            self._give_up(self._failure)
        elif self._reconnector is None or self._reconnector.done():
            log.info("connection to %s lost (code %s); reconnecting", self.url, conn.close_code)
            self._reconnector = asyncio.create_task(
                self._reconnect(), name="relay-client-reconnect"
            )

    async def _reconnect(self) -> None:
        """Reconnect with backoff, restore subscriptions, then let requests through."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempt = 0
        while True:
            attempt += 1
            await asyncio.sleep(self.retry.delay_s(attempt, random.random()))
            try:
                conn, welcome = await self._open()
            except (ConnectError, RelayErrorReply) as e:
                fatal = isinstance(e, RelayErrorReply) and e.code not in RETRYABLE_CODES
                spent = loop.time() - started >= self.retry.reconnect_timeout_s
                if fatal or spent or attempt >= self.retry.reconnect_attempts:
                    self._give_up(e)
                    return
                log.info("reconnect %d to %s failed: %s", attempt, self.url, e)
                continue
            self.reconnects += 1
            self._install(conn, welcome)
            await self._resubscribe(conn)
            if self._conn is conn:
                self._ready.set()
                return
            # Lost again while subscribing: go round.

    async def _resubscribe(self, conn: ClientConnection) -> None:
        subs = [s for s in self._subs.values() if s._confirmed]
        if not subs:
            return
        objs = [{"op": "sub", "ch": s.ch} for s in subs]
        deadline = asyncio.get_running_loop().time() + self._open_timeout_s
        replies = await self._send_and_wait(conn, objs, "subscribed", deadline)
        for sub, r in zip(subs, replies, strict=True):
            op = r.get("op")
            if op in ("subscribed", _LOST):
                continue
            if op == "error" and r.get("code") not in RETRYABLE_CODES:
                self._subs.pop(sub.ch, None)
                sub._end(RelayErrorReply.from_obj(r))
                continue
            task = asyncio.create_task(self._resubscribe_later(sub), name="relay-client-resub")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _resubscribe_later(self, sub: Subscription) -> None:
        try:
            await self._call(
                {"op": "sub", "ch": sub.ch}, "subscribed", self.retry.reconnect_timeout_s
            )
        except (ClosedError, ConnectionLostError):
            pass
        except ClientError as e:
            if self._subs.get(sub.ch) is sub:
                del self._subs[sub.ch]
            sub._end(e)

    def _give_up(self, error: ClientError) -> None:
        self._failure = error
        lost = ConnectionLostError(f"gave up on {self.url}: {error}")
        lost.__cause__ = error
        self._end_all(lost)
        self._ready.set()  # wake waiters: they see the failure

    def _end_all(self, error: ClientError | None) -> None:
        for sub in self._subs.values():
            sub._end(error)
        self._subs.clear()
