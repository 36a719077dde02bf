"""The owner's publish decision: which level a ``pub`` is answered with, and when.

One path for every owner of a channel: a standalone node (:mod:`relay.session`) and a
region's owner (:mod:`cluster.region.routing`) both ask :func:`plan_pub` and answer with
:func:`puback_fields`. Pure: the caller has already run :meth:`relay.node.Node.publish`
(dedupe, store) and carries the plan out (batch the event, wait for the append or for a
link, answer).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from relay.hlc import LOGICAL_BITS, physical_ms
from relay.node import Accepted


class Wait(enum.Enum):
    """When the ``puback`` goes out."""

    NONE = "none"  # now
    LOG = "log"  # once the slot's batch holding the message (or its first copy) is logged
    REMOTE = "remote"  # once a link confirms the slot's newest entry in another region


@dataclass(frozen=True, slots=True)
class PubPlan:
    level: str  # the level answered now (``wait`` NONE), else the level waited for
    wait: Wait
    log: bool  # a new message: batch its event for the slot log


# What a standalone node (no slot log) always does: answer ``mem`` at once. The session's
# hot path reads this constant rather than calling plan_pub for every message.
STANDALONE: Final = PubPlan("mem", Wait.NONE, False)


def plan_pub(
    *,
    dup: bool,
    ack: str,
    logged: bool,
    batch_busy: bool = False,
    remote_known: bool = False,
) -> PubPlan:
    """``logged``: this owner writes a slot log (a region's); a standalone node keeps
    messages in RAM only and says so (``ack: mem``), whatever was asked.

    A duplicate is answered with its first copy's fate: while the slot's batches are
    on their way to the log (``batch_busy``) it waits for them; at ``ack=remote`` it
    waits for a link to confirm the slot's newest entry (``remote_known``: there are
    links and the slot has a log position); else it is already logged."""
    if not logged:
        return STANDALONE
    if not dup:
        return PubPlan(ack, Wait.NONE if ack == "mem" else Wait.LOG, True)
    if ack != "mem" and batch_busy:
        return PubPlan(ack, Wait.LOG, False)
    if ack == "remote" and remote_known:
        return PubPlan("remote", Wait.REMOTE, False)
    return PubPlan("mem" if ack == "mem" else "log", Wait.NONE, False)


def puback_fields(acc: Accepted, level: str) -> dict[str, Any]:
    """The fields of a ``puback`` (PROTOCOL.md) for a message accepted at ``level``, as
    a router answers them (the session adds ``op``, ``id`` and ``ch``)."""
    return {"ts": physical_ms(acc.hlc), "origin": acc.origin, "ack": level, "dup": acc.dup}


def puback(msg_id: str, ch: str, acc: Accepted, level: str) -> dict[str, Any]:
    """The whole ``puback`` reply, built in one go (the session's hot path)."""
    return {
        "op": "puback",
        "id": msg_id,
        "ch": ch,
        "ts": acc.hlc >> LOGICAL_BITS,
        "origin": acc.origin,
        "ack": level,
        "dup": acc.dup,
    }
