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
from cluster.region.reading import Reading
from cluster.regioncore import AppendDone, Confirmed, NotAppended
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
                # The core: the batch is done, the position moves on (never back), and
                # which waiters are answered now or wait for a link (ack=remote).
                done = self.core.step(AppendDone(e.slot, e.batch_id, r, e.waiters, self.clock()))
                if e.batch_id in self._retried:
                    # Its slot may have been rebuilt meanwhile: make RAM hold it again.
                    self._retried.discard(e.batch_id)
                    for m in apply_events(self.node, list(e.events), self.wall_ms()):
                        self.slot_channels.setdefault(e.slot, set()).add(m.ch)
                self._answer(done)

    def on_confirmed(self, doc: dict[str, Any]) -> None:
        """A link announced entries its destination holds: answer ``ack=remote``."""
        slots = {int(s): str(i) for s, i in dict(doc.get("slots", {})).items()}
        self._answer(self.core.step(Confirmed(slots)))

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
        self._retried.discard(e.batch_id)
        self._answer(self.core.step(NotAppended(e, f"internal error, correlation id {cid}")))

    def _not_appended(self, e: AppendToLog, why: str) -> None:
        """An entry that cannot be appended under our current epoch: the core says
        whether to claim the slot back and append it again, or to fail its waiters."""
        ready = self.core.step(NotAppended(e))
        if ready.retry:
            log.warning("slot %d: %s; claiming it again", e.slot, why)
            self._retry.extend(ready.retry)
            self._retried.update(r.batch_id for r in ready.retry)
            for slot in ready.own.claims:
                self._start_claim(slot)
            return
        log.warning("slot %d: %s; %d events not logged", e.slot, why, len(e.events))
        self._answer(ready)
