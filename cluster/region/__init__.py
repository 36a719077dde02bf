"""A node as a member of its region (the region edge), one concept per module.

The layers stack from :mod:`~cluster.region.state` up to :class:`~cluster.region.node.Router`;
the pure parts they lean on (slot states, the failure detector, the ring, apply, the chain
check, checkpoints) live in :mod:`cluster` and :mod:`relay` modules that do no I/O.
"""

from __future__ import annotations

from cluster.region.node import Router
from cluster.region.state import PubWaiter, Unavailable, fields_message, message_fields

__all__ = ["PubWaiter", "Router", "Unavailable", "fields_message", "message_fields"]
