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
    └── MembershipError         (cluster.failure) the detector was misused, e.g. fed a
                                time earlier than one it has already seen: a bug in the
                                caller, never a peer's fault

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
