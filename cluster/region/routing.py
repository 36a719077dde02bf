"""Client ops on a channel: served here when this node owns its slot, else forwarded
over the mesh to the owner."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

from cluster.mesh import PeerUnavailable, RemoteError
from cluster.meshops import MeshPub
from cluster.region.members import Members
from cluster.region.state import (
    RESUBSCRIBE_S,
    PubWaiter,
    Unavailable,
    failure_answer,
    fields_message,
    message_fields,
)
from cluster.ring import slot_of
from relay.batch import ack_events
from relay.errors import Code
from relay.publish import Wait, plan_pub, puback_fields
from relay.store import Message

log = logging.getLogger(__name__)


class Routing(Members):
    """Client ops: served here or forwarded to the owner."""

    def publish(
        self,
        *,
        ch: str,
        msg_id: str,
        body: bytes,
        sender: str,
        ttl_ms: int,
        ack: str,
        reply: Callable[[dict[str, Any] | None, Code | None, str], None],
    ) -> None:
        """Publish; ``reply(puback_fields, None, "")`` or ``reply(None, code, reason)``."""
        slot = slot_of(ch, self.slots)
        owner = self.owner_of(ch)
        if owner == self.me:
            try:
                self._publish_local(slot, MeshPub(ch, msg_id, body, sender, ttl_ms, ack), reply)
            except Unavailable as e:
                reply(None, Code.UNAVAILABLE, str(e))
            return
        if owner is None or self.mesh is None:
            reply(None, Code.UNAVAILABLE, "no owner for this channel right now")
            return
        args = {"ch": ch, "id": msg_id, "body": body, "from": sender, "ttl_ms": ttl_ms, "ack": ack}
        self._spawn(self._forward(owner, "pub", args, reply))

    async def _forward(
        self,
        owner: str,
        op: str,
        args: dict[str, Any],
        reply: Callable[[Any, Code | None, str], None],
        *,
        at_once: bool = False,
    ) -> None:
        """Send ``op`` to ``owner``; ``reply`` with its result or error. ``at_once``: reply
        in the same turn as the reply frame, before any delivery that follows it."""
        assert self.mesh is not None
        on_result = (lambda r: reply(r, None, "")) if at_once else None
        try:
            result = await self.mesh.request(owner, op, args, on_result=on_result)
        except RemoteError as e:
            reply(None, e.code, e.reason)
            return
        except PeerUnavailable as e:
            reply(None, Code.UNAVAILABLE, str(e))
            return
        if not at_once:
            reply(result, None, "")

    def _publish_local(
        self,
        slot: int,
        p: MeshPub,
        reply: Callable[[dict[str, Any] | None, Code | None, str], None],
    ) -> None:
        """The owner's publish (a client's here, or a peer's over the mesh)."""
        ch, msg_id, body, sender, ttl_ms, ack = p.ch, p.id, p.body, p.sender, p.ttl_ms, p.ack
        if not self.serving(slot):
            raise Unavailable(f"slot {slot} is moving; retry")
        now = self.wall_ms()
        acc = self.node.publish(ch, msg_id, body, sender=sender, ttl_ms=ttl_ms, now_ms=now)
        plan = plan_pub(
            dup=acc.dup,
            ack=ack,
            logged=True,
            batch_busy=acc.dup and self.batcher.busy(slot),
            remote_known=acc.dup and bool(self.links) and slot in self.applied,
        )
        waiter = None
        if plan.wait is Wait.NONE:
            reply(puback_fields(acc, plan.level), None, "")
        elif plan.wait is Wait.REMOTE:
            # A duplicate: confirmed once the slot's newest entry (at or after the first
            # copy's) is in another region.
            def remote_done(level: str | None) -> None:
                if level is None:
                    reply(None, Code.UNAVAILABLE, "no region confirmed it in time")
                else:
                    reply(puback_fields(acc, level), None, "")

            self._logged(slot, self.applied[slot], PubWaiter(remote_done, level="remote"))
        else:
            # Answered once the batch holding it (a duplicate: its first copy, which may
            # still be on its way to the log) is logged.
            moved = "the slot moved before {} logged".format(
                "it was" if acc.dup else "the message was"
            )

            def done(level: str | None) -> None:
                if level is None:
                    reply(None, *failure_answer(waiter, moved))
                else:
                    reply(puback_fields(acc, level), None, "")

            waiter = PubWaiter(done, level=plan.level)
        if not plan.log:
            if waiter is not None:
                self.batcher.add_waiter(slot, waiter, now)
            return
        self.slot_channels.setdefault(slot, set()).add(ch)
        self._changed(slot)
        # One message: what the log holds is what is delivered.
        message = acc.message or Message(
            msg_id, ch, sender, acc.hlc, acc.origin, body, now + ttl_ms
        )
        cut = self.batcher.add(slot, message, now, waiter)
        if cut:  # full batches: the group-commit loop appends them next, in order
            self._cut.extend(cut)
            self.commits.wake()
        if acc.message is not None or ch in self.interest:
            self._deliver(message)

    def _deliver(self, message: Message) -> None:
        local = self.node.subscribers.get(message.ch)
        if local:
            self.fan_out(message, tuple(local))
        peers = self.interest.get(message.ch)
        if peers and self.mesh is not None:
            fields = message_fields(message)
            for peer in list(peers):
                if not self.mesh.deliver(peer, message.ch, fields):
                    self.subs.remove(peer, message.ch)

    def _route(
        self, ch: str, reply: Callable[[Any, Code | None, str], None]
    ) -> tuple[str, int] | None:
        """The owner of ``ch`` (this node, serving it, or a peer the mesh reaches) and its
        slot; None once ``reply`` has answered ``unavailable``."""
        owner = self.owner_of(ch)
        slot = slot_of(ch, self.slots)
        if owner == self.me:
            if not self.serving(slot):
                reply(None, Code.UNAVAILABLE, f"slot {slot} is moving; retry")
                return None
            return owner, slot
        if owner is None or self.mesh is None:
            reply(None, Code.UNAVAILABLE, "no owner for this channel right now")
            return None
        return owner, slot

    def subscribe(
        self,
        handle: Hashable,
        ch: str,
        reply: Callable[[list[Message] | None, Code | None, str], None],
    ) -> None:
        routed = self._route(ch, reply)
        if routed is None:
            return
        owner, _ = routed
        if owner == self.me:
            self.subs.register(ch, self.me)
            reply(self.node.subscribe(handle, ch, self.wall_ms()), None, "")
            return

        def registered(result: Any, code: Code | None, reason: str) -> None:
            if code is not None:
                reply(None, code, reason)
                return
            # Registered now, in the same turn as the reply: deliveries that follow on
            # this connection are exactly the messages after the pending ones.
            self.node.subscribers.setdefault(ch, set()).add(handle)
            self.subs.register(ch, owner)
            reply([fields_message(f) for f in result], None, "")

        self._spawn(self._forward(owner, "sub", {"ch": ch}, registered, at_once=True))

    def unsubscribe(self, handle: Hashable, ch: str) -> None:
        self.node.unsubscribe(handle, ch)
        if ch not in self.node.subscribers:
            owner = self.subs.unregister(ch)
            if owner is not None and owner != self.me and self.mesh is not None:
                self.mesh.interest(owner, ch, False)

    def ack(
        self, ch: str, ids: list[str], reply: Callable[[int | None, Code | None, str], None]
    ) -> None:
        routed = self._route(ch, reply)
        if routed is None:
            return
        owner, slot = routed
        if owner == self.me:
            self._ack_logged(slot, ch, ids, reply)
            return
        self._spawn(
            self._forward(
                owner,
                "ack",
                {"ch": ch, "ids": ids},
                lambda r, c, s: reply(None if c else int(r), c, s),
            )
        )

    def _ack_logged(
        self,
        slot: int,
        ch: str,
        ids: list[str],
        reply: Callable[[int | None, Code | None, str], None],
    ) -> None:
        """Ack, and answer once the ack is in the slot log: an acknowledged ack survives
        a crash of this node (the message never comes back)."""
        n = self._ack_local(slot, ch, ids)

        def done(level: str | None) -> None:
            if level is None:
                reply(None, *failure_answer(w, "the slot moved before the ack was logged"))
            else:
                reply(n, None, "")

        w = PubWaiter(done)
        self.batcher.add_waiter(slot, w, self.wall_ms())

    def _ack_local(self, slot: int, ch: str, ids: list[str]) -> int:
        now = self.wall_ms()
        n = self.node.ack(ch, ids, now)
        hlc = self.node.clock.tick(now)
        for ev in ack_events(ch, ids, hlc, self.region):
            cut = self.batcher.add(slot, ev, now)
            if cut:
                self._cut.extend(cut)
                self.commits.wake()
        self._tombstone(slot, ch, ids, hlc)
        self._changed(slot)
        return n

    async def _resubscribe(self, ch: str) -> None:
        """The owner of ``ch`` moved: register with the new one and replay its pending
        messages to our subscribers (clients drop what they already have, by id).

        Retried until it works, the subscribers leave or the ring moves again: the new
        owner answers ``unavailable`` until its claim has read the log.
        """
        self.subs.unregister(ch)
        deadline = self.clock() + RESUBSCRIBE_S
        while not self.stopped and self.clock() < deadline:
            handles = tuple(self.node.subscribers.get(ch, ()))
            owner = self.owner_of(ch)
            if not handles or owner is None or self.registered.get(ch) is not None:
                return
            if owner == self.me:
                if self.serving(slot_of(ch, self.slots)):
                    self.subs.register(ch, self.me)
                    for m in self.node.store.pending(ch, self.wall_ms()):
                        self.fan_out(m, handles)
                    return
            elif self.mesh is not None:

                def registered(result: Any, owner: str = owner) -> None:
                    # In the same turn as the reply: the deliveries that follow it on the
                    # connection are the messages after these pending ones.
                    self.subs.register(ch, owner)
                    handles = tuple(self.node.subscribers.get(ch, ()))
                    for m in (fields_message(f) for f in result):
                        self.fan_out(m, handles)

                try:
                    await self.mesh.request(owner, "sub", {"ch": ch}, on_result=registered)
                except (PeerUnavailable, RemoteError) as e:
                    log.debug("re-subscribing %s with %s: %s", ch, owner, e)
                else:
                    if self.owner_of(ch) != owner:
                        self.subs.unregister(ch)
                        continue  # the ring moved during the request: follow it
                    return
            await self.sleep(0.1)  # the new owner is still claiming the slot
        log.warning("could not re-subscribe %s with its new owner", ch)
