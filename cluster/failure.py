"""The failure detector: which peers of a region are alive, suspect, dead or gone.

Everything that decides a peer's state lives in this module, and every transition sits in
one table, :data:`TRANSITIONS` (the spirit of h11's ``_state.py``). The detector is pure:
the edge feeds it facts as they happen (:meth:`FailureDetector.observe`) with the current
monotonic time, and carries out what it returns (``MemberUp``, ``MemberDown`` …). It also
says when to call back (:meth:`FailureDetector.next_deadline`) with a :class:`Tick`.

Two sources of evidence, weighed differently (DESIGN.md, "Membership and failure"):

* **The lease** in the region's Redis (``SET … PX``, renewed every second, carrying the
  node's epoch) is the authority. Only its loss — Redis's expiry notification
  (:class:`LeaseExpired`), or no renewal seen for ``dead_after_s`` — or a graceful
  :class:`Left` makes a peer DEAD or LEFT, and only DEAD or LEFT moves slots.
* **Mesh pings** see a stalled reactor or a cut link early, but prove nothing about
  fencing, so ping silence only makes a peer SUSPECT: it stays in the ring (``live()``)
  and keeps its slots; an answer clears the suspicion.

Epochs fence incarnations. A peer declared DEAD or LEFT at epoch ``e`` comes back only
with a lease of an epoch above ``e`` (a restart, a rejoin); a renewal of ``e`` or below is
an old process's late write and is ignored. A higher epoch while the peer is still
ALIVE means it restarted before its lease ran out: the old incarnation is reported down
(``restarted``), the new one up.

Time must not go backwards between calls; it raises :class:`MembershipError`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cluster.errors import DetectorConfigError, MembershipError

DEFAULT_LEASE_TTL_S = 3.0
DEFAULT_SUSPECT_AFTER_S = 1.5


class State(enum.Enum):
    """A peer's state as this node sees it."""

    ALIVE = "alive"
    SUSPECT = "suspect"  # pings unanswered; still in the ring
    DEAD = "dead"  # lease lost; its slots go to others
    LEFT = "left"  # left on purpose; its slots were handed over


LIVE_STATES: Final = frozenset({State.ALIVE, State.SUSPECT})


class Signal(enum.Enum):
    """What one event means for one peer, once epochs and deadlines are compared."""

    LEASE = "lease"  # a renewal of the epoch we know
    NEWER_LEASE = "newer_lease"  # a renewal of a higher epoch: a new incarnation
    STALE = "stale"  # a renewal or a leave of a lower epoch: an old incarnation
    LEASE_EXPIRED = "lease_expired"  # Redis expired the lease key
    LEASE_SILENT = "lease_silent"  # no renewal seen for dead_after_s
    LEFT = "left"  # the peer announced a graceful leave
    PING_ANSWERED = "ping_answered"
    PING_SILENT = "ping_silent"  # no ping answered for suspect_after_s


class Notice(enum.Enum):
    """Which effect a transition emits (the effect classes are below)."""

    UP = "up"
    DOWN = "down"
    SUSPECT = "suspect"
    ALIVE = "alive"


class DownReason(enum.StrEnum):
    LEASE_EXPIRED = "lease_expired"  # Redis said so
    LEASE_TIMEOUT = "lease_timeout"  # we saw no renewal in time
    LEFT = "left"  # graceful leave
    RESTARTED = "restarted"  # a higher epoch replaced a live incarnation


_A, _S, _D, _L = State.ALIVE, State.SUSPECT, State.DEAD, State.LEFT
_UP, _DOWN = Notice.UP, Notice.DOWN

# (state, signal) -> (next state, effects). ``None`` is a peer never seen: only a lease
# makes it known. The table is total over State x Signal; a test walks every entry.
TRANSITIONS: Final[Mapping[tuple[State | None, Signal], tuple[State, tuple[Notice, ...]]]] = {
    (None, Signal.NEWER_LEASE): (_A, (_UP,)),
    # ALIVE
    (_A, Signal.LEASE): (_A, ()),
    (_A, Signal.NEWER_LEASE): (_A, (_DOWN, _UP)),
    (_A, Signal.STALE): (_A, ()),
    (_A, Signal.LEASE_EXPIRED): (_D, (_DOWN,)),
    (_A, Signal.LEASE_SILENT): (_D, (_DOWN,)),
    (_A, Signal.LEFT): (_L, (_DOWN,)),
    (_A, Signal.PING_ANSWERED): (_A, ()),
    (_A, Signal.PING_SILENT): (_S, (Notice.SUSPECT,)),
    # SUSPECT: still owns its slots; only the lease decides
    (_S, Signal.LEASE): (_S, ()),
    (_S, Signal.NEWER_LEASE): (_A, (_DOWN, _UP)),
    (_S, Signal.STALE): (_S, ()),
    (_S, Signal.LEASE_EXPIRED): (_D, (_DOWN,)),
    (_S, Signal.LEASE_SILENT): (_D, (_DOWN,)),
    (_S, Signal.LEFT): (_L, (_DOWN,)),
    (_S, Signal.PING_ANSWERED): (_A, (Notice.ALIVE,)),
    (_S, Signal.PING_SILENT): (_S, ()),
    # DEAD: only a higher epoch brings it back
    (_D, Signal.LEASE): (_D, ()),
    (_D, Signal.NEWER_LEASE): (_A, (_UP,)),
    (_D, Signal.STALE): (_D, ()),
    (_D, Signal.LEASE_EXPIRED): (_D, ()),
    (_D, Signal.LEASE_SILENT): (_D, ()),
    (_D, Signal.LEFT): (_L, ()),
    (_D, Signal.PING_ANSWERED): (_D, ()),
    (_D, Signal.PING_SILENT): (_D, ()),
    # LEFT: a rejoin needs a higher epoch, like DEAD
    (_L, Signal.LEASE): (_L, ()),
    (_L, Signal.NEWER_LEASE): (_A, (_UP,)),
    (_L, Signal.STALE): (_L, ()),
    (_L, Signal.LEASE_EXPIRED): (_L, ()),
    (_L, Signal.LEASE_SILENT): (_L, ()),
    (_L, Signal.LEFT): (_L, ()),
    (_L, Signal.PING_ANSWERED): (_L, ()),
    (_L, Signal.PING_SILENT): (_L, ()),
}

# Why a peer went down, by the signal that took it down.
DOWN_REASONS: Final[Mapping[Signal, DownReason]] = {
    Signal.LEASE_EXPIRED: DownReason.LEASE_EXPIRED,
    Signal.LEASE_SILENT: DownReason.LEASE_TIMEOUT,
    Signal.LEFT: DownReason.LEFT,
    Signal.NEWER_LEASE: DownReason.RESTARTED,
}


# -- events: facts the edge observed


@dataclass(frozen=True, slots=True)
class LeaseRenewed:
    """The peer's lease was (re)written carrying ``epoch``: a join or a renewal."""

    node_id: str
    epoch: int
    now: float


@dataclass(frozen=True, slots=True)
class LeaseExpired:
    """Redis reported the peer's lease key expired (keyspace notification)."""

    node_id: str
    now: float


@dataclass(frozen=True, slots=True)
class Left:
    """The peer announced a graceful leave, after handing its slots over.

    ``epoch``, when given, is the leaving incarnation's; a leave from an older
    incarnation than the one known is ignored.
    """

    node_id: str
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class PingAnswered:
    node_id: str
    now: float


@dataclass(frozen=True, slots=True)
class PingMissed:
    """A mesh ping to the peer got no answer in time."""

    node_id: str
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: check every peer's deadlines."""

    now: float


Event = LeaseRenewed | LeaseExpired | Left | PingAnswered | PingMissed | Tick


# -- effects: what the edge must act on


@dataclass(frozen=True, slots=True)
class MemberUp:
    """A new incarnation joined: add ``node_id`` to the ring (its slots come by handoff)."""

    node_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class MemberDown:
    """The incarnation ``epoch`` of ``node_id`` is gone: take it off the ring.

    For ``lease_expired`` and ``lease_timeout`` its slots go to their replicas under a
    new epoch in each slot's owner record; for ``left`` they were handed over already;
    for ``restarted`` the ring keeps the node (a ``MemberUp`` follows) but its RAM is
    gone, so its slots are rebuilt from snapshots and logs.
    """

    node_id: str
    reason: DownReason
    epoch: int


@dataclass(frozen=True, slots=True)
class MemberSuspect:
    """Pings to ``node_id`` go unanswered. It keeps its slots; report it, move nothing."""

    node_id: str


@dataclass(frozen=True, slots=True)
class MemberAlive:
    """A suspect ``node_id`` answered again."""

    node_id: str


Effect = MemberUp | MemberDown | MemberSuspect | MemberAlive


# -- settings and pure time helpers


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Timeouts of the detector. ``dead_after_s`` defaults to ``lease_ttl_s``.

    ``dead_after_s`` counts from the last lease renewal the edge reported; set it to
    ``math.inf`` when the edge cannot see renewals and must rely on :class:`LeaseExpired`
    alone (Redis delivers expiry notifications late when nobody touches the key, and
    pub/sub drops them across a reconnect, so a finite timeout is the safer choice).
    """

    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    suspect_after_s: float = DEFAULT_SUSPECT_AFTER_S
    dead_after_s: float | None = None

    @property
    def dead_after(self) -> float:
        """Seconds without a renewal before a peer is declared dead."""
        return self.lease_ttl_s if self.dead_after_s is None else self.dead_after_s

    def validate(self) -> list[str]:
        """Every problem with these settings; empty when they hold together."""
        problems: list[str] = []
        for name in ("lease_ttl_s", "suspect_after_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive number of seconds, not {value}")
        if not self.dead_after > 0:  # inf is allowed: trust LeaseExpired alone
            problems.append(
                f"dead_after_s must be a positive number of seconds, not {self.dead_after}"
            )
        if problems:
            return problems
        if self.dead_after < self.lease_ttl_s:
            # Declaring a peer dead while its lease may still be valid would give its
            # slots away while it can still write them.
            problems.append(
                f"dead_after_s ({self.dead_after}) must be at least lease_ttl_s "
                f"({self.lease_ttl_s})"
            )
        if self.suspect_after_s > self.dead_after:
            problems.append(
                f"suspect_after_s ({self.suspect_after_s}) must not exceed dead_after_s "
                f"({self.dead_after})"
            )
        return problems


def remaining_s(since: float, after_s: float, now: float) -> float:
    """Seconds left before a silence that began at ``since`` lasts ``after_s``; 0 once it has.

    The pure half of a timeout (memberlist's ``remainingSuspicionTime``): the edge
    sleeps, the detector only compares.
    """
    return max(0.0, since + after_s - now)


@dataclass(slots=True)
class _Peer:
    state: State
    epoch: int
    lease_at: float  # last renewal of the current epoch
    heard_at: float  # last ping answered, or when this incarnation appeared


class FailureDetector:
    """Per-peer state for one node's view of its region.

    Feed every observed fact to :meth:`observe` and act on the effects it returns, in
    order. Call :meth:`observe` with a :class:`Tick` at :meth:`next_deadline` (or on a
    fixed beat). The edge must report every lease renewal it sees, not just joins: a
    peer with no renewal for ``dead_after_s`` is declared dead.
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config if config is not None else DetectorConfig()
        problems = self.config.validate()
        if problems:
            raise DetectorConfigError(problems)
        self._dead_after_s = self.config.dead_after
        self._peers: dict[str, _Peer] = {}
        self._now = -math.inf

    # -- queries

    def members(self) -> dict[str, State]:
        """Every peer ever seen and its state, sorted by node id."""
        return {n: self._peers[n].state for n in sorted(self._peers)}

    def live(self) -> set[str]:
        """The peers the ring is built from: ALIVE and SUSPECT (suspicion moves no slot)."""
        return {n for n, p in self._peers.items() if p.state in LIVE_STATES}

    def state(self, node_id: str) -> State | None:
        peer = self._peers.get(node_id)
        return None if peer is None else peer.state

    def epoch(self, node_id: str) -> int | None:
        """The epoch of the newest incarnation seen (for DEAD and LEFT: the one that went)."""
        peer = self._peers.get(node_id)
        return None if peer is None else peer.epoch

    def next_deadline(self) -> float | None:
        """The earliest time a :class:`Tick` can change something; ``None`` if no peer is live."""
        deadlines: list[float] = []
        for p in self._peers.values():
            if p.state in LIVE_STATES and math.isfinite(self._dead_after_s):
                deadlines.append(p.lease_at + self._dead_after_s)
            if p.state is State.ALIVE:
                deadlines.append(p.heard_at + self.config.suspect_after_s)
        return min(deadlines, default=None)

    # -- input

    def observe(self, event: Event) -> list[Effect]:
        """Apply one observed fact; return the effects to carry out, in order."""
        if isinstance(event, Tick):
            self._advance(event.now)
            out: list[Effect] = []
            for node_id in sorted(self._peers):
                signal = self._deadline_signal(self._peers[node_id], event.now)
                if signal is not None:
                    out.extend(self._apply(node_id, signal, None))
            return out
        if isinstance(event, Left):
            now = self._now
        else:
            now = event.now
            self._advance(now)
        peer = self._peers.get(event.node_id)
        signal = self._classify(peer, event, now)
        if signal is None:
            return []
        epoch = event.epoch if isinstance(event, LeaseRenewed | Left) else None
        return self._apply(event.node_id, signal, epoch)

    # -- the rules

    def _advance(self, now: float) -> None:
        if math.isnan(now) or now < self._now:
            raise MembershipError(f"time went backwards: {now} after {self._now}")
        self._now = now

    def _deadline_signal(self, peer: _Peer, now: float) -> Signal | None:
        # Asked of every peer; the table makes it a no-op for DEAD and LEFT.
        if remaining_s(peer.lease_at, self._dead_after_s, now) == 0.0:
            return Signal.LEASE_SILENT
        if remaining_s(peer.heard_at, self.config.suspect_after_s, now) == 0.0:
            return Signal.PING_SILENT
        return None

    def _classify(self, peer: _Peer | None, event: Event, now: float) -> Signal | None:
        if isinstance(event, LeaseRenewed):
            if peer is None or event.epoch > peer.epoch:
                return Signal.NEWER_LEASE
            return Signal.LEASE if event.epoch == peer.epoch else Signal.STALE
        if peer is None:
            return None  # only a lease makes a peer known
        if isinstance(event, LeaseExpired):
            return Signal.LEASE_EXPIRED
        if isinstance(event, Left):
            stale = event.epoch is not None and event.epoch < peer.epoch
            return Signal.STALE if stale else Signal.LEFT
        if isinstance(event, PingAnswered):
            return Signal.PING_ANSWERED
        if isinstance(event, PingMissed):
            return self._deadline_signal(peer, now)
        return None

    def _apply(self, node_id: str, signal: Signal, epoch: int | None) -> list[Effect]:
        """Look the transition up and carry it out; ``epoch`` is the event's, if any."""
        peer = self._peers.get(node_id)
        transition = TRANSITIONS.get((None if peer is None else peer.state, signal))
        if transition is None:
            return []
        next_state, notices = transition
        now = self._now
        gone_epoch = -1 if peer is None else peer.epoch
        if peer is None:
            if epoch is None:  # the table admits only a lease for an unknown peer
                raise MembershipError(f"{signal} cannot introduce {node_id!r}")
            peer = self._peers[node_id] = _Peer(next_state, epoch, now, now)
        elif signal is Signal.NEWER_LEASE and epoch is not None:
            peer.epoch = epoch
            peer.lease_at = peer.heard_at = now
        elif signal is Signal.LEASE and next_state in LIVE_STATES:
            peer.lease_at = now
        elif signal is Signal.PING_ANSWERED and next_state in LIVE_STATES:
            peer.heard_at = now
        elif signal is Signal.LEFT and epoch is not None:
            peer.epoch = max(peer.epoch, epoch)
        peer.state = next_state

        out: list[Effect] = []
        for notice in notices:
            if notice is Notice.UP:
                out.append(MemberUp(node_id, peer.epoch))
            elif notice is Notice.DOWN:
                # The incarnation that was up, even if the news came from a newer one.
                out.append(MemberDown(node_id, DOWN_REASONS[signal], gone_epoch))
            elif notice is Notice.SUSPECT:
                out.append(MemberSuspect(node_id))
            else:
                out.append(MemberAlive(node_id))
        return out
