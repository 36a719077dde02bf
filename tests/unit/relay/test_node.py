"""relay.node: publish, duplicates, delivery to subscribers, ack, TTL and caps, counted."""

from __future__ import annotations

from relay.hlc import HybridClock, from_ms, physical_ms
from relay.node import Accepted, Node
from tests.conftest import memory_node

T0 = 1_700_000_000_000
WINDOW_MS = 600_000
TTL_MS = 60_000


def make_node(
    *, max_messages: int = 100, max_bytes: int = 1 << 20, window_ms: int = WINDOW_MS
) -> Node:
    return memory_node(
        max_messages=max_messages, max_bytes=max_bytes, window_ms=window_ms, max_ids=1000
    )


def pub(
    node: Node, ch: str, msg_id: str, now_ms: int, *, ttl_ms: int = TTL_MS, body: bytes = b"x"
) -> Accepted:
    return node.publish(ch, msg_id, body, sender="alice", ttl_ms=ttl_ms, now_ms=now_ms)


def test_publish_accepts_with_increasing_timestamps() -> None:
    node = make_node()
    a = pub(node, "c", "1", T0)
    b = pub(node, "c", "2", T0)  # same millisecond
    c = pub(node, "c", "3", T0 - 50)  # wall clock stepped back
    assert not (a.dup or b.dup or c.dup)
    assert a.hlc < b.hlc < c.hlc
    assert physical_ms(a.hlc) == T0
    assert a.origin == "eu"
    assert a.message is None and a.subscribers == () and a.removed is None
    assert node.counters.accepted == 3
    assert [m.id for m in node.store.pending("c", T0)] == ["1", "2", "3"]


def test_publish_uses_the_given_clock() -> None:
    clock = HybridClock(last=from_ms(T0 + 1000))
    node = memory_node(
        max_messages=10, max_bytes=1 << 20, window_ms=WINDOW_MS, max_ids=10, clock=clock
    )
    assert pub(node, "c", "1", T0).hlc == from_ms(T0 + 1000) + 1


def test_subscribers_are_returned_for_delivery() -> None:
    node = make_node()
    assert node.subscribe("h1", "c", T0) == []
    node.subscribe("h2", "c", T0)
    node.subscribe("h3", "other", T0)
    acc = pub(node, "c", "m", T0, body=b"hello")
    assert set(acc.subscribers) == {"h1", "h2"}
    assert acc.message is not None
    m = acc.message
    assert (m.id, m.ch, m.sender, m.hlc, m.origin, m.body) == (
        "m",
        "c",
        "alice",
        acc.hlc,
        "eu",
        b"hello",
    )
    assert m.expires_ms == T0 + TTL_MS
    assert m == node.store.get("c", "m")  # what is delivered is what stays pending
    node.unsubscribe("h1", "c")
    node.unsubscribe("h1", "c")  # twice is harmless
    node.unsubscribe("nobody", "nowhere")
    assert pub(node, "c", "m2", T0).subscribers == ("h2",)
    node.drop("h2", {"c", "other"})
    acc = pub(node, "c", "m3", T0)
    assert acc.message is None and acc.subscribers == ()
    assert node.store.count("c") == 3  # messages stay pending without subscribers


def test_dup_while_pending_comes_from_the_store() -> None:
    node = make_node()
    node.subscribe("h", "c", T0)
    first = pub(node, "c", "m", T0, body=b"one")
    again = pub(node, "c", "m", T0 + 10, body=b"two")
    assert again.dup
    assert again.hlc == first.hlc and again.origin == "eu"
    assert again.message is None and again.subscribers == ()  # not delivered again
    assert node.store.count("c") == 1
    assert node.store.get("c", "m").body == b"one"  # type: ignore[union-attr]
    assert (node.counters.accepted, node.counters.duplicates) == (1, 1)


def test_same_id_on_another_channel_is_a_new_message() -> None:
    node = make_node()
    pub(node, "a", "m", T0)
    assert not pub(node, "b", "m", T0).dup
    assert node.counters.accepted == 2


def test_dup_after_ack_comes_from_the_dedupe_index() -> None:
    node = make_node()
    first = pub(node, "c", "m", T0)
    assert node.ack("c", ["m"], T0 + 5) == 1
    assert node.store.count("c") == 0
    again = pub(node, "c", "m", T0 + 10)
    assert again.dup and again.hlc == first.hlc
    assert node.store.count("c") == 0  # not stored again
    assert node.counters.duplicates == 1
    # Past the window (measured from acceptance) the id is new again.
    node.tick(T0 + WINDOW_MS)
    later = pub(node, "c", "m", T0 + WINDOW_MS)
    assert not later.dup and later.hlc > first.hlc
    assert node.store.count("c") == 1


def test_an_ack_remembers_every_id_it_names_pending_or_not() -> None:
    node = make_node()
    pub(node, "c", "m", T0)
    assert node.ack("c", ["m", "early"], T0 + 5, hlc=(T0 + 5) << 16) == 1
    # A pub of an id acked before it was ever published is a duplicate, as where the
    # slot log is applied (an ack's tombstone keeps its message out).
    early = pub(node, "c", "early", T0 + 10)
    assert early.dup and early.hlc == (T0 + 5) << 16
    assert node.store.count("c") == 0
    # Without an hlc given, the node's clock stamps the ids it did not hold.
    node.ack("c", ["other"], T0 + 20)
    assert pub(node, "c", "other", T0 + 30).dup


def test_acks_of_made_up_ids_cannot_make_a_retried_pub_deliver_twice() -> None:
    # Anyone who may ack on a channel can name any ids; a flood of them must not push
    # the ids of accepted messages out of the dedupe window (max_ids 1000 here).
    node = make_node()
    pub(node, "c", "pay-10", T0)
    assert node.ack("c", ["pay-10"], T0 + 1) == 1
    for i in range(60):
        node.ack("mine", [f"junk-{i}-{j}" for j in range(100)], T0 + 2)
    assert node.dedupe.forgotten_early > 0  # the flood forgot only its own
    retry = pub(node, "c", "pay-10", T0 + 3)
    assert retry.dup and node.store.count("c") == 0
    assert pub(node, "mine", "junk-59-99", T0 + 4).dup  # the newest made-up ids hold


def test_ack_removes_and_counts() -> None:
    node = make_node()
    for i in range(3):
        pub(node, "c", f"m{i}", T0)
    assert node.ack("c", ["m0", "m2", "nope"], T0) == 2
    assert node.ack("c", ["m0"], T0) == 0
    assert node.ack("elsewhere", ["m1"], T0) == 0
    assert [m.id for m in node.store.pending("c", T0)] == ["m1"]
    assert node.counters.acked == 2


def test_subscribe_replays_pending_oldest_first_and_counts() -> None:
    node = make_node()
    for i in range(3):
        pub(node, "c", f"m{i}", T0 + i)
    node.ack("c", ["m1"], T0)
    replay = node.subscribe("h", "c", T0 + 10)
    assert [m.id for m in replay] == ["m0", "m2"]
    assert node.counters.delivered == 2
    # Unacked messages are sent again on the next sub.
    assert [m.id for m in node.subscribe("h2", "c", T0 + 10)] == ["m0", "m2"]
    assert node.counters.delivered == 4


def test_tick_expires_and_counts() -> None:
    node = make_node()
    pub(node, "c", "short", T0, ttl_ms=1000)
    pub(node, "c", "long", T0, ttl_ms=5000)
    pub(node, "d", "short", T0, ttl_ms=1000)
    assert node.tick(T0 + 999) == []
    removed = node.tick(T0 + 1000)
    assert sorted((r.ch, r.ids, r.reason) for r in removed) == [
        ("c", ("short",), "expired"),
        ("d", ("short",), "expired"),
    ]
    assert node.counters.expired == 2
    assert node.store.messages == 1
    # An expired id is still a duplicate within the dedupe window.
    assert pub(node, "c", "short", T0 + 2000).dup


def test_caps_evict_and_count() -> None:
    node = make_node(max_messages=2)
    node.subscribe("h", "c", T0)
    pub(node, "c", "m0", T0)
    pub(node, "c", "m1", T0)
    acc = pub(node, "c", "m2", T0)
    assert acc.removed is not None
    assert (acc.removed.ids, acc.removed.reason) == (("m0",), "evicted")
    assert acc.subscribers == ("h",)  # the new message is still delivered
    assert node.counters.evicted == 1
    assert [m.id for m in node.store.pending("c", T0)] == ["m1", "m2"]
    # An evicted id is remembered: a retry is not stored again.
    dup = pub(node, "c", "m0", T0 + 1)
    assert dup.dup
    assert node.store.count("c") == 2
    assert node.counters.evicted == 1


def test_byte_cap_evicts_and_counts() -> None:
    node = make_node(max_bytes=300)
    evicted: list[str] = []
    for i in range(5):
        acc = pub(node, "c", f"m{i}", T0, body=b"b" * 100)
        if acc.removed is not None:
            evicted += acc.removed.ids
    kept = [m.id for m in node.store.pending("c", T0)]
    assert 1 <= len(kept) < 5
    assert evicted + kept == [f"m{i}" for i in range(5)]  # the oldest went first
    assert node.counters.evicted == len(evicted)
    assert node.counters.accepted == 5
    assert node.store.bytes <= 300


def test_dedupe_window_is_forgotten_by_tick() -> None:
    node = make_node()
    pub(node, "c", "m", T0)
    node.ack("c", ["m"], T0)
    node.tick(T0 + WINDOW_MS)
    assert len(node.dedupe) == 0


def test_retry_after_reuse_of_an_id_is_a_duplicate() -> None:
    node = make_node()
    pub(node, "c", "old", T0)
    pub(node, "c", "young", T0 + 500_000)
    node.ack("c", ["young"], T0 + 500_000)
    node.ack("c", ["old"], T0 + 501_000)  # acks arrive in any order
    t = T0 + 700_000  # past old's window, inside young's
    node.tick(t)
    node.subscribe("h", "c", t)
    assert not pub(node, "c", "old", t).dup  # the id may be used again: a new message
    node.ack("c", ["old"], t + 1)
    retry = pub(node, "c", "old", t + 2)
    assert retry.dup
    assert retry.subscribers == ()
