"""The arguments of mesh ops, checked as strictly as a client's (PROTOCOL.md).

A node forwards a client's ``pub``, ``sub`` and ``ack`` to the channel's owner over the
mesh; the owner checks the arguments again here, with the same rules and limits the
client's node applied (channel, id, TTL cap, sender, body size), so that a bad or buggy
peer can never put into a slot what no client could. Each ``parse_*`` returns the typed
arguments or raises :class:`~relay.frames.BadObject`; the caller answers the request with
its code. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from relay.auth import MAX_SUB_CHARS
from relay.errors import Code
from relay.frames import ACK_LEVELS, MAX_ACK_IDS, BadObject, check_channel, check_id
from relay.store import Message

# A sender is a token's ``sub`` (relay/auth.py bounds it) or "anon".
MAX_SENDER_CHARS: Final = MAX_SUB_CHARS


class MeshPub(msgspec.Struct, frozen=True, gc=False):
    ch: str
    id: str
    body: bytes
    sender: str
    ttl_ms: int
    ack: str


def _args(args: Any) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise BadObject(Code.BAD_REQUEST, "mesh op arguments must be a map")
    return args


def check_sender(v: Any) -> str:
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_SENDER_CHARS or not v.isprintable():
        raise BadObject(Code.BAD_REQUEST, f"from must be 1-{MAX_SENDER_CHARS} printable characters")
    return v


def parse_pub(args: Any, *, max_body: int, max_ttl_ms: int) -> MeshPub:
    a = _args(args)
    ch = check_channel(a.get("ch"))
    msg_id = check_id(a.get("id"), ch)
    body = a.get("body")
    if not isinstance(body, bytes):
        raise BadObject(Code.BAD_REQUEST, "body must be bytes", id=msg_id, ch=ch)
    if len(body) > max_body:
        raise BadObject(
            Code.TOO_LARGE, f"body is {len(body)} bytes, over max_body {max_body}", id=msg_id, ch=ch
        )
    try:
        sender = check_sender(a.get("from"))
    except BadObject as e:
        e.id, e.ch = msg_id, ch
        raise
    ttl_ms = a.get("ttl_ms")
    if type(ttl_ms) is not int or not 0 < ttl_ms <= max_ttl_ms:
        raise BadObject(
            Code.BAD_REQUEST, f"ttl_ms must be an integer in (0, {max_ttl_ms}]", id=msg_id, ch=ch
        )
    ack = a.get("ack")
    if ack not in ACK_LEVELS:
        raise BadObject(Code.BAD_REQUEST, "ack must be mem, log or remote", id=msg_id, ch=ch)
    return MeshPub(ch, msg_id, body, sender, ttl_ms, str(ack))


def parse_sub(args: Any) -> str:
    return check_channel(_args(args).get("ch"))


def parse_ack(args: Any) -> tuple[str, list[str]]:
    a = _args(args)
    ch = check_channel(a.get("ch"))
    ids = a.get("ids")
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_ACK_IDS:
        raise BadObject(Code.BAD_REQUEST, f"ids must be a list of 1-{MAX_ACK_IDS} ids", ch=ch)
    return ch, [check_id(i, ch) for i in ids]


def parse_delivery(ch: str, fields: Any) -> Message:
    """A delivered message's fields (:func:`cluster.router.message_fields`), checked."""
    if not isinstance(fields, list) or len(fields) != 7:
        raise BadObject(Code.BAD_REQUEST, "a delivery has 7 fields")
    msg_id, f_ch, sender, hlc, origin, body, expires_ms = fields
    if f_ch != ch or check_channel(f_ch) != ch:
        raise BadObject(Code.BAD_REQUEST, "a delivery's channel does not match")
    check_id(msg_id, ch)
    check_sender(sender)
    if type(hlc) is not int or type(expires_ms) is not int or not isinstance(body, bytes):
        raise BadObject(Code.BAD_REQUEST, "a delivery's ts, expiry or body is ill-typed")
    if not isinstance(origin, str) or not 1 <= len(origin) <= 32:
        raise BadObject(Code.BAD_REQUEST, "a delivery's origin is ill-typed")
    return Message(msg_id, ch, sender, hlc, origin, body, expires_ms)
