"""Errors of the cluster core.

Hierarchy::

    ClusterError                root of every exception this package raises on purpose
    ├── RingError               (cluster.ring) a ring cannot be built from these members or
    │                           parameters, or was asked about a slot it does not have;
    │                           every problem of a construction is listed together
    ├── DetectorConfigError     (cluster.failure) the failure detector's settings do not
    │                           hold together; every problem is listed together
    ├── ShapeError              (cluster.shaping) fault-proxy settings that do not hold
    │                           together; every problem is listed together
    ├── MembershipError         (cluster.failure) the detector was misused, e.g. fed a
    │                           time earlier than one it has already seen: a bug in the
    │                           caller, never a peer's fault
    ├── SlotStateError          (cluster.slots) a slot transition the table refuses: a bug
    │                           in the router, never a peer's fault
    └── RebalanceError          (cluster.rebalance, .ringstore) a planned change cannot go on
        ├── PlanError           the change makes no sense (unknown node, empty region)
        ├── ChangeInProgress    another change holds the lock, or one was interrupted
        ├── StalePlan           the ring moved since the plan was made: plan again
        ├── NodeDown            a node the change needs holds no lease
        └── MoveStuck           a slot did not reach its new owner in time (resumable)

A peer that misbehaves (a stale epoch, a ping from a node declared dead) is *not* an
error: the detector ignores or records it. Only a broken contract raises.
"""

from __future__ import annotations


class ClusterError(Exception):
    """Root of the exceptions the cluster core raises on purpose."""


class RingError(ClusterError):
    """The ring cannot be built as asked, or was asked about a slot it does not have."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DetectorConfigError(ClusterError):
    """The failure detector's settings are inconsistent; ``problems`` lists them all."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class MembershipError(ClusterError):
    """The failure detector was called in a way its contract forbids."""


class SlotStateError(ClusterError):
    """A slot was moved through a transition :data:`cluster.slots.TRANSITIONS` refuses."""


class RebalanceError(ClusterError):
    """A planned ring change cannot go on (``relay ring apply`` exits non-zero)."""


class PlanError(RebalanceError):
    """The change asked for makes no sense for this region (exit 2)."""


class ChangeInProgress(RebalanceError):
    """Another change is being applied, or an interrupted one must be resumed (exit 75)."""


class StalePlan(RebalanceError):
    """The ring changed since the plan was computed (exit 1): plan again."""


class NodeDown(RebalanceError):
    """A node the change needs (one being added) holds no lease (exit 69)."""


class MoveStuck(RebalanceError):
    """A slot did not reach its new owner in time (exit 1); ``--resume`` goes on."""
