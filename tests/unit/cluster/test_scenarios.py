"""Cluster scenarios as small scripts (tests/scenarios/*.txt), as etcd raft keeps them.

Real routers (:class:`cluster.region.Router`) on one in-memory slot log
(:class:`cluster.slotlog.MemorySlotLog`, the fake that passes the Redis log's shared
tests) and an in-memory mesh that calls the peer router's handlers directly. No socket,
no Redis, no sleeping: a step awaits what it started.

Commands (a node is ``nN``, ``owner`` / ``non-owner`` of the channel last named, or
``subscriber``, the node of the last ``subscribe``):

``add-node N…``                  start nodes; the ring is rebuilt and slots move
``kill N`` / ``kill-owner CH``   crash a node (no hand-over); the others claim its slots
``partition N`` / ``partition-non-owner CH`` / ``heal``   cut a node off the mesh, or mend
``publish N CH ID ACK``          a client's publish on node N (forwarded to the owner)
``ack N CH ID…``                 a client's ack on node N
``expect-reply WORDS``           the last reply: ``ok LEVEL [dup]``, ``ok N``, or a code
``expect-pending CH ID…``        the owner holds exactly these pending messages
``subscribe N CH``               a client on node N subscribes (through the owner)
``expect-delivered N CH ID…``    what node N fanned out to its clients on CH, in order
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cluster.mesh import PeerUnavailable
from cluster.ring import Ring
from cluster.router import Router
from cluster.slotlog import MemorySlotLog
from tests.conftest import aio, memory_router, publish_at

ROOT = Path(__file__).resolve().parents[3]
SCENARIOS = sorted((ROOT / "tests" / "scenarios").glob("*.txt"))
REGION = "sg"


class Net:
    """The region: its routers, its slot log, which nodes are dead or cut off."""

    def __init__(self) -> None:
        self.log = MemorySlotLog(REGION)
        self.routers: dict[str, Router] = {}
        self.dead: set[str] = set()
        self.cut: set[str] = set()
        self.now_ms = 1_000_000

    def reachable(self, a: str, b: str) -> bool:
        return not ({a, b} & (self.dead | self.cut))


class InMemoryMesh:
    """The mesh calls a router makes, carried out by calling the peer's handlers."""

    max_outbound_bytes = 64 * 1024 * 1024  # as cluster.mesh.Mesh: its send buffer

    def __init__(self, net: Net, me: str) -> None:
        self.net, self.me, self.epoch = net, me, 0

    @property
    def connections(self) -> dict[str, Any]:
        return {
            p: None for p in self.net.routers if p != self.me and self.net.reachable(self.me, p)
        }

    async def request(self, peer: str, op: str, args: Any, on_result: Any = None) -> Any:
        return await self.request_soon(peer, op, args, on_result)

    def request_soon(
        self, peer: str, op: str, args: Any, on_result: Any = None, *, patient: bool = False
    ) -> asyncio.Future[Any]:
        if not self.net.reachable(self.me, peer):
            raise PeerUnavailable(f"no connection to {peer}")
        return asyncio.ensure_future(self._serve(peer, op, args, on_result))

    async def _serve(self, peer: str, op: str, args: Any, on_result: Any) -> Any:
        result = self.net.routers[peer].on_request(self.me, op, args)
        if asyncio.isfuture(result):
            result = await result
        if on_result is not None:
            on_result(result)
        return result

    def deliver(self, peer: str, ch: str, fields: list[Any]) -> bool:
        if not self.net.reachable(self.me, peer):
            return False
        self.net.routers[peer].on_deliver(self.me, ch, fields)
        return True

    def interest(self, peer: str, ch: str, on: bool) -> bool:
        if not self.net.reachable(self.me, peer):
            return False
        self.net.routers[peer].on_interest(self.me, ch, on)
        return True

    def want(self, peer: str, address: str) -> None:
        pass

    def forget(self, peer: str) -> None:
        pass


class Scenario:
    def __init__(self) -> None:
        self.net = Net()
        self.ch = ""
        self.reply: list[Any] | None = None
        self.delivered: dict[str, dict[str, list[str]]] = {}
        self.subscriber = ""  # the node of the last subscribe

    def live(self) -> list[str]:
        return sorted(n for n in self.net.routers if n not in self.net.dead)

    def node(self, name: str) -> str:
        owner = self.owner(self.ch)
        if name == "owner":
            return owner
        if name == "non-owner":
            return next(n for n in self.live() if n != owner)
        if name == "subscriber":
            return self.subscriber
        return f"{REGION}/{name}"

    def owner(self, ch: str) -> str:
        r = self.net.routers[self.live()[0]]
        owner = r.owner_of(ch)
        assert owner is not None
        return owner

    def add(self, name: str) -> None:
        node_id = f"{REGION}/{name}"
        r = memory_router(node_id, self.net.log, lambda: self.net.now_ms)
        r.mesh = InMemoryMesh(self.net, node_id)  # type: ignore[assignment]
        got = self.delivered.setdefault(node_id, {})
        r.fan_out = lambda m, handles: got.setdefault(m.ch, []).append(m.id)
        self.net.routers[node_id] = r

    async def settle(self) -> None:
        """Every live node takes the newest ring: hands over what it lost, claims the rest."""
        live = self.live()
        for n in live:
            r = self.net.routers[n]
            r.ring = Ring(dict.fromkeys(live, 1.0), slots=r.slots, replicas=r.replicas)  # type: ignore[assignment]
        for n in live:
            r = self.net.routers[n]
            await r._release([s for s in r.owned if not r._should_own(s)])
        for n in live:
            r = self.net.routers[n]
            assert r.ring is not None
            for s in r.ring.slots_of(n):
                if s not in r.owned:
                    await r._claim_now(s)
            assert set(r.ring.slots_of(n)) <= set(r.owned), f"{n} did not claim all its slots"
        for n in live:
            r = self.net.routers[n]
            for gone in self.net.dead:
                r.on_peer_down(gone, "killed")
            # What that spawned (lease checks, re-subscriptions) ends now; then what the
            # new ring moved is registered again, as a rebalance does.
            await asyncio.gather(*r._background, return_exceptions=True)
            for ch in r.subs.moved(r.owner_of):
                await r._resubscribe(ch)

    async def flush(self) -> None:
        for n in self.live():
            await self.net.routers[n]._flush(force=True)

    async def answer(self) -> list[Any]:
        for _ in range(100):  # each round flushes and lets the mesh hops run
            await self.flush()
            await asyncio.sleep(0)  # one loop turn for the forwarded request
            if self.reply is not None:
                break
        assert self.reply is not None, "no reply"
        return self.reply

    async def run(self, cmd: str, args: list[str]) -> None:
        if cmd == "add-node":
            for a in args:
                self.add(a)
            await self.settle()
        elif cmd in ("kill", "kill-owner"):
            self.ch = args[0] if cmd == "kill-owner" else self.ch
            self.net.dead.add(self.owner(self.ch) if cmd == "kill-owner" else self.node(args[0]))
            await self.settle()
        elif cmd in ("partition", "partition-non-owner"):
            self.ch = args[0] if cmd == "partition-non-owner" else self.ch
            self.net.cut.add(self.node("non-owner" if cmd == "partition-non-owner" else args[0]))
        elif cmd == "heal":
            self.net.cut.clear()
        elif cmd == "publish":
            name, self.ch, msg_id, ack = args
            self.reply = None

            def reply(result: Any, code: Any, reason: str) -> None:
                if code is not None:
                    self.reply = [code.value]
                else:
                    self.reply = ["ok", result["ack"], *(["dup"] if result["dup"] else [])]

            publish_at(self.net.routers[self.node(name)], self.ch, msg_id, ack, reply)
            await self.answer()
        elif cmd == "ack":
            name, self.ch, *ids = args
            self.reply = None

            def acked(n: Any, code: Any, reason: str) -> None:
                self.reply = [code.value] if code is not None else ["ok", str(n)]

            self.net.routers[self.node(name)].ack(self.ch, ids, acked)
            await self.answer()
        elif cmd == "subscribe":
            name, self.ch = args
            self.reply = None

            def subscribed(pending: Any, code: Any, reason: str) -> None:
                self.reply = [code.value] if code is not None else ["ok", str(len(pending))]

            node_id = self.subscriber = self.node(name)
            self.net.routers[node_id].subscribe(f"client@{node_id}", self.ch, subscribed)
            await self.answer()
        elif cmd == "expect-delivered":
            name, self.ch, *ids = args
            node_id = self.node(name)
            got = self.delivered.get(node_id, {}).get(self.ch, [])
            assert got == ids, f"{node_id} delivered {got} on {self.ch}, expected {ids}"
        elif cmd == "expect-reply":
            assert self.reply == args, f"reply {self.reply}, expected {args}"
        elif cmd == "expect-pending":
            self.ch, *ids = args
            owner = self.net.routers[self.owner(self.ch)]
            held = [m.id for m in owner.node.store.pending(self.ch, 0)]
            assert held == ids, f"{owner.me} holds {held} of {self.ch}, expected {ids}"
        else:
            raise AssertionError(f"unknown command {cmd!r}")


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
@aio
async def test_scenario(path: Path) -> None:
    s = Scenario()
    try:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if words:
                try:
                    await s.run(words[0], words[1:])
                except AssertionError as e:
                    raise AssertionError(f"{path.name}:{n}: {line.strip()}: {e}") from None
    finally:
        for r in s.net.routers.values():
            for t in r._background:
                t.cancel()


def test_there_are_several_scenarios() -> None:
    assert len(SCENARIOS) >= 4
