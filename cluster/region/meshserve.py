"""Answering peers over the mesh: their ops pass the same checks as a client's
(:mod:`cluster.meshops`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from cluster import meshops
from cluster.mesh import RemoteError
from cluster.region.routing import Routing
from cluster.region.state import Unavailable, message_fields
from cluster.ring import slot_of
from relay.errors import Code
from relay.frames import BadObject

log = logging.getLogger(__name__)


def answer_future() -> tuple[asyncio.Future[Any], Callable[[Any, Code | None, str], None]]:
    """A future the mesh answers a peer with, and the ``reply(result, code, reason)``
    that settles it (once): a code becomes the peer's :class:`RemoteError`."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def reply(result: Any, code: Code | None, reason: str) -> None:
        if fut.done():
            return
        if code is not None:
            fut.set_exception(RemoteError(code, reason))
        else:
            fut.set_result(result)

    return fut, reply


class MeshServe(Routing):
    """Peers' ops over the mesh."""

    def on_request(self, peer: str, op: str, args: Any) -> Any:
        # A peer's arguments pass the same checks as a client's (cluster/meshops.py).
        try:
            if op == "pub":
                c = self.config
                return self._serve_pub(
                    meshops.parse_pub(
                        args, max_body=c.client.max_body, max_ttl_ms=c.store.max_ttl_s * 1000
                    )
                )
            if op == "sub":
                ch, ids = meshops.parse_sub(args), None
            elif op == "ack":
                ch, ids = meshops.parse_ack(args)
            else:
                raise BadObject(Code.BAD_REQUEST, f"unknown mesh op {str(op)[:40]!r}")
        except BadObject as e:
            self.mesh_counters["bad_requests"] += 1
            log.warning("mesh: %s's %s refused: %s", peer, str(op)[:40], e.reason)
            raise RemoteError(e.code, e.reason) from None
        slot = slot_of(ch, self.slots)
        if not self.serving(slot):
            raise RemoteError(Code.UNAVAILABLE, f"{self.me} does not serve slot {slot} now")
        if ids is None:
            self.subs.add(peer, ch)
            return [message_fields(m) for m in self.node.store.pending(ch, self.wall_ms())]
        fut, acked = answer_future()
        self._ack_logged(slot, ch, ids, acked)
        return fut

    def _serve_pub(self, p: meshops.MeshPub) -> Any:
        fut, reply = answer_future()
        try:
            self._publish_local(slot_of(p.ch, self.slots), p, reply)
        except Unavailable as e:
            raise RemoteError(Code.UNAVAILABLE, str(e)) from None
        return fut

    def on_deliver(self, peer: str, ch: str, fields: list[Any]) -> None:
        if not self.subs.follows(ch, peer):
            return  # from an owner we no longer follow for this channel
        local = self.node.subscribers.get(ch)
        if local:
            try:
                message = meshops.parse_delivery(ch, fields)
            except BadObject as e:
                self.mesh_counters["bad_requests"] += 1
                log.warning("mesh: %s delivered a bad message on %r: %s", peer, ch, e.reason)
                return
            self.fan_out(message, tuple(local))

    def on_interest(self, peer: str, ch: str, on: bool) -> None:
        if on:
            try:
                meshops.parse_sub({"ch": ch})
            except BadObject:
                self.mesh_counters["bad_requests"] += 1
                return
            self.subs.add(peer, ch)
        else:
            self.subs.remove(peer, ch)
