"""Late replies (a pub's puback answered once its append landed): one frame per connection
per reactor turn, never lost for other connections when one closes, errors counted.

The protocol runs over Twisted's StringTransport with a Clock as its reactor: the
reactor turn's end is ``clock.advance(0)``."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relay.errors import Code
from relay.session import Limits
from relay.ws import RelayFactory, RelayProtocol
from tests.conftest import memory_node

HANDSHAKE = (
    b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:80\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relay.v1.json\r\n\r\n"
)


def factory(
    *,
    limits: Limits | None = None,
    verifier: Any = None,
    clock_s: Callable[[], float] = lambda: 0.0,
    clock_ms: Callable[[], int] = lambda: 0,
) -> tuple[RelayFactory, Clock]:
    """A node's client factory on a Clock reactor (anonymous clients unless ``limits``)."""
    f = RelayFactory(
        url="ws://127.0.0.1",
        node=memory_node(),
        limits=Limits(allow_anonymous=True) if limits is None else limits,
        verifier=verifier,
        clock_s=clock_s,
        clock_ms=clock_ms,
        overloaded=lambda: False,
        max_outbound_bytes=1 << 20,
        allowed_origins=[],
        ping_interval_s=0,
        ping_timeout_s=0,
        handshake_timeout_s=0,
    )
    clock = Clock()
    f.reactor = clock
    return f, clock


def connect(f: RelayFactory, clock: Clock) -> tuple[RelayProtocol, StringTransport]:
    p: Any = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    t = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
    p.makeConnection(t)
    p.dataReceived(HANDSHAKE)
    p.dataReceived(masked(json.dumps({"op": "hello"}).encode()))
    assert p.state == p.STATE_OPEN
    clock.advance(0)  # the welcome goes out at the turn's end
    t.clear()
    return p, t


def masked(payload: bytes, opcode: int = 1) -> bytes:
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    assert n < 1 << 16
    head = bytes([0x80 | opcode, 0x80 | n]) if n < 126 else bytes([0x80 | opcode, 0xFE])
    head += b"" if n < 126 else struct.pack("!H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def text_frames(data: bytes) -> list[Any]:
    """The JSON documents of the text frames in ``data`` (what the node sent)."""
    out = []
    i = 0
    while i < len(data):
        b0, b1 = data[i], data[i + 1]
        n = b1 & 0x7F
        i += 2
        if n == 126:
            n = struct.unpack("!H", data[i : i + 2])[0]
            i += 2
        if b0 & 0x0F == 1:
            out.append(json.loads(data[i : i + n]))
        i += n
    return out


def puback(i: str) -> dict[str, Any]:
    return {"op": "puback", "id": i, "ch": "c"}


def test_a_turns_late_replies_go_out_as_one_frame() -> None:
    f, clock = factory()
    a, ta = connect(f, clock)
    a.send_objects([puback("1")], [])
    a.send_objects([puback("2"), puback("3")], [])
    assert ta.value() == b""  # not before the turn's end
    clock.advance(0)
    assert text_frames(ta.value()) == [[puback("1"), puback("2"), puback("3")]]


def test_late_replies_go_out_ahead_of_anything_else_the_connection_sends() -> None:
    f, clock = factory()
    a, ta = connect(f, clock)
    a.send_objects([puback("1")], [])
    a.dataReceived(masked(json.dumps({"op": "ping"}).encode()))
    clock.advance(0)
    assert [d["op"] for d in text_frames(ta.value())] == ["puback", "pong"]


def test_one_connection_closing_does_not_hold_back_anothers_late_replies() -> None:
    f, clock = factory()
    a, _ = connect(f, clock)
    b, tb = connect(f, clock)
    a.send_objects([puback("a1")], [])
    b.send_objects([puback("b1")], [])
    a.dataReceived(masked(b"\x03\xe8", opcode=8))  # a's Close, in the same turn
    clock.advance(0)
    b.send_objects([puback("b2")], [])
    clock.advance(0)
    assert text_frames(tb.value()) == [puback("b1"), puback("b2")]
    assert a.late == [] and b.late == []


def test_late_errors_are_counted_even_when_the_connection_goes_in_that_turn() -> None:
    f, clock = factory()
    a, _ = connect(f, clock)
    err = {"op": "error", "code": Code.UNAVAILABLE.value, "reason": "moved", "ch": "c"}
    a.send_objects([err], [Code.UNAVAILABLE])
    a.connectionLost(Failure(ConnectionDone()))
    clock.advance(0)
    assert f.errors == {Code.UNAVAILABLE.value: 1}


def test_a_connection_whose_flush_fails_is_cut_and_the_others_still_get_theirs() -> None:
    f, clock = factory()
    a, ta = connect(f, clock)
    b, tb = connect(f, clock)

    def broken() -> None:
        raise RuntimeError("a bug in one connection's flush")

    a.send_objects([puback("a1")], [])
    b.send_objects([puback("b1")], [])
    a.flush_late = broken  # type: ignore[method-assign]
    clock.advance(0)
    assert text_frames(tb.value()) == [puback("b1")]
    assert ta.disconnecting  # cut, not left with frames that never go
    b.send_objects([puback("b2")], [])
    clock.advance(0)  # the factory still flushes afterwards
    assert text_frames(tb.value()) == [puback("b1"), puback("b2")]
