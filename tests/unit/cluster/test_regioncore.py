"""The region core (cluster/regioncore.py): each event kind in, the expected Ready out,
on a fake clock and no sockets; walks of random event sequences check its invariants."""

from __future__ import annotations

from typing import Any, NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.apply import apply_events
from cluster.mesh import PATIENT_TIMEOUT_S
from cluster.meshops import MeshPub
from cluster.ownership import AuditDue, Rebalance, Tick
from cluster.rebalance import RingState
from cluster.regioncore import (
    CLAIM_ATTEMPTS,
    NO_OWNER,
    NOT_CONFIRMED,
    RELEASE_POLL_S,
    REMOTE_WAIT_S,
    RESUBSCRIBE_POLL_S,
    RESUBSCRIBE_S,
    Ack,
    Answered,
    AppendDone,
    ClaimFenced,
    ClaimStep,
    Confirmed,
    LogRead,
    MeshDeliver,
    MeshInterest,
    NotAppended,
    Publish,
    Ready,
    RegionCore,
    Registered,
    ReleaseWait,
    Resub,
    Resubscribe,
    Subscribe,
    Unsubscribe,
    message_fields,
)
from cluster.ring import slot_of
from cluster.slots import SlotEvent
from relay.batch import AppendToLog
from relay.errors import Code
from relay.store import Message
from tests.conftest import FakeClock, memory_node
from tests.unit.cluster.cores import region_core

ME = "sg/n1"
PEER = "sg/n2"
NODES = ("sg/n1", "sg/n2", "sg/n3")
SLOTS = 16
NOW_MS = 1_000_000


class Entry(NamedTuple):
    slot: int
    id: str
    data: bytes
    prev: str = ""


def make(*, links: bool = False, own_all: bool = True) -> RegionCore:
    c = region_core(ME, SLOTS, messages=1000, dedupe_ms=600_000, tombstones=1000, links=links)
    c.step(Rebalance(dict.fromkeys(NODES, 1.0), RingState()))
    c.mesh_up = True
    if own_all:
        assert c.ownership.ring is not None
        for s in c.ownership.ring.slots_of(ME):
            own(c, s)
    return c


def own(c: RegionCore, slot: int) -> None:
    c.table.fire(slot, SlotEvent.CLAIM)
    c.table.fire(slot, SlotEvent.CLAIMED, epoch=1)
    c.table.fire(slot, SlotEvent.CLAIM_ENDED)


def channel(c: RegionCore, owner: str, n: int = 0) -> str:
    found = [f"room-{i}" for i in range(500) if c.owner_of(f"room-{i}") == owner]
    return found[n]


class Replies:
    """Reply tokens that record what they were answered."""

    def __init__(self) -> None:
        self.got: dict[int, list[tuple[Any, Code | None, str]]] = {}

    def token(self, key: int) -> Any:
        self.got.setdefault(key, [])
        return lambda result, code, reason: self.got[key].append((result, code, reason))

    def carry(self, ready: Ready) -> None:
        for reply, result, code, reason in ready.replies:
            reply(result, code, reason)
        for w, level in ready.answers:
            w.settle(level)


def pub(
    c: RegionCore, ch: str, reply: Any, *, ack: str = "log", peer: str = "", **kw: Any
) -> Ready:
    p = MeshPub(ch, kw.get("msg_id", "m1"), b"x", "s", 60_000, ack)
    return c.step(Publish(p, reply, NOW_MS, 0.0, True, peer))


def flush_all(c: RegionCore, r: Replies, now: float = 0.0) -> list[AppendToLog]:
    entries = c.batcher.flush(NOW_MS, force=True)
    for e in entries:
        r.carry(c.step(AppendDone(e.slot, e.batch_id, f"{NOW_MS}-{e.batch_id}", e.waiters, now)))
    return entries


# -- client ops


def test_a_client_pub_at_ack_mem_on_the_owner_is_answered_at_once_and_batched() -> None:
    c, r = make(), Replies()
    ch = channel(c, ME)
    ready = pub(c, ch, r.token(1), ack="mem")
    r.carry(ready)
    assert r.got[1] == [({"ts": NOW_MS, "origin": "sg", "ack": "mem", "dup": False}, None, "")]
    assert ready.changed == slot_of(ch, SLOTS) and ready.forward is None and ready.appends == ()
    assert ready.deliver is None  # nobody subscribes
    assert [e.slot for e in c.batcher.flush(NOW_MS, force=True)] == [slot_of(ch, SLOTS)]


def test_a_client_pub_at_ack_log_is_answered_once_its_append_is_done() -> None:
    c, r = make(), Replies()
    ch = channel(c, ME)
    r.carry(pub(c, ch, r.token(1)))
    assert r.got[1] == []  # waits for the append
    entries = flush_all(c, r)
    assert len(entries) == 1 and r.got[1][0][0]["ack"] == "log"
    assert c.positions.at(slot_of(ch, SLOTS)) == f"{NOW_MS}-{entries[0].batch_id}"
    # The same id again: a duplicate, already logged, answered at once.
    r.carry(pub(c, ch, r.token(2)))
    assert r.got[2] == [({"ts": NOW_MS, "origin": "sg", "ack": "log", "dup": True}, None, "")]


def test_a_client_pub_for_another_owner_is_forwarded_and_its_answer_replied() -> None:
    c, r = make(), Replies()
    ch = channel(c, PEER)
    ready = pub(c, ch, r.token(1), ack="mem")
    f = ready.forward
    assert f is not None and f.owner == PEER and f.op == "pub" and f.args["id"] == "m1"
    assert ready.changed == -1 and c.batcher.flush(NOW_MS, force=True) == []  # never appends
    r.carry(c.step(Answered(f, {"ack": "mem"}, None, "")))
    assert r.got[1] == [({"ack": "mem"}, None, "")]


def test_ops_are_refused_with_codes_when_nobody_can_serve_them() -> None:
    c, r = make(own_all=False), Replies()
    mine = channel(c, ME)
    slot = slot_of(mine, SLOTS)
    r.carry(pub(c, mine, r.token(1)))  # ours by the ring, not claimed yet
    assert r.got[1] == [(None, Code.UNAVAILABLE, f"slot {slot} is moving; retry")]
    r.carry(pub(c, mine, r.token(2), peer=PEER))  # a peer's, for a slot we do not serve
    assert r.got[2] == [(None, Code.UNAVAILABLE, f"slot {slot} is moving; retry")]
    r.carry(c.step(Ack(mine, ["m1"], r.token(3), NOW_MS, True, PEER)))
    assert r.got[3] == [(None, Code.UNAVAILABLE, f"{ME} does not serve slot {slot} now")]
    c.mesh_up = False
    r.carry(pub(c, channel(c, PEER), r.token(4)))
    assert r.got[4] == [(None, Code.UNAVAILABLE, NO_OWNER)]


def test_a_lease_not_surely_fresh_refuses_and_a_draining_node_too() -> None:
    c, r = make(), Replies()
    ch = channel(c, ME)
    r.carry(c.step(Ack(ch, ["m1"], r.token(1), NOW_MS, False)))
    assert r.got[1][0][1] is Code.UNAVAILABLE
    c.ownership.draining = True
    r.carry(c.step(Subscribe(ch, "h", r.token(2), NOW_MS, True)))
    assert r.got[2][0][1] is Code.UNAVAILABLE


def test_an_ack_on_the_owner_is_logged_tombstoned_and_answered_with_the_count() -> None:
    c, r = make(), Replies()
    ch = channel(c, ME)
    slot = slot_of(ch, SLOTS)
    r.carry(pub(c, ch, r.token(1), ack="mem"))
    ready = c.step(Ack(ch, ["m1", "nope"], r.token(2), NOW_MS, True))
    assert ready.changed == slot and r.got[2] == []
    assert c.acks.gone(slot) == {(ch, "m1"), (ch, "nope")}
    flush_all(c, r)
    assert r.got[2] == [(1, None, "")]


def test_an_ack_before_its_message_keeps_it_out_here_as_in_the_log() -> None:
    # An id acked before anything was published with it: the owner remembers it, as
    # every reader of the log does (cluster/apply.py), so the pub that follows is a
    # duplicate here too, and the owner's pending set is what the log rebuilds.
    c, r = make(), Replies()
    ch = channel(c, ME)
    r.carry(c.step(Ack(ch, ["early"], r.token(1), NOW_MS, True)))
    r.carry(pub(c, ch, r.token(2), ack="mem", msg_id="early"))
    r.carry(pub(c, ch, r.token(3), ack="mem", msg_id="later"))
    entries = flush_all(c, r)
    assert r.got[1] == [(0, None, "")]
    assert r.got[2][0][0]["dup"] is True and r.got[3][0][0]["dup"] is False
    held = [m.id for m in c.node.store.pending(ch, NOW_MS)]
    replica = memory_node("sg/n2", max_messages=1000, max_bytes=1 << 30, max_ids=1000)
    apply_events(replica, [e for entry in entries for e in entry.events], NOW_MS)
    assert held == [m.id for m in replica.store.pending(ch, NOW_MS)] == ["later"]


def test_a_forwarded_ack_and_sub_answered_by_the_owner() -> None:
    c, r = make(), Replies()
    ch = channel(c, PEER)
    fa = c.step(Ack(ch, ["a"], r.token(1), NOW_MS, True)).forward
    assert fa is not None and fa.op == "ack"
    r.carry(c.step(Answered(fa, 1, None, "")))
    assert r.got[1] == [(1, None, "")]
    fs = c.step(Subscribe(ch, "h", r.token(2), NOW_MS, True)).forward
    assert fs is not None and fs.op == "sub" and fs.at_once
    m = Message("a", ch, "s", NOW_MS << 16, "sg", b"x", NOW_MS + 60_000)
    r.carry(c.step(Answered(fs, [message_fields(m)], None, "")))
    assert r.got[2] == [([m], None, "")]
    assert c.node.subscribers[ch] == {"h"} and c.interest.follows(ch, PEER)
    fs2 = c.step(Subscribe(ch, "h2", r.token(3), NOW_MS, True)).forward
    assert fs2 is not None
    r.carry(c.step(Answered(fs2, None, Code.UNAVAILABLE, "claiming")))
    assert r.got[3] == [(None, Code.UNAVAILABLE, "claiming")] and "h2" not in c.node.subscribers[ch]
    # The last local subscriber leaves: tell the owner.
    assert c.step(Unsubscribe(ch, "h")).interest == (PEER, ch, False)
    assert not c.interest.follows(ch, PEER)


def test_a_local_and_a_peer_subscription_and_what_a_publish_then_delivers() -> None:
    c, r = make(), Replies()
    ch = channel(c, ME)
    r.carry(c.step(Subscribe(ch, "h", r.token(1), NOW_MS, True)))
    r.carry(c.step(Subscribe(ch, None, r.token(2), NOW_MS, True, PEER)))
    assert r.got[1] == [([], None, "")] and r.got[2] == [([], None, "")]
    assert c.interest.peers[ch] == {PEER}
    ready = pub(c, ch, r.token(3), ack="mem")
    assert ready.deliver is not None and ready.deliver.id == "m1"


# -- mesh messages


def test_a_delivery_from_the_owner_we_follow_fans_out_and_bad_input_is_refused() -> None:
    c, r = make(), Replies()
    ch = channel(c, PEER)
    fs = c.step(Subscribe(ch, "h", r.token(1), NOW_MS, True)).forward
    assert fs is not None
    r.carry(c.step(Answered(fs, [], None, "")))
    m = Message("a", ch, "s", NOW_MS << 16, "sg", b"x", NOW_MS + 60_000)
    assert c.step(MeshDeliver(PEER, ch, message_fields(m))).fan_out == (m, ("h",))
    assert c.step(MeshDeliver("sg/n3", ch, message_fields(m))) == Ready()  # not followed
    assert "7 fields" in c.step(MeshDeliver(PEER, ch, [1, 2])).refused
    assert c.step(MeshInterest(PEER, "", True)).refused
    assert c.step(MeshInterest(PEER, "room", True)) == Ready()
    assert c.interest.peers["room"] == {PEER}
    c.step(MeshInterest(PEER, "room", False))
    assert "room" not in c.interest.peers


# -- appends, links, ticks


def test_ack_remote_waits_for_a_link_and_expires_on_the_tick() -> None:
    clock = FakeClock()
    c, r = make(links=True), Replies()
    ch = channel(c, ME)
    slot = slot_of(ch, SLOTS)
    r.carry(pub(c, ch, r.token(1), ack="remote", msg_id="a"))
    r.carry(pub(c, ch, r.token(2), ack="remote", msg_id="b"))
    flush_all(c, r, clock.now)
    assert r.got[1] == r.got[2] == [] and len(c.remote_waiters[slot]) == 2
    r.carry(c.step(Confirmed({slot: str(c.positions.at(slot))})))
    assert r.got[1][0][0]["ack"] == "remote" and r.got[2][0][0]["ack"] == "remote"
    assert not c.remote_waiters
    r.carry(pub(c, ch, r.token(3), ack="remote", msg_id="c"))
    flush_all(c, r, clock.now)
    clock.now += REMOTE_WAIT_S + 1
    ready = c.step(Tick(clock.now))
    r.carry(ready)
    assert r.got[3] == [(None, Code.UNAVAILABLE, NOT_CONFIRMED)]
    assert "within 30 s" in NOT_CONFIRMED and "logged here" in NOT_CONFIRMED
    assert PATIENT_TIMEOUT_S > REMOTE_WAIT_S  # a forwarded one is answered by its owner
    # A duplicate of a logged message at ack=remote waits for the link too.
    r.carry(pub(c, ch, r.token(4), ack="remote", msg_id="c"))
    r.carry(c.step(Confirmed({slot: f"{NOW_MS + 1}-0"})))
    assert r.got[4][0][0] == {"ts": NOW_MS, "origin": "sg", "ack": "remote", "dup": True}


def test_the_ownership_events_pass_through_the_one_step() -> None:
    c = make()
    assert c.step(Tick(0.0)).own.audit is False  # arms the audit timer
    assert c.step(Tick(5.0)).own.audit is True
    assert set(c.step(AuditDue()).own.read_records or ()) == set(c.table.owned)


def test_an_entry_not_appended_is_retried_under_a_claim_or_fails_its_waiters() -> None:
    c, r = make(), Replies()
    ch = channel(c, ME)
    slot = slot_of(ch, SLOTS)
    r.carry(pub(c, ch, r.token(1)))
    (e,) = c.batcher.flush(NOW_MS, force=True)
    ready = c.step(NotAppended(e))  # the ring gives us the slot: claim it back, retry
    assert ready.retry == (e,) and ready.own.claims == (slot,) and r.got[1] == []
    c.table.fire(slot, SlotEvent.LOSE)
    c.table.fire(slot, SlotEvent.CLAIM)
    assert c.step(NotAppended(e)).own.claims == ()  # a claim is under way already
    c.ownership.draining = True  # not ours to take back: the waiters fail
    r.carry(c.step(NotAppended(e)))
    assert r.got[1] == [(None, Code.UNAVAILABLE, "the slot moved before the message was logged")]


def test_an_entry_the_codec_refused_answers_internal() -> None:
    c, r = make(), Replies()
    ch = channel(c, ME)
    r.carry(c.step(Ack(ch, ["a"], r.token(1), NOW_MS, True)))
    (e,) = c.batcher.flush(NOW_MS, force=True)
    r.carry(c.step(NotAppended(e, "internal error, correlation id x")))
    assert r.got[1] == [(None, Code.INTERNAL, "internal error, correlation id x")]


# -- log reads


def test_a_log_read_applies_in_chain_skips_what_is_applied_and_names_a_gap() -> None:
    c = make(own_all=False)
    c.positions.start(3, None)
    e1, e2, e3 = (
        Entry(3, "1-0", b"a", "0-0"),
        Entry(3, "2-0", b"b", "1-0"),
        Entry(3, "3-0", b"c", "2-0"),
    )
    ready = c.step(LogRead("", [e1, e2]))
    assert [e for e, _ in ready.applies] == [e1, e2] and c.positions.at(3) == "2-0"
    again = c.step(LogRead("", [e2, e3]))
    assert [e for e, _ in again.applies] == [e3] and again.skipped == 1
    # 4-0 is missing: 5-0 is a gap, and nothing of the slot after it is applied.
    e5, e6 = Entry(3, "5-0", b"e", "4-0"), Entry(3, "6-0", b"f", "5-0")
    gap = c.step(LogRead("", [e5, e6, Entry(4, "1-0", b"x", "")]))
    assert gap.catch_ups == (3,) and [e.slot for e, _ in gap.applies] == [4]
    assert c.positions.at(3) == "3-0"
    # A slot whose state is not loaded here: any chained entry is a gap.
    assert c.step(LogRead("", [Entry(9, "1-0", b"", "0-0")])).catch_ups == (9,)
    assert c.step(LogRead("", [e6], frozenset({3}))) == Ready()  # left alone


def test_a_mirror_gap_of_an_owned_slot_is_a_resync_and_delivers_otherwise() -> None:
    c = make()
    slot = next(iter(c.table.owned))
    ok = Entry(slot, "1-0", b"a", "0-0")
    ready = c.step(LogRead("fra", [ok], deliver=True))
    assert ready.applies == ((ok, True),) and c.positions.at(slot, "fra") == "1-0"
    gap = c.step(LogRead("fra", [Entry(slot, "3-0", b"c", "2-0")], deliver=True))
    assert gap.resyncs == ((slot, "2-0"),) and gap.catch_ups == ()


# -- walks


@st.composite
def reads(draw: st.DrawFn) -> tuple[int, list[list[int]]]:
    """A chain of ``n`` entries of one slot, and reads of it: runs that may replay what
    was read, or jump over entries (trimmed under the reader)."""
    n = draw(st.integers(1, 12))
    runs = []
    for _ in range(draw(st.integers(1, 6))):
        start = draw(st.integers(1, n))
        runs.append(list(range(start, draw(st.integers(start, n)) + 1)))
    return n, runs


@settings(max_examples=150, deadline=None)
@given(reads(), st.booleans())
def test_walk_log_reads_never_deliver_twice_and_never_skip_a_gap_silently(
    chain: tuple[int, list[list[int]]], mirror: bool
) -> None:
    n, runs = chain
    c = make(own_all=False)
    origin = "fra" if mirror else ""
    if not mirror:
        c.positions.start(2, None)
    applied: list[int] = []
    for run in runs:
        entries = [Entry(2, f"{i}-0", b"", f"{i - 1}-0") for i in run]
        before = int(str(c.positions.at(2, origin)).split("-")[0])
        ready = c.step(LogRead(origin, entries))
        if run[-1] <= before:  # a replay of what is applied: skipped, not a rebuild
            assert ready.applies == () and ready.catch_ups == () and ready.skipped == len(run)
        applied += [int(e.id.split("-")[0]) for e, _ in ready.applies]
        position = int(str(c.positions.at(2, origin)).split("-")[0])
        for i in run:
            if i > position:  # neither applied nor behind: only ever after a gap
                assert ready.catch_ups == (2,), (run, position)
        if ready.catch_ups:  # the edge rebuilds it: from the checkpoint, which covers all
            c.positions.advance(2, f"{run[-1]}-0", origin)
    assert applied == sorted(set(applied)), "an entry applied twice or out of order"
    assert all(1 <= i <= n for i in applied)


# -- re-subscriptions


def resub(c: RegionCore, ch: str, now: float, **kw: Any) -> Ready:
    return c.step(Resubscribe(ch, 0.0, now, NOW_MS, kw.pop("fresh", True), **kw))


def test_a_resubscription_asks_the_new_owner_until_it_answers_and_replays_its_pending() -> None:
    c = make()
    ch = channel(c, PEER)
    c.node.subscribers[ch] = {"h1"}
    c.interest.register(ch, "sg/n3")  # the owner before the ring moved
    first = resub(c, ch, 0.0, start=True)
    assert first.resubscribe == Resub(ch, ask=PEER) and ch not in c.interest.registered
    refused = resub(c, ch, 0.05, asked=PEER, ok=False)  # still claiming: unavailable
    assert refused.resubscribe == Resub(ch, wait_s=RESUBSCRIBE_POLL_S)
    assert resub(c, ch, 0.2).resubscribe == Resub(ch, ask=PEER)
    m = Message("m1", ch, "s", 5, "sg", b"x", NOW_MS + 60_000)
    answered = c.step(Registered(ch, PEER, [message_fields(m)]))
    assert answered.replay == ((m,), ("h1",)) and c.interest.follows(ch, PEER)
    assert resub(c, ch, 0.3, asked=PEER, ok=True) == Ready()  # done
    # Nobody there to ask: wait; and past RESUBSCRIBE_S: give up.
    c.mesh_up = False
    assert resub(c, ch, 1.0, start=True).resubscribe == Resub(ch, wait_s=RESUBSCRIBE_POLL_S)
    assert resub(c, ch, RESUBSCRIBE_S).resubscribe == Resub(ch, gave_up=True)


def test_a_resubscription_follows_a_ring_that_moved_and_ends_without_subscribers() -> None:
    c = make()
    ch = channel(c, PEER)
    c.node.subscribers[ch] = {"h1"}
    c.interest.register(ch, "sg/n3")  # registered with n3 meanwhile, the ring says n2
    moved = resub(c, ch, 0.1, asked="sg/n3", ok=True)
    assert moved.resubscribe == Resub(ch, ask=PEER) and ch not in c.interest.registered
    del c.node.subscribers[ch]  # the subscribers left: nothing to register
    assert resub(c, ch, 0.2) == Ready()


def test_a_resubscription_to_ourselves_replays_our_pending_once_we_serve_the_slot() -> None:
    c, r = make(), Replies()
    ch = channel(c, ME)
    r.carry(pub(c, ch, r.token(1), ack="mem"))
    c.node.subscribers[ch] = {"h1"}
    not_fresh = resub(c, ch, 0.0, start=True, fresh=False)  # not surely ours: wait
    assert not_fresh.resubscribe == Resub(ch, wait_s=RESUBSCRIBE_POLL_S)
    ready = resub(c, ch, 0.1)
    assert ready.replay is not None and [m.id for m in ready.replay[0]] == ["m1"]
    assert ready.replay[1] == ("h1",) and c.interest.follows(ch, ME)


# -- claims


def test_a_claim_waits_for_a_live_old_owner_to_hand_over_within_a_lease_then_fences() -> None:
    c = make(own_all=False)
    c.release_wait_s = 3.0
    slot = next(s for s in range(SLOTS) if c.ownership.should_own(s))
    assert c.step(ReleaseWait(slot, 0.0, 0.0)).claim == ClaimStep(slot, read=True)
    live_holder = c.step(ReleaseWait(slot, 0.0, 0.01, read=True, holder=PEER, live=True))
    assert live_holder.claim == ClaimStep(slot, wait_s=RELEASE_POLL_S)  # it is flushing
    unread = c.step(ReleaseWait(slot, 0.0, 0.05, read=True, holder=None))  # not knowing
    assert unread.claim == ClaimStep(slot, wait_s=RELEASE_POLL_S)
    for holder, live in (("", False), (ME, True), (PEER, False)):  # none, us, a dead one
        ready = c.step(ReleaseWait(slot, 0.0, 0.1, read=True, holder=holder, live=live))
        assert ready.claim == ClaimStep(slot, fence=True), (holder, live)
    assert c.step(ReleaseWait(slot, 0.0, 2.9)).claim == ClaimStep(slot, read=True)
    assert c.step(ReleaseWait(slot, 0.0, 3.0)).claim == ClaimStep(slot, fence=True)  # too long
    other = next(s for s in range(SLOTS) if not c.ownership.should_own(s))
    assert c.step(ReleaseWait(other, 0.0, 0.0)).claim == ClaimStep(other, fence=True)


def test_a_claim_fenced_in_a_race_tries_again_a_bounded_number_of_times() -> None:
    c = make()
    assert c.step(ClaimFenced(3, 1)).claim == ClaimStep(3, fence=True)
    assert c.step(ClaimFenced(3, CLAIM_ATTEMPTS - 1)).claim == ClaimStep(3, fence=True)
    assert c.step(ClaimFenced(3, CLAIM_ATTEMPTS)).claim is None  # gives up


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["pub", "peer-pub", "ack", "sub", "flush", "fail", "answer", "tick", "lose", "claim"]
        ),
        st.integers(0, 5),
        st.sampled_from(["mem", "log", "remote"]),
    ),
    max_size=40,
)


@settings(max_examples=120, deadline=None)
@given(OPS, st.booleans())
def test_walk_every_op_is_answered_exactly_once_and_a_non_owner_never_appends(
    ops: list[tuple[str, int, str]], links: bool
) -> None:
    c, r = make(links=links), Replies()
    clock = FakeClock()
    channels = [channel(c, ME, 0), channel(c, ME, 1), channel(c, PEER, 0), channel(c, "sg/n3")]
    forwards: list[Any] = []
    retries: list[AppendToLog] = []

    def carry(ready: Ready, ch: str) -> None:
        if c.owner_of(ch) != ME or slot_of(ch, SLOTS) not in c.table.owned:
            assert ready.appends == () and ready.changed == -1, "a non-owner appended"
        for e in ready.appends:
            assert e.slot in c.table.owned
        if ready.forward is not None:
            forwards.append(ready.forward)
        r.carry(ready)

    for key, (op, n, ack) in enumerate(ops):
        ch = channels[n % len(channels)]
        if op in ("pub", "peer-pub"):
            peer = PEER if op == "peer-pub" else ""
            carry(pub(c, ch, r.token(key), ack=ack, peer=peer, msg_id=f"m{n}"), ch)
        elif op == "ack":
            carry(c.step(Ack(ch, [f"m{n}"], r.token(key), NOW_MS, True)), ch)
        elif op == "sub":
            carry(c.step(Subscribe(ch, key, r.token(key), NOW_MS, True)), ch)
        elif op == "flush":
            flush_all(c, r, clock.now)
        elif op == "fail":  # appends refused (fenced): ours by the ring, so retried
            for e in c.batcher.flush(NOW_MS, force=True):
                ready = c.step(NotAppended(e))
                assert ready.retry == (e,) and ready.answers == ()
                retries.extend(ready.retry)
        elif op == "lose" and slot_of(ch, SLOTS) in c.table.owned:  # fenced: lost
            slot = slot_of(ch, SLOTS)
            c.table.fire(slot, SlotEvent.LOSE)
            for e in c.batcher.take(slot):
                ready = c.step(NotAppended(e))
                retries.extend(ready.retry)
                r.carry(ready)
        elif op == "claim" and c.owner_of(ch) == ME and slot_of(ch, SLOTS) not in c.table.owned:
            own(c, slot_of(ch, SLOTS))
        elif op == "answer" and forwards:
            f = forwards.pop(0)
            r.carry(c.step(Answered(f, _owner_answer(f), None, "")))
        elif op == "tick":
            clock.now += REMOTE_WAIT_S / 2
            r.carry(c.step(Tick(clock.now)))
    # Quiet: the owner answers every forward, every batch is appended, links confirm.
    for f in forwards:
        r.carry(c.step(Answered(f, None, Code.UNAVAILABLE, "gone")))
    for ch in channels[:2]:  # our slots claimed back
        if slot_of(ch, SLOTS) not in c.table.owned:
            own(c, slot_of(ch, SLOTS))
    for e in retries:  # claimed back: appended under the new epoch
        r.carry(c.step(AppendDone(e.slot, e.batch_id, f"{NOW_MS}-{e.batch_id}", e.waiters, 0.0)))
    flush_all(c, r, clock.now)
    r.carry(c.step(Tick(clock.now + 2 * REMOTE_WAIT_S)))
    for key, got in r.got.items():
        assert len(got) == 1, f"op {key} ({ops[key]}) answered {len(got)} times: {got}"


def _owner_answer(f: Any) -> Any:
    return {"pub": {"ack": "log"}, "ack": 1, "sub": []}[f.op]
