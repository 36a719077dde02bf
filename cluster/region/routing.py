"""Client ops on a channel: served here when this node owns its slot, else forwarded
over the mesh to the owner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Any

from cluster.mesh import PeerUnavailable, RemoteError
from cluster.meshops import MeshPub
from cluster.region.members import Members
from cluster.region.state import message_fields
from cluster.regioncore import (
    Ack,
    Answered,
    Forward,
    Publish,
    Ready,
    Registered,
    Resubscribe,
    Subscribe,
    Unsubscribe,
)
from relay.errors import Code
from relay.store import Message

log = logging.getLogger(__name__)


class Routing(Members):
    """Client ops: each one a step of the region core (cluster/regioncore.py), whose
    Ready this layer carries out: replies, appends, deliveries, forwards to the owner."""

    def _carry(self, ready: Ready) -> None:
        """Carry out a Ready of an op, in its order (see cluster/regioncore.py)."""
        if ready.appends:  # full batches: the group-commit loop appends them next, in order
            # Queued first: the batches hold other ops' messages and waiters, which must
            # not depend on the replies below going well.
            self._cut.extend(ready.appends)
            self.commits.wake()
        for reply, result, code, reason in ready.replies:
            reply(result, code, reason)
        for w, level in ready.answers:
            w.settle(level)
        if ready.changed >= 0:
            self._changed(ready.changed)
        if ready.deliver is not None:
            self._deliver(ready.deliver)
        if ready.fan_out is not None:
            self.fan_out(*ready.fan_out)
        if ready.forward is not None:
            self._forward(ready.forward)
        if ready.interest is not None and self.mesh is not None:
            self.mesh.interest(*ready.interest)
        if ready.refused:
            self.mesh_counters["bad_requests"] += 1
            log.warning("mesh: %s", ready.refused)

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
        p = MeshPub(ch, msg_id, body, sender, ttl_ms, ack)
        ev = Publish(p, reply, self.wall_ms(), self.clock(), self.lease_fresh())
        self._carry(self.core.step(ev))

    def _forward(self, f: Forward) -> None:
        """Send ``f.op`` to the owner; step the core with its result or error (``at_once``:
        in the same turn as the reply frame, before any delivery that follows it). No
        task per forwarded op: a callback on the request's future."""
        assert self.mesh is not None

        def answered(result: Any, code: Code | None, reason: str) -> None:
            self._carry(self.core.step(Answered(f, result, code, reason)))

        def at_once(result: Any) -> None:
            if not self.stopped:
                answered(result, None, "")

        on_result = at_once if f.at_once else None
        try:
            patient = f.op == "pub" and f.args.get("ack") == "remote"
            fut = self.mesh.request_soon(
                f.owner, f.op, f.args, on_result=on_result, patient=patient
            )
        except PeerUnavailable as e:
            # Answered next turn, as a reply would be: never inside the _carry that
            # forwards (its remaining steps come first).
            why = str(e)
            asyncio.get_running_loop().call_soon(
                lambda: None if self.stopped else answered(None, Code.UNAVAILABLE, why)
            )
            return

        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                return
            e = fut.exception()  # retrieved even when stopping (the mesh fails them all)
            if self.stopped:
                return
            try:
                if e is None:
                    if not f.at_once:
                        answered(fut.result(), None, "")
                elif isinstance(e, RemoteError):
                    answered(None, e.code, e.reason)
                elif isinstance(e, PeerUnavailable):
                    answered(None, Code.UNAVAILABLE, str(e))
                else:  # on_result raised (a malformed reply): logged, and answered
                    log.error("mesh: %s forwarded to %s failed", f.op, f.owner, exc_info=e)
                    answered(None, Code.INTERNAL, f"{f.owner} sent a reply that cannot be used")
            except Exception:
                log.exception("mesh: answering %s forwarded to %s failed", f.op, f.owner)

        fut.add_done_callback(done)

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

    def subscribe(
        self,
        handle: Hashable,
        ch: str,
        reply: Callable[[list[Message] | None, Code | None, str], None],
    ) -> None:
        ev = Subscribe(ch, handle, reply, self.wall_ms(), self.lease_fresh())
        self._carry(self.core.step(ev))

    def unsubscribe(self, handle: Hashable, ch: str) -> None:
        self._carry(self.core.step(Unsubscribe(ch, handle)))

    def ack(
        self, ch: str, ids: list[str], reply: Callable[[int | None, Code | None, str], None]
    ) -> None:
        self._carry(self.core.step(Ack(ch, ids, reply, self.wall_ms(), self.lease_fresh())))

    async def _resubscribe(self, ch: str) -> None:
        """The owner of ``ch`` moved: register with the new one and replay its pending
        messages to our subscribers (clients drop what they already have, by id). The
        core says whom to ask, when to wait and when to give up (cluster/regioncore.py)."""
        since = self.clock()
        ev = Resubscribe(ch, since, since, self.wall_ms(), self.lease_fresh(), start=True)
        while not self.stopped:
            ready = self.core.step(ev)
            self._replay(ready)
            r = ready.resubscribe
            if r is None:
                return
            if r.gave_up:
                break
            ok = False
            if r.ask:
                owner = r.ask

                def registered(result: Any, owner: str = owner) -> None:
                    # In the same turn as the reply: the deliveries that follow it on the
                    # connection are the messages after these pending ones.
                    self._replay(self.core.step(Registered(ch, owner, result)))

                if self.mesh is not None:  # else: not asked; the core says to wait
                    try:
                        await self.mesh.request(owner, "sub", {"ch": ch}, on_result=registered)
                        ok = True
                    except (PeerUnavailable, RemoteError) as e:
                        log.debug("re-subscribing %s with %s: %s", ch, owner, e)
            else:
                await self.sleep(r.wait_s)  # the new owner is still claiming the slot
            now = self.clock()
            fresh = self.lease_fresh()
            ev = Resubscribe(ch, since, now, self.wall_ms(), fresh, asked=r.ask, ok=ok)
        log.warning("could not re-subscribe %s with its new owner", ch)

    def _replay(self, ready: Ready) -> None:
        if ready.replay is not None:
            messages, handles = ready.replay
            for m in messages:
                self.fan_out(m, handles)
