"""Applying slot-log events to a node's store: idempotent and commutative.

A replica (or a new owner catching up) applies the events of a slot log in any
interleaving and any number of times and ends with the same pending set: a message is
added only if it is neither pending nor remembered (the dedupe index doubles as the ack
tombstones), and an ack removes what it names and remembers the ids, so a message that
arrives after its ack is not brought back.
"""

from __future__ import annotations

from collections.abc import Iterable

from relay.codec import AckEvent, Event, MessageEvent
from relay.dedupe import dedupe_key
from relay.node import Node
from relay.store import Message, PendingStore, Removed


def apply_events(node: Node, events: Iterable[Event], now_ms: int) -> list[Message]:
    """Apply ``events`` in order; return the messages that became pending.

    An ack of a message not pending here (an early ack, or a tombstone of a snapshot or
    checkpoint, which may name made-up ids as well) is held apart from the ids of
    messages accepted (relay/dedupe.py)."""
    added: list[Message] = []
    store = node.store
    dedupe = node.dedupe
    for e in events:
        if isinstance(e, MessageEvent):
            if e.expires_ms <= now_ms:
                continue
            existing = store.get(e.ch, e.id)
            if existing is not None:
                # The same id accepted in two regions: every region keeps the copy with
                # the smaller (timestamp, origin), so all converge on one.
                if (e.hlc, e.origin) < (existing.hlc, existing.origin):
                    store.ack(e.ch, [e.id])
                    _store(store, e)
                continue
            if dedupe.lookup(dedupe_key(e.ch, e.id), now_ms) is not None:
                continue
            node.clock.observe(e.hlc)
            removed = _store(store, e)
            if removed is not None:
                for msg_id, hlc in zip(removed.ids, removed.hlcs, strict=True):
                    dedupe.remember(dedupe_key(removed.ch, msg_id), hlc, now_ms)
                node.counters.evicted += len(removed.ids)
            added.append(Message(e.id, e.ch, e.sender, e.hlc, e.origin, e.body, e.expires_ms))
        elif isinstance(e, AckEvent):
            node.clock.observe(e.hlc)
            gone = {m.id: m.hlc for m in store.ack(e.ch, e.ids)}
            for msg_id in e.ids:
                # The tombstone: an ack seen before its message keeps it from coming back
                # (held apart from accepted ids when the message was not pending here).
                was = gone.get(msg_id)
                key = dedupe_key(e.ch, msg_id)
                if was is not None:
                    dedupe.remember(key, was, now_ms)
                else:
                    dedupe.remember(key, e.hlc, now_ms, weak=True)
    return added


def _store(store: PendingStore, e: MessageEvent) -> Removed | None:
    return store.add(
        e.ch,
        e.id,
        hlc=e.hlc,
        expires_ms=e.expires_ms,
        sender=e.sender,
        origin=e.origin,
        body=e.body,
    )


def slot_state(node: Node, channels: Iterable[str], now_ms: int) -> list[Event]:
    """A slot's pending messages as events: what a checkpoint holds."""
    out: list[Event] = []
    for ch in channels:
        out.extend(node.store.pending(ch, now_ms))  # a pending Message is its own event
    return out
