"""The connection is closed when its token runs out, even when the reactor's timer fires
a little before the wall clock says so (the timer runs on the reactor's monotonic clock,
the check on the wall clock in whole milliseconds, and ``exp`` may be fractional)."""

from __future__ import annotations

import json
from typing import Any

import jwt
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relay.auth import TokenVerifier
from relay.session import Limits
from relay.ws import EXPIRY_RECHECK_S, RelayFactory, RelayProtocol
from tests.unit.relay.test_late_replies import HANDSHAKE, factory, masked, text_frames

SECRET = "expiry-timer-test-secret-of-32-bytes!"
T0 = 1_700_000_000.0


def setup(wall: list[float]) -> tuple[RelayFactory, Clock, RelayProtocol, StringTransport]:
    f, clock = factory(
        limits=Limits(),
        verifier=TokenVerifier(hs256_secret=SECRET, es256_public_key_pem=None),
        clock_s=lambda: wall[0],
        clock_ms=lambda: int(wall[0] * 1000),
    )
    p: Any = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    t = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
    p.makeConnection(t)
    p.dataReceived(HANDSHAKE)
    t.clear()  # the handshake's response
    return f, clock, p, t


def hello(p: RelayProtocol, exp: float) -> None:
    tok = jwt.encode(
        {"sub": "alice", "exp": exp, "can_pub": [], "can_sub": ["inbox:alice"]},
        SECRET,
        algorithm="HS256",
    )
    p.dataReceived(masked(json.dumps({"op": "hello", "token": tok}).encode()))


def closed_with(t: StringTransport) -> int | None:
    """The close code of the Close frame the node sent, if any."""
    data = t.value()
    i = 0
    while i < len(data):
        b0, n = data[i], data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n = int.from_bytes(data[i : i + 2], "big")
            i += 2
        if b0 & 0x0F == 8:
            return int.from_bytes(data[i : i + 2], "big")
        i += n
    return None


def test_a_timer_that_fires_before_the_wall_clock_reaches_exp_is_set_again() -> None:
    wall = [T0]
    _, clock, p, t = setup(wall)
    hello(p, exp=T0 + 1.0)
    clock.advance(0)
    assert [o["op"] for o in text_frames(t.value())] == ["welcome"]
    # The timer fires after 1 s of the reactor's clock; the wall clock, slewed, is 0.5 ms
    # short of exp: too early to close, so the node must look again.
    wall[0] = T0 + 0.9995
    clock.advance(1.0)
    assert closed_with(t) is None
    wall[0] = T0 + 1.0
    clock.advance(0.001)  # what is left, by the wall clock's milliseconds
    assert closed_with(t) == 1008
    # nothing set again once closed
    assert not [c for c in clock.getDelayedCalls() if "_expired" in repr(c)]
    assert any(
        o.get("reason") == "token expired"
        for frame in text_frames(t.value())
        for o in (frame if isinstance(frame, list) else [frame])
    )


def test_the_timer_closes_at_exp_when_the_clocks_agree() -> None:
    wall = [T0]
    _, clock, p, t = setup(wall)
    hello(p, exp=T0 + 2.0)
    clock.advance(1.999)
    assert closed_with(t) is None
    wall[0] = T0 + 2.0
    clock.advance(0.001)
    assert closed_with(t) == 1008


def test_a_forward_step_of_the_wall_clock_is_seen_within_the_recheck_interval() -> None:
    """The timer runs on the monotonic clock: when the wall clock steps forward past exp,
    the connection is closed at the next recheck, not when the monotonic delay runs out."""
    wall = [T0]
    _, clock, p, t = setup(wall)
    hello(p, exp=T0 + 3600.0)
    clock.advance(1.0)
    wall[0] = T0 + 7200.0  # NTP steps the wall clock an hour forward
    clock.advance(EXPIRY_RECHECK_S)
    assert closed_with(t) == 1008


def test_a_fractional_exp_is_rechecked_a_millisecond_later_not_in_a_spin() -> None:
    wall = [T0]
    _, clock, p, _t = setup(wall)
    hello(p, exp=T0 + 2.0000002)  # just past a whole millisecond
    wall[0] = T0 + 2.0  # the wall clock's millisecond has not ticked yet
    clock.advance(2.0005)  # the timer fired and found the token still valid
    calls = [c for c in clock.getDelayedCalls() if "_expired" in repr(c)]
    assert len(calls) == 1 and calls[0].getTime() - clock.seconds() >= 0.001 - 1e-9
