"""The failure detector: every transition of its table, epochs, leases, pings, time."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.errors import ClusterError, DetectorConfigError, MembershipError
from cluster.failure import (
    DOWN_REASONS,
    TRANSITIONS,
    DetectorConfig,
    DownReason,
    Effect,
    Event,
    FailureDetector,
    LeaseExpired,
    LeaseRenewed,
    Left,
    MemberAlive,
    MemberDown,
    MemberSuspect,
    MemberUp,
    Notice,
    PingAnswered,
    PingMissed,
    Signal,
    State,
    Tick,
    remaining_s,
)
from tests.unit.test_boundaries import FORBIDDEN, imported

ROOT = Path(__file__).resolve().parents[3]
P = "sg/n2"
EPOCH = 5

# -- putting a peer in a state, and firing a signal at it

# Each setup leaves peer P in its state at t = 10 with its last lease renewal at t = 10
# (or, for SUSPECT, pings unanswered since t = 8).


def alive() -> FailureDetector:
    d = FailureDetector()
    d.observe(LeaseRenewed(P, EPOCH, 8.0))
    d.observe(LeaseRenewed(P, EPOCH, 10.0))
    d.observe(PingAnswered(P, 10.0))
    return d


def suspect() -> FailureDetector:
    d = FailureDetector()
    d.observe(LeaseRenewed(P, EPOCH, 8.0))
    d.observe(LeaseRenewed(P, EPOCH, 9.0))
    assert d.observe(PingMissed(P, 9.6)) == [MemberSuspect(P)]
    d.observe(LeaseRenewed(P, EPOCH, 10.0))
    return d


def dead() -> FailureDetector:
    d = alive()
    d.observe(LeaseExpired(P, 10.0))
    return d


def left() -> FailureDetector:
    d = alive()
    d.observe(Left(P))
    return d


SETUPS: dict[State | None, Callable[[], FailureDetector]] = {
    None: FailureDetector,
    State.ALIVE: alive,
    State.SUSPECT: suspect,
    State.DEAD: dead,
    State.LEFT: left,
}

# Events that mean each signal for a peer set up as above.
FIRES: dict[Signal, Event] = {
    Signal.LEASE: LeaseRenewed(P, EPOCH, 10.5),
    Signal.NEWER_LEASE: LeaseRenewed(P, EPOCH + 1, 10.5),
    Signal.STALE: LeaseRenewed(P, EPOCH - 1, 10.5),
    Signal.LEASE_EXPIRED: LeaseExpired(P, 10.5),
    Signal.LEASE_SILENT: Tick(13.0),  # 3 s after the last renewal
    Signal.LEFT: Left(P),
    Signal.PING_ANSWERED: PingAnswered(P, 10.5),
    Signal.PING_SILENT: Tick(11.6),  # > 1.5 s of ping silence, lease still fresh
}


def test_the_table_is_total() -> None:
    for state in State:
        for signal in Signal:
            assert (state, signal) in TRANSITIONS
    assert [k for k in TRANSITIONS if k[0] is None] == [(None, Signal.NEWER_LEASE)]
    # Every transition that reports a peer down says why.
    for (_, signal), (_, notices) in TRANSITIONS.items():
        if Notice.DOWN in notices:
            assert signal in DOWN_REASONS


@pytest.mark.parametrize(
    ("state", "signal"), list(TRANSITIONS), ids=lambda x: getattr(x, "name", "UNKNOWN")
)
def test_every_transition(state: State | None, signal: Signal) -> None:
    d = SETUPS[state]()
    assert d.state(P) is state
    if signal is Signal.PING_SILENT and state is State.ALIVE:
        d.observe(LeaseRenewed(P, EPOCH, 11.5))  # keep the lease fresh; pings stay silent
    effects = d.observe(FIRES[signal])
    next_state, notices = TRANSITIONS[(state, signal)]
    assert d.state(P) is next_state
    kinds = {
        Notice.UP: MemberUp,
        Notice.DOWN: MemberDown,
        Notice.SUSPECT: MemberSuspect,
        Notice.ALIVE: MemberAlive,
    }
    assert [type(e) for e in effects] == [kinds[n] for n in notices]
    for e in effects:
        if isinstance(e, MemberDown):
            assert e.reason == DOWN_REASONS[signal]
        if isinstance(e, MemberUp):
            assert e.epoch == d.epoch(P)


def test_unknown_peers_are_ignored_until_they_hold_a_lease() -> None:
    d = FailureDetector()
    for event in (
        PingAnswered(P, 1.0),
        PingMissed(P, 2.0),
        LeaseExpired(P, 3.0),
        Left(P),
        Tick(9.0),
    ):
        assert d.observe(event) == []
    assert d.members() == {} and d.live() == set()
    assert d.state(P) is None and d.epoch(P) is None
    assert d.observe(LeaseRenewed(P, 1, 10.0)) == [MemberUp(P, 1)]


# -- the promises


def test_lease_expiry_takes_a_peer_down() -> None:
    d = alive()
    assert d.observe(LeaseExpired(P, 10.2)) == [MemberDown(P, DownReason.LEASE_EXPIRED, EPOCH)]
    assert d.live() == set() and d.members() == {P: State.DEAD}


def test_no_renewal_for_the_lease_ttl_takes_a_peer_down() -> None:
    d = alive()
    d.observe(PingAnswered(P, 12.9))
    assert d.observe(Tick(12.99)) == []
    assert d.next_deadline() == 13.0
    assert d.observe(Tick(13.0)) == [MemberDown(P, DownReason.LEASE_TIMEOUT, EPOCH)]
    assert d.observe(Tick(100.0)) == []


def test_left_takes_a_peer_down_at_once() -> None:
    d = alive()
    (down,) = d.observe(Left(P))
    assert down == MemberDown(P, DownReason.LEFT, EPOCH)
    assert down.reason == "left"
    assert d.members() == {P: State.LEFT} and d.live() == set()


def test_suspicion_never_takes_a_peer_down() -> None:
    d = alive()
    effects: list[Effect] = []
    now = 10.0
    while now < 70.0:  # a minute of unanswered pings, leases renewed every second
        now += 0.5
        effects += d.observe(PingMissed(P, now))
        if now % 1.0 == 0:
            effects += d.observe(LeaseRenewed(P, EPOCH, now))
        effects += d.observe(Tick(now))
        assert P in d.live()
    assert effects == [MemberSuspect(P)]
    assert d.observe(PingAnswered(P, now)) == [MemberAlive(P)]
    assert d.state(P) is State.ALIVE


def test_one_missed_ping_is_not_yet_suspicion() -> None:
    d = alive()
    assert d.observe(PingMissed(P, 11.0)) == []
    assert d.state(P) is State.ALIVE
    assert d.observe(PingMissed(P, 11.5)) == [MemberSuspect(P)]


@pytest.mark.parametrize("setup", [dead, left], ids=["dead", "left"])
def test_a_stale_epoch_is_not_resurrected(setup: Callable[[], FailureDetector]) -> None:
    d = setup()
    for epoch in (EPOCH, EPOCH - 1, 0):
        assert d.observe(LeaseRenewed(P, epoch, 11.0)) == []
    assert d.observe(PingAnswered(P, 11.0)) == []
    assert d.observe(Tick(11.0)) == []
    assert P not in d.live()
    assert d.observe(LeaseRenewed(P, EPOCH + 1, 12.0)) == [MemberUp(P, EPOCH + 1)]
    assert d.live() == {P} and d.epoch(P) == EPOCH + 1


def test_a_restart_within_the_lease_reports_the_old_incarnation_down() -> None:
    d = alive()
    assert d.observe(LeaseRenewed(P, EPOCH + 3, 11.0)) == [
        MemberDown(P, DownReason.RESTARTED, EPOCH),
        MemberUp(P, EPOCH + 3),
    ]
    assert d.live() == {P}
    # The old process's late renewal changes nothing.
    assert d.observe(LeaseRenewed(P, EPOCH, 11.5)) == []
    assert d.epoch(P) == EPOCH + 3


def test_a_leave_from_an_older_incarnation_is_ignored() -> None:
    d = alive()
    d.observe(LeaseRenewed(P, EPOCH + 1, 11.0))
    assert d.observe(Left(P, epoch=EPOCH)) == []
    assert d.state(P) is State.ALIVE
    assert d.observe(Left(P, epoch=EPOCH + 1)) == [MemberDown(P, DownReason.LEFT, EPOCH + 1)]


def test_a_leave_names_the_epoch_that_left() -> None:
    d = alive()
    d.observe(Left(P, epoch=EPOCH + 2))  # it restarted and left before we saw it
    assert d.epoch(P) == EPOCH + 2
    assert d.observe(LeaseRenewed(P, EPOCH + 2, 11.0)) == []
    assert d.observe(LeaseRenewed(P, EPOCH + 3, 11.0)) == [MemberUp(P, EPOCH + 3)]


def test_members_and_live() -> None:
    d = FailureDetector()
    for i, n in enumerate(["sg/a", "sg/b", "sg/c", "sg/d"]):
        d.observe(LeaseRenewed(n, 1, float(i)))
    d.observe(PingAnswered("sg/a", 3.0))
    d.observe(PingAnswered("sg/b", 3.0))
    d.observe(LeaseRenewed("sg/a", 1, 3.0))
    d.observe(LeaseRenewed("sg/b", 1, 3.0))
    d.observe(LeaseExpired("sg/c", 3.0))
    d.observe(Left("sg/d"))
    effects = d.observe(Tick(4.6))  # sg/a and sg/b: pings silent for 1.6 s
    assert effects == [MemberSuspect("sg/a"), MemberSuspect("sg/b")]
    d.observe(PingAnswered("sg/b", 4.7))
    assert d.members() == {
        "sg/a": State.SUSPECT,
        "sg/b": State.ALIVE,
        "sg/c": State.DEAD,
        "sg/d": State.LEFT,
    }
    assert d.live() == {"sg/a", "sg/b"}


def test_next_deadline() -> None:
    d = FailureDetector()
    assert d.next_deadline() is None
    d.observe(LeaseRenewed(P, 1, 10.0))
    assert d.next_deadline() == 11.5  # suspicion first
    d.observe(Tick(11.5))
    assert d.next_deadline() == 13.0  # then the lease
    d.observe(Tick(13.0))
    assert d.next_deadline() is None


def test_an_infinite_dead_after_trusts_redis_alone() -> None:
    d = FailureDetector(DetectorConfig(dead_after_s=math.inf))
    d.observe(LeaseRenewed(P, 1, 0.0))
    assert d.observe(Tick(1e6)) == [MemberSuspect(P)]
    assert d.next_deadline() is None and d.live() == {P}
    assert d.observe(LeaseExpired(P, 1e6))[0].reason == DownReason.LEASE_EXPIRED  # type: ignore[union-attr]


def test_remaining_s() -> None:
    assert remaining_s(10.0, 1.5, 10.0) == 1.5
    assert remaining_s(10.0, 1.5, 11.0) == 0.5
    assert remaining_s(10.0, 1.5, 12.0) == 0.0


# -- misuse


def test_time_must_not_go_backwards() -> None:
    d = alive()
    with pytest.raises(MembershipError):
        d.observe(Tick(9.0))
    with pytest.raises(MembershipError):
        d.observe(PingAnswered(P, math.nan))
    assert d.observe(Tick(10.0)) == []  # the same instant again is fine


def test_bad_config_lists_every_problem() -> None:
    with pytest.raises(DetectorConfigError) as e:
        FailureDetector(DetectorConfig(lease_ttl_s=0, suspect_after_s=-1, dead_after_s=math.nan))
    assert len(e.value.problems) == 3 and isinstance(e.value, ClusterError)
    assert DetectorConfig(lease_ttl_s=3, dead_after_s=2).validate() == [
        "dead_after_s (2) must be at least lease_ttl_s (3)"
    ]
    assert len(DetectorConfig(suspect_after_s=5).validate()) == 1
    assert DetectorConfig().validate() == []
    assert DetectorConfig().dead_after == 3.0


# -- any sequence of events


peers = st.sampled_from(["sg/a", "sg/b", "sg/c"])
epochs = st.integers(0, 4)
# Each step makes its event once it knows the time.
steps: st.SearchStrategy[Callable[[float], Event]] = st.one_of(
    st.builds(lambda n, e: lambda now: LeaseRenewed(n, e, now), peers, epochs),
    st.builds(lambda n: lambda now: LeaseExpired(n, now), peers),
    st.builds(lambda n, e: lambda now: Left(n, e), peers, st.none() | epochs),
    st.builds(lambda n: lambda now: PingAnswered(n, now), peers),
    st.builds(lambda n: lambda now: PingMissed(n, now), peers),
    st.just(Tick),
)
REASONS = {
    LeaseExpired: {DownReason.LEASE_EXPIRED},
    Left: {DownReason.LEFT},
    LeaseRenewed: {DownReason.RESTARTED},
    Tick: {DownReason.LEASE_TIMEOUT},
    PingMissed: {DownReason.LEASE_TIMEOUT},
}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 2.0), steps), max_size=40))
def test_effects_track_live_members(script: list[tuple[float, Callable[[float], Event]]]) -> None:
    d = FailureDetector()
    now = 0.0
    up: dict[str, int] = {}  # the live incarnations, as the effects told them
    highest: dict[str, int] = {}
    for gap, make in script:
        now += gap
        event = make(now)
        for effect in d.observe(event):
            if isinstance(effect, MemberUp):
                assert effect.node_id not in up
                # An incarnation comes up once: epochs only grow.
                assert effect.epoch > highest.get(effect.node_id, -1)
                up[effect.node_id] = highest[effect.node_id] = effect.epoch
            elif isinstance(effect, MemberDown):
                assert up.pop(effect.node_id) == effect.epoch
                assert effect.reason in REASONS[type(event)]
            else:
                assert effect.node_id in up  # suspicion comes and goes while live
        assert set(up) == d.live()
        assert all(d.epoch(n) == e for n, e in up.items())


def test_failure_is_pure_core() -> None:
    names = imported(ROOT / "cluster/failure.py")
    assert not {n for n in names if n.split(".")[0] in FORBIDDEN}
    assert {n for n in names if n.split(".")[0] in ("relay", "cluster")} <= {"cluster.errors"}
