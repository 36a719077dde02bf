"""Applying slot-log events converges whatever the order and repetition."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.apply import apply_events, slot_state
from relay.codec import AckEvent, Event, MessageEvent
from relay.node import Node
from tests.conftest import memory_node

NOW = 1_800_000_000_000


def fresh() -> Node:
    return memory_node("sg/n1", max_messages=10_000, max_bytes=1 << 30, max_ids=100_000)


def msg(i: int, ch: str = "c") -> MessageEvent:
    return MessageEvent(f"m{i}", ch, "anon", (NOW << 16) + i, "sg", b"b%d" % i, NOW + 60_000)


def pending(node: Node) -> dict[str, list[str]]:
    return {
        ch: [m.id for m in node.store.pending(ch, NOW)] for ch in sorted(node.store.channel_names())
    }


def test_acks_of_ids_never_pending_here_cannot_push_out_accepted_ones() -> None:
    # Any ack may name made-up ids (in the log, in a snapshot's or checkpoint's
    # tombstones): held apart, they never push out the id of a message accepted here.
    n = memory_node("sg/n1", max_messages=100, max_bytes=1 << 20, max_ids=80)
    apply_events(n, [msg(i) for i in range(20)], NOW)
    apply_events(n, [AckEvent("c", tuple(f"m{i}" for i in range(20)), (NOW << 16) + 30, "sg")], NOW)
    flood = AckEvent("junk", tuple(f"j{i}" for i in range(500)), (NOW << 16) + 40, "sg")
    apply_events(n, [flood], NOW)
    assert apply_events(n, [msg(i) for i in range(20)], NOW) == []  # still duplicates
    assert len(n.dedupe) == 80 and n.dedupe.weak == 60


def test_ack_before_message_keeps_it_out() -> None:
    n = fresh()
    apply_events(n, [AckEvent("c", ("m1",), (NOW << 16) + 9, "fra")], NOW)
    assert apply_events(n, [msg(1)], NOW) == []
    assert pending(n) == {}


def test_duplicates_are_applied_once() -> None:
    n = fresh()
    assert len(apply_events(n, [msg(1), msg(1), msg(2)], NOW)) == 2
    assert pending(n) == {"c": ["m1", "m2"]}


def test_out_of_order_messages_end_up_oldest_first() -> None:
    n = fresh()
    apply_events(n, [msg(3), msg(1), msg(2)], NOW)
    assert pending(n) == {"c": ["m1", "m2", "m3"]}


def test_expired_messages_are_not_applied() -> None:
    n = fresh()
    old = MessageEvent("x", "c", "a", NOW << 16, "sg", b"", NOW - 1)
    assert apply_events(n, [old], NOW) == []


def test_checkpoint_state_round_trips() -> None:
    n = fresh()
    apply_events(n, [msg(1), msg(2, "d"), AckEvent("c", ("m1",), (NOW << 16) + 5, "sg")], NOW)
    m = fresh()
    apply_events(m, slot_state(n, ["c", "d"], NOW), NOW)
    assert pending(m) == pending(n) == {"d": ["m2"]}


events = st.lists(
    st.one_of(
        st.builds(msg, st.integers(0, 8), st.sampled_from(["a", "b"])),
        st.builds(
            lambda ids, ch: AckEvent(ch, tuple(f"m{i}" for i in ids), (NOW << 16) + 100, "sg"),
            st.lists(st.integers(0, 8), min_size=1, max_size=3),
            st.sampled_from(["a", "b"]),
        ),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(events, st.randoms(use_true_random=False), st.integers(1, 3))
def test_any_interleaving_and_repetition_converges(
    evs: list[Event], rnd: object, copies: int
) -> None:
    a = fresh()
    apply_events(a, evs, NOW)
    shuffled = evs * copies
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    b = fresh()
    apply_events(b, shuffled, NOW)
    assert pending(a) == pending(b)
    # A message never comes back after its ack.
    acked = {(e.ch, i) for e in evs if isinstance(e, AckEvent) for i in e.ids}
    for ch, ids in pending(b).items():
        assert not acked & {(ch, i) for i in ids}
