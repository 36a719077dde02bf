"""Errors of the relay node, and the table of codes clients see.

Hierarchy::

    RelayError                  root of every exception this package raises on purpose
    ├── ConfigError             (relay.config) the configuration has problems; all listed
    ├── CodecError              (relay.codec) a batch failed its checks on decode
    ├── TokenError              (relay.auth) a token was refused
    ├── TLSConfigError          (relay.tls) certificate or key cannot be used
    ├── FrameError              (relay.frames) a client frame cannot be parsed at all
    ├── SnapshotError           (relay.snapshot) a snapshot file is refused (corrupt, …)
    ├── SnapshotDirError        (relay.snapshot_io) the data directory is unsafe
    ├── SnapshotWriteError      (relay.snapshot_io) a snapshot could not be written
    └── InvariantError          the core was misused: a bug, never a client's fault

A client's bad input is *answered* with a code from :data:`CODES` (PROTOCOL.md); only a
broken invariant raises.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RelayError(Exception):
    """Root of the exceptions relay raises on purpose."""


class FrameError(RelayError):
    """A whole client frame is unusable (not JSON/msgpack, not an object or array)."""


class InvariantError(RelayError):
    """The core was called in a way its contract forbids: a bug in the caller."""


class Code(enum.StrEnum):
    """Client-visible error codes (PROTOCOL.md, "Error codes")."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    TOO_MANY = "too_many"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class CodeInfo:
    """What a code means for the client: may it retry, and does the node close."""

    retry: bool
    closes_with: int | None
    summary: str


# WebSocket close codes (RFC 6455 §7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011

CODES: dict[Code, CodeInfo] = {
    Code.BAD_REQUEST: CodeInfo(False, None, "malformed frame or object; fix the request"),
    Code.UNAUTHORIZED: CodeInfo(False, CLOSE_POLICY_VIOLATION, "missing, bad or expired token"),
    Code.FORBIDDEN: CodeInfo(False, None, "the token does not grant this op on this channel"),
    Code.TOO_LARGE: CodeInfo(False, None, "body over max_body"),
    Code.RATE_LIMITED: CodeInfo(True, None, "over the connection's rate; slow down"),
    Code.TOO_MANY: CodeInfo(
        False, None, "over a per-connection limit (subscriptions); unsub first"
    ),
    Code.OVERLOADED: CodeInfo(True, None, "node protecting its memory; retry later"),
    Code.UNAVAILABLE: CodeInfo(True, None, "owner unreachable; retry later"),
    Code.INTERNAL: CodeInfo(True, None, "a bug; reason carries a correlation id"),
}
