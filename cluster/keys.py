"""Redis key names of a region: slot logs, owner records, checkpoints, mirrors, leases.

Every key of one slot carries the hash tag ``{<region>:<slot>}``, so on a Redis Cluster
all of them live on one shard and a Lua script may touch several of them (the fenced
append reads the owner record and writes the log in one script). Keys of the whole
region (leases, the membership channel) carry ``{<region>}``::

    relay:{sg:17}:log              stream: the slot log (entries {d: batch, e: epoch, p: prev id})
    relay:{sg:17}:owner            hash {owner, epoch}: the owner record that fences writes
    relay:{sg:17}:checkpoint       hash {d: state, id: covered log id, e: epoch}
    relay:{sg:17}:mirror:fra       stream: fra's slot log 17, copied into sg, same ids
    relay:{sg}:lease:sg/n1         string: node sg/n1's lease (SET … PX)
    relay:{sg}:link:fra            string: the lease of the link sg → fra
    relay:{sg}:members             pub/sub channel: joins, leaves and ring changes
    relay:{sg}:ring                hash {version}: the ring's version (cluster/ringstore.py)
    relay:{sg}:ring:weights        hash node → weight set by ops (overrides the lease's)
    relay:{sg}:ring:holds          hash slot → node keeping it until a planned move
    relay:{sg}:ring:plan           string: the planned change being applied (JSON)
    relay:{sg}:ring:lock           string: the lock of the one change applied at a time

Names are checked here, once, so that a region or node id can never break the hash tag
(a ``}`` in a region would move keys to another shard silently).
"""

from __future__ import annotations

import re
from typing import Final

PREFIX: Final = "relay"

# The rules of relay.config for node ids: "region/name", each part like this.
_NAME: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_NODE_ID: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,31}/[a-z0-9][a-z0-9-]{0,31}")


def check_region(region: str) -> str:
    """Return ``region`` if it is a valid region name, else raise ValueError."""
    if not isinstance(region, str) or not _NAME.fullmatch(region):
        raise ValueError(
            f"region must be 1-32 characters of a-z, 0-9 and '-' not starting with '-', "
            f"got {region!r}"
        )
    return region


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it is ``region/name``, else raise ValueError."""
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ValueError(f'node id must be "region/name", got {node_id!r}')
    return node_id


def check_slot(slot: int) -> int:
    """Return ``slot`` if it is a non-negative int, else raise ValueError."""
    if type(slot) is not int or slot < 0:
        raise ValueError(f"slot must be a non-negative int, got {slot!r}")
    return slot


def slot_tag(region: str, slot: int) -> str:
    """The hash tag of every key of ``slot`` in ``region``: ``{sg:17}``."""
    return f"{{{check_region(region)}:{check_slot(slot)}}}"


def log_key(region: str, slot: int) -> str:
    """The slot log of ``slot`` born in ``region``: ``relay:{sg:17}:log``."""
    return f"{PREFIX}:{slot_tag(region, slot)}:log"


def owner_key(region: str, slot: int) -> str:
    """The owner record of ``slot`` in ``region``: ``relay:{sg:17}:owner``."""
    return f"{PREFIX}:{slot_tag(region, slot)}:owner"


def checkpoint_key(region: str, slot: int) -> str:
    """The newest checkpoint of ``slot`` in ``region``: ``relay:{sg:17}:checkpoint``."""
    return f"{PREFIX}:{slot_tag(region, slot)}:checkpoint"


def mirror_key(region: str, slot: int, origin: str) -> str:
    """``origin``'s slot log ``slot``, copied into ``region``: ``relay:{sg:17}:mirror:fra``."""
    return f"{PREFIX}:{slot_tag(region, slot)}:mirror:{check_region(origin)}"


def region_tag(region: str) -> str:
    """The hash tag of the region-wide keys: ``{sg}``."""
    return f"{{{check_region(region)}}}"


def lease_key(region: str, node_id: str) -> str:
    """The lease of node ``node_id`` in ``region``: ``relay:{sg}:lease:sg/n1``."""
    return f"{PREFIX}:{region_tag(region)}:lease:{check_node_id(node_id)}"


def link_lease_key(region: str, dest: str) -> str:
    """The lease of the link from ``region`` to ``dest``: ``relay:{sg}:link:fra``."""
    return f"{PREFIX}:{region_tag(region)}:link:{check_region(dest)}"


def members_channel(region: str) -> str:
    """The pub/sub channel of joins and leaves in ``region``: ``relay:{sg}:members``."""
    return f"{PREFIX}:{region_tag(region)}:members"


def control_channel(region: str) -> str:
    """The pub/sub channel of ops commands to the nodes of ``region`` (drain)."""
    return f"{PREFIX}:{region_tag(region)}:control"


def epoch_key(region: str) -> str:
    """The counter that hands out epochs in ``region``: every join takes a new one."""
    return f"{PREFIX}:{region_tag(region)}:epoch"


def lease_prefix(region: str) -> str:
    """The common prefix of every lease key of ``region``."""
    return f"{PREFIX}:{region_tag(region)}:lease:"


def confirmed_channel(region: str) -> str:
    """Where the links of ``region`` announce what their destinations hold."""
    return f"{PREFIX}:{region_tag(region)}:confirmed"


def ring_key(region: str, part: str = "") -> str:
    """The ring state of ``region`` set by ops: ``relay:{sg}:ring`` (its version), and
    ``…:ring:weights``, ``…:ring:holds``, ``…:ring:plan``, ``…:ring:lock``."""
    base = f"{PREFIX}:{region_tag(region)}:ring"
    return f"{base}:{part}" if part else base
