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
from cluster.regioncore import Ack, MeshDeliver, MeshInterest, Publish, Subscribe
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
    """Peers' ops over the mesh: parsed here, then steps of the region core."""

    def on_request(self, peer: str, op: str, args: Any) -> Any:
        # A peer's arguments pass the same checks as a client's (cluster/meshops.py).
        c = self.config
        try:
            if op == "pub":
                p = meshops.parse_pub(
                    args, max_body=c.client.max_body, max_ttl_ms=c.store.max_ttl_s * 1000
                )
            elif op == "sub":
                ch = meshops.parse_sub(args)
            elif op == "ack":
                ch, ids = meshops.parse_ack(args)
            else:
                raise BadObject(Code.BAD_REQUEST, f"unknown mesh op {str(op)[:40]!r}")
        except BadObject as e:
            self.mesh_counters["bad_requests"] += 1
            log.warning("mesh: %s's %s refused: %s", peer, str(op)[:40], e.reason)
            raise RemoteError(e.code, e.reason) from None
        fresh = self.lease_fresh()
        if op == "sub":
            self._check_sub_budget(peer)
            # Answered in this turn: the reply frame goes before any delivery after it.
            got: list[tuple[Any, Code | None, str]] = []
            ev: Any = Subscribe(
                ch, None, lambda *a: got.append(a), self.wall_ms(), fresh, peer=peer
            )
            self._carry(self.core.step(ev))
            result, code, reason = got[0]
            if code is not None:
                raise RemoteError(code, reason)
            self._count_sub_reply(peer, result)
            return result
        fut, reply = answer_future()
        if op == "pub":
            ev = Publish(p, reply, self.wall_ms(), self.clock(), fresh, peer=peer)
        else:
            ev = Ack(ch, ids, reply, self.wall_ms(), fresh, peer=peer)
        self._carry(self.core.step(ev))
        if fut.done() and fut.exception() is not None:
            raise fut.exception() from None  # type: ignore[misc]  # refused: at once
        return fut

    def _check_sub_budget(self, peer: str) -> None:
        """A sub's reply carries the channel's whole backlog (up to its byte cap): while
        what this node still has to write to ``peer`` (queued, and the replies of this
        turn) is over half the mesh's send buffer, refuse it, so that many subs at once
        (several clients, many channels) cannot make the buffer overflow and cut the
        connection (every op crossing it would fail)."""
        conn = self.mesh.connections.get(peer) if self.mesh is not None else None
        queued = conn.pressure.queued if conn is not None else 0
        limit = self.mesh.max_outbound_bytes // 2 if self.mesh is not None else 0
        if queued + self._sub_reply_bytes.get(peer, 0) > limit:
            raise RemoteError(
                Code.OVERLOADED,
                "the owner is still sending earlier subs' pending messages to this node; retry",
            )

    def _count_sub_reply(self, peer: str, result: list[Any]) -> None:
        size = sum(len(f[5]) + len(f[0]) + len(f[1]) + len(f[2]) + 64 for f in result)
        if not self._sub_reply_bytes:
            # Counted until this turn's replies are written (then the connection's own
            # queue says what is left).
            asyncio.get_running_loop().call_soon(self._sub_reply_bytes.clear)
        self._sub_reply_bytes[peer] = self._sub_reply_bytes.get(peer, 0) + size

    def on_deliver(self, peer: str, ch: str, fields: list[Any]) -> None:
        self._carry(self.core.step(MeshDeliver(peer, ch, fields)))

    def on_interest(self, peer: str, ch: str, on: bool) -> None:
        self._carry(self.core.step(MeshInterest(peer, ch, on)))
