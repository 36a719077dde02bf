"""Link windows: what crosses the WAN, one compressed unit per window across all slots.

A window is every slot's new entries a link sends in one go. Each slot-log entry is
already an lz4 frame of one small batch, and at chat rates a slot's entry holds a message
or two: compressed one by one, nothing repeats. So the window carries each entry's
*decompressed* payload, and the whole window is compressed once, where the compressor
sees what the messages share::

    b"RW" <version: 1 byte> <lz4 frame: content size declared, content checksum>
        msgpack array of entries, each [slot, id, prev, kind, body, crc32]
            kind 0: body is the payload of a relay batch (relay/codec.py); the receiver
                    recompresses it, and crc32 (of the entry's original bytes) proves
                    the result is those bytes exactly
            kind 1: body is the entry's bytes as they are (checkpoints, anything else)

:func:`pack_window` only flattens an entry it can rebuild byte for byte (it recompresses
and compares), so the receiver writes each mirror entry with the **same id and bytes**.
:func:`unpack_window` trusts nothing: every problem raises :class:`WindowError`, which
carries a client-style :class:`~relay.errors.Code`, never anything else.

:class:`WindowTuner` is the adaptive part, pure: it takes measured round trips and the
backlog, and says how many entries a window holds and how many may be in flight.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Final, Protocol

import lz4.frame
import msgspec

from cluster.errors import ClusterError
from cluster.slotlog import TailEntry
from relay.codec import PREFIX as BATCH_PREFIX
from relay.config import LINK_CONNECTIONS_MAX
from relay.errors import Code

MAGIC: Final = b"RW"
VERSION: Final = 1
PREFIX: Final = MAGIC + bytes([VERSION])
MAX_ENTRIES: Final = 100_000
MAX_DECOMPRESSED: Final = 64 * 1024 * 1024
MAX_SLOTS: Final = 1 << 16
MAX_CONNECTIONS: Final = LINK_CONNECTIONS_MAX

# lz4 level of windows while no backlog waits (see WindowTuner).
STEADY_LEVEL: Final = 3
# Windows compressed hard after the WAN refused one (see window_level).
HARD_WINDOWS: Final = 16

KIND_BATCH: Final = 0
KIND_RAW: Final = 1

_Row = tuple[int, str, str, int, bytes, int]
_encoder = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(
    Annotated[list[_Row], msgspec.Meta(max_length=MAX_ENTRIES)]
)


class WindowError(ClusterError):
    """A window frame failed its checks: not one byte of it may be applied.

    ``code`` is :attr:`~relay.errors.Code.BAD_REQUEST`: the sender (a link, or whatever
    wrote to the inbound stream) is at fault, never the receiver."""

    code: Final = Code.BAD_REQUEST


def _batch_payload(data: bytes) -> bytes | None:
    """The payload of a relay batch ``data``, if recompressing it gives ``data`` back."""
    if data[: len(BATCH_PREFIX)] != BATCH_PREFIX:
        return None
    try:
        payload: bytes = lz4.frame.decompress(data[len(BATCH_PREFIX) :])
    except Exception:  # a damaged frame travels as it is; readers refuse it later
        return None
    if _recompress(payload) != data:
        return None
    return payload


def _recompress(payload: bytes) -> bytes:
    # Exactly what relay.codec.encode_batch does.
    frame: bytes = lz4.frame.compress(payload, store_size=True, content_checksum=True)
    return BATCH_PREFIX + frame


def pack_window(entries: Sequence[TailEntry], level: int = 0, *, raw: bool = False) -> bytes:
    """One frame holding ``entries`` (any slots, in the order the receiver must write
    them). The receiver's :func:`unpack_window` gives back equal ``TailEntry`` values.
    ``level`` is lz4's (0: fast; 3 and up: high compression, several times the CPU).
    ``raw``: every entry as the log's bytes, none decompressed (for a receiver whose lz4
    does not rebuild our batches byte for byte)."""
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"window of {len(entries)} entries is over {MAX_ENTRIES}; split it")
    rows: list[_Row] = []
    for e in entries:
        payload = None if raw else _batch_payload(e.data)
        if payload is None:
            rows.append((e.slot, e.id, e.prev, KIND_RAW, e.data, 0))
        else:
            rows.append((e.slot, e.id, e.prev, KIND_BATCH, payload, zlib.crc32(e.data)))
    body = _encoder.encode(rows)
    if len(body) > MAX_DECOMPRESSED:
        raise ValueError(f"window of {len(body)} bytes is over {MAX_DECOMPRESSED}; split it")
    frame: bytes = lz4.frame.compress(
        body, compression_level=level, store_size=True, content_checksum=True
    )
    return PREFIX + frame


def unpack_window(
    data: bytes, *, slots: int = MAX_SLOTS, max_decompressed: int = MAX_DECOMPRESSED
) -> list[TailEntry]:
    """The entries of a window made by :func:`pack_window`, each checked.

    Raises :class:`WindowError` — and nothing else, whatever the bytes — for a foreign
    prefix or version, a corrupt or oversized frame, a slot outside ``0..slots-1``, an
    id that is not a stream id, or a batch that does not rebuild to its checksum."""
    if len(data) < len(PREFIX) or data[:2] != MAGIC:
        raise WindowError(f"not a link window: starts {bytes(data[:3])!r}")
    if data[2] != VERSION:
        raise WindowError(f"window version {data[2]}: this node reads version {VERSION}")
    body = _decompress(memoryview(data)[len(PREFIX) :], max_decompressed)
    try:
        rows = _decoder.decode(body)
    except (msgspec.MsgspecError, ValueError) as exc:
        raise WindowError(f"bad window content: {exc}") from None
    out: list[TailEntry] = []
    for slot, entry_id, prev, kind, payload, crc in rows:
        if not 0 <= slot < slots:
            raise WindowError(f"slot {slot} is outside 0..{slots - 1}")
        if not _is_id(entry_id) or entry_id == "0-0" or (prev and not _is_id(prev)):
            raise WindowError(f"bad entry id {entry_id!r} or prev {prev!r}")
        if kind == KIND_RAW:
            out.append(TailEntry(slot, entry_id, payload, prev))
        elif kind == KIND_BATCH:
            rebuilt = _recompress(payload)
            if zlib.crc32(rebuilt) != crc:
                raise WindowError(f"entry {entry_id} of slot {slot} does not rebuild to its bytes")
            out.append(TailEntry(slot, entry_id, rebuilt, prev))
        else:
            raise WindowError(f"entry kind {kind} is unknown")
    return out


_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def _is_id(s: str) -> bool:
    return _ID.fullmatch(s) is not None


def _decompress(frame: memoryview, max_decompressed: int) -> bytes:
    # Untrusted input to a C extension: whatever it raises means "corrupt frame".
    try:
        size = lz4.frame.get_frame_info(frame)["content_size"]
    except Exception as exc:
        raise WindowError(f"corrupt lz4 frame header: {exc}") from None
    if not isinstance(size, int) or size <= 0 or size > max_decompressed:
        raise WindowError(f"window content size {size!r} is not within 1..{max_decompressed}")
    try:
        body: bytes = lz4.frame.decompress(frame)
    except Exception as exc:
        raise WindowError(f"corrupt lz4 frame: {exc}") from None
    if len(body) != size:
        raise WindowError(f"window decompressed to {len(body)} bytes, declared {size}")
    return body


# -- adapting to the link ---------------------------------------------------------------


# The default of WindowBounds.min_bytes.
MIN_BYTES = 12 << 10


@dataclass(frozen=True, slots=True)
class WindowBounds:
    """The configured bounds (``cluster.link_*``) the tuner stays within."""

    window_ms: int = 100
    # With no backlog a window closes as soon as its entries hold this many bytes: by
    # then the compressor has seen what the messages share, and waiting longer only
    # adds latency (window_ms is the upper bound, not the cadence).
    min_bytes: int = MIN_BYTES
    min_entries: int = 64
    max_entries: int = 4000
    max_bytes: int = 1 << 20
    min_inflight: int = 2
    max_inflight: int = 16
    max_inflight_bytes: int = 16 << 20
    # A backlog's windows go over this many connections, split by slot: a long fat
    # pipe's TCP window bounds what one connection carries in a round trip.
    connections: int = 4

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            out.append(f"connections must be 1-{MAX_CONNECTIONS}")
        if self.window_ms < 1:
            out.append("window_ms must be at least 1")
        if not 1 <= self.min_entries <= self.max_entries <= MAX_ENTRIES:
            out.append(f"need 1 <= min_entries <= max_entries <= {MAX_ENTRIES}")
        if self.max_bytes < 1024:
            out.append("max_bytes must be at least 1024")
        if not 0 <= self.min_bytes <= self.max_bytes:
            out.append("need 0 <= min_bytes <= max_bytes")
        if not 1 <= self.min_inflight <= self.max_inflight:
            out.append("need 1 <= min_inflight <= max_inflight")
        if self.max_inflight_bytes < self.max_bytes:
            out.append("max_inflight_bytes must be at least max_bytes")
        return out


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """What the link does next: cut windows of up to ``entries`` entries (and
    ``bounds.max_bytes``), keep at most ``inflight`` windows unconfirmed, and compress
    at lz4 ``level``. ``close_bytes``: a window being filled is sent as soon as its
    entries hold this many bytes (0: only when full or its time is up)."""

    entries: int
    inflight: int
    level: int = 0
    close_bytes: int = 0


class WindowTuner:
    """Window size and in-flight depth from the measured round trip and the backlog.

    The round trip is smoothed as TCP does (``srtt = 7/8 srtt + 1/8 sample``). With
    little waiting, a window is cut once it holds ``min_bytes`` of entries or
    ``window_ms`` after its oldest entry, whichever comes first; just enough are in
    flight to cover the time to its confirmation (``ceil(c / gap) + 2``, ``c`` the
    longer of two round trips and 1.5 times the measured time to a confirmation, ``gap`` the
    smoothed time between windows sent, at most ``window_ms``), compressed hard
    (lz4 level :data:`STEADY_LEVEL`: bytes matter more than the link's CPU); with a backlog,
    windows grow to ``max_entries``, the depth to ``max_inflight``, and compression
    goes fast (level 0): a long fat pipe is kept full and the link's CPU is not the
    bottleneck (but see :func:`window_level`). The caller passes as ``backlog_entries``
    what it last read, doubled, so windows grow geometrically while reads keep filling
    them.
    """

    def __init__(self, bounds: WindowBounds) -> None:
        problems = bounds.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.bounds = bounds
        self.srtt_s: float | None = None
        # Smoothed time between windows sent (windows close early when little waits).
        self.gap_s = bounds.window_ms / 1000
        # Smoothed time from a window sent to its confirmation (None: none measured yet).
        self.confirm_s: float | None = None
        self._last_sent: float | None = None

    def observe_rtt(self, sample_s: float) -> None:
        if sample_s < 0 or math.isnan(sample_s):
            return
        self.srtt_s = sample_s if self.srtt_s is None else 0.875 * self.srtt_s + 0.125 * sample_s

    def observe_confirm(self, sample_s: float) -> None:
        """A window was confirmed ``sample_s`` after it was sent."""
        if sample_s < 0 or math.isnan(sample_s):
            return
        c = self.confirm_s
        self.confirm_s = sample_s if c is None else 0.875 * c + 0.125 * sample_s

    def observe_sent(self, at_s: float) -> None:
        """A window was sent at ``at_s`` (monotonic seconds): the cadence windows go at."""
        if self._last_sent is not None and at_s >= self._last_sent:
            gap = min(at_s - self._last_sent, self.bounds.window_ms / 1000)
            self.gap_s = 0.75 * self.gap_s + 0.25 * gap
        self._last_sent = at_s

    def plan(self, backlog_entries: int) -> WindowPlan:
        b = self.bounds
        entries = max(b.min_entries, min(b.max_entries, backlog_entries))
        rtt_ms = (self.srtt_s or 0.0) * 1000
        # A window is confirmed one to two round trips after it is cut (its XADD crosses,
        # the receiver writes it, its progress comes back on the next read of `done`), or
        # half as long again as confirmations were measured to take on average (they
        # vary by a round trip: a window held back for depth waits, which is latency).
        # Windows go every gap_s (at most window_ms): cover that many.
        confirm_ms = max(2 * rtt_ms, 1.5 * (self.confirm_s or 0.0) * 1000)
        cover = math.ceil(confirm_ms / max(1.0, self.gap_s * 1000)) + 2
        if backlog_entries > b.max_entries or self.srtt_s is None:
            # A backlog, or no round trip measured yet (a link just started): fill
            # the pipe rather than wait a round trip per window to learn its length.
            cover = max(cover, b.max_inflight)
        inflight = max(b.min_inflight, min(b.max_inflight, cover))
        if backlog_entries > b.max_entries:
            return WindowPlan(entries, inflight, 0)
        return WindowPlan(entries, inflight, STEADY_LEVEL, b.min_bytes)


def window_level(plan_level: int, wan_full: bool, hard_left: int) -> tuple[int, int]:
    """The lz4 level of the next window, and ``hard_left`` for the one after.

    The plan's level, except that a backlog's windows (level 0) are compressed hard for
    the next :data:`HARD_WINDOWS` windows whenever ``wan_full``: the destination's socket
    refused at once most of the previous window (its send buffer full: the WAN, TCP's
    window, holds the backlog back; a busy event loop does not count). Then every byte
    saved is throughput, and the link's CPU has time to spare while it waits: level
    :data:`STEADY_LEVEL` with entries flattened carries ~1.5 times the messages per byte
    of a raw window at level 0 (docs/BENCHMARKS.md §12). It lasts several windows
    because a window compressed hard takes long enough to pack that the socket has
    drained meanwhile."""
    if plan_level != 0:
        return plan_level, 0
    if wan_full:
        hard_left = HARD_WINDOWS
    if hard_left > 0:
        return STEADY_LEVEL, hard_left - 1
    return 0, 0


def batch_events(data: bytes) -> int:
    """How many events a relay batch holds, from its payload's msgpack array header
    (0 for anything else). Reads the header from the lz4 frame's first literals when it
    is there (the usual case: nothing decompressed), else decompresses a few bytes.
    (A link counts every entry it sends: this runs once per entry.)"""
    if data.startswith(_USUAL_HEAD) and len(data) > _USUAL_AT + 1:
        # The frame relay.codec writes (content size and checksum declared): its first
        # block at a fixed place. Stored as it is, or compressed with fewer than 15
        # literals first: the header byte is right there.
        if data[_USUAL_AT - 1] & 0x80:  # stored; an empty block holds no header
            b = data[_USUAL_AT] if data[_USUAL_AT - 4 : _USUAL_AT] != b"\0\0\0\x80" else 0
        elif 0 < data[_USUAL_AT] >> 4 < 15:
            b = data[_USUAL_AT + 1]
        else:
            b = 0
        if 0x90 <= b <= 0x9F:
            return b & 0x0F
    if not data.startswith(BATCH_PREFIX):
        return 0
    lit = _first_literals(data, _BATCH_AT)
    if lit:
        b = lit[0]
        if 0x90 <= b <= 0x9F:  # up to 15 events: the header is one byte
            return b & 0x0F
        if len(lit) >= (3 if b == 0xDC else 5 if b == 0xDD else 1):
            return _array_len(lit)
    try:
        d = lz4.frame.LZ4FrameDecompressor()
        head: bytes = d.decompress(data[_BATCH_AT:], max_length=5)
    except Exception:
        return 0
    return _array_len(head)


_BATCH_AT: Final = len(BATCH_PREFIX)
_LZ4_MAGIC: Final = b"\x04\x22\x4d\x18"
# relay.codec's frames: FLG 0x6C (version 1, independent blocks, content checksum,
# content size), then BD, 8 bytes of content size and HC; the first block's 4-byte size
# (its top bit: stored as it is) ends right before _USUAL_AT.
_USUAL_HEAD: Final = BATCH_PREFIX + _LZ4_MAGIC + b"\x6c"
_USUAL_AT: Final = len(_USUAL_HEAD) + 1 + 8 + 1 + 4


def _first_literals(data: bytes, at: int) -> bytes | None:
    """The literal bytes an lz4 frame at ``data[at:]`` begins its content with, read
    from its first block's first sequence without decompressing (None: not found)."""
    if not data.startswith(_LZ4_MAGIC, at) or len(data) < at + 7:
        return None
    flg = data[at + 4]
    i = at + 7 + (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0)
    if len(data) < i + 5:
        return None
    size = int.from_bytes(data[i : i + 4], "little")
    i += 4
    if size & 0x80000000:  # a block stored as it is
        return data[i : i + min(5, size & 0x7FFFFFFF)]
    token = data[i]
    i += 1
    n = token >> 4
    if n == 15:
        while i < len(data):
            b = data[i]
            i += 1
            n += b
            if b != 255:
                break
    return data[i : i + min(n, 5)]


def _array_len(head: bytes) -> int:
    """The length a msgpack array header at the start of ``head`` gives (0: none)."""
    if not head:
        return 0
    b = head[0]
    if 0x90 <= b <= 0x9F:
        return b & 0x0F
    if b == 0xDC and len(head) >= 3:
        return int.from_bytes(head[1:3], "big")
    if b == 0xDD and len(head) >= 5:
        return int.from_bytes(head[1:5], "big")
    return 0


class _LinkSettings(Protocol):
    @property
    def link_window_ms(self) -> int: ...
    @property
    def link_window_min_entries(self) -> int: ...
    @property
    def link_window_max_entries(self) -> int: ...
    @property
    def link_window_max_bytes(self) -> int: ...
    @property
    def link_inflight_min(self) -> int: ...
    @property
    def link_inflight_max(self) -> int: ...
    @property
    def link_inflight_max_bytes(self) -> int: ...
    @property
    def link_connections(self) -> int: ...


def bounds_of(c: _LinkSettings) -> WindowBounds:
    """The bounds the ``cluster.link_*`` settings give (``Config.validate()`` checked them)."""
    return WindowBounds(
        window_ms=c.link_window_ms,
        min_entries=c.link_window_min_entries,
        max_entries=c.link_window_max_entries,
        max_bytes=c.link_window_max_bytes,
        # Never above what a window may hold (a small max_bytes is a valid setting).
        min_bytes=min(MIN_BYTES, c.link_window_max_bytes),
        min_inflight=c.link_inflight_min,
        max_inflight=c.link_inflight_max,
        max_inflight_bytes=c.link_inflight_max_bytes,
        connections=c.link_connections,
    )
