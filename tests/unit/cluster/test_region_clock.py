"""The region node on an injected clock: its timing reads the clock it was given, so a
test steps time instead of sleeping (no socket, no Redis: the in-memory slot log)."""

from __future__ import annotations

from cluster.ring import Ring, slot_of
from cluster.slotlog import MemorySlotLog
from cluster.slots import SlotState
from tests.conftest import FakeClock, aio, memory_router, publish_at


@aio
async def test_a_published_message_ages_on_the_injected_clock_until_it_is_snapshotted() -> None:
    clock = FakeClock()
    log = MemorySlotLog("sg")
    r = memory_router("sg/n1", log, clock=clock)
    r.ring = Ring({"sg/n1": 1.0}, slots=r.slots, replicas=r.replicas)
    ch = "inbox:erin"
    slot = slot_of(ch, r.slots)
    await r._claim_now(slot)
    assert r.slot_table.state(slot) is SlotState.OWNER
    assert r.data_at_risk()["snapshot_age_s"] == 0.0
    publish_at(r, ch, "m1", ack="mem")
    clock.now += 7.5
    risk = r.data_at_risk()
    assert risk["snapshot_age_s"] == 7.5 and risk["unsaved_slots"] >= 1
    clock.now += 1.0
    assert r.data_at_risk()["snapshot_age_s"] == 8.5
    await log.close()
