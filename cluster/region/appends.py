"""Appending what owned slots changed to their logs, and answering the waiters.

The batcher (:mod:`relay.batch`) hands out entries by group commit (:mod:`cluster.commit`:
as soon as the previous append returned); each ends appended, retried later, or failed
with its waiters answered, never dropped. ``ack=remote`` waiters wait further for a link
to confirm their entry.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from cluster.apply import apply_events
from cluster.chain import parse_id
from cluster.region.reading import Reading
from cluster.region.state import REMOTE_WAIT_S, PubWaiter
from cluster.slotlog import FencedError
from relay.batch import AppendToLog
from relay.codec import encode_batch
from relay.errors import InvariantError

log = logging.getLogger(__name__)


class Appends(Reading):
    """Appends to the slot logs, retries, and the waiters they answer."""

    async def _flush_loop(self) -> None:
        await self.commits.run()  # cluster/commit.py: group commit

    async def _flush(self, force: bool = False) -> None:
        async with self._flush_lock:  # one append under way at a time: order per slot
            # Entries that failed before go first, unchanged (same events, same waiters),
            # then those cut early, then what the batcher holds now.
            entries, self._retry = self._retry, []
            entries += self._cut
            self._cut = []
            entries += self.batcher.flush(self.wall_ms(), force=force)
            if entries:
                await self._append(entries)

    async def _append(self, entries: list[AppendToLog]) -> None:
        """Append entries handed out by the batcher; each ends appended, retried later, or
        failed (its waiters answered), never dropped."""
        ready = []
        for e in entries:
            if e.slot in self.owned:
                ready.append(e)
            else:
                self._not_appended(e, "the slot is not ours now")
        if not ready:
            return
        # Each entry is encoded on its own: one that cannot be fails alone.
        entries, items = [], []
        for e in ready:
            try:
                items.append((e.slot, encode_batch(e.events)))
            except InvariantError as err:
                self._not_encoded(e, err)
            else:
                entries.append(e)
        if not entries:
            return
        epochs = {e.slot: self.owned[e.slot] for e in entries}
        started = self.clock()
        try:
            results = await self.slotlog.append_many(items, self.me, epochs)
            self.append_seconds.observe(self.clock() - started)
            for e in entries:
                self.batch_events.observe(len(e.events))
        except Exception as err:
            self.counters["append_errors"] += 1
            log.warning("slot-log append failed (%s); retrying next window", err)
            self._retry.extend(entries)
            self._retried.update(e.batch_id for e in entries)
            return
        for e, r in zip(entries, results, strict=True):
            if isinstance(r, FencedError):
                self.counters["fenced"] += 1
                self._lose(e.slot)
                self._not_appended(e, f"fenced: {r}")
            else:
                self.counters["appends"] += 1
                self.batcher.appended(e.batch_id)
                if parse_id(r) > parse_id(self.applied.get(e.slot, "0-0")):
                    self.applied[e.slot] = r  # never backwards
                if e.batch_id in self._retried:
                    # Its slot may have been rebuilt meanwhile: make RAM hold it again.
                    self._retried.discard(e.batch_id)
                    for m in apply_events(self.node, list(e.events), self.wall_ms()):
                        self.slot_channels.setdefault(e.slot, set()).add(m.ch)
                for w in e.waiters:
                    if isinstance(w, PubWaiter):
                        self._logged(e.slot, r, w)

    def _logged(self, slot: int, entry_id: str, w: PubWaiter) -> None:
        """``w``'s entry is in the log: answer it, or wait for a link if it asked remote."""
        if w.level != "remote" or not self.links:
            w.done("log")
            return
        eid = parse_id(entry_id)
        if self.confirmed.get(slot, (0, 0)) >= eid:
            w.done("remote")
            return
        w.since = self.clock()
        self.remote_waiters.setdefault(slot, []).append((eid, w))

    def on_confirmed(self, doc: dict[str, Any]) -> None:
        """A link announced entries its destination holds: answer ``ack=remote``."""
        for slot_s, entry_id in dict(doc.get("slots", {})).items():
            slot = int(slot_s)
            eid = parse_id(str(entry_id))
            if eid > self.confirmed.get(slot, (0, 0)):
                self.confirmed[slot] = eid
            waiting = self.remote_waiters.get(slot)
            if not waiting:
                continue
            still = [(i, w) for i, w in waiting if i > eid]
            for i, w in waiting:
                if i <= eid:
                    w.done("remote")
            if still:
                self.remote_waiters[slot] = still
            else:
                del self.remote_waiters[slot]

    def _expire_remote_waiters(self) -> None:
        """Answer ``unavailable`` to ``ack=remote`` publishes no link confirmed in time
        (the message is logged here; the client's retry with the same id waits again)."""
        cutoff = self.clock() - REMOTE_WAIT_S
        for slot, waiting in list(self.remote_waiters.items()):
            keep = []
            for i, w in waiting:
                if w.since < cutoff:
                    w.done(None)
                else:
                    keep.append((i, w))
            if keep:
                self.remote_waiters[slot] = keep
            else:
                del self.remote_waiters[slot]

    def _not_encoded(self, e: AppendToLog, err: Exception) -> None:
        """An entry the codec refuses (a bug upstream: every argument was checked). Only
        its own waiters hear of it, with ``internal`` and a correlation id."""
        cid = uuid.uuid4().hex[:12]
        self.mesh_counters["encode_failures"] += 1
        log.error(
            "slot %d: an entry of %d events cannot be encoded (correlation id %s): %s",
            e.slot,
            len(e.events),
            cid,
            err,
        )
        self.batcher.append_failed(e.batch_id)
        self._retried.discard(e.batch_id)
        for w in e.waiters:
            if isinstance(w, PubWaiter):
                w.failed = f"internal error, correlation id {cid}"
                w.done(None)

    def _not_appended(self, e: AppendToLog, why: str) -> None:
        """An entry that cannot be appended under our current epoch."""
        if self._should_own(e.slot):
            # Another node claimed it under an older view of the ring: take it back and
            # append the same entry under the new epoch.
            log.warning("slot %d: %s; claiming it again", e.slot, why)
            self._retry.append(e)
            self._retried.add(e.batch_id)
            if e.slot not in self.claiming:
                self._start_claim(e.slot)
            return
        log.warning("slot %d: %s; %d events not logged", e.slot, why, len(e.events))
        self.batcher.append_failed(e.batch_id)
        for w in e.waiters:
            if isinstance(w, PubWaiter):
                w.done(None)
