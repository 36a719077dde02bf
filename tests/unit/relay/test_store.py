"""relay.store: pending messages per channel, checked against a model, and the record format."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from relay.errors import InvariantError
from relay.store import (
    EXPIRY_SLACK,
    MAX_ORIGIN_BYTES,
    MAX_SENDER_BYTES,
    Message,
    PendingStore,
    Removed,
    pack,
    unpack,
)

T0 = 1_700_000_000_000
BIG = 1 << 40


def big_store() -> PendingStore:
    return PendingStore(channel_max_messages=BIG, channel_max_bytes=BIG)


def add(store: PendingStore, ch: str, msg_id: str, hlc: int, **kw: object) -> Removed | None:
    fields: dict[str, object] = {
        "expires_ms": T0 + 60_000,
        "sender": "alice",
        "origin": "sg",
        "body": b"hi",
    }
    fields.update(kw)
    return store.add(ch, msg_id, hlc=hlc, **fields)  # type: ignore[arg-type]


def ids(messages: list[Message]) -> list[str]:
    return [m.id for m in messages]


def size_of(msg_id: str, hlc: int, expires_ms: int, sender: str, origin: str, body: bytes) -> int:
    """What a message counts for in the byte totals, read from the store's own accounting
    (so the model does not depend on the record layout)."""
    s = big_store()
    s.add("probe", msg_id, hlc=hlc, expires_ms=expires_ms, sender=sender, origin=origin, body=body)
    return s.bytes


# -- plain cases -------------------------------------------------------------------------


def test_add_get_pending_ack() -> None:
    s = big_store()
    assert add(s, "c", "a", 1, body=b"one") is None
    add(s, "c", "b", 2)
    m = s.get("c", "a")
    assert m == Message("a", "c", "alice", 1, "sg", b"one", T0 + 60_000)
    assert s.contains("c", "a") and not s.contains("c", "zz") and not s.contains("d", "a")
    assert s.get("d", "a") is None and s.get("c", "zz") is None
    assert ids(s.pending("c", T0)) == ["a", "b"]
    assert (s.count("c"), s.messages, s.channels) == (2, 2, 1)
    acked = s.ack("c", ["a", "nope", "a"])
    assert ids(acked) == ["a"]
    assert acked[0].body == b"one"
    assert (s.count("c"), s.messages) == (1, 1)
    assert ids(s.ack("c", ["b"])) == ["b"]
    assert (s.messages, s.bytes, s.channels) == (0, 0, 0)
    assert list(s.channel_names()) == []
    assert s.ack("never", ["x"]) == []
    assert s.pending("never", T0) == []


def test_adding_a_pending_id_again_is_a_caller_bug() -> None:
    s = big_store()
    add(s, "c", "a", 1)
    before = (s.messages, s.bytes)
    with pytest.raises(InvariantError):
        add(s, "c", "a", 2)
    assert (s.messages, s.bytes) == before
    assert s.get("c", "a") is not None and s.get("c", "a").hlc == 1  # type: ignore[union-attr]
    add(s, "other", "a", 3)  # ids are per channel


def test_out_of_order_timestamps_end_up_oldest_first() -> None:
    s = big_store()
    for msg_id, hlc in [("c", 30), ("e", 50), ("a", 10), ("d", 40), ("b", 20)]:
        add(s, "ch", msg_id, hlc)
    assert ids(s.pending("ch", T0)) == ["a", "b", "c", "d", "e"]
    s.ack("ch", ["e", "d"])
    add(s, "ch", "f", 35)  # older than the newest ever added, newer than what is left
    add(s, "ch", "g", 5)
    assert [m.hlc for m in s.pending("ch", T0)] == [5, 10, 20, 30, 35]


def test_pending_leaves_out_expired_messages_before_expire_runs() -> None:
    s = big_store()
    add(s, "c", "short", 1, expires_ms=T0 + 10)
    add(s, "c", "long", 2, expires_ms=T0 + 1000)
    assert ids(s.pending("c", T0 + 9)) == ["short", "long"]
    assert ids(s.pending("c", T0 + 10)) == ["long"]
    assert s.count("c") == 2  # still held until expire() collects it


def test_expire_reports_every_message_it_drops() -> None:
    s = big_store()
    add(s, "a", "1", 1, expires_ms=T0 + 10)
    add(s, "a", "2", 2, expires_ms=T0 + 30)
    add(s, "b", "3", 3, expires_ms=T0 + 20)
    assert s.expire(T0 + 9) == []
    got = s.expire(T0 + 20)
    assert sorted((r.ch, r.ids, r.hlcs, r.reason) for r in got) == [
        ("a", ("1",), (1,), "expired"),
        ("b", ("3",), (3,), "expired"),
    ]
    assert (s.messages, s.channels) == (1, 1)
    assert [(r.ch, r.ids) for r in s.expire(T0 + 30)] == [("a", ("2",))]
    assert (s.messages, s.bytes, s.channels) == (0, 0, 0)


def test_an_expiry_of_zero_is_an_expiry_not_unset() -> None:
    # A record can carry expires_ms 0 (or less: the header is signed), e.g. from an old
    # log replayed; it is the channel's earliest expiry, and a later add must not hide it.
    s = big_store()
    add(s, "z", "old", 1, expires_ms=0)
    add(s, "z", "new", 2, expires_ms=T0 + 50)
    add(s, "n", "neg", 3, expires_ms=-5)
    assert sorted((r.ch, r.ids) for r in s.expire(1)) == [("n", ("neg",)), ("z", ("old",))]
    assert s.count("z") == 1


def test_expire_after_acks_changed_the_earliest_expiry() -> None:
    s = big_store()
    add(s, "c", "soon", 1, expires_ms=T0 + 10)
    add(s, "c", "later", 2, expires_ms=T0 + 50)
    s.ack("c", ["soon"])
    assert s.expire(T0 + 20) == []
    assert s.count("c") == 1
    assert [r.ids for r in s.expire(T0 + 50)] == [("later",)]


def test_channels_that_empty_and_refill_keep_the_expiry_index_bounded() -> None:
    """The chat case: every message acked soon after it came, so its channel empties and
    is made again by the next one. The expiry index must not keep an entry per message
    for the whole TTL (a week by default): it stays within EXPIRY_SLACK + 2 per channel."""
    s = big_store()
    channels = 10
    bound = EXPIRY_SLACK + 2 * channels
    worst = 0
    for n in range(5 * bound):
        ch = f"room:{n % channels}"
        add(s, ch, str(n), n, expires_ms=T0 + 604_800_000)
        s.ack(ch, [str(n)])
        worst = max(worst, s.expiry_entries)
    assert worst <= bound
    assert (s.messages, s.channels) == (0, 0)


def test_expiry_still_finds_every_message_after_the_index_was_compacted() -> None:
    s = big_store()
    add(s, "keep", "early", 0, expires_ms=T0 + 10)
    add(s, "keep", "late", 1, expires_ms=T0 + 1_000)
    for n in range(2 * EXPIRY_SLACK + 100):  # empties and refills: compactions
        add(s, "churn", str(n), n + 2, expires_ms=T0 + 5 + n % 7)
        if n % 3:
            s.ack("churn", [str(n)])
    assert s.expiry_entries <= EXPIRY_SLACK + 2 * s.channels
    pending_churn = s.count("churn")
    got: dict[str, set[str]] = {}
    for r in s.expire(T0 + 20):
        got.setdefault(r.ch, set()).update(r.ids)
    assert got["keep"] == {"early"}
    assert len(got["churn"]) == pending_churn
    assert s.count("keep") == 1
    assert [(r.ch, r.ids) for r in s.expire(T0 + 1_000)] == [("keep", ("late",))]
    assert (s.messages, s.channels) == (0, 0)


def test_count_cap_evicts_the_oldest() -> None:
    s = PendingStore(channel_max_messages=2, channel_max_bytes=BIG)
    add(s, "c", "a", 1)
    add(s, "c", "b", 2)
    r = add(s, "c", "c", 3)
    assert r is not None
    assert (r.ch, r.ids, r.hlcs, r.reason) == ("c", ("a",), (1,), "evicted")
    assert ids(s.pending("c", T0)) == ["b", "c"]
    # An older message from another region is the oldest: it is the one evicted.
    r = add(s, "c", "old", 0)
    assert r is not None and r.ids == ("old",)
    assert ids(s.pending("c", T0)) == ["b", "c"]


def test_byte_cap_evicts_oldest_but_keeps_one_message() -> None:
    one = size_of("a", 1, T0 + 60_000, "alice", "sg", b"x" * 100)
    s = PendingStore(channel_max_messages=100, channel_max_bytes=2 * one + 1)
    add(s, "c", "a", 1, body=b"x" * 100)
    add(s, "c", "b", 2, body=b"x" * 100)
    r = add(s, "c", "c", 3, body=b"x" * 100)
    assert r is not None and r.ids == ("a",)
    # One message over the cap on its own is kept (the caller bounds bodies).
    r = add(s, "c", "huge", 4, body=b"x" * (3 * one))
    assert r is not None and r.ids == ("b", "c")
    assert ids(s.pending("c", T0)) == ["huge"]
    assert s.bytes >= 3 * one


def test_pack_refuses_fields_too_long_for_the_header() -> None:
    with pytest.raises(InvariantError):
        pack(1, 2, "s" * (MAX_SENDER_BYTES + 1), "o", b"")
    with pytest.raises(InvariantError):
        pack(1, 2, "s", "o" * (MAX_ORIGIN_BYTES + 1), b"")
    with pytest.raises(InvariantError):
        pack(1, 2, "é" * (MAX_SENDER_BYTES // 2 + 1), "o", b"")  # bytes, not characters


def test_a_refused_add_leaves_no_trace() -> None:
    s = big_store()
    with pytest.raises(InvariantError):
        add(s, "c", "a", 1, sender="s" * (MAX_SENDER_BYTES + 1))
    assert (s.messages, s.bytes) == (0, 0)
    assert s.channels == 0
    assert list(s.channel_names()) == []


@pytest.mark.parametrize(("count", "size"), [(0, 10), (10, 0)])
def test_caps_must_be_positive(count: int, size: int) -> None:
    with pytest.raises(InvariantError):
        PendingStore(channel_max_messages=count, channel_max_bytes=size)


@settings(max_examples=200)
@given(
    hlc=st.integers(0, 2**64 - 1),
    expires_ms=st.integers(-(2**63), 2**63 - 1),
    sender=st.text(max_size=40),
    origin=st.text(max_size=20),
    body=st.binary(max_size=200),
    ch=st.text(min_size=1, max_size=10),
    msg_id=st.text(min_size=1, max_size=10),
)
def test_pack_unpack_round_trip(
    hlc: int, expires_ms: int, sender: str, origin: str, body: bytes, ch: str, msg_id: str
) -> None:
    record = pack(hlc, expires_ms, sender, origin, body)
    assert unpack(ch, msg_id, record) == Message(msg_id, ch, sender, hlc, origin, body, expires_ms)


def test_pack_unpack_at_the_length_limits() -> None:
    sender = "s" * MAX_SENDER_BYTES
    origin = "o" * MAX_ORIGIN_BYTES
    m = unpack("c", "i", pack(0, 0, sender, origin, b"\x00" * 3))
    assert (m.sender, m.origin, m.body) == (sender, origin, b"\x00\x00\x00")


# -- stateful model test -------------------------------------------------------------------


@dataclass(frozen=True)
class Rec:
    id: str
    hlc: int
    expires_ms: int
    sender: str
    body: bytes
    size: int


CHANNELS = ["a", "b", "ç"]
IDS = [f"m{i}" for i in range(8)] + ["é", "☃x"]
ORIGIN = "fra"


class StoreMachine(RuleBasedStateMachine):
    """PendingStore against a dict of channel -> list of messages.

    Every message that leaves the store must come back from ack(), in a Removed from
    add() (evicted) or in a Removed from expire() (expired), and only then.
    """

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, list[Rec]] = {}
        self.now = T0
        self.used_hlcs: set[int] = set()
        self.seq = 0
        self.store = big_store()
        self.max_messages = BIG
        self.max_bytes = BIG

    @initialize(max_messages=st.integers(1, 5), max_bytes=st.integers(40, 260))
    def caps(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.store = PendingStore(channel_max_messages=max_messages, channel_max_bytes=max_bytes)

    def find(self, ch: str, msg_id: str) -> Rec | None:
        return next((r for r in self.model.get(ch, []) if r.id == msg_id), None)

    def remove(self, ch: str, msg_id: str) -> Rec:
        recs = self.model[ch]
        r = next(r for r in recs if r.id == msg_id)
        recs.remove(r)
        if not recs:
            del self.model[ch]
        return r

    @rule(
        ch=st.sampled_from(CHANNELS),
        msg_id=st.sampled_from(IDS),
        hlc_ms=st.integers(0, 50),
        ttl_ms=st.integers(1, 40),
        sender=st.sampled_from(["anon", "alice", "ß"]),
        body=st.binary(max_size=120),
    )
    def add(self, ch: str, msg_id: str, hlc_ms: int, ttl_ms: int, sender: str, body: bytes) -> None:
        if self.find(ch, msg_id) is not None:
            with pytest.raises(InvariantError):
                self.store.add(
                    ch, msg_id, hlc=1, expires_ms=1, sender=sender, origin=ORIGIN, body=body
                )
            return
        # Unique timestamps, in any order (as when other regions' messages arrive).
        self.seq += 1
        hlc = (hlc_ms << 16) | self.seq
        expires_ms = self.now + ttl_ms
        size = size_of(msg_id, hlc, expires_ms, sender, ORIGIN, body)
        assert size >= len(body)
        removed = self.store.add(
            ch, msg_id, hlc=hlc, expires_ms=expires_ms, sender=sender, origin=ORIGIN, body=body
        )
        recs = self.model.setdefault(ch, [])
        recs.append(Rec(msg_id, hlc, expires_ms, sender, body, size))
        recs.sort(key=lambda r: r.hlc)
        evicted: list[Rec] = []
        while len(recs) > 1 and (
            len(recs) > self.max_messages or sum(r.size for r in recs) > self.max_bytes
        ):
            evicted.append(recs.pop(0))
        if not evicted:
            assert removed is None or removed.ids == ()
            return
        assert removed is not None
        assert removed.reason == "evicted"
        assert removed.ch == ch
        assert removed.ids == tuple(r.id for r in evicted)  # the oldest, oldest first
        assert removed.hlcs == tuple(r.hlc for r in evicted)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        ch = data.draw(st.sampled_from(sorted(self.model)))
        known = [r.id for r in self.model[ch]]
        named = data.draw(st.lists(st.sampled_from([*known, "unknown", "m7"]), max_size=5))
        want = {i: self.find(ch, i) for i in named}
        got = self.store.ack(ch, named)
        assert sorted(m.id for m in got) == sorted(i for i, r in want.items() if r is not None)
        for m in got:
            r = self.remove(ch, m.id)
            assert m == Message(r.id, ch, r.sender, r.hlc, ORIGIN, r.body, r.expires_ms)

    @rule(ch=st.sampled_from(CHANNELS), msg_id=st.sampled_from(IDS))
    def ack_absent(self, ch: str, msg_id: str) -> None:
        if self.find(ch, msg_id) is None:
            assert self.store.ack(ch, [msg_id]) == []

    @rule(dt=st.integers(0, 30), limit=st.sampled_from([1, 2, 10_000]))
    def expire(self, dt: int, limit: int) -> None:
        self.now += dt
        got = self.store.expire(self.now, limit=limit)
        due = {
            (ch, r.id) for ch, recs in self.model.items() for r in recs if r.expires_ms <= self.now
        }
        assert len(got) <= limit
        assert len({r.ch for r in got}) == len(got)  # one Removed per channel
        seen = set()
        for removed in got:
            assert removed.reason == "expired"
            assert len(removed.ids) == len(removed.hlcs) > 0
            for msg_id, hlc in zip(removed.ids, removed.hlcs, strict=True):
                assert (removed.ch, msg_id) in due
                assert self.remove(removed.ch, msg_id).hlc == hlc
                seen.add((removed.ch, msg_id))
        if limit >= len(CHANNELS):
            assert seen == due  # nothing due is left behind by a full pass

    @invariant()
    def matches_model(self) -> None:
        s = self.store
        total_bytes = 0
        for ch in CHANNELS:
            recs = self.model.get(ch, [])
            assert s.count(ch) == len(recs)
            assert len(recs) <= self.max_messages
            ch_bytes = sum(r.size for r in recs)
            assert len(recs) <= 1 or ch_bytes <= self.max_bytes
            total_bytes += ch_bytes
            live = [r for r in recs if r.expires_ms > self.now]
            pending = s.pending(ch, self.now)
            assert [(m.id, m.hlc) for m in pending] == [(r.id, r.hlc) for r in live]
            assert all(m.ch == ch and m.origin == ORIGIN for m in pending)
            assert [m.body for m in pending] == [r.body for r in live]
        assert s.messages == sum(len(v) for v in self.model.values())
        assert s.bytes == total_bytes
        assert s.channels == len(self.model)
        assert set(s.channel_names()) == set(self.model)


StoreMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestStoreMachine = StoreMachine.TestCase
