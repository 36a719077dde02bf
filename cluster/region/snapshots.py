"""Snapshots of owned slots on this node's disk: loaded at start, written when changed
(the I/O; which slots are due the region core decides: cluster/persist.py)."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

from cluster.apply import apply_events
from cluster.region.appends import Appends
from cluster.region.state import (
    RUN_FILE_MARGIN_MS,
    SNAPSHOT_BATCH_ITEMS,
    SNAPSHOT_SWITCH_INTERVAL_S,
)
from cluster.regioncore import SnapshotDue, SnapshotFailed, SnapshotStart, SnapshotWritten
from relay.codec import AckEvent
from relay.snapshot import (
    RunRef,
    Sealed,
    SealedTombstones,
    Tombstone,
    encode_run_file,
    encode_snapshot,
)
from relay.snapshot_io import (
    delete_run_files,
    delete_snapshot,
    load_snapshots,
    prepare_data_dir,
    read_epoch,
    run_files,
    sync_slots_dir,
    write_epoch,
    write_run_files,
    write_snapshot,
)
from relay.store import unpack

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Captured:
    """What a slot's snapshot holds, taken in one reactor turn: pointers only."""

    log_id: str
    mirrors: dict[str, str]
    records: list[Any]
    # Older tombstones, sealed in runs (oldest first), each with where it is on disk if
    # a run file holds it already (None: to write in this batch's run file).
    runs: list[tuple[Sealed, RunRef | None]]
    start: int  # the sequence number of the first of ``tombstones``
    tombstones: list[Tombstone]  # the newer ones, to encode

    @property
    def size(self) -> int:
        """Records and tombstones to encode or write: what a batch of captures is bounded
        by."""
        unwritten = sum(run.end - run.start for run, ref in self.runs if ref is None)
        return sum(len(pairs) for _, pairs in self.records) + len(self.tombstones) + unwritten

    def needs_run_file(self, seal_every: int) -> bool:
        """Whether this snapshot writes runs: sealed ones no file holds yet, or new ones."""
        return len(self.tombstones) >= seal_every or any(ref is None for _, ref in self.runs)


@dataclass(frozen=True, slots=True)
class _Written:
    """A slot's snapshot on disk: the bytes it took (its file and the runs written to its
    run file), the runs sealed on the way, and where the runs written are."""

    size: int
    sealed: list[Sealed]
    located: dict[tuple[int, int], RunRef]  # (slot, run start) → where


_Outcome = _Written | Exception


class Snapshots(Appends):
    """Snapshots of owned slots on disk."""

    _sealed: SealedTombstones | None = None

    @property
    def sealed_tombstones(self) -> SealedTombstones:
        if self._sealed is None:
            self._sealed = SealedTombstones()
        return self._sealed

    def _dedupe_cutoff_hlc(self, margin_ms: int = 0) -> int:
        """The hlc below which a tombstone dedupes nothing (``margin_ms`` older still)."""
        return (self.wall_ms() - self.node.dedupe.window_ms - margin_ms) << 16

    def _hlc_bound(self) -> int:
        """An hlc no tombstone held now exceeds: the hybrid clock has issued or seen every
        one of them (another region's may run ahead of this node's wall clock)."""
        return max((self.wall_ms() + 1) << 16, self.node.clock.last + 1)

    async def _last_epoch(self) -> int:
        """The epoch this node last joined under, from its disk (0: none recorded)."""
        if self.slots_dir is None:
            return 0
        return await asyncio.to_thread(read_epoch, self.slots_dir)

    async def _record_epoch(self, epoch: int) -> None:
        """Written before the join is announced: after a restart the node joins above it,
        even if the region's Redis lost its epoch counter meanwhile. A disk that refuses
        it does not stop the join (the snapshots say so loudly)."""
        if self.slots_dir is None:
            return
        try:
            await asyncio.to_thread(write_epoch, self.slots_dir, epoch)
        except OSError as e:
            log.warning("cannot record epoch %d in %s: %s", epoch, self.slots_dir.parent, e)

    async def _load_snapshots(self) -> None:
        """Before joining: take back what this node's disk holds (a restart)."""
        was_enabled = gc.isenabled()
        gc.disable()  # loading builds long-lived state: no collection needed meanwhile
        try:
            await self._load_snapshots_now()
        finally:
            if was_enabled:
                gc.enable()

    async def _load_snapshots_now(self) -> None:
        self.slots_dir = await asyncio.to_thread(prepare_data_dir, self.config.node.data_dir)
        loaded, refused = await asyncio.to_thread(
            functools.partial(load_snapshots, self.slots_dir, cutoff_hlc=self._dedupe_cutoff_hlc())
        )
        for slot, reason in refused:
            # Never half-loaded: the slot is rebuilt from the region's checkpoint and logs.
            self.snapshot_stats["refused"] += 1
            log.error(
                "snapshot of slot %d refused (%s); rebuilding it from the region", slot, reason
            )
        now = self.wall_ms()
        # Tombstones older than the dedupe window dedupe nothing: a snapshot may carry
        # some (relay/snapshot.py, SealedTombstones); they are not applied.
        cutoff = (now - self.node.dedupe.window_ms) << 16
        for slot, snap in loaded.items():
            if slot >= self.slots:
                continue
            events = [e for e in snap.events if not (isinstance(e, AckEvent) and e.hlc < cutoff)]
            for m in apply_events(self.node, events, now):
                self.slot_channels.setdefault(slot, set()).add(m.ch)
            for ch, msg_id, hlc in snap.tombstones:
                self._tombstone(slot, ch, [msg_id], hlc)
            self.applied[slot] = snap.log_id
            for origin, mirror_id in snap.mirrors.items():
                if origin in self.mirror_applied:
                    self.mirror_applied[origin][slot] = mirror_id
            self._loaded_slots.add(slot)
        # After the loaded tombstones went through the hybrid clock: it bounds their hlc.
        await self._keep_run_files(loaded.values())
        self.snapshot_stats["loaded"] = len(self._loaded_slots)
        if loaded or refused:
            log.info(
                "loaded %d slot snapshots (%d pending messages), refused %d",
                len(loaded),
                self.node.store.messages,
                len(refused),
            )

    async def _keep_run_files(self, loaded: Any) -> None:
        """After a load: track every run file on disk, to be removed once older than the
        dedupe window — by the runs the snapshots name in it, or from now when none does
        (a batch whose snapshots failed, a snapshot refused: never removed at start, so
        a start that could not read one leaves it to the next)."""
        assert self.slots_dir is not None
        on_disk = await asyncio.to_thread(run_files, self.slots_dir)
        named: dict[tuple[int, int], int] = {}
        numbers = [f for _, f in on_disk]
        for snap in loaded:
            for ref in snap.runs:
                key = (snap.slot, ref.file)
                named[key] = max(named.get(key, 0), ref.newest_hlc)
                numbers.append(ref.file)
        bound = self._hlc_bound()
        for key in on_disk:
            self._run_files[key] = named.get(key, bound)
        # Numbered on from every number on disk or named, and from the clock (µs): a
        # number is not reused for other bytes while a snapshot may still name it.
        self._next_run_file = max(max(numbers, default=-1) + 1, self.wall_ms() * 1000)

    async def _prune_run_files(self) -> None:
        """Remove the run files whose every tombstone is older than the dedupe window by
        a margin: a snapshot still naming them leaves those runs out on load anyway. A
        removal that fails is tried again at the next tick."""
        if self.slots_dir is None or not self._run_files:
            return
        cutoff = self._dedupe_cutoff_hlc(RUN_FILE_MARGIN_MS)
        old = [key for key, newest in self._run_files.items() if newest < cutoff]
        if not old:
            return
        # Recorded: the newest these files may hold (not the cutoff, which a clock set
        # ahead would carry past tombstones still in the window).
        below = max(self._run_files[key] for key in old) + 1
        gone_list, error = await asyncio.to_thread(
            functools.partial(delete_run_files, self.slots_dir, old, below_hlc=below)
        )
        if error is not None:
            log.warning(
                "removing %d old tombstone run files: %d failed: %s",
                len(old),
                len(old) - len(gone_list),
                error,
            )
        gone = set(gone_list)
        for key in gone:
            self._run_files.pop(key, None)
        self._run_refs = {k: r for k, r in self._run_refs.items() if (k[0], r.file) not in gone}

    def _capture(self, slot: int) -> _Captured | None:
        """What ``slot``'s snapshot holds, taken in one reactor turn (encoded in a thread)."""
        log_id = self.applied.get(slot)
        if log_id is None:
            return None
        # Only pointers are copied here; unpacking happens in the writer's thread.
        store = self.node.store
        records = [(ch, store.records(ch)) for ch in sorted(self.slot_channels.get(slot, ()))]
        mirrors = self.positions.mirrors_of(slot)
        # Tombstones already sealed go as runs, named where a run file holds them (and
        # left out once older than the window); only the newer ones are copied.
        start, sealed = self.sealed_tombstones.runs(slot, self.acks.first(slot))
        cutoff = self._dedupe_cutoff_hlc()
        refs = self._run_refs
        runs = [(r, refs.get((slot, r.start))) for r in sealed if r.newest_hlc >= cutoff]
        tombstones = self.acks.since(slot, start)
        return _Captured(log_id, mirrors, records, runs, start, tombstones)

    def _encode(self, slot: int, state: _Captured, fresh: Any, refs: list[RunRef]) -> bytes:
        """``slot``'s snapshot (in a thread): its pending messages, its tombstone runs
        named by ``refs``, and ``fresh`` tombstones."""
        now = self.wall_ms()
        events: list[Any] = []
        for ch, pairs in state.records:
            for msg_id, record in pairs:
                m = unpack(ch, msg_id, record)
                if m.expires_ms > now:
                    events.append(m)
        return encode_snapshot(
            slot,
            state.log_id,
            state.mirrors,
            events,
            fresh,
            region=self.region,
            tombstone_runs=refs,
        )

    async def _snapshot_once(self, budget: int, every: bool = False) -> None:
        if self.slots_dir is None:
            return
        async with self.snapshot_lock:
            await self._snapshot_tick(budget, every)

    async def _snapshot_tick(self, budget: int, every: bool) -> None:
        # A tick makes one short-lived object per pending message; with the collector
        # on, they trigger full collections that scan the whole heap (the stalls that
        # `relay bench durability` measured). They hold no cycles: refcounting frees them.
        was_enabled = gc.isenabled()
        gc.disable()
        # The writer thread encodes with the GIL held; hand it back to the reactor more
        # often than the default 5 ms while a tick runs.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(SNAPSHOT_SWITCH_INTERVAL_S)
        try:
            await self._prune_run_files()
            await self._snapshot_slots(budget, every)
        finally:
            sys.setswitchinterval(switch)
            if was_enabled:
                gc.enable()

    async def _snapshot_slots(self, budget: int, every: bool = False) -> None:
        assert self.slots_dir is not None
        failed: list[int] = []
        last_error: Exception | None = None
        # The core says which slots are due (cluster/persist.py) and hears each outcome:
        # every slot it named is reported, written or failed, whatever happens here (one
        # left in flight would never be taken again).
        due = deque(self.core.step(SnapshotDue(self.clock(), budget, every)).snapshots)
        batch: list[tuple[int, _Captured]] = []
        try:
            while due:
                # Small slots go to the writer thread together, captured in one reactor
                # turn (a thread hand-off per slot costs the reactor more than a small
                # slot's capture); a batch ends with the slot that takes it to
                # SNAPSHOT_BATCH_ITEMS records and tombstones, so large slots go one or
                # two to a turn, as before.
                batch, size = [], 0
                while due and size < SNAPSHOT_BATCH_ITEMS:
                    slot = due[0]
                    if not self.core.step(SnapshotStart(slot, self.clock())).snapshots:
                        due.popleft()
                        continue  # no longer held: forgotten
                    state = self._capture(slot)
                    assert state is not None  # the core saw it held, in this same turn
                    batch.append((slot, state))
                    due.popleft()
                    size += state.size
                if not batch:
                    continue
                # A slot whose snapshot writes runs gets its run file's number here,
                # tracked (to be removed once old) whether or not the thread writes it.
                files = self._number_run_files(batch)
                writing = asyncio.ensure_future(
                    asyncio.to_thread(self._encode_and_write_many, batch, files)
                )
                done, batch = batch, []
                try:
                    outcomes = await asyncio.shield(writing)
                except asyncio.CancelledError:
                    # The thread goes on writing: its slots are reported when it is done,
                    # not before (a slot is never taken while its write is in flight).
                    writing.add_done_callback(functools.partial(self._report_late, done))
                    raise
                except Exception as e:  # the hand-off itself (an executor shut down)
                    outcomes = [e] * len(done)
                for slot, err in self._report(done, outcomes):
                    failed.append(slot)
                    last_error = err
        finally:
            # Cancelled (the node stops) or a bug above: what was not handed off stays
            # dirty, to be taken again.
            for slot in [s for s, _ in batch] + list(due):
                self.core.step(SnapshotFailed(slot))
        if failed:
            log.warning(
                "snapshots of %d slots failed (first: slot %d): %s",
                len(failed),
                failed[0],
                last_error,
            )

    def _number_run_files(self, batch: list[tuple[int, _Captured]]) -> dict[int, int]:
        """Slot → the number of the run file its snapshot writes, for those that do."""
        seal_every = self.sealed_tombstones.seal_every
        files = {}
        bound = self._hlc_bound()
        for slot, state in batch:
            if state.needs_run_file(seal_every):
                files[slot] = self._next_run_file
                self._run_files[(slot, self._next_run_file)] = bound
                self._next_run_file += 1
        return files

    def _report(
        self,
        done: list[tuple[int, _Captured]],
        outcomes: list[_Outcome],
    ) -> list[tuple[int, Exception]]:
        """Step each slot's outcome into the core; return the failed ones."""
        failed = []
        for (slot, _), outcome in zip(done, outcomes, strict=True):
            if isinstance(outcome, Exception):
                # Full disk, I/O error: keep serving; the previous snapshot stays.
                self.snapshot_stats["failures"] += 1
                self.core.step(SnapshotFailed(slot))
                failed.append((slot, outcome))
                continue
            for run in outcome.sealed:
                self.sealed_tombstones.seal(slot, run)
            self._run_refs.update(outcome.located)
            # The file's age by its runs' own newest hlc, no longer the bound taken at
            # hand-off (unless it was removed meanwhile).
            newest: dict[tuple[int, int], int] = {}
            for ref in outcome.located.values():
                key = (slot, ref.file)
                newest[key] = max(newest.get(key, 0), ref.newest_hlc)
            for key, hlc in newest.items():
                if key in self._run_files:
                    self._run_files[key] = hlc
            self.core.step(SnapshotWritten(slot, self.clock()))
            self.snapshot_stats["written"] += 1
            self.snapshot_stats["bytes"] += outcome.size
        return failed

    def _report_late(
        self,
        done: list[tuple[int, _Captured]],
        f: asyncio.Future[list[_Outcome]],
    ) -> None:
        """The writes of a tick cancelled meanwhile are done: report them."""
        if f.cancelled():
            outcomes: list[_Outcome] = [RuntimeError("cancelled")] * len(done)
        elif (exc := f.exception()) is not None:
            outcomes = [exc if isinstance(exc, Exception) else RuntimeError(str(exc))] * len(done)
        else:
            outcomes = f.result()
        for slot, err in self._report(done, outcomes):
            log.warning("snapshot of slot %d failed: %s", slot, err)

    def _encode_and_write_many(
        self, batch: list[tuple[int, _Captured]], files: dict[int, int]
    ) -> list[_Outcome]:
        """Write the snapshots of ``batch``'s slots (in a thread): first, for each slot in
        ``files``, its run file (that number) with the runs no run file holds yet and
        those sealed now, and one fsync of their directory; then each slot's file; then
        one fsync of the directory for all their renames. Each slot's outcome, or the
        exception its write raised (the others still go). If the run files or the
        directory's fsync fail, every slot of the batch is failed with them (dirty again,
        written at the next tick)."""
        assert self.slots_dir is not None
        sealing = self.sealed_tombstones
        prepared: list[tuple[int, _Captured, list[Sealed], Any, list[RunRef]] | Exception] = []
        to_write: list[tuple[int, int, bytes]] = []
        for slot, state in batch:
            try:
                new, fresh = sealing.to_seal(state.start, state.tombstones, self.region)
                unwritten = [run for run, ref in state.runs if ref is None]
                refs: list[RunRef] = []
                if unwritten or new:
                    data, refs = encode_run_file([*unwritten, *new], files[slot])
                    to_write.append((slot, files[slot], data))
            except Exception as e:
                prepared.append(e)
                continue
            prepared.append((slot, state, new, fresh, refs))
        if to_write:
            try:
                write_run_files(self.slots_dir, to_write)
            except Exception as e:
                return [e] * len(batch)
        out: list[_Outcome] = []
        for p in prepared:
            if isinstance(p, Exception):
                out.append(p)
                continue
            slot, state, new, fresh, written = p
            try:
                # Every run, oldest first: each one on disk already where it is, each
                # one written now (``written``: the unwritten ones, then the new ones)
                # in its place.
                it = iter(written)
                refs = [ref if ref is not None else next(it) for _, ref in state.runs]
                refs.extend(it)
                data = self._encode(slot, state, fresh, refs)
                n = write_snapshot(self.slots_dir, slot, data, sync_dir=False)
                runs = [run for run, ref in state.runs if ref is None] + new
                located = {(slot, run.start): ref for run, ref in zip(runs, written, strict=True)}
                out.append(_Written(n + sum(r.length for r in written), new, located))
            except Exception as e:
                out.append(e)
        if any(not isinstance(o, Exception) for o in out):
            try:
                sync_slots_dir(self.slots_dir)
            except Exception as e:
                return [o if isinstance(o, Exception) else e for o in out]
        return out

    async def _snapshot_loop(self) -> None:
        while not self.stopped:
            await self.sleep(self.snapshot_interval_s)  # the snapshot period
            try:
                # Every dirty slot, one after the other: each capture is one short reactor
                # turn, each encode and write runs in a thread.
                await self._snapshot_once(self.slots)
            except Exception:
                log.exception("snapshot tick failed")

    async def _snapshot_all(self) -> None:
        """Write every changed owned slot now (graceful stop)."""
        for _ in range(3):
            if not self.snapshots.count:
                return
            await self._snapshot_once(max(1, len(self.owned)), every=True)

    def _drop_foreign_snapshots(self) -> None:
        """Slots loaded from disk that the ring gives to others: forget them."""
        mine = set(self.owned) | self.claiming | self.replicated
        if self.ring is not None and self.me in self.ring.nodes:
            mine |= set(self.ring.slots_of(self.me))
        for slot in sorted(self._loaded_slots - mine):
            self._loaded_slots.discard(slot)
            self._forget_slot(slot)
            if self.slots_dir is not None and not self.snapshots.in_flight(slot):
                delete_snapshot(self.slots_dir, slot)

    def slot_stats(self) -> dict[int, list[int]]:
        """Owned slot → [pending messages, pending bytes] (for ``relay ring plan``)."""
        now = self.wall_ms()
        out: dict[int, list[int]] = {}
        for slot in sorted(self.owned):
            n = size = 0
            for ch in self.slot_channels.get(slot, ()):
                for m in self.node.store.pending(ch, now):
                    n += 1
                    size += len(m.body)
            out[slot] = [n, size]
        return out

    def data_at_risk(self) -> dict[str, Any]:
        """What a crash right now could lose: events not yet in the slot log, and slots
        changed since their snapshot (``relay_data_at_risk_messages``)."""
        unlogged = self.batcher.pending_events + sum(
            len(e.events) for e in (*self._retry, *self._cut)
        )
        return {
            "unlogged_events": unlogged,
            "unsaved_slots": self.snapshots.count,
            "snapshot_age_s": round(self.snapshots.age_s(self.clock()), 3),
            "unreplicated_entries": {link.dest: link.backlog_entries for link in self.links},
        }
