"""The router's slot-log bookkeeping under faults, on the in-memory slot log.

Regression tests for a review's findings: a failed append never turns into an ack=log
for a message the log lacks, and a slot rebuilt after a trim holds every logged message.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from cluster.membership import Joined, Member
from cluster.ring import Ring, slot_of
from cluster.router import Router
from cluster.slotlog import MemorySlotLog
from relay.codec import MessageEvent, decode_batch
from tests.conftest import aio, memory_router, next_turn, publish_at, until


class Flaky(MemorySlotLog):
    fail = 1

    async def append_many(self, *a: Any, **k: Any) -> Any:
        if self.fail:
            self.fail -= 1
            raise RedisConnectionError("blip")
        return await super().append_many(*a, **k)


def router(node_id: str, log: MemorySlotLog) -> Router:
    r: Router = memory_router(node_id, log)
    return r


def give_all_to(owner: str, *routers: Router) -> None:
    """Every router's ring puts every slot on ``owner``."""
    for r in routers:
        r.ring = Ring({owner: 1.0}, slots=r.slots, replicas=r.replicas)


async def flaky_owner(ch: str) -> tuple[Flaky, Router, int]:
    """A router alone on a flaky log, owning ``ch``'s slot (claimed)."""
    log = Flaky("sg")
    r = router("sg/n1", log)
    give_all_to("sg/n1", r)
    slot = slot_of(ch, r.slots)
    await r._claim_now(slot)
    return log, r, slot


async def logged_ids(log: MemorySlotLog, slot: int) -> set[str]:
    out = set()
    for e in await log.read(slot):
        for ev in decode_batch(e.data):
            if isinstance(ev, MessageEvent):
                out.add(ev.id)
    return out


@aio
async def test_a_failed_full_batch_is_retried_whole() -> None:
    ch = "inbox:carol"
    log, r, slot = await flaky_owner(ch)
    answered: dict[str, Any] = {}
    for i in range(1001):  # the 1000th fills a batch, appended at once: it fails
        publish_at(
            r,
            ch,
            f"m{i}",
            reply=lambda f, c, s, i=i: answered.__setitem__(f"m{i}", (f or {}).get("ack", c)),
        )
    await until(lambda: not r._background, what="the full batch's append ran (and failed)")
    for _ in range(3):
        await r._flush(force=True)
    in_log = await logged_ids(log, slot)
    assert {i for i, a in answered.items() if a == "log"} <= in_log
    assert len(answered) == 1001 and r.batcher.in_flight == 0
    await r.slotlog.close()


@aio
async def test_a_slot_rebuilt_after_a_trim_holds_every_logged_message() -> None:
    log = MemorySlotLog("sg")
    a, b = router("sg/n1", log), router("sg/n2", log)
    ch, slot = "inbox:alice", slot_of("inbox:alice", a.slots)
    give_all_to("sg/n1", a, b)
    await a._claim_now(slot)
    publish_at(a, ch, "m1")
    await a._flush(force=True)
    # The slot moves to b, which logs more, checkpoints and trims.
    a._lose(slot)
    give_all_to("sg/n2", a, b)
    await b._claim_now(slot)
    for i in (2, 3):
        publish_at(b, ch, f"m{i}")
        await b._flush(force=True)
    events = [
        MessageEvent(m.id, m.ch, m.sender, m.hlc, m.origin, m.body, m.expires_ms)
        for m in b.node.store.pending(ch, 0)
    ]
    await log.write_checkpoint(
        slot, "sg/n2", b.owned[slot], b._checkpoint_data(slot, events)[0], b.applied[slot]
    )
    await log.trim(slot, b.applied[slot])
    # Back to a: it must rebuild from the checkpoint, not trust its stale position.
    give_all_to("sg/n1", a, b)
    b._lose(slot)
    await a._claim_now(slot)
    assert [m.id for m in a.node.store.pending(ch, 0)] == ["m1", "m2", "m3"]
    await log.close()


@aio
async def test_a_replica_that_lagged_behind_a_trim_rebuilds_from_the_checkpoint() -> None:
    import asyncio

    log = MemorySlotLog("sg")
    a, b = router("sg/n1", log), router("sg/n2", log)
    ch = "inbox:dave"
    slot = slot_of(ch, a.slots)
    give_all_to("sg/n2", a, b)
    await b._claim_now(slot)

    publish_at(b, ch, "m1")
    await b._flush(force=True)
    await a._catch_up(slot)  # a replicates the slot: it holds m1
    # a lags while b logs m2 and m3, checkpoints and trims the log behind m3, logs m4.
    for i in (2, 3):
        publish_at(b, ch, f"m{i}")
        await b._flush(force=True)
    await b._checkpoint(slot)
    assert [e.id for e in await log.read(slot)] == [b.applied[slot]]  # only m3's entry
    publish_at(b, ch, "m4")
    await b._flush(force=True)
    # a's tail reads on from m1's entry: m2's is gone. It must notice and rebuild.
    tail = asyncio.ensure_future(a._tail_loop([slot]))
    try:
        await until(lambda: a.applied.get(slot) == b.applied[slot], what="a caught up")
    finally:
        tail.cancel()
    assert sorted(m.id for m in a.node.store.pending(ch, 0)) == ["m1", "m2", "m3", "m4"]
    # And after a failover to a, every logged message is there.
    b._lose(slot)
    give_all_to("sg/n1", a, b)
    await a._claim_now(slot)
    assert sorted(m.id for m in a.node.store.pending(ch, 0)) == ["m1", "m2", "m3", "m4"]
    await log.close()


@aio
async def test_an_entry_that_cannot_be_encoded_fails_alone() -> None:
    """A bad event (here an id the codec refuses, put past every check) in one slot: its
    own waiter gets ``internal``; a good pub of another slot in the same flush is logged,
    and nothing stays in flight."""
    log = MemorySlotLog("sg")
    r = router("sg/n1", log)
    give_all_to("sg/n1", r)
    bad_ch, good_ch = "inbox:bad", "inbox:good"
    assert slot_of(bad_ch, r.slots) != slot_of(good_ch, r.slots)
    for ch in (bad_ch, good_ch):
        await r._claim_now(slot_of(ch, r.slots))
    answered: dict[str, Any] = {}
    for ch, msg_id in ((bad_ch, "i" * 65), (good_ch, "fine")):
        publish_at(
            r,
            ch,
            msg_id,
            reply=lambda f, c, s, ch=ch: answered.__setitem__(ch, (f or {}).get("ack", c)),
        )
    await r._flush(force=True)
    assert answered == {good_ch: "log", bad_ch: "internal"}
    assert r.batcher.in_flight == 0
    assert r.mesh_counters["encode_failures"] == 1
    assert await logged_ids(log, slot_of(good_ch, r.slots)) == {"fine"}


async def logged_order(log: MemorySlotLog, slot: int) -> list[str]:
    return [
        ev.id
        for e in await log.read(slot)
        for ev in decode_batch(e.data)
        if isinstance(ev, MessageEvent)
    ]


@aio
async def test_full_batches_and_a_failed_append_keep_the_slots_order() -> None:
    # Two batches fill up while the first append fails: the group-commit loop, a
    # release's flush and a drain's flush all append one at a time, so the retried
    # first batch still lands before the second (it used to be appended beside it).
    import asyncio

    ch = "inbox:dave"
    log, r, slot = await flaky_owner(ch)
    sent = [f"m{i}" for i in range(2001)]
    for i, msg_id in enumerate(sent):
        publish_at(r, ch, msg_id)
        if i == 999:
            first = asyncio.ensure_future(r._flush(force=True))  # fails (Flaky)
    await asyncio.gather(first, r._flush(force=True), r._flush(force=True))
    for _ in range(3):
        await r._flush(force=True)
    assert await logged_order(log, slot) == sent
    await r.slotlog.close()


@aio
async def test_a_slot_lost_while_the_ring_still_names_us_keeps_its_subscribers() -> None:
    # Peers register a channel's subscribers with the ring's owner. An owner record
    # taken from us by a node whose view was behind (then given back) moves no ring:
    # the peers register nothing again, so the interest they gave us must outlive the
    # loss, or deliveries to them stop for good. A slot the ring gives to another node
    # drops it (the peers register with that node).
    log = MemorySlotLog("sg")
    a = router("sg/n1", log)
    give_all_to("sg/n1", a)
    ch = "inbox:erin"
    slot = slot_of(ch, a.slots)
    await a._claim_now(slot)
    publish_at(a, ch, "m1")  # the slot holds the channel (a message pending)
    await a._flush(force=True)
    a.subs.add("sg/n3", ch)
    a._lose(slot)
    assert a.interest[ch] == {"sg/n3"}
    await a._claim_now(slot)
    publish_at(a, ch, "m2")
    await a._flush(force=True)
    assert [m.id for m in a.node.store.pending(ch, 0)] == ["m1", "m2"]
    assert a.interest[ch] == {"sg/n3"}  # m2 goes to sg/n3's subscribers
    give_all_to("sg/n2", a)
    a._lose(slot)
    assert ch not in a.interest
    # Kept through a loss, then the ring moves the slot away: a rebalance drops it.
    give_all_to("sg/n1", a)
    await a._claim_now(slot)
    a.subs.add("sg/n3", ch)
    a._lose(slot)
    assert a.interest[ch] == {"sg/n3"}
    a.members_known = True
    a.ring = None  # the rebalance builds the ring of the live members: sg/n2 only
    a._live = lambda: {"sg/n2": 1.0}
    await a._rebalance()
    assert a.owner_of(ch) == "sg/n2" and ch not in a.interest
    await log.close()


@aio
async def test_a_starting_node_does_not_rebalance_on_its_own_join_before_knowing_others() -> None:
    # A node hears its own join (it subscribes to the region's membership events first)
    # before it has read the other members' leases. A rebalance then would build a ring
    # of this node alone and claim every slot from live owners: none runs until start()
    # has seen every lease; the first one, then, sees them all.
    log = MemorySlotLog("sg")
    a = router("sg/n1", log)
    assert not a.members_known
    a.on_membership(Joined(Member("sg/n1", 7, "127.0.0.1:1")))
    for _ in range(5):
        await next_turn()
    assert a.ring is None and not a._claim_tasks and a.owned == {}
    a._observe_member(Member("sg/n2", 3, "127.0.0.1:2"))
    a.members_known = True  # start() has observed every lease held
    await a._rebalance()
    assert a.ring is not None and set(a.ring.assignment()) == {"sg/n1", "sg/n2"}
    for task in list(a._claim_tasks.values()):
        task.cancel()
    await log.close()


class _SlowSnapshot:
    """A membership whose lease read is overtaken by a join event: ``peer`` rejoins at
    a new epoch after the read passed its key, and its join reaches the listener
    before the read returns."""

    def __init__(self, r: Router, peer: Member) -> None:
        self.r, self.peer = r, peer

    async def snapshot(self) -> dict[str, Member]:
        self.r.on_membership(Joined(self.peer))
        return {}


@aio
async def test_a_rejoin_does_not_expire_a_peer_that_joined_while_the_leases_were_read() -> None:
    log = MemorySlotLog("sg")
    a = router("sg/n1", log)
    a._observe_member(Member("sg/n1", 1, "127.0.0.1:1"))
    a._observe_member(Member("sg/n2", 2, "127.0.0.1:2"))
    a.membership = _SlowSnapshot(a, Member("sg/n2", 4, "127.0.0.1:2"))  # type: ignore[assignment]
    await a._reconcile_after_rejoin()
    assert "sg/n2" in a.detector.live() and a.detector.epoch("sg/n2") == 4
    # A peer whose lease is gone and that did not rejoin meanwhile expires.
    a.membership = _SlowSnapshot(a, Member("sg/n3", 5, "127.0.0.1:3"))  # type: ignore[assignment]
    await a._reconcile_after_rejoin()
    assert "sg/n2" not in a.detector.live() and "sg/n3" in a.detector.live()
    await log.close()
