"""The pending-message store: what has not been acknowledged yet, per channel.

Messages are kept packed, one ``bytes`` record each, in a per-channel dict keyed by the
message id (insertion order is the order of their hybrid-logical-clock timestamps). A
record is a fixed header followed by the sender, origin and body::

    <Q hlc> <q expires_ms> <H sender_len> <B origin_len> sender origin body

Nothing here reads a clock: callers pass ``now_ms`` (wall-clock milliseconds, since TTLs
must mean the same thing in every region).
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from relay.errors import InvariantError

_HEADER = struct.Struct("<QqHB")
_HEADER_SIZE = _HEADER.size
_HLC = struct.Struct("<Q")
_EXPIRES = struct.Struct("<q")

MAX_SENDER_BYTES = 0xFFFF
MAX_ORIGIN_BYTES = 0xFF


class Message(msgspec.Struct, frozen=True, gc=False):
    """One pending message, unpacked (a Struct: ten times cheaper to make than a frozen
    dataclass, and one is made per delivered message)."""

    id: str
    ch: str
    sender: str
    hlc: int
    origin: str
    body: bytes
    expires_ms: int


@dataclass(frozen=True, slots=True)
class Removed:
    """Why messages left a channel other than by ack: the caller counts and reports them."""

    ch: str
    ids: tuple[str, ...]
    reason: str  # "evicted" (channel cap) or "expired" (TTL)
    hlcs: tuple[int, ...]


# (sender, origin) -> (sender_len, origin_len, sender + origin encoded): a node sees few
# distinct pairs at a time, and encoding them is a good part of packing a small message.
_who_cache: dict[tuple[str, str], tuple[int, int, bytes]] = {}
_WHO_CACHE_MAX = 4096


def _who(sender: str, origin: str) -> tuple[int, int, bytes]:
    key = (sender, origin)
    who = _who_cache.get(key)
    if who is None:
        s = sender.encode()
        o = origin.encode()
        if len(s) > MAX_SENDER_BYTES or len(o) > MAX_ORIGIN_BYTES:
            raise InvariantError("sender or origin too long to pack")
        if len(_who_cache) >= _WHO_CACHE_MAX:
            _who_cache.clear()
        who = _who_cache[key] = (len(s), len(o), s + o)
    return who


def pack(hlc: int, expires_ms: int, sender: str, origin: str, body: bytes) -> bytes:
    """Pack a message's fields (all but id and channel) into one record."""
    slen, olen, so = _who(sender, origin)
    return b"".join((_HEADER.pack(hlc, expires_ms, slen, olen), so, body))


def unpack(ch: str, msg_id: str, record: bytes) -> Message:
    """Unpack a record made by :func:`pack`."""
    hlc, expires_ms, slen, olen = _HEADER.unpack_from(record)
    p = _HEADER_SIZE
    sender = record[p : p + slen].decode()
    p += slen
    origin = record[p : p + olen].decode()
    p += olen
    return Message(msg_id, ch, sender, hlc, origin, record[p:], expires_ms)


def record_hlc(record: bytes) -> int:
    """The timestamp of a packed record, without unpacking the rest."""
    hlc: int = _HLC.unpack_from(record)[0]
    return hlc


def record_expires_ms(record: bytes) -> int:
    """The expiry time of a packed record, without unpacking the rest."""
    expires: int = _EXPIRES.unpack_from(record, 8)[0]
    return expires


# Stale entries the expiry index may hold beyond two per live channel before it is
# compacted (PendingStore._compact_expiry).
EXPIRY_SLACK = 4096
# A channel's earliest expiry before its first message: above any record's (a signed
# 64-bit field), so the first add always sets it; 0 is a real expiry, not "unset".
_NO_EXPIRY = 1 << 63


class _Channel:
    __slots__ = ("bytes", "last_hlc", "min_expires_ms", "records")

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}
        self.bytes = 0
        self.last_hlc = 0
        self.min_expires_ms = _NO_EXPIRY  # set by the first add


def _size(msg_id: str, record: bytes) -> int:
    return len(record) + len(msg_id)


class PendingStore:
    """Undelivered messages per channel, oldest first, bounded per channel.

    The caller checks for duplicates first (:meth:`contains`), then :meth:`add`. Every
    message leaves by :meth:`ack`, by a cap (:meth:`add` returns what it evicted) or by
    TTL (:meth:`expire`); the returned :class:`Removed` values must be counted.
    """

    def __init__(self, *, channel_max_messages: int, channel_max_bytes: int) -> None:
        if channel_max_messages < 1 or channel_max_bytes < 1:
            raise InvariantError("channel caps must be positive")
        self.channel_max_messages = channel_max_messages
        self.channel_max_bytes = channel_max_bytes
        self._channels: dict[str, _Channel] = {}
        # (min expiry of the channel when pushed, channel): checked lazily by expire().
        # An entry outlives its channel when the channel empties (all acked, the usual
        # case in chat) and comes back: compacted once it holds more than
        # EXPIRY_SLACK + 2 entries per live channel, or it grew by one per message for
        # the whole TTL (a week by default).
        self._expiry_heap: list[tuple[int, str]] = []
        self.messages = 0
        self.bytes = 0

    # -- queries -------------------------------------------------------------------

    @property
    def channels(self) -> int:
        return len(self._channels)

    def contains(self, ch: str, msg_id: str) -> bool:
        c = self._channels.get(ch)
        return c is not None and msg_id in c.records

    def get(self, ch: str, msg_id: str) -> Message | None:
        c = self._channels.get(ch)
        if c is None:
            return None
        record = c.records.get(msg_id)
        return None if record is None else unpack(ch, msg_id, record)

    def count(self, ch: str) -> int:
        c = self._channels.get(ch)
        return 0 if c is None else len(c.records)

    def pending(self, ch: str, now_ms: int) -> list[Message]:
        """The channel's unexpired messages, oldest first."""
        c = self._channels.get(ch)
        if c is None:
            return []
        out = []
        for msg_id, record in c.records.items():
            m = unpack(ch, msg_id, record)
            if m.expires_ms > now_ms:
                out.append(m)
        return out

    def records(self, ch: str) -> list[tuple[str, bytes]]:
        """The channel's (id, packed record) pairs, oldest first: a copy that stays
        valid while the store changes (records are immutable), cheap to take in one
        turn and to unpack elsewhere with :func:`unpack`."""
        c = self._channels.get(ch)
        return [] if c is None else list(c.records.items())

    def channel_names(self) -> Iterable[str]:
        return self._channels.keys()

    # -- changes -------------------------------------------------------------------

    def add(
        self,
        ch: str,
        msg_id: str,
        *,
        hlc: int,
        expires_ms: int,
        sender: str,
        origin: str,
        body: bytes,
    ) -> Removed | None:
        """Store a message the caller has checked is new; return what the cap evicted."""
        # Packed first: a record that cannot be packed leaves no empty channel behind.
        record = pack(hlc, expires_ms, sender, origin, body)
        c = self._channels.get(ch)
        if c is None:
            c = self._channels[ch] = _Channel()
        elif msg_id in c.records:
            raise InvariantError(f"message {msg_id!r} already pending in {ch!r}")
        size = len(record) + len(msg_id)
        c.records[msg_id] = record
        c.bytes += size
        self.messages += 1
        self.bytes += size
        if hlc < c.last_hlc:
            self._resort(c)
        else:
            c.last_hlc = hlc
        if expires_ms < c.min_expires_ms:
            c.min_expires_ms = expires_ms
            heap = self._expiry_heap
            heapq.heappush(heap, (expires_ms, ch))
            if len(heap) > EXPIRY_SLACK + 2 * len(self._channels):
                self._compact_expiry()
        if len(c.records) > self.channel_max_messages or c.bytes > self.channel_max_bytes:
            return self._evict(ch, c)
        return None

    def ack(self, ch: str, ids: Iterable[str]) -> list[Message]:
        """Remove the named messages; return those that were pending."""
        c = self._channels.get(ch)
        if c is None:
            return []
        removed = []
        records = c.records
        for msg_id in ids:
            record = records.pop(msg_id, None)
            if record is not None:
                size = _size(msg_id, record)
                c.bytes -= size
                self.bytes -= size
                self.messages -= 1
                removed.append(unpack(ch, msg_id, record))
        if not records:
            del self._channels[ch]
        return removed

    def expire(self, now_ms: int, *, limit: int = 10_000) -> list[Removed]:
        """Drop messages whose TTL has passed, looking at ``limit`` channels at most.

        Call it periodically; when it returns as many channels as ``limit``, call again
        soon (the work is spread so one call never stalls the caller for long).
        """
        out: list[Removed] = []
        heap = self._expiry_heap
        seen = 0
        while heap and heap[0][0] <= now_ms and seen < limit:
            _, ch = heapq.heappop(heap)
            seen += 1
            c = self._channels.get(ch)
            if c is None or c.min_expires_ms > now_ms:
                continue  # stale heap entry: the channel's minimum moved on
            gone = [(i, r) for i, r in c.records.items() if _EXPIRES.unpack_from(r, 8)[0] <= now_ms]
            for msg_id, record in gone:
                del c.records[msg_id]
                size = _size(msg_id, record)
                c.bytes -= size
                self.bytes -= size
                self.messages -= 1
            if gone:
                out.append(
                    Removed(
                        ch,
                        tuple(i for i, _ in gone),
                        "expired",
                        tuple(record_hlc(r) for _, r in gone),
                    )
                )
            if c.records:
                c.min_expires_ms = min(record_expires_ms(r) for r in c.records.values())
                heapq.heappush(heap, (c.min_expires_ms, ch))
            else:
                del self._channels[ch]
        return out

    @property
    def expiry_entries(self) -> int:
        """Entries of the expiry index (at most ``EXPIRY_SLACK`` + 2 per channel)."""
        return len(self._expiry_heap)

    # -- internals -----------------------------------------------------------------

    def _compact_expiry(self) -> None:
        """One entry per live channel: its earliest expiry (a lower bound is enough for
        expire(), which rechecks). Amortized O(1) per add: a rebuild of C live channels
        follows at least EXPIRY_SLACK + C stale pushes. The one add that rebuilds pays
        O(C): ~150 ms at 200,000 live channels on a slow core."""
        heap = [(c.min_expires_ms, ch) for ch, c in self._channels.items()]
        heapq.heapify(heap)
        self._expiry_heap = heap

    def _evict(self, ch: str, c: _Channel) -> Removed:
        ids = []
        hlcs = []
        records = c.records
        while len(records) > 1 and (
            len(records) > self.channel_max_messages or c.bytes > self.channel_max_bytes
        ):
            msg_id = next(iter(records))
            record = records.pop(msg_id)
            size = _size(msg_id, record)
            c.bytes -= size
            self.bytes -= size
            self.messages -= 1
            ids.append(msg_id)
            hlcs.append(record_hlc(record))
        return Removed(ch, tuple(ids), "evicted", tuple(hlcs))

    @staticmethod
    def _resort(c: _Channel) -> None:
        # A message from another region can be older than the newest here; keep the
        # channel oldest first. Rare, so a full re-sort is fine.
        items = sorted(c.records.items(), key=lambda kv: (record_hlc(kv[1]), kv[0]))
        c.records = dict(items)
        c.last_hlc = record_hlc(items[-1][1])
