"""The node's WebSocket frame reading fuzzed from outside, over a raw TCP socket.

The node reads a client's whole simple frames itself (relay/wsread.py) and leaves every
other frame to Autobahn's parser (relay/ws.py ``RelayProtocol.processData``). Here
random streams mixing both kinds (whole frames with 7-, 16- and 64-bit lengths, pings and
pongs, fragmented messages with control frames between their fragments) are written in
random chunks, and:

- a valid stream gets every reply in the order of its frames (each ``pub`` its
  ``puback``, each ping its pong with the same payload), nothing else, and the
  connection stays open;
- a valid prefix followed by one bad frame gets the prefix's replies, then a close frame
  with the RFC 6455 code Autobahn fails the connection with (1002 protocol error, 1007
  invalid UTF-8, 1009 too big), nothing after it, and the connection is closed; the node
  then serves a fresh connection.

Where the node closes the TCP connection is Autobahn's: on the client's close frame
answering its own, or at once when the bad frame holds a second violation (Autobahn checks
a frame's first two bytes again each time more of its header arrives, so a bad header
split between two reads is two violations). Either way nothing follows the close frame.

Examples are derandomized and no example database is kept, so every run (CI included)
tries the same streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from relay.server import RelayServer
from tests.conftest import aio, next_turn

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
FORMATS = {"json": TEXT, "msgpack": BINARY}
# The max_frame (and max_body) of the malformed-stream test's node: under 65,536, so that
# a whole frame with a 16-bit length can be over it.
SMALL_MAX_FRAME = 32_768
EXAMPLE_S = 20.0  # the time limit of one example
READ_S = 3.0  # the time limit of one read from the node

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    # No "explain" phase: its line tracing makes a failing example's shrinking crawl.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    # The node (a function-scoped fixture) serves every example of a test: that it keeps
    # serving them is part of what is tested.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# Each kind of bad frame is a test of its own, with fewer examples.
FUZZ_EACH_KIND = settings(FUZZ, max_examples=6)

_ids = itertools.count()


# -- frames, as a client writes them --------------------------------------------------


def xor(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def client_frame(
    opcode: int,
    payload: bytes,
    mask: bytes = b"\x01\x02\x03\x04",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length_code: int | None = None,
) -> bytes:
    """One frame as RFC 6455 §5.2 lays it out; ``length_code`` (126, 127) forces a 16- or
    64-bit length whatever the payload's size."""
    n = len(payload)
    code = length_code or (n if n < 126 else 126 if n < 65536 else 127)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode, (0x80 if masked else 0) | code])
    if code == 126:
        head += n.to_bytes(2, "big")
    elif code == 127:
        head += n.to_bytes(8, "big")
    return head + (mask + xor(payload, mask) if masked else payload)


def encode(objs: list[dict[str, Any]], fmt: str, as_list: bool) -> bytes:
    doc: Any = objs if as_list or len(objs) != 1 else objs[0]
    if fmt == "json":
        return json.dumps(doc, ensure_ascii=False).encode()
    return msgspec.msgpack.encode(doc)


# -- what a stream is made of ---------------------------------------------------------


@dataclass(frozen=True)
class Control:
    """A ping (answered with a pong of the same payload) or an unsolicited pong."""

    opcode: int
    payload: bytes
    mask: bytes


@dataclass(frozen=True)
class Msg:
    """A data message holding pubs, whole or in fragments (cut at ``cuts``, each taken
    modulo the payload's length + 1: empty fragments too), with control frames between
    them (``between[i]`` after fragment ``i``)."""

    bodies: tuple[str, ...]
    as_list: bool
    cuts: tuple[int, ...]
    between: tuple[Control | None, ...]
    masks: tuple[bytes, ...]
    # "huge": two bodies of 33,000 bytes, a 64-bit length. "full": one body that makes the
    # payload exactly the node's max_frame.
    size: str = "small"


Item = Control | Msg
Event = tuple[Any, ...]


@dataclass
class Stream:
    frames: list[bytes]
    expected: list[Event]
    welcomed: bool = False
    bad_frame: int = -1  # the number of the bad frame, in a malformed stream


def pub_body(text: str, fmt: str) -> Any:
    return text if fmt == "json" else text.encode()


def message_frames(
    msg: Msg, fmt: str, stream: Stream, max_frame: int, last_fragment: int | None = None
) -> None:
    """Add ``msg``'s frames and replies to ``stream``; ``last_fragment``: stop after that
    fragment, the message left open (no replies for it)."""
    ids = [f"z{next(_ids):07d}" for _ in msg.bodies]  # one width: the same payload sizes
    objs = [
        {"op": "pub", "id": i, "ch": f"fz:{n % 3}", "body": pub_body(b, fmt)}
        for n, (i, b) in enumerate(zip(ids, msg.bodies, strict=True))
    ]
    payload = encode(objs, fmt, msg.as_list)
    if msg.size == "full":
        n = len(msg.bodies[0])
        while len(payload) != max_frame:
            n += max_frame - len(payload)
            objs[0]["body"] = pub_body("x" * n, fmt)
            payload = encode(objs, fmt, msg.as_list)
    cuts = sorted(c % (len(payload) + 1) for c in msg.cuts)
    parts = [payload[a:b] for a, b in itertools.pairwise([0, *cuts, len(payload)])]
    masks = itertools.cycle(msg.masks)
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        stream.frames.append(
            client_frame(FORMATS[fmt] if k == 0 else CONT, part, next(masks), fin=last)
        )
        if last_fragment is not None and k == last_fragment:
            return
        if not last and k < len(msg.between) and (c := msg.between[k]) is not None:
            control_frame(c, stream)
    if not stream.welcomed:
        stream.expected.append(("welcome",))
        stream.welcomed = True
    stream.expected.extend(("puback", o["id"], o["ch"], False) for o in objs)


def control_frame(c: Control, stream: Stream) -> None:
    stream.frames.append(client_frame(c.opcode, c.payload, c.mask))
    if c.opcode == PING:
        stream.expected.append(("ws-pong", c.payload))


def build(items: list[Item], fmt: str, max_frame: int, stream: Stream | None = None) -> Stream:
    stream = stream or Stream([], [])
    for item in items:
        if isinstance(item, Control):
            control_frame(item, stream)
        else:
            message_frames(item, fmt, stream, max_frame)
    return stream


# -- strategies -----------------------------------------------------------------------

masks = st.binary(min_size=4, max_size=4)
controls = st.builds(
    Control,
    opcode=st.sampled_from([PING, PING, PONG]),
    payload=st.binary(max_size=125),
    mask=masks,
)
# Any Unicode scalar value: split anywhere between fragments, a character's UTF-8 bytes
# may be cut in two (RFC 6455 checks UTF-8 over the whole message).
text = st.characters(codec="utf-8")
bodies = st.one_of(st.text(text, max_size=40), st.text(text, min_size=126, max_size=1500))
cut_lists = st.lists(st.integers(0, 1 << 17), max_size=3).map(tuple)
betweens = st.lists(st.none() | controls, max_size=3).map(tuple)
mask_lists = st.lists(masks, min_size=1, max_size=4).map(tuple)
small_msgs = st.builds(
    Msg,
    bodies=st.lists(bodies, min_size=1, max_size=3).map(tuple),
    as_list=st.booleans(),
    cuts=cut_lists,
    between=betweens,
    masks=mask_lists,
)
# Two bodies of 33,000 bytes: a payload over 65,535, a 64-bit length.
huge_msgs = st.builds(
    Msg,
    bodies=st.just(("x" * 33_000, "y" * 33_000)),
    as_list=st.just(True),
    cuts=st.lists(st.integers(0, 1 << 17), max_size=1).map(tuple),
    between=betweens,
    masks=mask_lists,
    size=st.just("huge"),
)
# One pub, its payload exactly max_frame: the largest the node takes, whole or in fragments.
full_msgs = st.builds(
    Msg,
    bodies=st.just(("x",)),
    as_list=st.booleans(),
    cuts=st.lists(st.integers(0, 1 << 17), max_size=2).map(tuple),
    between=betweens,
    masks=mask_lists,
    size=st.just("full"),
)


def items(big: st.SearchStrategy[Msg] | None) -> st.SearchStrategy[Item]:
    # Mostly messages and control frames; one item in six a ``big`` message.
    def pick(k: int) -> st.SearchStrategy[Item]:
        if k >= 10 and big is not None:
            return big
        return controls if k % 3 == 2 else small_msgs

    return st.integers(0, 11).flatmap(pick)


# Where the stream is cut into writes: (frame number, offset in it), each taken modulo
# the number of frames and the frame's length + 1; offsets near a frame's start cut its
# header. Frames not cut apart go in one write.
chunkings = st.lists(
    st.tuples(st.integers(0, 63), st.one_of(st.integers(0, 15), st.integers(0, 1 << 17))),
    max_size=24,
)


@dataclass(frozen=True)
class Valid:
    fmt: str
    items: list[Item]
    chunks: list[tuple[int, int]]


valid_cases = st.builds(
    Valid,
    fmt=st.sampled_from(list(FORMATS)),
    items=st.lists(items(huge_msgs), max_size=8),
    chunks=chunkings,
)


@dataclass(frozen=True)
class Bad:
    """One bad frame (``kind``) and the close code it must get. The other fields are read
    as each kind needs them (:func:`bad_stream`)."""

    kind: str
    code: int
    opcode: int = TEXT
    rsv: int = 0
    size: int = 0
    payload: bytes = b""
    open_msg: Msg | None = None  # "interleaved": the message left open before it
    open_fragments: int = 0
    cut: int = 0  # where a fragmented bad message is cut in two


def _bad(kind: str, code: int, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Bad]:
    return st.builds(Bad, kind=st.just(kind), code=st.just(code), **fields)


simple_opcodes = st.sampled_from([TEXT, BINARY, PING, PONG])
small_payloads = st.binary(max_size=125)
# Invalid UTF-8: a stray byte, an overlong form, a surrogate, over U+10FFFF, a character
# cut at the end of the message.
bad_utf8 = st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])
# How far over max_frame: with a 16-bit length, or a 64-bit one.
over_max_frame = st.integers(1, 64) | st.integers(65536 - SMALL_MAX_FRAME, 65600 - SMALL_MAX_FRAME)
# The bad frames, by kind: the close code each gets.
BAD_FRAMES: dict[str, st.SearchStrategy[Bad]] = {
    # An RSV bit set (no extension is negotiated).
    "rsv": _bad("rsv", 1002, opcode=simple_opcodes, rsv=st.integers(1, 7), payload=small_payloads),
    "reserved_opcode": _bad(
        "reserved_opcode",
        1002,
        opcode=st.sampled_from([*range(3, 8), *range(11, 16)]),
        payload=small_payloads,
    ),
    "unmasked": _bad("unmasked", 1002, opcode=simple_opcodes, payload=small_payloads),
    # A continuation frame with no message started.
    "orphan_continuation": _bad("orphan_continuation", 1002, payload=small_payloads),
    # A new data message while a fragmented one is open.
    "interleaved": _bad(
        "interleaved",
        1002,
        opcode=st.sampled_from([TEXT, BINARY]),
        payload=small_payloads,
        open_msg=st.builds(
            Msg,
            bodies=st.lists(bodies, min_size=1, max_size=3).map(tuple),
            as_list=st.booleans(),
            cuts=st.lists(st.integers(0, 1 << 17), min_size=1, max_size=3).map(tuple),
            between=betweens,
            masks=mask_lists,
        ),
        open_fragments=st.integers(0, 3),
    ),
    "control_not_fin": _bad(
        "control_not_fin", 1002, opcode=st.sampled_from([PING, PONG]), payload=small_payloads
    ),
    "control_too_long": _bad(
        "control_too_long",
        1002,
        opcode=st.sampled_from([PING, PONG]),
        payload=st.binary(min_size=126, max_size=300),
    ),
    # A 16-bit length under 126, a 64-bit length under 65,536.
    "len16_not_minimal": _bad("len16_not_minimal", 1002, payload=small_payloads),
    "len64_not_minimal": _bad("len64_not_minimal", 1002, size=st.integers(0, 65535)),
    # A payload over max_frame: one frame, or the fragment that takes a message over it.
    "too_big": _bad("too_big", 1009, size=over_max_frame),
    "too_big_fragmented": _bad(
        "too_big_fragmented", 1009, size=over_max_frame, cut=st.integers(0, 1 << 16)
    ),
    # Invalid UTF-8 in a text message: whole, or cut in two anywhere.
    "invalid_utf8": _bad("invalid_utf8", 1007, payload=bad_utf8, size=st.integers(0, 1500)),
    "invalid_utf8_fragmented": _bad(
        "invalid_utf8_fragmented",
        1007,
        payload=st.one_of(bad_utf8, st.just(b"\xe2\x82")),
        size=st.integers(0, 1500),
        cut=st.integers(0, 1 << 13),
    ),
    # A close frame with a code no endpoint may send, a 1-byte payload, a reason that is
    # not UTF-8. Autobahn fails these and aborts the connection in the same call; the
    # node still writes the frames of that turn (its close frame among them) before the
    # socket goes, so the client gets the code (RFC 6455 §7.1.7: it SHOULD), then a reset.
    "close_reserved_code": _bad(
        "close_reserved_code",
        1002,
        size=st.sampled_from([0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]),
    ),
    "close_payload_1": _bad("close_payload_1", 1002, payload=st.binary(min_size=1, max_size=1)),
    "close_reason_not_utf8": _bad("close_reason_not_utf8", 1007, payload=bad_utf8),
}


@dataclass(frozen=True)
class Malformed:
    fmt: str
    prefix: list[Item]
    bad: Bad
    trailing: list[Item]
    chunks: list[tuple[int, int]]


def malformed_cases(kind: str) -> st.SearchStrategy[Malformed]:
    return st.builds(
        Malformed,
        # Text messages only: the JSON subprotocol's.
        fmt=st.just("json") if "utf8" in kind else st.sampled_from(list(FORMATS)),
        prefix=st.lists(items(full_msgs), max_size=5),
        bad=BAD_FRAMES[kind],
        trailing=st.lists(items(None), max_size=3),
        chunks=chunkings,
    )


def bad_stream(case: Malformed, max_frame: int) -> Stream:
    """The valid prefix, the bad frame, then frames the node must no longer answer."""
    stream = build(case.prefix, case.fmt, max_frame)
    bad = case.bad
    kind = bad.kind
    data = FORMATS[case.fmt]
    if kind == "rsv":
        frame = client_frame(bad.opcode, bad.payload, rsv=bad.rsv)
    elif kind in ("reserved_opcode", "control_too_long"):
        frame = client_frame(bad.opcode, bad.payload)
    elif kind == "unmasked":
        frame = client_frame(bad.opcode, bad.payload, masked=False)
    elif kind == "orphan_continuation":
        frame = client_frame(CONT, bad.payload)
    elif kind == "interleaved":
        assert bad.open_msg is not None
        n = bad.open_fragments % (len(bad.open_msg.cuts) + 1)
        # The open message's first fragments (FIN clear), then a new data message.
        message_frames(bad.open_msg, case.fmt, stream, max_frame, last_fragment=n)
        if n == len(bad.open_msg.cuts):  # its last fragment: sent with FIN clear
            stream.frames[-1] = bytes([stream.frames[-1][0] & 0x7F]) + stream.frames[-1][1:]
        frame = client_frame(bad.opcode, bad.payload)
    elif kind == "control_not_fin":
        frame = client_frame(bad.opcode, bad.payload, fin=False)
    elif kind == "len16_not_minimal":
        frame = client_frame(data, bad.payload, length_code=126)
    elif kind == "len64_not_minimal":
        frame = client_frame(data, b"a" * bad.size, length_code=127)
    elif kind == "too_big":
        frame = client_frame(data, b"a" * (max_frame + bad.size))
    elif kind == "too_big_fragmented":
        first = bad.cut % (max_frame + 1)  # what is left goes over in the second fragment
        frame = client_frame(data, b"a" * first, fin=False) + client_frame(
            CONT, b"a" * (max_frame - first + bad.size)
        )
    elif kind == "close_reserved_code":
        frame = client_frame(CLOSE, bad.size.to_bytes(2, "big"))
    elif kind == "close_payload_1":
        frame = client_frame(CLOSE, bad.payload)
    elif kind == "close_reason_not_utf8":
        frame = client_frame(CLOSE, (1000).to_bytes(2, "big") + b"bye " + bad.payload)
    else:  # invalid UTF-8 in a text message (JSON), whole or in two fragments
        obj = {"op": "pub", "id": "u", "ch": "fz", "body": "é" * bad.size}
        head = json.dumps(obj, ensure_ascii=False).encode()[:-2]  # up to the body's end
        if kind == "invalid_utf8":
            frame = client_frame(TEXT, head + bad.payload + b'"}')
        else:  # the bad bytes (or a character cut short) end the message
            payload = head + bad.payload
            cut = bad.cut % (len(payload) + 1)
            frame = client_frame(TEXT, payload[:cut], fin=False) + client_frame(CONT, payload[cut:])
    stream.bad_frame = len(stream.frames)
    stream.frames.append(frame)
    after = build(case.trailing, case.fmt, max_frame)
    stream.frames.extend(after.frames)
    return stream


# -- the raw connection ---------------------------------------------------------------


class Raw:
    """A WebSocket client written by hand on a raw socket: frames in, events out.

    The loop's socket calls, not streams: once the node has closed, a failed write must
    not take with it what the node sent before (a stream's reader then only raises)."""

    def __init__(self, sock: socket.socket, fmt: str) -> None:
        self.sock = sock
        self.fmt = fmt
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.objects: deque[Event] = deque()

    @classmethod
    async def open(cls, node: RelayServer, fmt: str) -> Raw:
        host, port = node.ws_url.split("//")[1].split("/")[0].split(":")
        sock = socket.socket()
        sock.setblocking(False)
        c = cls(sock, fmt)
        await asyncio.wait_for(c.loop.sock_connect(sock, (host, int(port))), READ_S)
        await c.write(
            f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relay.v1.{fmt}\r\n\r\n".encode()
        )
        while b"\r\n\r\n" not in c.buf:
            await c.recv()
        end = c.buf.index(b"\r\n\r\n") + 4
        head = bytes(c.buf[:end])
        del c.buf[:end]
        assert head.startswith(b"HTTP/1.1 101"), head
        assert f"sec-websocket-protocol: relay.v1.{fmt}".encode() in head.lower(), head
        return c

    async def write(self, data: bytes) -> None:
        await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), READ_S)

    async def send(
        self, frames: list[bytes], chunks: list[tuple[int, int]], node_may_close_after: int = -1
    ) -> None:
        """Write ``frames`` cut where ``chunks`` says, letting the node read each piece.
        Past frame ``node_may_close_after`` the node may have closed: writes may fail."""
        starts = list(itertools.accumulate((len(f) for f in frames), initial=0))
        points = {0, starts[-1]}
        for k, off in chunks:
            if frames:
                i = k % len(frames)
                points.add(starts[i] + off % (len(frames[i]) + 1))
        data = b"".join(frames)
        may_fail_from = starts[node_may_close_after] if node_may_close_after >= 0 else len(data)
        for a, b in itertools.pairwise(sorted(points)):
            try:
                await self.write(data[a:b])
            except (BrokenPipeError, ConnectionResetError):
                assert a > may_fail_from, f"the node closed before byte {a}"
                return
            await next_turn()

    async def recv(self) -> None:
        data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 16), READ_S)
        assert data, f"the node closed the connection; unread: {bytes(self.buf)!r}"
        self.buf += data

    async def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self.recv()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def frame(self) -> tuple[int, bytes]:
        b0, b1 = await self.read(2)
        assert b0 & 0xF0 == 0x80 and b1 & 0x80 == 0, f"node frame header {b0:#x} {b1:#x}"
        n = b1 & 0x7F
        if n >= 126:
            n = int.from_bytes(await self.read(2 if n == 126 else 8), "big")
        return b0 & 0x0F, await self.read(n)

    async def event(self) -> Event:
        """The next thing the node says (its own WebSocket pings are left out)."""
        while not self.objects:
            opcode, payload = await self.frame()
            if opcode in (TEXT, BINARY):
                assert opcode == FORMATS[self.fmt], f"a frame of opcode {opcode}"
                doc = json.loads(payload) if opcode == TEXT else msgspec.msgpack.decode(payload)
                for o in doc if isinstance(doc, list) else [doc]:
                    self.objects.append(_event(o))
            elif opcode == PONG:
                self.objects.append(("ws-pong", payload))
            elif opcode == CLOSE:
                self.objects.append(("close", int.from_bytes(payload[:2], "big")))
            else:
                assert opcode == PING, f"a frame of opcode {opcode}"
        return self.objects.popleft()

    async def eof(self) -> None:
        """The node has closed the connection, with nothing more sent."""
        try:
            rest = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 16), READ_S)
        except ConnectionResetError:
            rest = b""
        assert not self.buf and not rest, f"more after the close: {bytes(self.buf) + rest!r}"

    async def close(self) -> None:
        """Close as a client does: a close frame, the node's answer, the end."""
        await self.write(client_frame(CLOSE, (1000).to_bytes(2, "big")))
        assert await self.event() == ("close", 1000)
        await self.eof()


def same(got: list[Event], want: list[Event]) -> None:
    """``got == want``, told briefly (pytest's own diff of long lists takes minutes)."""
    if got == want:
        return
    k = next(
        (i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w),
        min(len(got), len(want)),
    )
    raise AssertionError(
        f"{len(got)} events, {len(want)} expected; first difference at {k}:"
        f" got {_short(got[k : k + 3])}, expected {_short(want[k : k + 3])}"
    )


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) < 600 else r[:600] + "…"


def _event(o: dict[str, Any]) -> Event:
    op = o.get("op")
    if op == "puback":
        return ("puback", o["id"], o["ch"], o["dup"])
    if op in ("welcome", "pong"):
        return (op,)
    return ("other", o)


@contextlib.asynccontextmanager
async def connect(node: RelayServer, fmt: str) -> AsyncIterator[Raw]:
    """A handshaken connection, its socket closed at the end whatever happens (a failed
    example must not leave the node a connection to wait for)."""
    c = await Raw.open(node, fmt)
    try:
        yield c
    finally:
        c.sock.close()


def op_ping(fmt: str) -> bytes:
    """An op ping, the last frame of a stream: its pong ends the node's replies, or tells at
    once that the node did not close where it should have."""
    return client_frame(FORMATS[fmt], encode([{"op": "ping"}], fmt, False))


async def fresh_connection_is_served(node: RelayServer) -> None:
    msg_id = f"fresh{next(_ids)}"
    obj = {"op": "pub", "id": msg_id, "ch": "f", "body": "b"}
    async with connect(node, "json") as c:
        await c.send([client_frame(TEXT, json.dumps(obj).encode())], [])
        assert [await c.event(), await c.event()] == [
            ("welcome",),
            ("puback", msg_id, "f", False),
        ]
        await c.close()


# -- the tests ------------------------------------------------------------------------


def _note_kinds(fmt: str, items: list[Item], stream: Stream) -> None:
    """What kinds of frames an example holds (``--hypothesis-show-statistics``)."""
    event(f"format: {fmt}")
    msgs = [i for i in items if isinstance(i, Msg)]
    for size in sorted({m.size for m in msgs} - {"small"}):
        event(f"a {size} message")
    if any(f[1] & 0x7F == 127 for f in stream.frames):
        event("a 64-bit length")
    if any(f[1] & 0x7F == 126 for f in stream.frames):
        event("a 16-bit length")
    if any(m.cuts for m in msgs):
        event("a fragmented message")
    if any(c is not None for m in msgs if m.cuts for c in m.between[: len(m.cuts)]):
        event("a control frame between fragments")
    event(f"frames: {min(len(stream.frames) // 4 * 4, 20)}+")


async def _valid(node: RelayServer, case: Valid) -> None:
    stream = build(case.items, case.fmt, node.factory.limits.max_frame)
    stream.frames.append(op_ping(case.fmt))
    _note_kinds(case.fmt, case.items, stream)
    async with connect(node, case.fmt) as c:
        await c.send(stream.frames, case.chunks)
        got: list[Event] = []
        while got[-1:] != [("pong",)]:
            got.append(await c.event())
            assert got[-1][0] != "close", _short(got[-3:])
        same(got, [*stream.expected, ("pong",)])
        await c.close()


@FUZZ
@given(case=valid_cases)
@aio
async def test_valid_streams_in_any_chunks_get_every_reply_in_order(
    anon_node: RelayServer, case: Valid
) -> None:
    await asyncio.wait_for(_valid(anon_node, case), EXAMPLE_S)


async def _malformed(node: RelayServer, case: Malformed) -> None:
    stream = bad_stream(case, SMALL_MAX_FRAME)
    stream.frames.append(op_ping(case.fmt))  # never answered: the node has failed by then
    _note_kinds(case.fmt, case.prefix, stream)
    async with connect(node, case.fmt) as c:
        await c.send(stream.frames, case.chunks, node_may_close_after=stream.bad_frame)
        got: list[Event] = []
        while got[-1:] != [("pong",)] and (not got or got[-1][0] != "close"):
            got.append(await c.event())
        same(got, [*stream.expected, ("close", case.bad.code)])
        # Then the connection ends with nothing more: the node drops it on the close
        # frame that answers its own, or (a second violation first) has closed it already.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await c.write(client_frame(CLOSE, (1000).to_bytes(2, "big")))
        await c.eof()
    await fresh_connection_is_served(node)


@pytest.fixture
def small_node(make_node: Any) -> RelayServer:
    """A node whose max_frame a whole 16-bit-length frame can exceed."""
    node: RelayServer = make_node(
        client={
            "allow_anonymous": True,
            "max_frame": SMALL_MAX_FRAME,
            "max_body": SMALL_MAX_FRAME,
        }
    )
    return node


def _bad_frame_test(kind: str) -> Callable[..., Any]:
    # One test per kind, not a parametrized one: pytest-twisted wraps a @given test's
    # inner function once per call, so a second parameter would run it wrapped twice.
    @FUZZ_EACH_KIND
    @given(case=malformed_cases(kind))
    @aio
    async def test(small_node: RelayServer, case: Malformed) -> None:
        await asyncio.wait_for(_malformed(small_node, case), EXAMPLE_S)

    test.__name__ = test.__qualname__ = f"test_bad_frame_after_a_valid_prefix_closes__{kind}"
    test.__doc__ = f"A {kind} frame after a valid prefix: its close code, then the end."
    return test


for _kind in BAD_FRAMES:
    _test = _bad_frame_test(_kind)
    globals()[_test.__name__] = _test
