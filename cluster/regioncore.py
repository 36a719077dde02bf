"""The region node as one pure core, stepped like etcd raft's ``RawNode``: the edge
(:mod:`cluster.region`) reads a socket or Redis, makes an event, calls
:meth:`RegionCore.step` and carries out the :class:`Ready` it returns.

:class:`RegionCore` composes the pure cores: ownership and timers
(:class:`cluster.ownership.OwnershipCore`, whose events it passes through), the slot
table, positions and the chain check (:mod:`cluster.positions`), who subscribes where
(:mod:`cluster.interest`), the node's store and dedupe (:class:`relay.node.Node`), the
publish decision (:mod:`relay.publish`) and the batcher (:mod:`relay.batch`). It does no
I/O and reads no clock: times come in with the events.

Events and what their Ready asks for::

    Publish / Ack / Subscribe   a client's op here (``peer`` empty) or a peer's over the
                                mesh: replies (now), appends (batches cut full), changed,
                                deliver; or a forward to the owner; or a coded refusal
    Unsubscribe                 interest (tell the owner we have no subscriber left)
    Answered(forward, …)        the owner's reply to our forward: replies
    MeshDeliver / MeshInterest  a peer's delivery (fan_out) or interest; refused (bad input)
    AppendDone(slot, id, …)     an entry is in the log: answers (the waiters on it)
    NotAppended(entry, failed)  it cannot be: retry (and own.claims: take the slot back)
                                if the ring gives us the slot, else answers (failed)
    Confirmed(slots)            a link's confirmation: answers (``ack=remote``)
    LogRead(origin, entries)    entries read from a log or a mirror: applies (in order,
                                positions advanced), skipped ones, and gaps as catch_ups
                                (rebuild from the checkpoint) or resyncs (an owned slot's
                                mirror: merge the checkpoint)
    Tick(now)                   answers (``ack=remote`` waits expired) and ``own``
    CheckpointDue(now)          checkpoints (changed slots not being handed over), due_at
                                (step it again then: a fixed cadence)
    CheckpointStart(slot)       checkpoints (``(slot,)``: write it now, it is no longer
                                dirty) or nothing (not owned, no position to cover)
    CheckpointWritten(slot, …)  trims (the log behind the checkpoint and the links, the
                                mirrors up to what it covers)
    CheckpointFailed(slot)      nothing (the slot is due again next round)
    SnapshotDue(now, budget, …) snapshots (slots due, oldest change first, within budget)
    SnapshotStart(slot, now)    snapshots (``(slot,)``: capture it now) or nothing (not
                                held: forgotten)
    SnapshotWritten / Failed    nothing (written: clean; failed: dirty from its oldest change)
    Resubscribe(ch, since, …)   a local channel's owner moved: ``resubscribe`` (ask the new
                                owner, or wait and step it again; None: done) or replay
                                (we own it now: its pending messages to our subscribers)
    Registered(ch, owner, …)    the owner's answer to that ``sub``: replay
    ReleaseWait(slot, since, …) a claim waiting for the old owner's hand-over: claim (read
                                the owner record, wait, or fence it now)
    ClaimFenced(slot, attempts) a claim lost a race: claim (try again) or nothing (give up)
    the ownership events        ``own``: the ownership core's Ready (cluster/ownership.py)

A reply token (``reply``) is the edge's callback ``reply(result, code, reason)``; the core
never calls it, it only names it in ``replies``. Waiters (:class:`PubWaiter`) wait in the
batcher for their append, or here for a link; ``answers`` name them with the level
reached (None: failed) and :meth:`PubWaiter.settle` turns that into their one reply.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol

from cluster import ownership
from cluster.chain import Chained, parse_id
from cluster.interest import Interest
from cluster.meshops import MeshPub, parse_delivery, parse_sub
from cluster.ownership import OwnershipCore
from cluster.persist import Persistence, Trim
from cluster.positions import Positions, Tombstones
from cluster.ring import slot_of
from cluster.slots import SlotTable
from relay.batch import AppendToLog, Batcher, ack_events
from relay.errors import Code
from relay.frames import BadObject
from relay.node import Accepted, Node
from relay.publish import Wait, plan_pub, puback_fields
from relay.store import Message

REMOTE_WAIT_S: Final = 30.0  # an ack=remote publish no link confirmed by then: unavailable
NOT_CONFIRMED: Final = (
    f"no other region confirmed it within {REMOTE_WAIT_S:g} s (a link is cut or behind); "
    "it is logged here: publish it again with the same id to wait again"
)
RESUBSCRIBE_S: Final = 15.0  # a re-subscription gives up after this long
RESUBSCRIBE_POLL_S: Final = 0.1  # and asks again this often (the new owner is claiming)
RELEASE_GRACE_S: Final = 1.0  # a claim waits a lease's time and this for a hand-over
RELEASE_POLL_S: Final = 0.02  # reading the owner record again this often meanwhile
CLAIM_ATTEMPTS: Final = 10  # a claim fenced this many times in a row gives up

Reply = Callable[[Any, Code | None, str], None]


def message_fields(m: Message) -> list[Any]:
    return [m.id, m.ch, m.sender, m.hlc, m.origin, m.body, m.expires_ms]


def fields_message(f: list[Any]) -> Message:
    return Message(str(f[0]), str(f[1]), str(f[2]), int(f[3]), str(f[4]), bytes(f[5]), int(f[6]))


@dataclass(slots=True, eq=False)
class PubWaiter:
    """A ``pub`` (or an ``ack``) waiting for its slot-log append (and, for ``remote``,
    for a link to confirm that another region holds it) before it is answered.

    ``reply`` and ``acc`` (a pub's) or ``n`` (an ack's) make its answer; ``done``, when
    set instead, is called with the level reached (None: failed)."""

    done: Callable[[str | None], None] | None = None
    level: str = "log"
    since: float = 0.0
    failed: str = ""  # set before a failure that is a bug, not a move
    reply: Reply | None = None
    acc: Accepted | None = None
    n: int = 0
    moved: str = ""  # the reason given when it fails (the slot moved, no confirmation)

    def answer(self, level: str | None) -> tuple[Any, Code | None, str]:
        """The reply's ``(result, code, reason)`` once ``level`` is reached (None: failed)."""
        if level is None:
            if self.failed:
                return None, Code.INTERNAL, self.failed
            return None, Code.UNAVAILABLE, self.moved
        if self.acc is not None:
            return puback_fields(self.acc, level), None, ""
        return self.n, None, ""

    def settle(self, level: str | None) -> None:
        """Answer (the edge calls this for each of a Ready's ``answers``)."""
        if self.done is not None:
            self.done(level)
        elif self.reply is not None:
            self.reply(*self.answer(level))


def failure_answer(w: PubWaiter | None, moved: str) -> tuple[Code, str]:
    """The code and reason a failed waiter is answered with: ``internal`` when its entry
    could not be encoded, else ``unavailable`` (the slot moved; retry)."""
    if w is not None and w.failed:
        return Code.INTERNAL, w.failed
    return Code.UNAVAILABLE, moved


class LogEntry(Chained, Protocol):
    """An entry read from a slot log or a mirror (``TailEntry`` of cluster/slotlog/)."""

    @property
    def data(self) -> bytes: ...


# -- events in (named tuples: the hot path makes one per op, and a frozen dataclass's
# __init__ costs three times as much)


class Publish(NamedTuple):
    """A ``pub`` (its arguments checked): a client's here (``peer`` empty) or one a peer
    forwarded to us."""

    p: MeshPub
    reply: Reply
    now_ms: int  # the wall clock
    now: float  # the monotonic clock
    fresh: bool  # the edge's lease is surely still ours
    peer: str = ""


class Ack(NamedTuple):
    ch: str
    ids: list[str]
    reply: Reply
    now_ms: int
    fresh: bool
    peer: str = ""


class Subscribe(NamedTuple):
    """A client's ``sub`` here (``handle``), or a peer's registration (``peer``)."""

    ch: str
    handle: Hashable
    reply: Reply
    now_ms: int
    fresh: bool
    peer: str = ""


class Unsubscribe(NamedTuple):
    ch: str
    handle: Hashable


class Forward(NamedTuple):
    """Effect: send ``op`` to the channel's owner; step :class:`Answered` with its reply
    (``at_once``: in the same turn as the reply frame, before what follows on it)."""

    owner: str
    op: str
    ch: str
    args: dict[str, Any]
    reply: Reply
    handle: Hashable = None
    at_once: bool = False


class Answered(NamedTuple):
    """The owner's reply to a :class:`Forward` (``code`` set: refused or unreachable)."""

    forward: Forward
    result: Any
    code: Code | None
    reason: str


class MeshDeliver(NamedTuple):
    peer: str
    ch: str
    fields: list[Any]


class MeshInterest(NamedTuple):
    peer: str
    ch: str
    on: bool


class AppendDone(NamedTuple):
    """An entry (``batch_id``) of ``slot`` is in the log at ``entry_id``."""

    slot: int
    batch_id: int
    entry_id: str
    waiters: tuple[Hashable, ...]
    now: float


class NotAppended(NamedTuple):
    """An entry that cannot be appended under our epoch (the slot is not ours now, or
    fenced and lost), or, with ``failed``, one the codec refused (a bug: that reason)."""

    entry: AppendToLog
    failed: str = ""


class Confirmed(NamedTuple):
    """A link announced the newest entries of these slots its destination holds."""

    slots: Mapping[int, str]


class LogRead(NamedTuple):
    """Entries read from the slots' logs (``origin`` empty) or our mirrors of
    ``origin``'s, oldest first per slot. ``skip``: slots the edge leaves alone now (owned,
    being rebuilt); ``deliver``: deliver what an owned slot's entries add (mirrors)."""

    origin: str
    entries: Sequence[LogEntry]
    skip: frozenset[int] = frozenset()
    deliver: bool = False


class CheckpointDue(NamedTuple):
    """The checkpoint loop's timer (monotonic ``now``)."""

    now: float


class CheckpointStart(NamedTuple):
    """About to checkpoint ``slot`` (a round's, or a hand-over's) at ``now``."""

    slot: int
    now: float


class CheckpointWritten(NamedTuple):
    """``slot``'s checkpoint covering ``covers`` (and ``mirrors``: origin → position) is
    written. ``links``: each link's confirmed position for the slot and the first log
    entry after it (None where the link is not behind the checkpoint); None: not known."""

    slot: int
    covers: str
    mirrors: Mapping[str, str]
    links: Sequence[tuple[str, str | None]] | None
    now_ms: int


class CheckpointFailed(NamedTuple):
    slot: int


class SnapshotDue(NamedTuple):
    """The snapshot loop's tick: at most ``budget`` writes in flight; ``every``: every
    changed slot, not only those due (a graceful stop)."""

    now: float
    budget: int
    every: bool = False


class SnapshotStart(NamedTuple):
    """About to capture ``slot``'s snapshot (one the last :class:`SnapshotDue` named)."""

    slot: int
    now: float


class SnapshotWritten(NamedTuple):
    slot: int
    now: float


class SnapshotFailed(NamedTuple):
    slot: int


class Resubscribe(NamedTuple):
    """Register ``ch`` (locally subscribed) again with its owner, which moved: the first
    step (``start``) of a re-subscription begun at ``since``, or the next one, after the
    wait it asked for or the request to ``asked`` it asked for (``ok``: answered)."""

    ch: str
    since: float
    now: float
    now_ms: int
    fresh: bool
    start: bool = False
    asked: str = ""
    ok: bool = False


class ReleaseWait(NamedTuple):
    """A claim of ``slot``, begun at ``since``, gives its old owner time to hand it over
    (flush, checkpoint, release) before fencing it. ``read``: the owner record was just
    read — ``holder`` the node it names ("" none; None: the read failed), ``live``
    whether the failure detector has that node live."""

    slot: int
    since: float
    now: float
    read: bool = False
    holder: str | None = None
    live: bool = False


class ClaimFenced(NamedTuple):
    """A claim of ``slot`` lost a race for the owner record, ``attempts`` times so far."""

    slot: int
    attempts: int


class Registered(NamedTuple):
    """``owner`` answered our re-subscription's ``sub`` with ``pending`` (message fields),
    stepped in the same turn as the reply frame: deliveries after it follow these."""

    ch: str
    owner: str
    pending: Sequence[list[Any]]


Event = (
    Publish
    | Ack
    | Subscribe
    | Unsubscribe
    | Answered
    | MeshDeliver
    | MeshInterest
    | AppendDone
    | NotAppended
    | Confirmed
    | LogRead
    | CheckpointDue
    | CheckpointStart
    | CheckpointWritten
    | CheckpointFailed
    | SnapshotDue
    | SnapshotStart
    | SnapshotWritten
    | SnapshotFailed
    | Resubscribe
    | Registered
    | ReleaseWait
    | ClaimFenced
    | ownership.Event
)


# -- what to carry out

_NO_OWN: Final = ownership.Ready()


class Resub(NamedTuple):
    """A re-subscription of ``ch`` goes on: send our ``sub`` to ``ask`` (then step
    :class:`Registered` with its answer, and :class:`Resubscribe` with the outcome), or
    wait ``wait_s`` and step :class:`Resubscribe` again; ``gave_up``: it ends unregistered."""

    ch: str
    ask: str = ""
    wait_s: float = 0.0
    gave_up: bool = False


class ClaimStep(NamedTuple):
    """A claim of ``slot`` goes on: ``read`` the owner record (then step
    :class:`ReleaseWait` with it), or wait ``wait_s`` (then step it again), or ``fence``:
    stop waiting and claim the slot (again, after :class:`ClaimFenced`)."""

    slot: int
    read: bool = False
    wait_s: float = 0.0
    fence: bool = False


class Ready(NamedTuple):
    """What the edge carries out after a step, in this order: replies, answers, appends,
    changed, deliver, fan_out, forward, interest; applies then catch_ups and resyncs;
    ``own`` as the ownership core's Ready says; checkpoints, trims and snapshots (each
    write reported back with its event)."""

    replies: tuple[tuple[Reply, Any, Code | None, str], ...] = ()
    answers: tuple[tuple[PubWaiter, str | None], ...] = ()
    appends: tuple[AppendToLog, ...] = ()  # cut full: the group commit's next append
    changed: int = -1  # this slot's pending state changed (checkpoint, snapshot due)
    deliver: Message | None = None  # to local subscribers and interested peers
    fan_out: tuple[Message, tuple[Hashable, ...]] | None = None  # to these local handles
    forward: Forward | None = None
    interest: tuple[str, str, bool] | None = None  # (owner, ch, on): tell the owner
    refused: str = ""  # a peer's bad input: count and log it
    applies: tuple[tuple[LogEntry, bool], ...] = ()  # (entry, deliver what it adds)
    skipped: int = 0  # entries at or behind our position: applied already
    catch_ups: tuple[int, ...] = ()  # gaps: rebuild these slots from their checkpoints
    resyncs: tuple[tuple[int, str], ...] = ()  # owned slots' mirror gaps: (slot, missing)
    retry: tuple[AppendToLog, ...] = ()  # append these again once the slot is claimed
    own: ownership.Ready = _NO_OWN
    checkpoints: tuple[int, ...] = ()  # write these slots' checkpoints, in order
    trims: tuple[Trim, ...] = ()  # after a checkpoint: its log and mirror trims
    snapshots: tuple[int, ...] = ()  # write these slots' snapshots, in order
    due_at: float = -1.0  # step CheckpointDue again at this time (monotonic)
    resubscribe: Resub | None = None  # a re-subscription's next step (None: over)
    replay: tuple[tuple[Message, ...], tuple[Hashable, ...]] | None = None  # fan these out
    claim: ClaimStep | None = None  # a claim's next step (None: it gives up)


_EMPTY: Final = Ready()
NO_OWNER: Final = "no owner for this channel right now"


@dataclass(slots=True, eq=False)
class RegionCore:
    """This node's decisions in its region; see the module's docstring. ``links``: there
    are links to other regions (``ack=remote`` waits for them); ``mesh_up``: a mesh to
    forward over. ``remote_waiters``: per slot, (entry id, waiter) until a link confirms
    the entry; ``confirmed``: per slot, the newest entry a link confirmed; ``persist``:
    which slots are due a checkpoint and a snapshot (cluster/persist.py);
    ``release_wait_s``: how long a claim waits for the old owner's hand-over."""

    me: str
    region: str
    node: Node
    batcher: Batcher
    ownership: OwnershipCore
    positions: Positions
    interest: Interest
    acks: Tombstones
    links: bool = False
    mesh_up: bool = False
    slot_channels: dict[int, set[str]] = field(default_factory=dict)
    remote_waiters: dict[int, list[tuple[tuple[int, int], PubWaiter]]] = field(default_factory=dict)
    confirmed: dict[int, tuple[int, int]] = field(default_factory=dict)
    persist: Persistence = field(default_factory=Persistence)
    release_wait_s: float = 10.0 + RELEASE_GRACE_S  # a lease's time and the grace

    table: SlotTable = field(init=False)  # the ownership core's
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        self.table = self.ownership.table
        self.slots = self.ownership.slots

    # -- views

    def owner_of(self, ch: str) -> str | None:
        ring = self.ownership.ring
        return None if ring is None else ring.owner(slot_of(ch, self.slots))

    def serving(self, slot: int, fresh: bool) -> bool:
        t = self.table
        return slot in t.owned and slot not in t.releasing and fresh and not self.ownership.draining

    # -- the step

    def step(self, ev: Event) -> Ready:
        handler = _HANDLERS.get(type(ev))
        if handler is not None:
            return handler(self, ev)
        if isinstance(ev, ownership.Tick):
            own = self.ownership.step(ev)
            expired = self._expire(ev.now)
            return Ready(answers=expired, own=own) if (own or expired) else _EMPTY
        return Ready(own=self.ownership.step(ev))  # type: ignore[arg-type]  # the rest

    # -- client and peer ops

    def _route(self, ch: str, peer: str, fresh: bool) -> tuple[int, str, str]:
        """``(slot, owner, why)``: served here when both are empty; ``owner``: forward a
        client's op to this peer; ``why``: the refusal."""
        slot = slot_of(ch, self.slots)
        if peer:  # a peer sent it here: served here or refused, never forwarded again
            if self.serving(slot, fresh):
                return slot, "", ""
            return slot, "", f"{self.me} does not serve slot {slot} now"
        ring = self.ownership.ring
        owner = None if ring is None else ring.owner(slot)
        if owner == self.me:
            return slot, "", "" if self.serving(slot, fresh) else f"slot {slot} is moving; retry"
        if owner is None or not self.mesh_up:
            return slot, "", NO_OWNER
        return slot, owner, ""

    def _publish(self, ev: Publish) -> Ready:
        p = ev.p
        slot, owner, why = self._route(p.ch, ev.peer, ev.fresh)
        if owner:
            args = {
                "ch": p.ch,
                "id": p.id,
                "body": p.body,
                "from": p.sender,
                "ttl_ms": p.ttl_ms,
                "ack": p.ack,
            }
            return Ready(forward=Forward(owner, "pub", p.ch, args, ev.reply))
        if why:
            if ev.peer:
                why = f"slot {slot} is moving; retry"
            return Ready(replies=((ev.reply, None, Code.UNAVAILABLE, why),))
        return self._publish_here(slot, ev)

    def _publish_here(self, slot: int, ev: Publish) -> Ready:
        """The owner's publish: dedupe, the plan, the batch, the reply or its waiter."""
        p, now = ev.p, ev.now_ms
        ch = p.ch
        acc = self.node.publish(ch, p.id, p.body, sender=p.sender, ttl_ms=p.ttl_ms, now_ms=now)
        plan = plan_pub(
            dup=acc.dup,
            ack=p.ack,
            logged=True,
            batch_busy=acc.dup and self.batcher.busy(slot),
            remote_known=acc.dup and self.links and slot in self.positions.log,
        )
        waiter = None
        replies: tuple[tuple[Reply, Any, Code | None, str], ...] = ()
        answers: tuple[tuple[PubWaiter, str | None], ...] = ()
        if plan.wait is Wait.NONE:
            replies = ((ev.reply, puback_fields(acc, plan.level), None, ""),)
        elif plan.wait is Wait.REMOTE:
            # A duplicate: confirmed once the slot's newest entry (at or after the first
            # copy's) is in another region.
            w = PubWaiter(reply=ev.reply, acc=acc, level="remote", moved=NOT_CONFIRMED)
            answers = self._logged(slot, self.positions.log[slot], w, ev.now)
        else:
            # Answered once the batch holding it (a duplicate: its first copy, which may
            # still be on its way to the log) is logged.
            moved = "the slot moved before {} logged".format(
                "it was" if acc.dup else "the message was"
            )
            waiter = PubWaiter(reply=ev.reply, acc=acc, level=plan.level, moved=moved)
        if not plan.log:
            if waiter is not None:
                self.batcher.add_waiter(slot, waiter, now)
            return Ready(replies=replies, answers=answers) if (replies or answers) else _EMPTY
        self.slot_channels.setdefault(slot, set()).add(ch)
        # One message: what the log holds is what is delivered.
        message = acc.message or Message(
            p.id, ch, p.sender, acc.hlc, acc.origin, p.body, now + p.ttl_ms
        )
        cut = self.batcher.add(slot, message, now, waiter)
        deliver = message if (acc.message is not None or ch in self.interest.peers) else None
        # Positional: replies, answers, appends, changed, deliver (the hot path's Ready).
        return Ready(replies, (), tuple(cut) if cut else (), slot, deliver)

    def _ack(self, ev: Ack) -> Ready:
        slot, owner, why = self._route(ev.ch, ev.peer, ev.fresh)
        if owner:
            return Ready(
                forward=Forward(owner, "ack", ev.ch, {"ch": ev.ch, "ids": ev.ids}, ev.reply)
            )
        if why:
            return Ready(replies=((ev.reply, None, Code.UNAVAILABLE, why),))
        # Answered once the ack is in the slot log: an acknowledged ack survives a crash
        # of this node (the message never comes back).
        now, ch, ids = ev.now_ms, ev.ch, ev.ids
        hlc = self.node.clock.tick(now)
        n = self.node.ack(ch, ids, now, hlc)
        cuts: list[AppendToLog] = []
        for e in ack_events(ch, ids, hlc, self.region):
            cut = self.batcher.add(slot, e, now)
            if cut:
                cuts.extend(cut)
        self.tombstone(slot, ch, ids, hlc, now)
        w = PubWaiter(reply=ev.reply, n=n, moved="the slot moved before the ack was logged")
        self.batcher.add_waiter(slot, w, now)
        return Ready(appends=tuple(cuts), changed=slot)

    def tombstone(self, slot: int, ch: str, ids: list[str], hlc: int, now_ms: int) -> None:
        # Only the dedupe window's worth matters (older ones dedupe nothing).
        cutoff = (now_ms - self.node.dedupe.window_ms) << 16
        self.acks.add(slot, ch, ids, hlc, cutoff_hlc=cutoff)

    def _subscribe(self, ev: Subscribe) -> Ready:
        _, owner, why = self._route(ev.ch, ev.peer, ev.fresh)
        ch = ev.ch
        if owner:
            return Ready(
                forward=Forward(owner, "sub", ch, {"ch": ch}, ev.reply, ev.handle, at_once=True)
            )
        if why:
            return Ready(replies=((ev.reply, None, Code.UNAVAILABLE, why),))
        if ev.peer:
            self.interest.add(ev.peer, ch)
            pending = [message_fields(m) for m in self.node.store.pending(ch, ev.now_ms)]
            return Ready(replies=((ev.reply, pending, None, ""),))
        self.interest.register(ch, self.me)
        return Ready(replies=((ev.reply, self.node.subscribe(ev.handle, ch, ev.now_ms), None, ""),))

    def _unsubscribe(self, ev: Unsubscribe) -> Ready:
        self.node.unsubscribe(ev.handle, ev.ch)
        if ev.ch in self.node.subscribers:
            return _EMPTY
        owner = self.interest.unregister(ev.ch)
        if owner is not None and owner != self.me and self.mesh_up:
            return Ready(interest=(owner, ev.ch, False))
        return _EMPTY

    def _answered(self, ev: Answered) -> Ready:
        f, result, code = ev.forward, ev.result, ev.code
        if code is not None:
            return Ready(replies=((f.reply, None, code, ev.reason),))
        if f.op == "ack":
            result = int(result)
        elif f.op == "sub":
            # Registered now, in the same turn as the reply: deliveries that follow on
            # this connection are exactly the messages after the pending ones.
            self.node.subscribers.setdefault(f.ch, set()).add(f.handle)
            self.interest.register(f.ch, f.owner)
            result = [fields_message(x) for x in result]
        return Ready(replies=((f.reply, result, None, ""),))

    def _mesh_deliver(self, ev: MeshDeliver) -> Ready:
        if not self.interest.follows(ev.ch, ev.peer):
            return _EMPTY  # from an owner we no longer follow for this channel
        local = self.node.subscribers.get(ev.ch)
        if not local:
            return _EMPTY
        try:
            message = parse_delivery(ev.ch, ev.fields)
        except BadObject as e:
            return Ready(refused=f"{ev.peer} delivered a bad message on {ev.ch!r}: {e.reason}")
        return Ready(fan_out=(message, tuple(local)))

    def _mesh_interest(self, ev: MeshInterest) -> Ready:
        if not ev.on:
            self.interest.remove(ev.peer, ev.ch)
            return _EMPTY
        try:
            parse_sub({"ch": ev.ch})
        except BadObject as e:
            return Ready(refused=f"{ev.peer}'s interest refused: {e.reason}")
        self.interest.add(ev.peer, ev.ch)
        return _EMPTY

    # -- appends and links

    def _append_done(self, ev: AppendDone) -> Ready:
        slot = ev.slot
        self.batcher.appended(ev.batch_id)
        log = self.positions.log
        if parse_id(ev.entry_id) > parse_id(log.get(slot, "0-0")):
            log[slot] = ev.entry_id  # never backwards
        answers: list[tuple[PubWaiter, str | None]] = []
        for w in ev.waiters:
            if isinstance(w, PubWaiter):
                answers.extend(self._logged(slot, ev.entry_id, w, ev.now))
        return Ready(answers=tuple(answers)) if answers else _EMPTY

    def _not_appended(self, ev: NotAppended) -> Ready:
        e = ev.entry
        if not ev.failed and self.ownership.should_own(e.slot):
            # Another node claimed it under an older view of the ring: take it back and
            # append the same entry under the new epoch.
            claims = () if e.slot in self.table.claiming else (e.slot,)
            return Ready(retry=(e,), own=ownership.Ready(claims=claims))
        self.batcher.append_failed(e.batch_id)
        answers = []
        for w in e.waiters:
            if isinstance(w, PubWaiter):
                if ev.failed:
                    w.failed = ev.failed
                answers.append((w, None))
        return Ready(answers=tuple(answers))

    def _logged(
        self, slot: int, entry_id: str, w: PubWaiter, now: float
    ) -> tuple[tuple[PubWaiter, str | None], ...]:
        """``w``'s entry is in the log: answer it, or wait for a link if it asked remote."""
        if w.level != "remote" or not self.links:
            return ((w, "log"),)
        eid = parse_id(entry_id)
        if self.confirmed.get(slot, (0, 0)) >= eid:
            return ((w, "remote"),)
        w.since = now
        self.remote_waiters.setdefault(slot, []).append((eid, w))
        return ()

    def _confirmed(self, slots: Mapping[int, str]) -> Ready:
        answers: list[tuple[PubWaiter, str | None]] = []
        for slot, entry_id in slots.items():
            eid = parse_id(entry_id)
            if eid > self.confirmed.get(slot, (0, 0)):
                self.confirmed[slot] = eid
            waiting = self.remote_waiters.get(slot)
            if not waiting:
                continue
            still = [(i, w) for i, w in waiting if i > eid]
            answers.extend((w, "remote") for i, w in waiting if i <= eid)
            if still:
                self.remote_waiters[slot] = still
            else:
                del self.remote_waiters[slot]
        return Ready(answers=tuple(answers)) if answers else _EMPTY

    def _expire(self, now: float) -> tuple[tuple[PubWaiter, str | None], ...]:
        """``ack=remote`` publishes no link confirmed in time fail (``unavailable``; the
        message is logged here, the client's retry with the same id waits again)."""
        cutoff = now - REMOTE_WAIT_S
        expired: list[tuple[PubWaiter, str | None]] = []
        for slot, waiting in list(self.remote_waiters.items()):
            keep = []
            for i, w in waiting:
                if w.since < cutoff:
                    w.moved = NOT_CONFIRMED  # logged, not moved: say what happened
                    expired.append((w, None))
                else:
                    keep.append((i, w))
            if keep:
                self.remote_waiters[slot] = keep
            else:
                del self.remote_waiters[slot]
        return tuple(expired)

    # -- log reads

    def _log_read(self, ev: LogRead) -> Ready:
        """The chain check and positions of every reader (a catch-up, the replica tail,
        the mirror loops): entries at or behind our position are skipped (applied
        already), an entry that does not follow on from it is a gap (nothing more of its
        slot is applied), the rest are applied in order."""
        origin, positions, owned = ev.origin, self.positions, self.table.owned
        applies: list[tuple[LogEntry, bool]] = []
        gapped: dict[int, str] = {}
        skipped = 0
        for e in ev.entries:
            slot = e.slot
            if slot in ev.skip or slot in gapped:
                continue
            known = positions.at(slot, origin)
            if known is not None and parse_id(e.id) <= parse_id(known):
                skipped += 1
                continue
            if not positions.follows(slot, e.prev, origin):
                gapped[slot] = e.prev
                continue
            positions.advance(slot, e.id, origin)
            applies.append((e, ev.deliver and slot in owned))
        if not gapped:
            return Ready(applies=tuple(applies), skipped=skipped)
        resyncs = tuple(
            (s, p) for s, p in sorted(gapped.items()) if origin and ev.deliver and s in owned
        )
        done = {s for s, _ in resyncs}
        return Ready(
            applies=tuple(applies),
            skipped=skipped,
            catch_ups=tuple(s for s in sorted(gapped) if s not in done),
            resyncs=resyncs,
        )

    # -- checkpoints and snapshots (cluster/persist.py)

    def changed(self, slot: int, now: float, rebuilt: bool = False) -> None:
        """``slot``'s pending state changed (a Ready's ``changed``, an apply, a claim; see
        :meth:`cluster.persist.Persistence.changed`): a plain call, not an event, as the
        hot path makes it once per publish."""
        self.persist.changed(slot, now, rebuilt)

    def _checkpoint_due(self, ev: CheckpointDue) -> Ready:
        slots, due = self.persist.checkpoints_due(ev.now, self.table.releasing)
        return Ready(checkpoints=slots, due_at=due)

    def _checkpoint_start(self, ev: CheckpointStart) -> Ready:
        slot = ev.slot
        if self.persist.checkpoint_start(
            slot, slot in self.table.owned, self.positions.log.get(slot), ev.now
        ):
            return Ready(checkpoints=(slot,))
        return _EMPTY

    def _checkpoint_written(self, ev: CheckpointWritten) -> Ready:
        trim = self.persist.trims(ev.slot, ev.covers, ev.mirrors, ev.links, ev.now_ms)
        return Ready(trims=(trim,))

    def _snapshot_start(self, ev: SnapshotStart) -> Ready:
        slot = ev.slot
        at = self.positions.log.get(slot) if slot in self.table.owned else None
        return Ready(snapshots=(slot,)) if self.persist.snapshot_start(slot, at, ev.now) else _EMPTY

    # -- re-subscriptions (the subscriber side of cluster/interest.py)

    def _resubscribe(self, ev: Resubscribe) -> Ready:
        """Whom to register ``ch`` with now, whether to wait, when to give up: retried
        until it works, the subscribers leave or the ring moves again (the new owner
        answers ``unavailable`` until its claim has read the log), at most
        :data:`RESUBSCRIBE_S`."""
        ch, interest = ev.ch, self.interest
        if ev.start:
            interest.unregister(ch)
        if ev.asked:
            if not ev.ok:
                return Ready(resubscribe=Resub(ch, wait_s=RESUBSCRIBE_POLL_S))
            if self.owner_of(ch) == ev.asked:
                return _EMPTY  # registered (Registered did it)
            interest.unregister(ch)  # the ring moved during the request: follow it
        if ev.now >= ev.since + RESUBSCRIBE_S:
            return Ready(resubscribe=Resub(ch, gave_up=True))
        handles = tuple(self.node.subscribers.get(ch, ()))
        owner = self.owner_of(ch)
        if not handles or owner is None or ch in interest.registered:
            return _EMPTY
        if owner == self.me:
            if self.serving(slot_of(ch, self.slots), ev.fresh):
                interest.register(ch, self.me)
                return Ready(replay=(tuple(self.node.store.pending(ch, ev.now_ms)), handles))
        elif self.mesh_up:
            return Ready(resubscribe=Resub(ch, ask=owner))
        return Ready(resubscribe=Resub(ch, wait_s=RESUBSCRIBE_POLL_S))

    def _registered(self, ev: Registered) -> Ready:
        self.interest.register(ev.ch, ev.owner)
        handles = tuple(self.node.subscribers.get(ev.ch, ()))
        return Ready(replay=(tuple(fields_message(f) for f in ev.pending), handles))

    # -- claims (the edge fences, reads the log, fires the slot table)

    def _release_wait(self, ev: ReleaseWait) -> Ready:
        """While the owner record names another live node, give it time to hand the
        slot over, so that a planned move, a join or a reweight loses nothing (not even
        what it accepted at ``ack=mem``). A dead owner (or none, or us) is fenced at
        once; one that does not let go within ``release_wait_s`` (its view of the ring
        differs) is fenced anyway; not knowing (the read failed) is no reason to fence
        a live owner: ask again."""
        slot = ev.slot
        if ev.read:
            holder = ev.holder
            if holder is not None and (not holder or holder == self.me or not ev.live):
                return Ready(claim=ClaimStep(slot, fence=True))
            return Ready(claim=ClaimStep(slot, wait_s=RELEASE_POLL_S))
        if ev.now >= ev.since + self.release_wait_s or not self.ownership.should_own(slot):
            return Ready(claim=ClaimStep(slot, fence=True))  # (the claim checks the ring)
        return Ready(claim=ClaimStep(slot, read=True))

    def _claim_fenced(self, ev: ClaimFenced) -> Ready:
        if ev.attempts >= CLAIM_ATTEMPTS:
            return _EMPTY
        return Ready(claim=ClaimStep(ev.slot, fence=True))


def _no_ready(f: Callable[[Persistence, Any], object]) -> Callable[[RegionCore, Any], Ready]:
    """A bookkeeping event: the persistence part records it; nothing to carry out."""

    def step(core: RegionCore, ev: Any) -> Ready:
        f(core.persist, ev)
        return _EMPTY

    return step


# What each region event steps (the ownership events go to the ownership core).
_HANDLERS: Final[dict[type, Callable[[RegionCore, Any], Ready]]] = {
    Publish: RegionCore._publish,
    Ack: RegionCore._ack,
    Subscribe: RegionCore._subscribe,
    AppendDone: RegionCore._append_done,
    NotAppended: RegionCore._not_appended,
    Answered: RegionCore._answered,
    MeshDeliver: RegionCore._mesh_deliver,
    MeshInterest: RegionCore._mesh_interest,
    Unsubscribe: RegionCore._unsubscribe,
    LogRead: RegionCore._log_read,
    Confirmed: lambda core, ev: core._confirmed(ev.slots),
    CheckpointDue: RegionCore._checkpoint_due,
    CheckpointStart: RegionCore._checkpoint_start,
    CheckpointWritten: RegionCore._checkpoint_written,
    CheckpointFailed: _no_ready(lambda p, ev: p.checkpoint_failed(ev.slot)),
    SnapshotDue: lambda core, ev: Ready(
        snapshots=core.persist.snapshots_due(ev.now, ev.budget, ev.every)
    ),
    SnapshotStart: RegionCore._snapshot_start,
    SnapshotWritten: _no_ready(lambda p, ev: p.snapshots.written(ev.slot, ev.now)),
    SnapshotFailed: _no_ready(lambda p, ev: p.snapshots.failed(ev.slot)),
    Resubscribe: RegionCore._resubscribe,
    Registered: RegionCore._registered,
    ReleaseWait: RegionCore._release_wait,
    ClaimFenced: RegionCore._claim_fenced,
}
