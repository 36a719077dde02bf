"""The region node's ownership core (cluster/ownership.py): events in, a Ready out, on a
fake clock and no sockets; a walk of random event sequences checks its invariants."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.failure import DownReason, MemberDown, MemberSuspect, MemberUp
from cluster.ownership import (
    AuditDue,
    HandedOver,
    LeaseLost,
    Members,
    OwnerRecords,
    OwnershipCore,
    Ready,
    Rebalance,
    ReleaseEnded,
    Tick,
)
from cluster.rebalance import RingState
from cluster.slots import SlotEvent, SlotState, SlotTable

ME = "sg/n1"
NODES = ("sg/n1", "sg/n2", "sg/n3")
SLOTS = 16


def core(audit_s: float = 1.0) -> OwnershipCore:
    return OwnershipCore(ME, SlotTable(), SLOTS, 2, audit_s)


def own(c: OwnershipCore, slot: int, epoch: int = 3) -> None:
    c.table.fire(slot, SlotEvent.CLAIM)
    c.table.fire(slot, SlotEvent.CLAIMED, epoch=epoch)
    c.table.fire(slot, SlotEvent.CLAIM_ENDED)


def test_alone_the_node_claims_every_slot_after_the_hand_overs() -> None:
    c = core()
    ready = c.step(Rebalance({ME: 1.0}, RingState()))
    assert ready.releases == () and ready.replicas == frozenset() and ready.claims == ()
    assert c.ring is not None and c.should_own(0)
    assert c.step(HandedOver()).claims == tuple(range(SLOTS))


def test_a_join_hands_over_the_slots_the_ring_moved_and_replicates_others() -> None:
    c = core()
    c.step(Rebalance({ME: 1.0}, RingState()))
    for s in range(SLOTS):
        own(c, s)
    ready = c.step(Rebalance(dict.fromkeys(NODES, 1.0), RingState()))
    assert c.ring is not None
    mine = set(c.ring.slots_of(ME))
    assert set(ready.releases) == set(range(SLOTS)) - mine and ready.releases
    assert ready.replicas == frozenset(c.ring.replicas_of(ME)) - mine
    assert c.step(HandedOver()).claims == ()  # everything ours is owned already


def test_claims_under_way_are_joined_not_claimed_twice() -> None:
    c = core()
    c.step(Rebalance({ME: 1.0}, RingState()))
    c.table.fire(5, SlotEvent.CLAIM)
    ready = c.step(HandedOver())
    assert 5 not in ready.claims and ready.joins == (5,)


def test_the_audit_is_due_on_the_clock_not_before() -> None:
    c = core(audit_s=1.0)
    assert not c.step(Tick(100.0))  # arms the timer
    assert not c.step(Tick(100.5)).audit
    assert c.step(Tick(101.0)).audit
    assert not c.step(Tick(101.5)).audit
    assert c.step(Tick(102.25)).audit


def test_the_audit_loses_a_slot_whose_record_moved_and_claims_it_again() -> None:
    c = core()
    c.step(Rebalance({ME: 1.0}, RingState()))
    own(c, 1, epoch=3)
    own(c, 2, epoch=3)
    c.table.fire(2, SlotEvent.RELEASE)  # being handed over: its record is not checked
    read = c.step(AuditDue()).read_records
    assert read == (1,)
    ready = c.step(OwnerRecords({1: ("sg/n2", 9)}))
    assert ready.losses == (1,)
    assert 1 in ready.claims and 2 not in ready.claims and 0 in ready.claims
    assert c.step(OwnerRecords({1: (ME, 3)})).losses == ()
    assert c.step(OwnerRecords({1: (ME, 4)})).losses == (1,)  # an older epoch of ours


def test_no_audit_outside_the_ring_or_while_draining() -> None:
    c = core()
    assert c.step(AuditDue()).read_records is None  # no ring yet
    c.step(Rebalance({"sg/n2": 1.0}, RingState()))
    assert c.step(AuditDue()).read_records is None
    c.step(Rebalance({ME: 1.0}, RingState()))
    c.draining = True
    assert c.step(AuditDue()).read_records is None
    assert not c.step(OwnerRecords({}))


def test_a_lost_lease_drops_everything_and_rejoins_unless_draining() -> None:
    c = core()
    c.step(Rebalance({ME: 1.0}, RingState()))
    own(c, 3)
    own(c, 4)
    assert c.step(LeaseLost()) == Ready(losses=(3, 4), rejoin=True)
    c.draining = True
    assert not c.step(LeaseLost())


def test_draining_places_the_ring_without_this_node_and_claims_nothing() -> None:
    c = core()
    c.draining = True
    ready = c.step(Rebalance(dict.fromkeys(NODES, 1.0), RingState()))
    assert not ready and c.ring is not None and ME not in c.ring.nodes
    assert c.step(HandedOver()).claims == () and not c.should_own(0)


def test_member_effects_connect_drop_count_failovers_and_ask_for_a_rebalance() -> None:
    c = core()
    ready = c.step(
        Members(
            (
                MemberUp("sg/n2", 4),
                MemberDown("sg/n3", DownReason.LEASE_EXPIRED, 2),
                MemberDown("sg/n2", DownReason.RESTARTED, 4),
                MemberUp("sg/n2", 7),
                MemberDown(ME, DownReason.LEASE_TIMEOUT, 1),
                MemberDown("sg/n4", DownReason.LEFT, 3),
            )
        )
    )
    # In order (a restart drops the old connection before making the new one); never
    # a connection to ourselves; only expired or silent leases are failovers.
    assert ready.peers == (
        ("sg/n2", True),
        ("sg/n3", False),
        ("sg/n2", False),
        ("sg/n2", True),
        ("sg/n4", False),
    )
    assert ready.failovers == 2 and ready.rebalance
    assert not c.step(Members((MemberSuspect("sg/n2"),)))  # suspicion moves nothing


def test_a_hand_over_ends_in_a_loss_unless_the_ring_gives_the_slot_back() -> None:
    c = core()
    c.step(Rebalance({ME: 1.0}, RingState()))
    c.step(Rebalance(dict.fromkeys(NODES, 1.0), RingState()))
    assert c.ring is not None
    mine, theirs = c.ring.slots_of(ME)[0], c.ring.slots_of("sg/n2")[0]
    assert c.step(ReleaseEnded((mine, theirs))).losses == (theirs,)
    c.draining = True
    assert c.step(ReleaseEnded((mine, theirs))).losses == (mine, theirs)


# -- a walk of event sequences: the edge modelled by a few lines, the invariants checked


@dataclass
class Edge:
    """Carries a Ready out the way cluster/region does, minus the I/O."""

    c: OwnershipCore = field(default_factory=core)
    now: float = 0.0
    handing_over: tuple[int, ...] | None = None
    epochs: int = 0
    records: dict[int, tuple[str, int]] = field(default_factory=dict)

    @property
    def t(self) -> SlotTable:
        return self.c.table

    def serving(self) -> set[int]:
        return {s for s in self.t.owned if s not in self.t.releasing}

    def carry(self, ready: Ready) -> None:
        for s in ready.losses:
            self.t.fire(s, SlotEvent.LOSE)
            assert s not in self.serving()
        for s in ready.releases:
            self.t.fire(s, SlotEvent.RELEASE)
            assert s not in self.serving()  # a released slot is not served
        if ready.replicas is not None:
            self.t.set_replicas(ready.replicas)
        assert len(set(ready.claims)) == len(ready.claims)
        for s in ready.claims:
            # Never two claims of one slot at once, never a claim of what we own.
            assert s not in self.t.claiming and s not in self.t.owned
            assert self.c.should_own(s) and not self.c.draining
            self.t.fire(s, SlotEvent.CLAIM)
        for s in ready.joins:
            assert s in self.t.claiming

    def rebalance(self, live: tuple[str, ...]) -> None:
        if self.handing_over is not None:
            return  # one rebalance at a time (the edge's lock)
        ready = self.c.step(Rebalance(dict.fromkeys(live, 1.0), RingState()))
        self.carry(ready)
        self.handing_over = ready.releases

    def handed_over(self) -> None:
        if self.handing_over is None:
            return
        for s in self.handing_over:
            self.t.fire(s, SlotEvent.RELEASE_ENDED)
        self.carry(self.c.step(ReleaseEnded(self.handing_over)))
        self.handing_over = None
        self.carry(self.c.step(HandedOver()))

    def claim_ends(self, pick: int, ok: bool) -> None:
        claiming = sorted(self.t.claiming)
        if not claiming:
            return
        s = claiming[pick % len(claiming)]
        if ok and self.c.should_own(s):
            self.epochs += 1
            self.t.fire(s, SlotEvent.CLAIMED, epoch=self.epochs)
            self.records[s] = (ME, self.epochs)
        self.t.fire(s, SlotEvent.CLAIM_ENDED)
        assert s not in self.t.claiming

    def fenced(self, pick: int) -> None:
        owned = sorted(self.t.owned)
        if owned:
            self.records[owned[pick % len(owned)]] = ("sg/n2", 10_000)

    def tick(self, dt: float) -> None:
        self.now += dt
        if not self.c.step(Tick(self.now)).audit:
            return
        assert not self.c.draining
        read = self.c.step(AuditDue()).read_records
        if read is None:
            return
        assert not set(read) & set(self.t.releasing)
        seen = {s: self.records.get(s, ("", 0)) for s in read}
        ready = self.c.step(OwnerRecords(seen))
        for s in ready.losses:
            assert seen[s] != (ME, self.t.owned[s])
        self.carry(ready)

    def lease_lost(self) -> None:
        ready = self.c.step(LeaseLost())
        self.carry(ready)
        if not self.c.draining:
            assert ready.rejoin and not self.t.owned

    def check(self) -> None:
        states = self.t.states()
        assert not set(self.t.claiming) & set(self.t.owned)
        assert set(self.t.releasing) <= set(self.t.owned)
        for s, st_ in states.items():
            assert (s in self.t.claiming) == (st_ is SlotState.CLAIMING)
        if self.c.draining:
            assert not self.c.mine()


live_sets = st.sampled_from([(ME,), NODES, NODES[:2], (ME, NODES[2]), NODES[1:]])
steps = st.lists(
    st.one_of(
        st.tuples(st.just("rebalance"), live_sets),
        st.tuples(st.just("handed_over"), st.none()),
        st.tuples(st.just("claim_ends"), st.tuples(st.integers(0, 31), st.booleans())),
        st.tuples(st.just("fenced"), st.integers(0, 31)),
        st.tuples(st.just("tick"), st.sampled_from([0.25, 0.5, 1.0, 2.0])),
        st.tuples(st.just("lease_lost"), st.none()),
        st.tuples(st.just("drain"), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_event_sequences_keep_the_invariants(script: list[tuple[str, object]]) -> None:
    e = Edge()
    for name, arg in script:
        if name == "rebalance":
            assert isinstance(arg, tuple)
            e.rebalance(arg)
        elif name == "handed_over":
            e.handed_over()
        elif name == "claim_ends":
            assert isinstance(arg, tuple)
            e.claim_ends(*arg)
        elif name == "fenced":
            assert isinstance(arg, int)
            e.fenced(arg)
        elif name == "tick":
            assert isinstance(arg, float)
            e.tick(arg)
        elif name == "lease_lost":
            e.lease_lost()
        else:
            e.c.draining = True
        e.check()
    # Quiet at the end: hand-overs end, every claim succeeds, the audit runs: the node
    # then serves exactly what the ring gives it.
    e.handed_over()
    while e.t.claiming:
        e.claim_ends(0, ok=True)
    e.tick(5.0)  # arms the audit timer if nothing did yet
    e.tick(5.0)
    while e.t.claiming:
        e.claim_ends(0, ok=True)
    e.check()
    if e.c.ring is not None and not e.c.draining:
        assert e.serving() == set(e.c.mine())
