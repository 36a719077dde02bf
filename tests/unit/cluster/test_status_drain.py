"""What `relay node drain` counts as the node's leave (cluster/status.py)."""

from __future__ import annotations

import json
from typing import Any

from cluster.status import _left


class Messages:
    """A pub/sub subscription holding these messages, read one at a time."""

    def __init__(self, *docs: Any) -> None:
        self.queue = [
            {"type": "message", "data": d if isinstance(d, bytes) else json.dumps(d).encode()}
            for d in docs
        ]

    def get_message(self, ignore_subscribe_messages: bool, timeout: float) -> Any:
        return self.queue.pop(0) if self.queue else None


def test_only_the_nodes_own_leave_with_its_lease_held_is_a_drain() -> None:
    leave = {"event": "leave", "node_id": "sg/n2", "epoch": 3}
    assert _left(Messages({**leave, "released": True}), "sg/n2", 0)
    assert _left(Messages(leave), "sg/n2", 0)  # a node from before `released`
    # Woken after its lease ran out: it announces a leave, but its slots failed over.
    assert not _left(Messages({**leave, "released": False}), "sg/n2", 0)
    assert not _left(Messages({**leave, "node_id": "sg/n3"}), "sg/n2", 0)
    assert not _left(Messages({"event": "join", "member": {}}), "sg/n2", 0)
    assert not _left(Messages(b"not json", [1, 2]), "sg/n2", 0)
    # Every message waiting is read: the leave may follow others.
    assert _left(Messages({"event": "ring"}, b"\xff", leave), "sg/n2", 0)
