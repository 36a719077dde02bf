"""RSS per pending message held by a node's core (``python -m bench.memory``).

Run in a fresh process: it builds a :class:`relay.node.Node` (store + dedupe, as
``relay serve`` does), samples RSS, publishes ``messages`` messages of ``body_bytes``
bytes spread evenly over ``channels`` channels with no subscriber (so all stay pending),
samples RSS again and divides. The yardstick is the msgpack encoding of the ``msg``
object a subscriber would receive for the same message.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Any

import psutil


def run(messages: int, channels: int, body_bytes: int, id_chars: int) -> dict[str, Any]:
    from relay.dedupe import DedupeIndex
    from relay.frames import Format, encode_frame
    from relay.node import Node
    from relay.session import message_object
    from relay.store import PendingStore

    node = Node(
        node_id="bench/n1",
        region="bench",
        store=PendingStore(channel_max_messages=10_000, channel_max_bytes=16 * 1024 * 1024),
        dedupe=DedupeIndex(window_ms=600_000, max_ids=4_000_000),
    )
    body = (b"lorem ipsum dolor sit amet " * (body_bytes // 27 + 1))[:body_bytes]
    now_ms = 1_764_000_000_000
    ttl_ms = 604_800_000
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    publish = node.publish
    id_fmt = "%0" + str(id_chars) + "d"
    for i in range(messages):
        ch = f"room:{i % channels:06d}"
        publish(ch, id_fmt % i, body, sender="anon", ttl_ms=ttl_ms, now_ms=now_ms + i // 1000)
    gc.collect()
    rss1 = proc.memory_info().rss
    store = node.store
    assert store.messages == messages, store.messages
    # The yardstick: the msg object as a msgpack client receives it.
    sample = store.get("room:000007", id_fmt % 7)
    assert sample is not None
    encoded = len(encode_frame([message_object(sample, Format.MSGPACK)], Format.MSGPACK))
    per_msg = (rss1 - rss0) / messages
    goal = 1.5 * encoded + 64
    return {
        "messages": messages,
        "channels": store.channels,
        "body_bytes": body_bytes,
        "id_chars": id_chars,
        "rss_delta_bytes": rss1 - rss0,
        "bytes_per_msg": round(per_msg, 1),
        "encoded_msg_bytes": encoded,
        "ratio_to_encoded": round(per_msg / encoded, 3),
        "goal_bytes_per_msg": goal,
        "meets_goal": per_msg <= goal,
        "store_accounted_bytes_per_msg": round(store.bytes / messages, 1),
        "dedupe_ids": len(node.dedupe),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.memory")
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--channels", type=int, default=100_000)
    ap.add_argument("--body-bytes", type=int, default=200)
    ap.add_argument("--id-chars", type=int, default=20)
    a = ap.parse_args(argv)
    r = run(a.messages, a.channels, a.body_bytes, a.id_chars)
    sys.stdout.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
