"""When a region node persists its owned slots, as a pure part of the region core
(:mod:`cluster.regioncore`): which slots are due a checkpoint (the region's Redis) and
a snapshot (this node's disk), and which trims follow a checkpoint written.

It holds the bookkeeping — the slots changed since their checkpoint, the snapshot
queue (:class:`relay.snapshot.DirtySlots`: dirty since when, in flight, last taken) and
the checkpoint cadence — and does no I/O and reads no clock: times come in with the
region core's events (``CheckpointDue``, ``SnapshotDue``, …), outcomes with the events
the edge steps once a write is done or failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from cluster.chain import parse_id, trim_bound
from relay.snapshot import DirtySlots

CHECKPOINT_INTERVAL_S = 5.0  # cluster.checkpoint_interval_s's default
MAX_BACKLOG_S = 120.0  # cluster.link_max_backlog_s's default


@dataclass(frozen=True, slots=True)
class Trim:
    """What follows a checkpoint of ``slot``: trim its log before ``log_before`` (None:
    leave the log as it is) and each mirror of ``origin`` up to ``position``.
    ``gapped``: the log bound passed a link more than ``max_backlog_s`` behind (that
    link resyncs the slot from the checkpoint)."""

    slot: int
    log_before: str | None
    mirrors: tuple[tuple[str, str], ...] = ()
    gapped: bool = False


@dataclass(slots=True, eq=False)
class Persistence:
    """The checkpoint and snapshot decisions of one node; see the module's docstring.

    ``dirty``: owned slots changed since their last checkpoint; ``snapshots``: the slots
    changed since their last snapshot; ``snapshot_at``: the log position each slot's last
    snapshot captured (since the slot was held); ``next_checkpoint``: when the next round
    of checkpoints is due (None: not started)."""

    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S
    max_backlog_s: float = MAX_BACKLOG_S
    dirty: set[int] = field(default_factory=set)
    snapshots: DirtySlots = field(default_factory=DirtySlots)
    snapshot_at: dict[int, str] = field(default_factory=dict)
    next_checkpoint: float | None = None

    def changed(self, slot: int, now: float, rebuilt: bool = False) -> None:
        """``slot``'s pending state changed at ``now``: due a checkpoint, and a snapshot
        after it (:class:`relay.snapshot.DirtySlots`); ``rebuilt`` (claimed, a hole filled
        from a checkpoint): a snapshot on the next tick."""
        self.dirty.add(slot)
        self.snapshots.mark(slot, now)
        if rebuilt:
            self.snapshots.due(slot)

    def lose(self, slot: int) -> None:
        """``slot`` is no longer ours: no checkpoint or snapshot of it is due (a write in
        flight is reported as usual and changes nothing)."""
        self.dirty.discard(slot)
        self.snapshots.discard(slot)
        self.snapshot_at.pop(slot, None)

    # -- checkpoints

    def checkpoints_due(
        self, now: float, releasing: AbstractSet[int]
    ) -> tuple[tuple[int, ...], float]:
        """The slots to checkpoint now (changed, not being handed over: a hand-over
        checkpoints its slot itself), and when to ask again. A fixed cadence: the time a
        round takes does not lengthen the period (the slot logs are trimmed only at
        checkpoints); the first call only starts it."""
        interval = self.checkpoint_interval_s
        due = self.next_checkpoint
        if due is None:
            self.next_checkpoint = now + interval
            return (), self.next_checkpoint
        if now < due:
            return (), due
        self.next_checkpoint = max(due + interval, now)
        slots = tuple(s for s in sorted(self.dirty) if s not in releasing)
        return slots, self.next_checkpoint

    def checkpoint_start(self, slot: int, owned: bool, covers: str | None, now: float) -> bool:
        """Whether to write ``slot``'s checkpoint now (it is owned and has a position to
        cover); if so it is no longer dirty (a change from now on makes it dirty again)."""
        if not owned or covers is None:
            return False
        self.dirty.discard(slot)
        # The slot's snapshot follows, on the next tick: captured after this checkpoint,
        # it covers at least as much of the log, so a restart starts from it rather than
        # loading it and then rebuilding from the checkpoint. One captured before an
        # append returned is behind the checkpoint though nothing changed since: due too.
        at = self.snapshot_at.get(slot)
        if at is None or parse_id(at) < parse_id(covers):
            self.snapshots.mark(slot, now)
        self.snapshots.due(slot)
        return True

    def checkpoint_failed(self, slot: int) -> None:
        """Writing ``slot``'s checkpoint (or its trims) failed: due again next round."""
        self.dirty.add(slot)

    def trims(
        self,
        slot: int,
        covers: str,
        mirrors: Mapping[str, str],
        links: Sequence[tuple[str, str | None]] | None,
        now_ms: int,
    ) -> Trim:
        """What to trim once ``slot``'s checkpoint covering ``covers`` (and ``mirrors``:
        origin → position) is written: the log behind it and behind every link (``links``:
        each link's confirmed position and the first entry after it; None: not known, so
        the log is left alone), unless a link is more than ``max_backlog_s`` behind; and
        the mirrors up to what it covers. Nothing logged yet (``covers`` "0-0"): no log
        trim."""
        bound: str | None = None
        gapped = False
        if covers != "0-0" and links is not None:
            b = trim_bound(
                covers=covers,
                links=links,
                now_ms=now_ms,
                max_backlog_ms=self.max_backlog_s * 1000,
            )
            bound, gapped = b.before_id, b.gapped
        return Trim(slot, bound, tuple(mirrors.items()), gapped)

    # -- snapshots

    def snapshots_due(self, now: float, budget: int, every: bool = False) -> tuple[int, ...]:
        """The slots to snapshot now (those due, or with ``every`` all changed ones),
        oldest change first, at most ``budget`` writes in flight
        (:meth:`relay.snapshot.DirtySlots.take`)."""
        return tuple(job.slot for job in self.snapshots.take(now, budget, every=every))

    def snapshot_start(self, slot: int, at: str | None, now: float) -> bool:
        """Whether to capture ``slot`` now (``at``: its log position if it is owned and has
        one, else None); a slot no longer held is forgotten (nothing to write)."""
        if at is not None:
            self.snapshot_at[slot] = at
            return True
        self.snapshots.discard(slot)
        self.snapshots.written(slot, now)
        return False
