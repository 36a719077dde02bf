"""The cyclic garbage collector, tuned for a node's heap.

A node holds every pending message, its dedupe index and its ack tombstones: hundreds of
thousands of container objects that live for minutes, while each message it handles
makes dozens of short-lived ones (frames, dicts, events) that reference counting frees
on its own — they hold no cycles. With CPython's default thresholds (700, 10, 10) a young
collection runs every 700 net allocations, a middle one every 7,000, and full ones, which
walk the whole long-lived heap, often enough to stall the reactor for tens of
milliseconds at a time. Measured with ``relay bench peer`` (one node, alternated runs,
docs/BENCHMARKS.md §9): publish→ack p50/p99 at 5 k msgs/s 8–13 / 64–79 ms with the
defaults against 3.0–3.9 / 20–28 ms with the thresholds below; CPU per message at
saturation 42 against 36–40 µs.

The thresholds below still collect: a young collection every 20,000 net allocations
(allocations of tracked objects minus their frees, so short-lived objects hardly count)
and a middle one every 50 young ones, so a cycle that dies young (a Twisted failure, a
cancelled task) is still reclaimed. A full collection comes only after 100 middle ones
*and* once a quarter of the long-lived heap is new (CPython's own rule): in a steady
state that is rare, so cyclic garbage that survived into the oldest generation may stay
for long. ``relay bench replication --soak`` samples the nodes' RSS: with these
thresholds it was flat over 4 minutes at 2,000 msgs/s once the dedupe window was full
(docs/BENCHMARKS.md §8; longer runs not measured). Whatever the node built before it
serves (modules, config) is frozen out of every collection.
"""

from __future__ import annotations

import gc

THRESHOLDS = (20_000, 50, 100)


def tune() -> None:
    """Freeze what exists now and set :data:`THRESHOLDS` (call once, before serving)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
