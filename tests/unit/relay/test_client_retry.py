"""The pure parts of relay.client: backoff, duplicate filter, reply matching, framing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay.client import (
    Message,
    Pacer,
    PendingReplies,
    RecentIds,
    RetryPolicy,
    UsageError,
    new_id,
    pack_frames,
)

# -- backoff ---------------------------------------------------------------------------


def test_delay_doubles_with_equal_jitter_and_is_capped() -> None:
    p = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0)
    assert [p.delay_s(n, 0.0) for n in range(1, 6)] == [0.05, 0.1, 0.2, 0.4, 0.5]
    assert [p.delay_s(n, 0.999999) for n in range(1, 3)] == pytest.approx([0.1, 0.2])
    assert p.delay_s(10_000, 0.5) == pytest.approx(0.75)  # no overflow, capped


@pytest.mark.parametrize("rand", [0.0, 0.25, 0.5, 0.999])
def test_delay_stays_within_half_and_whole(rand: float) -> None:
    p = RetryPolicy()
    for n in range(1, 20):
        d = min(p.max_delay_s, p.base_delay_s * 2 ** (n - 1))
        assert d / 2 <= p.delay_s(n, rand) <= d


def test_policy_is_validated() -> None:
    with pytest.raises(UsageError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(UsageError):
        RetryPolicy(base_delay_s=3, max_delay_s=1)


def test_new_ids_are_unique_and_fit() -> None:
    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(1 <= len(i) <= 64 and i.isprintable() for i in ids)


# -- pacing ----------------------------------------------------------------------------


def test_pacer_mirrors_the_node_bucket() -> None:
    p = Pacer(rate_per_s=10, burst=5, now_s=100.0, margin_s=0)  # hello spent one: 4 left
    assert p.wait_s(4, 100.0) == 0
    assert p.wait_s(5, 100.0) == pytest.approx(0.1)
    p.spend(4, 100.0)
    assert p.wait_s(1, 100.0) == pytest.approx(0.1)
    assert p.wait_s(2, 100.05) == pytest.approx(0.15)
    assert p.wait_s(1, 100.11) == 0
    p.spend(1, 100.11)
    assert p.wait_s(5, 200.0) == 0  # refill caps at burst
    assert p.wait_s(50, 200.0) == 0  # never more than burst
    p.spend(5, 200.0)
    assert p.wait_s(3, 200.0) == pytest.approx(0.3)
    assert Pacer(10, 5, 0.0, margin_s=0.01).wait_s(5, 0.0) == pytest.approx(0.11)


@pytest.mark.parametrize("late_s", [0.0, 0.001, 0.004, 0.03])
def test_pacer_keeps_a_node_bucket_from_refusing(late_s: float) -> None:
    """Sends come ``late_s`` after the pacer allows them; the node reads its clock then."""
    from relay.ratelimit import TokenBucket

    node = TokenBucket(rate_per_s=7, burst=3, now_s=0.0)
    assert node.take(0.0)  # hello
    pacer = Pacer(rate_per_s=7, burst=3, now_s=0.0)
    now = 0.0
    for n in [1, 2, 3, 1, 1, 3, 2, 1, 3, 3, 1, 2, 3, 3, 3]:
        now += pacer.wait_s(n, now) + late_s
        pacer.spend(n, now)
        assert all(node.take(now) for _ in range(n))


# -- duplicate filter -------------------------------------------------------------------


def test_recent_ids_remember_the_last_n_lru() -> None:
    r = RecentIds(3)
    assert [r.seen(i) for i in "abc"] == [False] * 3
    assert r.seen("a") is True  # a is now the most recent
    assert r.seen("d") is False  # forgets b, the least recent
    assert len(r) == 3
    assert r.seen("b") is False
    assert r.seen("a") is True


# -- reply matching ---------------------------------------------------------------------


def test_puback_is_matched_by_channel_and_id_in_any_order() -> None:
    p: PendingReplies[str] = PendingReplies()
    p.add("puback", "c", "1", "t1")
    p.add("puback", "c", "2", "t2")
    p.add("puback", "d", "1", "t3")
    assert p.match({"op": "puback", "ch": "d", "id": "1"}) == "t3"
    assert p.match({"op": "puback", "ch": "c", "id": "2"}) == "t2"
    assert p.match({"op": "puback", "ch": "c", "id": "2"}) is None  # answered already
    assert p.match({"op": "puback", "ch": "c", "id": "1"}) == "t1"
    assert len(p) == 0


def test_other_replies_are_first_come_first_served_per_op_and_channel() -> None:
    p: PendingReplies[str] = PendingReplies()
    p.add("acked", "a", None, "a1")
    p.add("acked", "b", None, "b1")
    p.add("acked", "a", None, "a2")
    p.add("pong", None, None, "p1")
    p.add("pong", None, None, "p2")
    assert p.match({"op": "acked", "ch": "a", "n": 1}) == "a1"
    assert p.match({"op": "pong", "ts": 1}) == "p1"
    assert p.match({"op": "acked", "ch": "a", "n": 0}) == "a2"
    assert p.match({"op": "subscribed", "ch": "b", "pending": 0}) is None
    assert p.match({"op": "acked", "ch": "b", "n": 0}) == "b1"
    assert p.match({"op": "welcome"}) is None
    assert p.drain() == ["p2"] and len(p) == 0


def test_errors_are_matched_by_what_they_name() -> None:
    p: PendingReplies[str] = PendingReplies()
    p.add("pong", None, None, "ping")
    p.add("puback", "c", "1", "pub-c1")
    p.add("subscribed", "c", None, "sub-c")
    p.add("puback", "d", "9", "pub-d9")
    p.add("puback", "e", "5", "pub-e5")
    assert p.match({"op": "error", "code": "x", "ch": "c", "id": "1"}) == "pub-c1"
    assert p.match({"op": "error", "code": "x", "ch": "c"}) == "sub-c"  # not a pub first
    assert p.match({"op": "error", "code": "x", "id": "9"}) == "pub-d9"  # bad channel
    assert p.match({"op": "error", "code": "x"}) == "ping"  # the oldest of all
    assert p.match({"op": "error", "code": "x", "ch": "e"}) == "pub-e5"  # then a pub
    assert p.match({"op": "error", "code": "x"}) is None


def test_discard_forgets_a_request() -> None:
    p: PendingReplies[str] = PendingReplies()
    first = p.add("pong", None, None, "p1")
    p.add("pong", None, None, "p2")
    p.discard(first)
    p.discard(first)  # no-op
    assert p.match({"op": "pong"}) == "p2"
    assert p.match({"op": "error"}) is None


# -- framing and messages ---------------------------------------------------------------


def _enc(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def test_pack_frames_keeps_order_and_limits() -> None:
    objs = [{"op": "pub", "id": str(i), "body": "x" * 50} for i in range(100)]
    frames = pack_frames(objs, _enc, max_objects=30, max_bytes=100_000)
    assert [n for _, n in frames] == [30, 30, 30, 10]
    assert [len(json.loads(f)) for f, _ in frames] == [30, 30, 30, 10]
    frames = pack_frames(objs, _enc, max_objects=1000, max_bytes=1000)
    assert all(len(f) <= 1000 for f, _ in frames) and len(frames) > 5
    back: list[Any] = []
    for f, n in frames:
        data = json.loads(f)
        got = data if isinstance(data, list) else [data]
        assert len(got) == n
        back.extend(got)
    assert back == objs
    assert pack_frames(objs[:1], _enc, max_objects=10, max_bytes=1000) == [(_enc(objs[0]), 1)]


def test_pack_frames_refuses_an_object_over_max_frame() -> None:
    with pytest.raises(UsageError):
        pack_frames([{"body": "x" * 200}], _enc, max_objects=10, max_bytes=100)
    with pytest.raises(UsageError):
        pack_frames([{}, {"body": "x" * 200}], _enc, max_objects=10, max_bytes=100)


def test_message_from_json_and_base64_bodies() -> None:
    o = {"op": "msg", "id": "1", "ch": "c", "from": "al", "ts": 5, "origin": "eu", "body": "hi"}
    assert Message.from_obj(o) == Message("1", "c", "al", 5, "eu", "hi")
    raw = Message.from_obj({**o, "body": "/wAB", "body_enc": "base64"})
    assert raw.body == b"\xff\x00\x01"
    assert Message.from_obj({**o, "body": b"\x00"}).body == b"\x00"
