"""The slot log's interface (:class:`SlotLog`), its records (owner, entry, checkpoint,
trim), its errors and limits: what the Redis implementation (:mod:`cluster.slotlog.redislog`)
and the in-memory fake (:mod:`cluster.slotlog.memory`) share, and what callers import
(through :mod:`cluster.slotlog`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

from cluster.errors import ClusterError

START_ID: Final = "0-0"
MAX_EPOCH: Final = 2**63 - 1
MAX_COUNT: Final = 100_000
DEFAULT_COUNT: Final = 1000
DEFAULT_MAX_BLOCK_MS: Final = 10_000
# The tailing connection's socket timeout is the longest block plus this, so a blocked
# XREAD is never mistaken for a dead server (redis-py requires socket_timeout > block).
TAIL_TIMEOUT_MARGIN_S: Final = 5.0
# On a Redis Cluster a blocking XREAD cannot span slots (CROSSSLOT), so a tail reads every
# shard without blocking (one pipelined round trip per shard, shards in parallel) and,
# while nothing is there, reads again after a pause that doubles from the first to the
# last of these: an idle tail costs ~1/TAIL_POLL_MAX_S round trips a second per shard.
TAIL_POLL_MIN_S: Final = 0.002
TAIL_POLL_MAX_S: Final = 0.05


class SlotLogError(ClusterError):
    """Root of the slot-log errors: :class:`FencedError`, :class:`StaleCheckpointError`,
    and a reply from Redis that is not what the adapter wrote (a foreign key)."""


class FencedError(SlotLogError):
    """The owner record of ``slot`` does not name this writer at ``epoch``.

    ``current`` is the epoch in force (0: no owner record), ``owner`` its node ("": none).
    Nothing was written. The writer has lost the slot: it must stop acting as its owner
    (and fail its ``log`` waiters) until it claims the slot again.
    """

    def __init__(self, slot: int, epoch: int, current: int, owner: str = "") -> None:
        super().__init__(
            f"slot {slot}: write at epoch {epoch} fenced, epoch in force is {current}"
            + (f" (owner {owner})" if owner else " (no owner)")
        )
        self.slot = slot
        self.epoch = epoch
        self.current = current
        self.owner = owner

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.slot, self.epoch, self.current, self.owner))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FencedError) and (
            (self.slot, self.epoch, self.current, self.owner)
            == (other.slot, other.epoch, other.current, other.owner)
        )

    def __hash__(self) -> int:
        return hash((self.slot, self.epoch, self.current, self.owner))


class StaleCheckpointError(SlotLogError):
    """A checkpoint covering ``covers_id`` was refused: the stored one covers ``newest``.

    The log may already be trimmed up to ``newest``, so an older checkpoint could not
    rebuild the slot. The writer's state is behind the log: it must catch up first.
    """

    def __init__(self, slot: int, covers_id: str, newest: str) -> None:
        super().__init__(
            f"slot {slot}: checkpoint covering {covers_id} is older than the stored one "
            f"covering {newest}"
        )
        self.slot = slot
        self.covers_id = covers_id
        self.newest = newest


class NotReplicatedError(SlotLogError):
    """Written, but fewer replicas than asked (``cluster.log_replicas``) confirmed the
    write within the timeout: an append (or an owner record) may be lost if the primary
    fails now. The caller writes again (applying is idempotent, a claim retried returns
    the same epoch) before answering ``ack=log`` or acting as the slot's owner."""

    def __init__(self, wanted: int, got: int) -> None:
        super().__init__(f"written, but {got} of {wanted} replicas confirmed it in time")
        self.wanted = wanted
        self.got = got


class Owner(NamedTuple):
    """An owner record: ``node_id`` owns the slot under ``epoch``."""

    node_id: str
    epoch: int


class Entry(NamedTuple):
    """One slot-log (or mirror) entry: its id and the batch it holds.

    ``prev`` is the id of the entry appended just before it to the same log ("0-0" for
    the first; "" when unknown: entries written before it was recorded). Mirrors keep
    their origin's. A reader whose position is not ``prev`` has missed entries (trimmed
    under it): it must rebuild from the checkpoint."""

    id: str
    data: bytes
    prev: str = ""


class TailEntry(NamedTuple):
    """An entry returned by :meth:`SlotLog.tail`, with its slot (``prev``: see Entry)."""

    slot: int
    id: str
    data: bytes
    prev: str = ""


class Checkpoint(NamedTuple):
    """A slot's state ``data``, covering every log entry up to ``covers_id``."""

    data: bytes
    covers_id: str


@dataclass(frozen=True, slots=True)
class Trimmed:
    """What :meth:`SlotLog.trim` did: ``removed`` entries before ``min_id``.

    ``clamped`` is true when the checkpoint (or the lack of one) held the trim back from
    the id asked for; ``min_id`` is then the bound actually used (``"0-0"``: none).
    """

    removed: int
    min_id: str
    clamped: bool


class SlotLog(Protocol):
    """The slot logs, owner records, checkpoints and mirrors of one region's Redis.

    Slot logs are the region's own (``relay:{region:slot}:log``); mirrors hold other
    regions' logs (``relay:{region:slot}:mirror:<origin>``). Every method may raise the
    transport's errors (``redis.exceptions.ConnectionError``, ``TimeoutError``); a write
    retried after a lost reply may have been applied twice, which applying batches
    tolerates (message ids and ack tombstones make apply idempotent).
    """

    @property
    def region(self) -> str: ...

    async def get_owner(self, slot: int) -> Owner | None:
        """The slot's owner record, or None if it has never had one."""
        ...

    async def set_owner(self, slot: int, node_id: str, new_epoch: int) -> bool:
        """Give ``slot`` to ``node_id`` under ``new_epoch`` if that is above the epoch in
        force (atomic); False, and nothing changed, otherwise."""
        ...

    async def release(self, slot: int, node_id: str, epoch: int) -> bool:
        """Give ``slot`` up on purpose: the owner record keeps its epoch but names nobody
        (``get_owner`` then returns ``Owner("", epoch)``), if it still names ``node_id``
        at ``epoch``. True when released; False, nothing changed, otherwise."""
        ...

    async def claim(self, slot: int, node_id: str, seen_epoch: int) -> int:
        """Take ``slot`` over if its epoch is still ``seen_epoch`` (0: no owner record).

        Returns the new epoch, ``seen_epoch + 1``, under which the caller now writes. A
        retry of a claim that already succeeded returns the same epoch. Raises
        :class:`FencedError` (``current``: the epoch in force) when another node moved
        the slot first; the caller must re-read the owner record before trying again.
        """
        ...

    async def append(self, slot: int, node_id: str, epoch: int, data: bytes) -> str:
        """Append one batch to ``slot``'s log, fenced; return the entry id.

        Raises :class:`FencedError` when the owner record does not name ``node_id`` at
        ``epoch``; nothing is written then.
        """
        ...

    async def append_many(
        self,
        items: Sequence[tuple[int, bytes]],
        node_id: str,
        epoch_by_slot: Mapping[int, int],
    ) -> list[str | FencedError]:
        """Append ``(slot, batch)`` items, each fenced at ``epoch_by_slot[slot]``, in one
        round trip. Returns, per item in order, its entry id or the :class:`FencedError`
        that refused it. Each slot is all or nothing (its items are appended together, in
        the order given); slots are independent: a fenced slot does not stop the others."""
        ...

    async def read(
        self, slot: int, after_id: str = START_ID, count: int = DEFAULT_COUNT, *, origin: str = ""
    ) -> list[Entry]:
        """Up to ``count`` entries of ``slot``'s log (of the mirror of ``origin``'s log
        when ``origin`` is given) with ids above ``after_id``, oldest first."""
        ...

    async def tail(
        self,
        slots_after: Mapping[int, str],
        block_ms: int | None,
        count: int = DEFAULT_COUNT,
        *,
        origin: str = "",
    ) -> list[TailEntry]:
        """Entries above ``slots_after[slot]``, up to ``count`` per slot, grouped by slot
        in the order of ``slots_after``; when there are none yet, wait up to ``block_ms``
        for some (``None``: do not wait), then return ``[]``.

        Reads slot logs, or mirrors of ``origin`` when given. The wait happens on a
        connection of its own and is cancellable: cancelling the awaiting task returns
        at once (the connection is dropped and reopened on the next call).
        """
        ...

    async def write_checkpoint(
        self, slot: int, node_id: str, epoch: int, data: bytes, covers_id: str
    ) -> None:
        """Store ``data`` as ``slot``'s checkpoint, covering the log up to ``covers_id``.

        Fenced like :meth:`append` (:class:`FencedError`). Raises
        :class:`StaleCheckpointError` if the stored checkpoint covers more of the log.
        """
        ...

    async def read_checkpoint(self, slot: int) -> Checkpoint | None:
        """The newest checkpoint of ``slot``, or None."""
        ...

    async def trim(self, slot: int, before_id: str, *, margin: int = 0) -> Trimmed:
        """Remove ``slot``'s log entries with ids below ``before_id`` — but never past the
        newest checkpoint: the newest entry it covers and ``margin`` entries before it
        always stay, and without a checkpoint nothing is removed (``clamped`` says so).
        The bound is read and applied in one script, so a racing checkpoint is safe."""
        ...

    async def mirror_append(self, slot: int, origin: str, entry_id: str, data: bytes) -> bool:
        """Copy entry ``entry_id`` of ``origin``'s log ``slot`` into this region's mirror
        under the same id. Returns False, writing nothing, when the mirror's top id is
        already at or above it: the entry was copied before (a retry or a restarted link).
        """
        ...

    async def mirror_append_many(self, origin: str, entries: Sequence[TailEntry]) -> list[bool]:
        """:meth:`mirror_append` for each entry (as :meth:`tail` returns them), in one
        round trip; per entry, True when copied, False when it was already there."""
        ...

    async def mirror_top(self, slot: int, origin: str) -> str | None:
        """The highest id ever added to the mirror of ``origin``'s log ``slot`` (even if
        trimmed since), or None when it does not exist: where a link resumes."""
        ...

    async def mirror_tops(self, slots: Sequence[int], origin: str) -> dict[int, str | None]:
        """:meth:`mirror_top` of each slot, in one round trip (a link resuming over a WAN)."""
        ...

    async def first_id(self, slot: int) -> str | None:
        """The id of the oldest entry still in ``slot``'s log (None: empty): a reader
        whose position is below it has a gap (the log was trimmed past it)."""
        ...

    async def last_id(self, slot: int) -> str | None:
        """The id of the newest entry in ``slot``'s log (None: empty): below a position
        a node applied, the region's Redis lost the log's end (restarted empty, or from
        an older backup)."""
        ...

    async def first_after(self, slot: int, after_id: str) -> str | None:
        """The id of the oldest entry of ``slot``'s log above ``after_id`` (None: none):
        its time part is how long a reader at ``after_id`` has been behind."""
        ...

    async def first_after_many(self, slots_after: Mapping[int, str]) -> dict[int, str]:
        """:meth:`first_after` of each slot, in one round trip; slots with no entry after
        their id are left out."""
        ...

    async def trim_mirror(self, slot: int, origin: str, before_id: str) -> int:
        """Remove the entries of the mirror of ``origin``'s log ``slot`` with ids below
        ``before_id`` (the mirror's top id is kept, so a link still resumes after it).
        The caller must hold a checkpoint of the slot covering the mirror up to
        ``before_id``: a reader behind it rebuilds from that. Returns entries removed."""
        ...

    async def close(self) -> None:
        """Close the connections; the object cannot be used afterwards."""
        ...
