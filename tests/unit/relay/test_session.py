"""relay.session: one connection's protocol state over a real Node and a fake clock."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import jwt
import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relay.auth import TokenVerifier
from relay.errors import Code, FrameError
from relay.frames import Format, decode_body_b64, decode_frame
from relay.node import Node
from relay.session import Limits, Outcome, Session, SubscriptionBudget, message_object
from tests.conftest import memory_node

T0_MS = 1_700_000_000_000
T0_S = T0_MS / 1000
SECRET = "k" * 32
VERIFIER = TokenVerifier(hs256_secret=SECRET, es256_public_key_pem=None)
ANON = Limits(allow_anonymous=True)
SECURED = Limits(allow_anonymous=False)


def token(sub: str = "alice", *, exp_s: float = T0_S + 3600, **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": sub, "exp": exp_s, "can_pub": ["*"], "can_sub": ["*"]}
    payload.update(claims)
    return jwt.encode(payload, SECRET, algorithm="HS256")


@dataclass
class Clock:
    """Monotonic seconds for rate limits, wall milliseconds for the rest."""

    s: float = 1000.0
    ms: int = T0_MS

    def advance(self, dt_s: float) -> None:
        self.s += dt_s
        self.ms += round(dt_s * 1000)


class Conn:
    """A session and the clock it is fed with."""

    def __init__(
        self,
        node: Node | None = None,
        *,
        limits: Limits = ANON,
        verifier: TokenVerifier | None = VERIFIER,
        fmt: Format = Format.JSON,
        clock: Clock | None = None,
        overloaded: bool = False,
        budget: SubscriptionBudget | None = None,
    ) -> None:
        self.node = node or memory_node()
        self.clock = clock or Clock()
        self.fmt = fmt
        self.session = Session(
            node=self.node,
            fmt=fmt,
            limits=limits,
            verifier=verifier,
            now_s=self.clock.s,
            overloaded=lambda: overloaded,
            budget=budget,
        )

    def frame(self, payload: bytes) -> Outcome:
        return self.session.receive(payload, self.clock.s, self.clock.ms)

    def send(self, *objs: Any) -> Outcome:
        data: Any = objs[0] if len(objs) == 1 else list(objs)
        if self.fmt is Format.JSON:
            return self.frame(json.dumps(data).encode())
        return self.frame(msgspec.msgpack.encode(data))


def ops(out: Outcome) -> list[str]:
    return [r["op"] for r in out.replies]


def codes(out: Outcome) -> list[str]:
    return [r["code"] for r in out.replies if r["op"] == "error"]


def pub(msg_id: str, ch: str = "room", body: Any = "hi", **kw: Any) -> dict[str, Any]:
    return {"op": "pub", "id": msg_id, "ch": ch, "body": body, **kw}


# -- hello -------------------------------------------------------------------------------


def test_hello_with_a_token_is_welcomed() -> None:
    c = Conn(limits=Limits(allow_anonymous=False, max_body=1000, rate_per_s=50.0, burst=70))
    out = c.send({"op": "hello", "token": token("alice"), "client": "test/1"})
    assert out.close is None and out.errors == []
    [welcome] = out.replies
    assert welcome["op"] == "welcome"
    assert (welcome["node"], welcome["region"]) == ("eu/n1", "eu")
    assert welcome["session"] == c.session.id and welcome["session"].startswith("eu/n1#")
    assert welcome["limits"] == {
        "max_body": 1000,
        "max_frame": SECURED.max_frame,
        "rate_per_s": 50.0,
        "burst": 70,
    }
    out = c.send(pub("m1"))
    assert out.replies == [
        {
            "op": "puback",
            "id": "m1",
            "ch": "room",
            "ts": T0_MS,
            "origin": "eu",
            "ack": "mem",
            "dup": False,
        }
    ]
    assert c.node.store.get("room", "m1").sender == "alice"  # type: ignore[union-attr]


def test_sessions_get_distinct_ids() -> None:
    node = memory_node()
    assert Conn(node).session.id != Conn(node).session.id


def test_implicit_anonymous_hello_is_welcomed_first() -> None:
    c = Conn(limits=ANON)
    out = c.send(pub("m1"))
    assert ops(out) == ["welcome", "puback"]
    assert ops(c.send(pub("m2"))) == ["puback"]  # once only
    assert c.node.store.get("room", "m1").sender == "anon"  # type: ignore[union-attr]


def test_anonymous_hello_without_token() -> None:
    c = Conn(limits=ANON, verifier=None)
    assert ops(c.send({"op": "hello"})) == ["welcome"]
    assert ops(c.send({"op": "sub", "ch": "x"})) == ["subscribed"]


@pytest.mark.parametrize("op", [pub("m1"), {"op": "sub", "ch": "c"}, {"op": "bogus"}])
def test_secured_node_refuses_ops_before_hello(op: dict[str, Any]) -> None:
    c = Conn(limits=SECURED)
    out = c.send(op)
    assert codes(out) == ["unauthorized"]
    assert out.close is not None and out.close[0] == 1008
    assert c.node.store.messages == 0
    # Closed: nothing more is answered.
    assert c.send({"op": "ping"}) == Outcome()


def test_ping_is_answered_before_hello() -> None:
    c = Conn(limits=SECURED)
    out = c.send({"op": "ping"})
    assert out.replies == [{"op": "pong", "ts": T0_MS}]
    assert out.close is None


@pytest.mark.parametrize(
    ("hello", "verifier"),
    [
        ({"op": "hello"}, VERIFIER),  # no token
        ({"op": "hello", "token": "not.a.jwt"}, VERIFIER),
        ({"op": "hello", "token": token(exp_s=T0_S - 1)}, VERIFIER),  # expired
        ({"op": "hello", "token": jwt.encode({"sub": "a", "exp": 2e9}, "x" * 32)}, VERIFIER),
        ({"op": "hello", "token": token()}, None),  # node has no keys
    ],
)
def test_bad_hello_closes_1008(hello: dict[str, Any], verifier: TokenVerifier | None) -> None:
    c = Conn(limits=SECURED, verifier=verifier)
    out = c.send(hello, {"op": "ping"})
    assert codes(out) == ["unauthorized"]
    assert ops(out) == ["error"]  # the ping after it is not answered
    assert out.close is not None and out.close[0] == 1008
    assert c.session.closed


def test_hello_with_a_non_string_token_is_a_bad_request() -> None:
    c = Conn(limits=SECURED)
    out = c.send({"op": "hello", "token": 12})
    assert codes(out) == ["bad_request"]
    assert out.close is None


def test_second_hello_replaces_grants() -> None:
    c = Conn(limits=SECURED)
    c.send({"op": "hello", "token": token(can_pub=["a"])})
    assert codes(c.send(pub("1", ch="b"))) == ["forbidden"]
    assert ops(c.send({"op": "hello", "token": token(can_pub=["b"])})) == ["welcome"]
    assert ops(c.send(pub("2", ch="b"))) == ["puback"]
    assert codes(c.send(pub("3", ch="a"))) == ["forbidden"]


def test_token_expiry_during_the_session() -> None:
    c = Conn(limits=SECURED)
    c.send({"op": "hello", "token": token(exp_s=T0_S + 10)})
    c.clock.advance(9.9)
    assert ops(c.send(pub("1"))) == ["puback"]
    c.clock.advance(0.1)
    assert ops(c.send({"op": "ping"})) == ["pong"]  # ping is still answered
    out = c.send(pub("2"))
    assert codes(out) == ["unauthorized"]
    assert out.close is not None and out.close[0] == 1008
    assert c.node.store.count("room") == 1


def test_forbidden_keeps_the_connection_open() -> None:
    c = Conn(limits=SECURED)
    c.send({"op": "hello", "token": token(can_pub=["inbox:*"], can_sub=["inbox:alice"])})
    out = c.send(
        pub("1", ch="room"),
        {"op": "sub", "ch": "inbox:bob"},
        {"op": "ack", "ch": "inbox:bob", "ids": ["x"]},
        {"op": "unsub", "ch": "inbox:bob"},
        pub("2", ch="inbox:bob"),
        {"op": "sub", "ch": "inbox:alice"},
    )
    # unsub needs no grant: leaving a channel is always allowed.
    assert ops(out) == ["error"] * 3 + ["unsubscribed", "puback", "subscribed"]
    assert codes(out) == ["forbidden"] * 3
    assert out.replies[0]["id"] == "1" and out.replies[0]["ch"] == "room"
    assert out.close is None


# -- ops ---------------------------------------------------------------------------------


def test_batched_frame_answers_in_order() -> None:
    c = Conn()
    out = c.send(
        {"op": "hello"},
        {"op": "ping"},
        pub("m1", ch="c"),
        {"op": "sub", "ch": "c"},
        {"op": "ack", "ch": "c", "ids": ["m1", "zz"]},
        {"op": "nope"},
        {"op": "unsub", "ch": "c"},
        pub("m1", ch="c"),
    )
    assert ops(out) == [
        "welcome",
        "pong",
        "puback",
        "subscribed",
        "acked",
        "error",
        "unsubscribed",
        "puback",
    ]
    assert out.replies[3]["pending"] == 1
    assert out.replies[4]["n"] == 1
    assert out.replies[7]["dup"] is True  # acked, still within the dedupe window
    assert [m.id for m in out.replay] == ["m1"]
    assert out.errors == [Code.BAD_REQUEST]


def test_duplicate_pub_is_acked_with_the_first_timestamp_and_not_delivered() -> None:
    node = memory_node()
    sub = Conn(node)
    sub.send({"op": "sub", "ch": "room"})
    c = Conn(node)
    first = c.send(pub("m1", body="one"))
    c.clock.advance(5)
    again = c.send(pub("m1", body="two"))
    assert again.replies[0]["dup"] is True
    assert again.replies[0]["ts"] == first.replies[-1]["ts"] == T0_MS
    assert len(first.deliveries) == 1 and again.deliveries == []


def test_sub_replays_pending_messages_oldest_first() -> None:
    node = memory_node()
    p = Conn(node)
    for i in range(3):
        p.send(pub(f"m{i}", body=f"body {i}"))
        p.clock.advance(0.001)
    p.send({"op": "ack", "ch": "room", "ids": ["m1"]})
    s = Conn(node)
    out = s.send({"op": "sub", "ch": "room"})
    assert ops(out) == ["welcome", "subscribed"]
    assert out.replies[1] == {"op": "subscribed", "ch": "room", "pending": 2}
    assert [m.id for m in out.replay] == ["m0", "m2"]
    msg = message_object(out.replay[1], Format.JSON)
    assert msg == {
        "op": "msg",
        "id": "m2",
        "ch": "room",
        "from": "anon",
        "ts": T0_MS + 2,
        "origin": "eu",
        "body": "body 2",
    }
    # Nothing acked them: the next sub sends them again.
    assert [m.id for m in s.send({"op": "sub", "ch": "room"}).replay] == ["m0", "m2"]


def test_live_messages_are_delivered_to_subscribers() -> None:
    node = memory_node()
    a, b = Conn(node), Conn(node)
    a.send({"op": "sub", "ch": "room"})
    out = b.send(pub("m1"))
    [(message, handles)] = out.deliveries
    assert message.id == "m1" and message.body == b"hi"
    assert handles == (a.session,)
    a.send({"op": "unsub", "ch": "room"})
    assert b.send(pub("m2")).deliveries == []
    a.send({"op": "sub", "ch": "room"})
    a.session.connection_lost()
    assert b.send(pub("m3")).deliveries == []
    assert node.store.count("room") == 3  # messages stay pending


def test_msgpack_binary_body_reaches_json_subscribers_as_base64() -> None:
    node = memory_node()
    m = Conn(node, fmt=Format.MSGPACK)
    out = m.send(pub("bin", body=b"\xff\x00\xfe"))
    assert ops(out) == ["welcome", "puback"]
    j = Conn(node)
    [message] = j.send({"op": "sub", "ch": "room"}).replay
    obj = message_object(message, Format.JSON)
    assert obj["body_enc"] == "base64"
    assert decode_body_b64(obj["body"]) == b"\xff\x00\xfe"
    assert message_object(message, Format.MSGPACK)["body"] == b"\xff\x00\xfe"


def test_ttl_and_too_large() -> None:
    c = Conn(limits=Limits(allow_anonymous=True, max_body=10, default_ttl_s=100, max_ttl_s=1000))
    out = c.send(pub("a"), pub("b", ttl_s=5), pub("c", body="x" * 11), pub("d", ttl_s=1001))
    assert ops(out) == ["welcome", "puback", "puback", "error", "error"]
    assert out.replies[3]["code"] == "too_large"
    assert (out.replies[3]["id"], out.replies[3]["ch"]) == ("c", "room")
    assert out.replies[4]["code"] == "bad_request"
    store = c.node.store
    assert store.get("room", "a").expires_ms == T0_MS + 100_000  # type: ignore[union-attr]
    assert store.get("room", "b").expires_ms == T0_MS + 5_000  # type: ignore[union-attr]
    assert not store.contains("room", "c")


def test_overloaded_refuses_pub_and_new_subs() -> None:
    c = Conn(overloaded=True)
    out = c.send(
        pub("m1"),
        {"op": "sub", "ch": "room"},
        {"op": "unsub", "ch": "room"},
        {"op": "ack", "ch": "room", "ids": ["m1"]},
        {"op": "ping"},
    )
    assert ops(out) == ["welcome", "error", "error", "unsubscribed", "acked", "pong"]
    err = out.replies[1]
    assert (err["code"], err["id"], err["ch"]) == ("overloaded", "m1", "room")
    assert (out.replies[2]["code"], out.replies[2]["ch"]) == ("overloaded", "room")
    assert c.node.store.messages == 0 and not c.session.subscriptions
    assert out.close is None


def test_a_sub_is_refused_while_earlier_replays_wait_over_the_backlog_limit() -> None:
    # A client that sends sub after sub and reads nothing must not make the node copy
    # the channel's backlog again and again.
    c = Conn(limits=Limits(allow_anonymous=True, max_replay_backlog=1000))
    c.send([pub(f"m{i}", body="x" * 500) for i in range(3)])
    out = c.send(*[{"op": "sub", "ch": "room"}] * 3)
    assert ops(out)[-3:] == ["subscribed", "error", "error"]
    assert codes(out) == ["overloaded"] * 2
    assert "still queued for this connection" in out.replies[-1]["reason"]
    assert [m.id for m in out.replay] == ["m0", "m1", "m2"]  # one copy


class Later:
    """A router that answers a sub when told."""

    def __init__(self) -> None:
        self.subs: list[Any] = []

    def subscribe(self, handle: Any, ch: str, reply: Any) -> None:
        self.subs.append(reply)

    def unsubscribe(self, handle: Any, ch: str) -> None:
        pass


def test_one_sub_of_a_channel_at_a_time_goes_to_its_owner() -> None:
    c = Conn()
    router = Later()
    c.session.router = router  # type: ignore[assignment]
    out = c.send({"op": "sub", "ch": "room"}, {"op": "sub", "ch": "room"})
    assert len(router.subs) == 1 and codes(out) == ["overloaded"]
    (refused,) = [r for r in out.replies if r["op"] == "error"]
    assert "already under way" in refused["reason"]
    router.subs[0]([], None, "")  # the owner answers
    c.send({"op": "sub", "ch": "room"})
    assert len(router.subs) == 2


class Raising(Later):
    def subscribe(self, handle: Any, ch: str, reply: Any) -> None:
        super().subscribe(handle, ch, reply)
        raise RuntimeError("boom")


def test_a_sub_the_router_failed_on_is_not_left_under_way() -> None:
    c = Conn()
    router = Raising()
    c.session.router = router  # type: ignore[assignment]
    c.send({"op": "sub", "ch": "room"})  # answered internal
    c.send({"op": "sub", "ch": "room"})
    assert len(router.subs) == 2 and not c.session.subs_in_flight


def test_subscriptions_per_connection_and_per_node() -> None:
    budget = SubscriptionBudget(5)
    a = Conn(limits=Limits(allow_anonymous=True, max_subscriptions=3), budget=budget)
    out = a.send(*({"op": "sub", "ch": f"c{i}"} for i in range(4)))
    assert ops(out) == ["welcome"] + ["subscribed"] * 3 + ["error"]
    assert out.replies[-1]["code"] == "too_many" and out.close is None
    # Re-subscribing a channel it holds costs nothing; an unsub frees a place.
    out = a.send({"op": "sub", "ch": "c0"}, {"op": "unsub", "ch": "c1"}, {"op": "sub", "ch": "c9"})
    assert ops(out) == ["subscribed", "unsubscribed", "subscribed"]
    b = Conn(limits=Limits(allow_anonymous=True, max_subscriptions=3), budget=budget)
    out = b.send(*({"op": "sub", "ch": f"d{i}"} for i in range(3)))
    assert ops(out) == ["welcome", "subscribed", "subscribed", "error"]
    assert out.replies[-1]["code"] == "overloaded"
    assert (budget.taken, budget.refused) == (5, 1)
    a.session.connection_lost()
    assert budget.taken == 2


def correlation_ids(reason: str, log_text: str) -> set[str]:
    """Words of an error's reason that also appear in the log: the correlation id."""
    words = set(re.findall(r"[A-Za-z0-9_-]{6,}", reason)) - {"internal", "correlation", "error"}
    return {w for w in words if w in log_text}


def test_internal_error_has_a_correlation_id_and_the_session_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    c = Conn()

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug in publish")

    monkeypatch.setattr(c.node, "publish", boom)
    with caplog.at_level(logging.ERROR):
        out = c.send(pub("m1"), {"op": "ping"})
    assert ops(out) == ["welcome", "error", "pong"]
    err = out.replies[1]
    assert err["code"] == "internal"
    assert out.errors == [Code.INTERNAL]
    assert "bug in publish" in caplog.text  # the traceback is logged
    [cid] = correlation_ids(err["reason"], caplog.text)
    assert out.close is None and not c.session.closed
    monkeypatch.undo()
    assert ops(c.send(pub("m1"))) == ["puback"]
    # A second failure gets a different correlation id.
    monkeypatch.setattr(c.node, "publish", boom)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        again = c.send(pub("m2"))
    assert again.replies[0]["code"] == "internal"
    [cid2] = correlation_ids(again.replies[0]["reason"], caplog.text)
    assert cid2 != cid


# -- abuse -------------------------------------------------------------------------------


def test_rate_limited_and_refilled() -> None:
    c = Conn(limits=Limits(allow_anonymous=True, rate_per_s=10.0, burst=5))
    out = c.send(*[{"op": "ping"}] * 6)
    assert ops(out) == ["pong"] * 5 + ["error"]
    assert codes(out) == ["rate_limited"]
    assert out.close is None
    c.clock.advance(0.1)  # one token back
    assert ops(c.send({"op": "ping"}, {"op": "ping"})) == ["pong", "error"]


def test_repeated_rate_limiting_closes_1008() -> None:
    c = Conn(limits=Limits(allow_anonymous=True, rate_per_s=10.0, burst=5))
    assert ops(c.send(*[{"op": "ping"}] * 5)) == ["pong"] * 5
    # PROTOCOL.md: 200 rate-limited ops are tolerated (then 20 a second), past that 1008.
    out = c.send(*[pub(f"m{i}") for i in range(200)])
    assert codes(out) == ["rate_limited"] * 200 and out.close is None
    assert (out.replies[0]["id"], out.replies[0]["ch"]) == ("m0", "room")
    assert c.node.store.messages == 0
    out = c.send(pub("x"), pub("y"))
    assert codes(out) == ["rate_limited"]  # the second is not answered: closing
    assert out.close is not None and out.close[0] == 1008
    assert c.session.closed


def test_rate_abuse_allowance_refills() -> None:
    c = Conn(limits=Limits(allow_anonymous=True, rate_per_s=0.001, burst=1))
    c.send({"op": "ping"})
    assert c.send(*[{"op": "ping"}] * 200).close is None
    c.clock.advance(1.0)  # 20 more tolerated
    assert c.send(*[{"op": "ping"}] * 20).close is None
    assert c.send({"op": "ping"}).close is not None


def test_repeated_bad_requests_close_1002() -> None:
    c = Conn()
    # PROTOCOL.md: a burst of 20 bad objects is allowed, then one a second.
    out = c.send(*[{"op": "pub", "id": ""}] * 20)
    assert codes(out) == ["bad_request"] * 20
    assert out.close is None
    c.clock.advance(1.0)
    assert c.send(123).close is None
    out = c.send("x", {"op": "ping"})
    assert codes(out) == ["bad_request"]
    assert out.close is not None and out.close[0] == 1002
    assert c.session.closed
    assert c.send({"op": "ping"}) == Outcome()


def test_other_errors_are_not_abuse() -> None:
    c = Conn(limits=Limits(allow_anonymous=True, max_body=1), overloaded=False)
    out = c.send(*[pub(f"m{i}", body="too long") for i in range(50)])
    assert codes(out) == ["too_large"] * 50
    assert out.close is None


def test_broken_frames_count_as_bad_requests() -> None:
    c = Conn()
    for _ in range(20):
        out = c.frame(b"{not json")
        assert codes(out) == ["bad_request"] and out.close is None
    out = c.frame(b"[]")
    assert codes(out) == ["bad_request"]
    assert out.close is not None and out.close[0] == 1002


def test_session_closed_by_a_broken_frame_answers_nothing_more() -> None:
    c = Conn()
    for _ in range(21):
        out = c.frame(b"garbage")
    assert out.close is not None and out.close[0] == 1002
    assert c.session.closed
    assert c.send({"op": "ping"}) == Outcome()


# -- anything a client may send ----------------------------------------------------------

GOOD_TOKEN = token("alice", can_pub=["c", "d*"], can_sub=["c"])
SHORT_TOKEN = token("bob", exp_s=T0_S + 3)

_channels = st.sampled_from(["c", "d", "dx", "", "a\x00", "é" * 101])
_ids = st.sampled_from(["m1", "m2", "m3", "", "x" * 65])
_junk: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=8,
)
_good_ch = st.sampled_from(["c", "d", "dx"])
_good_id = st.sampled_from(["m1", "m2", "m3", "m4"])
_valid = st.one_of(
    st.just({"op": "ping"}),
    st.fixed_dictionaries(
        {"op": st.just("pub"), "id": _good_id, "ch": _good_ch, "body": st.text(max_size=5)}
    ),
    st.fixed_dictionaries({"op": st.sampled_from(["sub", "unsub"]), "ch": _good_ch}),
    st.fixed_dictionaries(
        {"op": st.just("ack"), "ch": _good_ch, "ids": st.lists(_good_id, min_size=1, max_size=3)}
    ),
)
_anything = st.one_of(
    st.fixed_dictionaries(
        {"op": st.just("hello")},
        optional={"token": st.sampled_from([GOOD_TOKEN, SHORT_TOKEN, "garbage", 5])},
    ),
    st.fixed_dictionaries(
        {"op": st.just("pub")},
        optional={
            "id": _ids | _junk,
            "ch": _channels,
            "body": st.text(max_size=5) | st.just("x" * 40) | _junk,
            "ack": st.sampled_from(["mem", "log", "bogus"]),
            "ttl_s": st.sampled_from([1, 0, 10**9, "1"]),
        },
    ),
    st.fixed_dictionaries({"op": st.sampled_from(["sub", "unsub"])}, optional={"ch": _channels}),
    st.fixed_dictionaries(
        {"op": st.just("ack")},
        optional={"ch": _channels, "ids": st.lists(_ids, max_size=3) | _junk},
    ),
    st.fixed_dictionaries({"op": _junk | st.sampled_from(["PING", "bogus"])}),
    _junk,
)
# Mostly valid objects, so that sessions live long enough to be rate limited and to
# publish, ack and subscribe; the rest is anything at all.
_objects = st.one_of(_valid, _valid, _valid, _anything)
_frames = st.lists(
    st.tuples(
        st.floats(0, 2),  # seconds since the previous frame
        st.lists(_objects, min_size=1, max_size=12) | st.binary(max_size=8),
    ),
    min_size=1,
    max_size=6,
)
ANSWERS = {
    "ping": "pong",
    "hello": "welcome",
    "pub": "puback",
    "sub": "subscribed",
    "ack": "acked",
    "unsub": "unsubscribed",
}


# (allow_anonymous, token keys configured, what the client says first)
_setups = st.sampled_from(
    [
        (True, False, None),
        (True, False, {"op": "hello"}),
        (True, True, {"op": "hello", "token": GOOD_TOKEN}),
        (False, True, {"op": "hello", "token": GOOD_TOKEN}),
        (False, True, {"op": "hello", "token": GOOD_TOKEN}),
        (False, True, None),
        (False, False, {"op": "hello"}),
    ]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=_frames,
    setup=_setups,
    burst=st.integers(3, 30),
    fmt=st.sampled_from([Format.JSON, Format.MSGPACK]),
    overloaded=st.sampled_from([False, False, False, True]),
)
def test_anything_a_client_sends(
    frames: list[tuple[float, Any]],
    setup: tuple[bool, bool, dict[str, Any] | None],
    burst: int,
    fmt: Format,
    overloaded: bool,
) -> None:
    """The session never raises and never fails internally; each object gets exactly one
    reply, in order, of the right kind or an error (plus one implicit welcome, at most
    once, where anonymous clients are allowed), unless the connection is closed."""
    allow_anonymous, keys, hello = setup
    limits = Limits(allow_anonymous=allow_anonymous, max_body=32, rate_per_s=5.0, burst=burst)
    c = Conn(limits=limits, verifier=VERIFIER if keys else None, fmt=fmt, overloaded=overloaded)
    greeted = False
    closed = False
    if hello is not None:
        frames = [(0.0, [hello]), *frames]
    for dt, content in frames:
        c.clock.advance(dt)
        if isinstance(content, bytes):
            out = c.frame(content)
            try:
                objs: list[Any] = decode_frame(content, fmt)
            except FrameError:
                objs = ["<broken frame>"]
        else:
            bare = len(content) == 1 and isinstance(content[0], dict)
            out = c.send(content[0] if bare else content)
            objs = list(content)
        if closed:
            assert out == Outcome()
            continue
        assert all(r["op"] != "error" or r["code"] != "internal" for r in out.replies)
        assert out.errors == [Code(r["code"]) for r in out.replies if r["op"] == "error"]
        # A hello that narrows the grants is followed by an unsubscribed for each
        # subscription dropped: part of its one answer.
        grouped = []
        for r in out.replies:
            if r["op"] == "unsubscribed" and "reason" in r:
                continue
            grouped.append(r)
        replies = iter(grouped)
        answered = 0
        for obj in objs:
            r = next(replies, None)
            if r is None:
                break
            op = obj.get("op") if isinstance(obj, dict) else None
            if r["op"] == "welcome" and op != "hello":
                assert allow_anonymous and not greeted, "unexpected implicit welcome"
                greeted = True
                r = next(replies)
            elif isinstance(obj, dict) and op not in ("hello", "ping") and not greeted:
                # Before hello: an implicit anonymous one, else refused (or rate limited).
                refusals = {"rate_limited"} if allow_anonymous else {"rate_limited", "unauthorized"}
                assert r["op"] == "error" and r["code"] in refusals, (obj, r)
            want = ANSWERS.get(op) if isinstance(op, str) else None
            assert r["op"] in (want, "error"), (obj, r)
            greeted = greeted or r["op"] == "welcome"
            answered += 1
        assert next(replies, None) is None, "more replies than objects"
        if out.close is None:
            assert answered == len(objs)
            assert not c.session.closed
        else:
            closed = True
            event(f"closed {out.close[0]}")
            last = out.replies[-1]
            assert last["op"] == "error"
            allowed = {1002: {"bad_request"}, 1008: {"unauthorized", "rate_limited"}}
            assert last["code"] in allowed[out.close[0]], (out.close, last)
            assert c.session.closed
        for r in out.replies:
            event(r["op"] if r["op"] != "error" else r["code"])
        subscribed = sum(r["pending"] for r in out.replies if r["op"] == "subscribed")
        assert len(out.replay) == subscribed
        acked = {(r["ch"], r["id"]) for r in out.replies if r["op"] == "puback" and not r["dup"]}
        assert {(m.ch, m.id) for m, _ in out.deliveries} <= acked
