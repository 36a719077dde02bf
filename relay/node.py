"""The owner side of channels on one node: accept, dedupe, store, deliver, ack.

Pure: the caller passes the wall clock (``now_ms``) and carries out what comes back.
Subscribers are opaque hashable handles (the edge's connections); :meth:`Node.publish`
returns the handles a new message must be delivered to.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import msgspec

from relay.dedupe import DedupeIndex, dedupe_key
from relay.hlc import HybridClock
from relay.store import Message, PendingStore, Removed


class Accepted(msgspec.Struct, frozen=True, gc=False):
    """The answer to a publish: what ``puback`` reports, and whom to deliver to."""

    hlc: int
    origin: str
    dup: bool
    message: Message | None = None  # set only when there are subscribers to deliver to
    subscribers: tuple[Hashable, ...] = ()
    removed: Removed | None = None  # what the channel cap evicted to make room


@dataclass(slots=True)
class Counters:
    """Monotonic counts the edge exports as metrics."""

    accepted: int = 0
    duplicates: int = 0
    acked: int = 0
    evicted: int = 0
    expired: int = 0
    delivered: int = 0
    removed_by_reason: dict[str, int] = field(default_factory=dict)


class Node:
    """Channels owned by this node (all of them until the ring arrives)."""

    def __init__(
        self,
        *,
        node_id: str,
        region: str,
        store: PendingStore,
        dedupe: DedupeIndex,
        clock: HybridClock | None = None,
    ) -> None:
        self.node_id = node_id
        self.region = region
        self.store = store
        self.dedupe = dedupe
        self.clock = clock or HybridClock()
        self.subscribers: dict[str, set[Hashable]] = {}
        self.counters = Counters()

    # -- publish -------------------------------------------------------------------

    def publish(
        self,
        ch: str,
        msg_id: str,
        body: bytes,
        *,
        sender: str,
        ttl_ms: int,
        now_ms: int,
    ) -> Accepted:
        """Accept a message, or recognise it as a duplicate of one accepted before."""
        store = self.store
        m = store.get(ch, msg_id)
        if m is not None:
            self.counters.duplicates += 1
            return Accepted(m.hlc, m.origin, True)
        dedupe = self.dedupe
        if len(dedupe):
            seen = dedupe.lookup(dedupe_key(ch, msg_id), now_ms)
            if seen is not None:
                self.counters.duplicates += 1
                return Accepted(seen, self.region, True)
        hlc = self.clock.tick(now_ms)
        expires_ms = now_ms + ttl_ms
        region = self.region
        removed = store.add(
            ch, msg_id, hlc=hlc, expires_ms=expires_ms, sender=sender, origin=region, body=body
        )
        if removed is not None:
            self._forget(removed, now_ms)
        self.counters.accepted += 1
        subs = self.subscribers.get(ch)
        if not subs:
            return Accepted(hlc, region, False, None, (), removed)
        message = Message(msg_id, ch, sender, hlc, region, body, expires_ms)
        return Accepted(hlc, region, False, message, tuple(subs), removed)

    # -- subscribe -----------------------------------------------------------------

    def subscribe(self, handle: Hashable, ch: str, now_ms: int) -> list[Message]:
        """Add a subscriber; return the channel's pending messages, oldest first."""
        self.subscribers.setdefault(ch, set()).add(handle)
        pending = self.store.pending(ch, now_ms)
        self.counters.delivered += len(pending)
        return pending

    def unsubscribe(self, handle: Hashable, ch: str) -> None:
        subs = self.subscribers.get(ch)
        if subs is not None:
            subs.discard(handle)
            if not subs:
                del self.subscribers[ch]

    def drop(self, handle: Hashable, channels: set[str]) -> None:
        """Forget a subscriber that went away; its messages stay pending."""
        for ch in channels:
            self.unsubscribe(handle, ch)

    # -- ack and time --------------------------------------------------------------

    def ack(self, ch: str, ids: list[str], now_ms: int, hlc: int | None = None) -> int:
        """Remove acknowledged messages; return how many were pending.

        Every id named is remembered, pending or not (the ack's tombstone): a message
        published after an ack of its id is a duplicate here, as it is wherever the slot
        log is applied (:func:`cluster.apply.apply_events`), so this node, its replicas,
        a restart and the other regions agree. ``hlc``: the ack's time, remembered for
        the ids that were not pending (default: a tick of the node's clock)."""
        gone = self.store.ack(ch, ids)
        for m in gone:
            self.dedupe.remember(dedupe_key(ch, m.id), m.hlc, now_ms)
        if len(gone) < len(ids):
            # Not pending here: held apart (DedupeIndex), so that made-up ids cannot
            # push out the ids of messages accepted.
            at = self.clock.tick(now_ms) if hlc is None else hlc
            for msg_id in ids:
                self.dedupe.remember(dedupe_key(ch, msg_id), at, now_ms, weak=True)
        self.counters.acked += len(gone)
        return len(gone)

    def tick(self, now_ms: int) -> list[Removed]:
        """Expire messages past their TTL and ids past the dedupe window."""
        removed = self.store.expire(now_ms)
        for r in removed:
            self._forget(r, now_ms)
        self.dedupe.expire(now_ms)
        return removed

    def _forget(self, removed: Removed, now_ms: int) -> None:
        for msg_id, hlc in zip(removed.ids, removed.hlcs, strict=True):
            self.dedupe.remember(dedupe_key(removed.ch, msg_id), hlc, now_ms)
        n = len(removed.ids)
        if removed.reason == "evicted":
            self.counters.evicted += n
        else:
            self.counters.expired += n
