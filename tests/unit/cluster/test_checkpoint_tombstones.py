"""A region node's checkpoints of a busy slot (the in-memory slot log, no Redis): the ack
tombstones of the dedupe window are encoded once, in sealed runs that every later
checkpoint reuses, and a reader does not apply tombstones older than the window."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import relay.snapshot as snapshot_mod
from cluster.checkpoint import MAGIC_V3, decode_checkpoint, encode_checkpoint
from cluster.ring import Ring, slot_of
from cluster.slotlog import MemorySlotLog
from relay.codec import AckEvent, MessageEvent, encode_batch
from relay.snapshot import SEAL_TOMBSTONES
from tests.conftest import aio, memory_router, publish_at

NOW_MS = 1_000_000_000
CH = "inbox:erin"


async def _owner(
    log: MemorySlotLog | None = None, node: str = "sg/n1", wall_ms: Any = lambda: NOW_MS
) -> tuple[Any, MemorySlotLog, int]:
    """``node`` owning CH's slot of ``log`` (a new one when None): a first owner, or
    one taking the slot over (it rebuilds it from the checkpoint and the log)."""
    log = MemorySlotLog("sg") if log is None else log
    r = memory_router(node, log, wall_ms=wall_ms)
    r.ring = Ring({node: 1.0}, slots=r.slots, replicas=r.replicas)
    slot = slot_of(CH, r.slots)
    await r._claim_now(slot)
    return r, log, slot


def _acked(r: Any, slot: int, first: int, n: int) -> None:
    """``n`` acks of the slot's channel, ids ``a<first>`` on, a millisecond apart."""
    for i in range(first, first + n):
        r._tombstone(slot, CH, [f"a{i}"], (NOW_MS - 60_000 + i) << 16)


def _ack_ids(data: bytes) -> list[str]:
    return [i for e in decode_checkpoint(data).events if isinstance(e, AckEvent) for i in e.ids]


@aio
async def test_the_window_is_sealed_once_and_reused_by_every_later_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r, log, slot = await _owner()
    sealed_calls: list[int] = []
    real = snapshot_mod.encode_tombstones

    def counted(tombstones: Any, region: str) -> Any:
        sealed_calls.append(len(tombstones))
        return real(tombstones, region)

    monkeypatch.setattr(snapshot_mod, "encode_tombstones", counted)
    n = 2 * SEAL_TOMBSTONES + 120
    _acked(r, slot, 0, n)
    first, _ = r._checkpoint_data(slot, [])
    assert first.startswith(MAGIC_V3)
    assert _ack_ids(first) == [f"a{i}" for i in range(n)]  # all of them, oldest first
    assert sealed_calls == [SEAL_TOMBSTONES, SEAL_TOMBSTONES]  # two whole runs sealed
    # Later checkpoints encode only what came since: the runs are reused as they are.
    _acked(r, slot, n, 10)
    second, _ = r._checkpoint_data(slot, [])
    assert sealed_calls == [SEAL_TOMBSTONES, SEAL_TOMBSTONES]
    assert _ack_ids(second) == [f"a{i}" for i in range(n + 10)]
    runs_first = msgspec.msgpack.decode(first[len(MAGIC_V3) :])[1][:-1]
    runs_second = msgspec.msgpack.decode(second[len(MAGIC_V3) :])[1][:-1]
    assert runs_first == runs_second and len(runs_first) >= 2
    await log.close()


@aio
async def test_a_checkpoint_keeps_within_room_the_newest_tombstones() -> None:
    r, log, slot = await _owner()
    n = 3 * SEAL_TOMBSTONES + 100
    _acked(r, slot, 0, n)
    batches, rest = r._checkpoint_tombstones(slot, SEAL_TOMBSTONES + 150)
    # The 100 not sealed and the newest whole run that fits.
    assert [t[1] for t in rest] == [f"a{i}" for i in range(n - 100, n)]
    ids = [i for b in batches for e in decode_checkpoint(b).events for i in e.ids]  # type: ignore[union-attr]
    assert ids == [f"a{i}" for i in range(n - 100 - SEAL_TOMBSTONES, n - 100)]
    assert r._checkpoint_tombstones(slot, 0) == ([], [])
    assert len(r._checkpoint_tombstones(slot, 40)[1]) == 40
    await log.close()


@aio
async def test_a_checkpoint_and_the_pending_messages_published_on_agree() -> None:
    r, log, slot = await _owner()
    _acked(r, slot, 0, SEAL_TOMBSTONES + 5)
    publish_at(r, CH, "kept")
    await r._flush(force=True)
    await r._checkpoint(slot)
    stored = await log.read_checkpoint(slot)
    assert stored is not None and stored.data.startswith(MAGIC_V3)
    cp = decode_checkpoint(stored.data)
    assert [e.id for e in cp.events if isinstance(e, MessageEvent)] == ["kept"]
    assert len(_ack_ids(stored.data)) == SEAL_TOMBSTONES + 5
    await log.close()


@aio
async def test_a_tombstone_older_than_the_window_does_not_remove_a_message_published_since() -> (
    None
):
    r, log, slot = await _owner()
    window_ms = r.node.dedupe.window_ms
    # "m1" was acked long ago (past the window); the same id was published again since,
    # and is pending.
    publish_at(r, CH, "m1")
    await r._flush(force=True)
    assert [m.id for m in r.node.store.pending(CH, NOW_MS)] == ["m1"]
    stale = AckEvent(CH, ("m1",), (NOW_MS - window_ms - 5_000) << 16, "sg")
    recent = AckEvent(CH, ("gone",), (NOW_MS - 1_000) << 16, "sg")
    data = encode_checkpoint([recent], {}, hlc=NOW_MS << 16, batches=[encode_batch([stale])])
    r._apply(slot, data, NOW_MS)
    assert [m.id for m in r.node.store.pending(CH, NOW_MS)] == ["m1"]
    held = {i for _, i, _ in r.acks.by_slot.get(slot, ())}
    assert "gone" in held and "m1" not in held
    await log.close()


@aio
async def test_a_new_owner_rebuilds_the_slot_from_a_version_3_checkpoint() -> None:
    r, log, slot = await _owner()
    n = 2 * SEAL_TOMBSTONES + 7
    _acked(r, slot, 0, n)
    publish_at(r, CH, "kept")
    await r._flush(force=True)
    await r._checkpoint(slot)
    stored = await log.read_checkpoint(slot)
    assert stored is not None and stored.data.startswith(MAGIC_V3)
    # Another node takes the slot over from the same log (the first one is gone).
    r2, _, _ = await _owner(log, "sg/n2")
    assert [m.id for m in r2.node.store.pending(CH, NOW_MS)] == ["kept"]
    held = [i for _, i, _ in r2.acks.by_slot.get(slot, ())]
    assert held == [f"a{i}" for i in range(n)]
    await log.close()


@aio
async def test_a_sealed_run_astride_the_window_does_not_drop_a_message_published_again() -> None:
    # What the writer makes: a run sealed while all of it was fresh, half of it stale a
    # window later, in the checkpoint a new owner reads after the same id came again.
    now = [NOW_MS]
    r, log, slot = await _owner(wall_ms=lambda: now[0])
    window_ms = r.node.dedupe.window_ms
    for i in range(SEAL_TOMBSTONES):  # a millisecond apart
        now[0] = NOW_MS + i
        r._tombstone(slot, CH, [f"a{i}"], (NOW_MS + i) << 16)
    await r._checkpoint(slot)  # seals the run
    now[0] = NOW_MS + window_ms + SEAL_TOMBSTONES // 2  # a0 … a249 are past the window
    r._tombstone(slot, CH, ["later"], now[0] << 16)
    publish_at(r, CH, "a10")  # the same id again, after the window: a new message
    await r._flush(force=True)
    assert [m.id for m in r.node.store.pending(CH, now[0])] == ["a10"]
    await r._checkpoint(slot)
    r2, _, _ = await _owner(log, "sg/n2", wall_ms=lambda: now[0])
    assert [m.id for m in r2.node.store.pending(CH, now[0])] == ["a10"]
    held = {i for _, i, _ in r2.acks.by_slot.get(slot, ())}
    assert "a10" not in held and "a300" in held and "later" in held
    await log.close()


@aio
async def test_version_2_is_written_while_earlier_builds_run_in_the_region() -> None:
    from dataclasses import replace

    from cluster.checkpoint import MAGIC_V2

    r, log, slot = await _owner()
    r.config = replace(r.config, cluster=replace(r.config.cluster, checkpoint_version=2))
    n = SEAL_TOMBSTONES + 30
    _acked(r, slot, 0, n)
    data, _ = r._checkpoint_data(slot, [])
    assert data.startswith(MAGIC_V2)
    assert sorted(_ack_ids(data)) == sorted(f"a{i}" for i in range(n))
    await log.close()
