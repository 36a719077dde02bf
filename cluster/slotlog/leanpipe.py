"""One connection to one Redis server on which commands are pipelined: packed by hand,
replies parsed by hiredis, no pool and no retry. The slot log's hot calls use it: the
group commit's script calls, and the tails' ``XREAD`` (one connection per tail under way);
and the receiver's writes of a window into the mirrors (:meth:`LeanPipe.call_many`: every
call sent before a reply is awaited, so the receiver decodes the next window meanwhile).

Why: a group-commit round is one script call, and redis-py's client spends ~100-150 µs of
CPU on it (pool checkout, its retry wrapper, packing each argument through its encoder,
a stream reader, a timeout context per read); this costs ~50 µs. At 5,000 msgs/s a node
makes ~600 rounds a second (docs/BENCHMARKS.md §9). A tail's rows cost half as much read
raw as through redis-py's parsing (§12).

What it keeps of redis-py: the connection itself. It is opened by redis-py's own
connection class with the client's settings (TCP, TLS, a Unix socket, ACL user and
password, the database), so every URL the client accepts works here; then its transport
is taken over.

What a caller sees:
- replies in the order the calls were made (one connection, pipelined: several callers
  may have calls in flight);
- an error reply as redis-py raises it (``NoScriptError`` for NOSCRIPT, else
  ``ResponseError``);
- a broken connection, or a reply later than the client's ``socket_timeout``, fails
  every call in flight with ``ConnectionError`` / ``TimeoutError`` and closes the
  connection; the next call opens a new one. Nothing is sent again here: whether a
  failed call ran is unknown, and the caller decides (the group commit appends the
  entries again, as it does for every failed append).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cluster.redisconn import own_connection_kwargs

_CRLF = b"\r\n"


def pack(args: tuple[bytes | str, ...]) -> bytes:
    """One RESP command: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n" % len(b))
        out.append(b)
        out.append(_CRLF)
    return b"".join(out)


def _error(reply: hiredis.ReplyError) -> ResponseError:
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    return ResponseError(text)


class _Replies(asyncio.Protocol):
    """The taken-over connection: each reply resolves the oldest call waiting."""

    def __init__(self, transport: asyncio.Transport, owners: tuple[Any, ...]) -> None:
        self.transport = transport
        # redis-py's connection and stream writer: kept for as long as the transport is
        # used, since either would close it when collected (their __del__).
        self.owners = owners
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.broken: Exception | None = None

    def send(self, data: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        if self.broken is not None:
            raise self.broken
        fut = loop.create_future()
        self.waiting.append(fut)
        self.transport.write(data)
        return fut

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as e:
                self.fail(RedisConnectionError(f"protocol error from Redis: {e}"))
                return
            if reply is False:
                return
            if isinstance(reply, hiredis.PushNotification):
                continue  # RESP3 out-of-band (the connection asks for RESP2: never expected)
            if not waiting:
                self.fail(RedisConnectionError("a reply from Redis that no call waits for"))
                return
            fut = waiting.popleft()
            if fut.done():  # its caller went away; the reply is dropped, in order
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(_error(reply))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost ({exc or 'closed'})"))

    def fail(self, err: Exception) -> None:
        """Fail every call in flight with ``err`` and close the connection."""
        if self.broken is None:
            self.broken = err
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(err)
        self.transport.close()
        # redis-py's connection no longer holds a stream: collected, it neither warns
        # nor closes anything.
        conn = self.owners[0]
        conn._reader = conn._writer = None


class LeanPipe:
    """Script calls (or any command) on one connection of ``client``'s server."""

    def __init__(self, client: Redis) -> None:
        pool = client.connection_pool
        self._connection_class = pool.connection_class
        # The client's settings (address, TLS, credentials, database, timeouts), less what
        # belongs to its pool; RESP2 and no maintenance notifications: replies only, never
        # an out-of-band push between them.
        self._kwargs = own_connection_kwargs(client)
        self._kwargs.pop("maint_notifications_config", None)
        self._kwargs["protocol"] = 2
        timeout = self._kwargs.get("socket_timeout")
        self.timeout_s: float | None = None if timeout is None else float(timeout)
        self._proto: _Replies | None = None
        self._opening: asyncio.Future[_Replies] | None = None
        self._closed = False
        self.connects = 0  # connections opened (a status and test figure)

    async def call(self, *args: bytes | str) -> Any:
        """Send one command; its reply, or the error redis-py would raise."""
        data = pack(args)
        loop = asyncio.get_running_loop()
        proto, fut = await self._send(data, loop)
        timer = (
            None if self.timeout_s is None else loop.call_later(self.timeout_s, _late, proto, fut)
        )
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()

    async def call_many(self, cmds: Sequence[tuple[bytes | str, ...]]) -> list[Any]:
        """Send every command of ``cmds`` before awaiting any reply (nothing yields in
        between once the connection is open); their replies in order, an error reply in
        the list as the exception redis-py would raise, not raised. A broken connection
        or a late reply raises, as in :meth:`call`."""
        if not cmds:
            return []
        loop = asyncio.get_running_loop()
        proto, first = await self._send(pack(cmds[0]), loop)
        futs = [first]
        futs.extend(proto.send(pack(c), loop) for c in cmds[1:])
        # Replies come in order: the last one in time means every one did.
        timer = (
            None
            if self.timeout_s is None
            else loop.call_later(self.timeout_s, _late, proto, futs[-1])
        )
        out: list[Any] = []
        try:
            for fut in futs:
                try:
                    out.append(await fut)
                except ResponseError as e:
                    out.append(e)
            return out
        finally:
            if timer is not None:
                timer.cancel()
            for fut in futs:
                fut.cancel()  # the caller went away: later replies are dropped, in order

    async def _send(
        self, data: bytes, loop: asyncio.AbstractEventLoop
    ) -> tuple[_Replies, asyncio.Future[Any]]:
        for attempt in range(3):
            proto = self._proto
            if proto is None or proto.broken is not None:
                proto = await self._open()
            try:
                return proto, proto.send(data, loop)
            except Exception:
                # Broken since it was opened (another caller's call failed it): a fresh
                # one; this call was not sent.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _open(self) -> _Replies:
        if self._closed:
            raise RedisConnectionError("closed")
        if self._opening is not None:  # another caller is opening it: share that
            return await asyncio.shield(self._opening)
        loop = asyncio.get_running_loop()
        opening = self._opening = loop.create_future()
        try:
            conn: Any = self._connection_class(**self._kwargs)
            await conn.connect()  # redis-py's handshake: TLS, AUTH, SELECT…
            writer = conn._writer  # the connected stream; its transport is taken over
            if writer is None:
                raise RedisConnectionError("redis-py connected without a stream")
            transport: Any = writer.transport
            proto = _Replies(transport, (conn, writer))
            transport.set_protocol(proto)
            if self._closed:  # closed while this one was opening
                proto.fail(RedisConnectionError("closed"))
                raise RedisConnectionError("closed")
            self._proto = proto
            self.connects += 1
            opening.set_result(proto)
            return proto
        except BaseException as e:
            opening.set_exception(e if isinstance(e, Exception) else RedisConnectionError(str(e)))
            opening.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            self._opening = None

    async def close(self) -> None:
        self._closed = True
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.fail(RedisConnectionError("closed"))


def _late(proto: _Replies, fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        proto.fail(RedisTimeoutError("no reply from Redis within socket_timeout"))
