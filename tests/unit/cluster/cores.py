"""One way to build a region core for the unit tests, with no sockets and no clock."""

from __future__ import annotations

from typing import Any

from cluster.interest import Interest
from cluster.ownership import OwnershipCore
from cluster.positions import Positions, Tombstones
from cluster.regioncore import RegionCore
from cluster.slots import SlotTable
from relay.batch import Batcher
from relay.dedupe import DedupeIndex
from relay.node import Node
from relay.store import PendingStore


def region_core(
    me: str, slots: int, *, messages: int, dedupe_ms: int, tombstones: int, **extra: Any
) -> RegionCore:
    """A core of region ``sg`` with one link (to ``fra``); ``extra``: RegionCore fields."""
    node = Node(
        node_id=me,
        region="sg",
        store=PendingStore(channel_max_messages=messages, channel_max_bytes=messages << 10),
        dedupe=DedupeIndex(window_ms=dedupe_ms, max_ids=10 * tombstones),
    )
    return RegionCore(
        me=me,
        region="sg",
        node=node,
        batcher=Batcher(window_ms=100),
        ownership=OwnershipCore(me, SlotTable(), slots, 2),
        positions=Positions(["fra"]),
        interest=Interest(),
        acks=Tombstones(tombstones),
        **extra,
    )
