"""Client frames: decode, validate, encode (PROTOCOL.md, version 1).

A frame holds one object or an array of objects, as JSON (``relay.v1.json``, text) or
msgpack (``relay.v1.msgpack``, binary). :func:`decode_frame` turns a frame into a list of
raw objects, or raises :class:`~relay.errors.FrameError` when the frame as a whole is
unusable; the ``parse_*`` functions validate one object's fields and raise
:class:`BadObject` with the code to answer.
"""

from __future__ import annotations

import base64
import binascii
import enum
from typing import Any

import msgspec

from relay.errors import Code, FrameError

SUBPROTOCOL_JSON = "relay.v1.json"
SUBPROTOCOL_MSGPACK = "relay.v1.msgpack"

MAX_ID_CHARS = 64
MAX_CHANNEL_BYTES = 200
MAX_ACK_IDS = 1000
MAX_OBJECTS_PER_FRAME = 1000
ACK_LEVELS = ("mem", "log", "remote")


class Format(enum.Enum):
    JSON = SUBPROTOCOL_JSON
    MSGPACK = SUBPROTOCOL_MSGPACK


class BadObject(Exception):
    """One object of a frame is refused; answer it with ``error`` and go on."""

    def __init__(self, code: Code, reason: str, *, id: str | None = None, ch: str | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.id = id
        self.ch = ch


_json_decoder = msgspec.json.Decoder()
_json_encoder = msgspec.json.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def decode_frame(payload: bytes, fmt: Format) -> list[Any]:
    """The objects of one frame, in order; raise FrameError if it cannot be read at all."""
    try:
        if fmt is Format.JSON:
            data = _json_decoder.decode(payload)
        else:
            data = _msgpack_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError) as e:
        raise FrameError(f"frame is not valid {fmt.name.lower()}: {e}") from None
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        if not data:
            raise FrameError("empty array")
        if len(data) > MAX_OBJECTS_PER_FRAME:
            raise FrameError(f"more than {MAX_OBJECTS_PER_FRAME} objects in one frame")
        return data
    raise FrameError("a frame holds an object or an array of objects")


def encode_frame(objs: list[dict[str, Any]], fmt: Format) -> bytes:
    """One frame holding ``objs`` (a bare object when there is just one)."""
    data: Any = objs[0] if len(objs) == 1 else objs
    if fmt is Format.JSON:
        return _json_encoder.encode(data)
    return _msgpack_encoder.encode(data)


def body_field(body: bytes, fmt: Format, out: dict[str, Any]) -> None:
    """Put ``body`` into an outgoing object: bytes in msgpack, a string in JSON.

    A body that is not UTF-8 (published as msgpack bytes) reaches JSON clients as base64
    with ``"body_enc": "base64"`` (docs/PROTOCOL.md), never mangled.
    """
    if fmt is Format.MSGPACK:
        out["body"] = body
        return
    try:
        out["body"] = body.decode()
    except UnicodeDecodeError:
        out["body"] = base64.b64encode(body).decode()
        out["body_enc"] = "base64"


# -- field validation ----------------------------------------------------------------


def _is_clean(s: str) -> bool:
    # No control characters (C0, DEL, C1): they break logs and the dedupe key.
    return s.isprintable()


def check_channel(v: Any) -> str:
    # Fast path: printable ASCII is valid UTF-8 of one byte a character.
    if (
        type(v) is str
        and v.isascii()
        and 0 < len(v) <= MAX_CHANNEL_BYTES
        and v.isprintable()
        and "*" not in v
    ):
        return v
    if not isinstance(v, str):
        raise BadObject(Code.BAD_REQUEST, "ch must be a string")
    n = len(v.encode("utf-8", "surrogatepass"))
    if not 1 <= n <= MAX_CHANNEL_BYTES:
        raise BadObject(Code.BAD_REQUEST, f"ch must be 1-{MAX_CHANNEL_BYTES} bytes")
    if not _is_clean(v):
        raise BadObject(Code.BAD_REQUEST, "ch has control or non-printable characters")
    if "*" in v:
        # "*" is the grants' wildcard: a channel named "inbox:bob*" would make the grant
        # built from it ("inbox:bob*") cover every channel it prefixes.
        raise BadObject(Code.BAD_REQUEST, 'ch must not contain "*"')
    try:
        v.encode()
    except UnicodeEncodeError:
        raise BadObject(Code.BAD_REQUEST, "ch is not valid UTF-8") from None
    return v


def check_id(v: Any, ch: str | None = None) -> str:
    if type(v) is str and v.isascii() and 0 < len(v) <= MAX_ID_CHARS and v.isprintable():
        return v
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_ID_CHARS:
        raise BadObject(
            Code.BAD_REQUEST, f"id must be a string of 1-{MAX_ID_CHARS} characters", ch=ch
        )
    if not _is_clean(v):
        raise BadObject(Code.BAD_REQUEST, "id has control or non-printable characters", ch=ch)
    try:
        v.encode()
    except UnicodeEncodeError:
        raise BadObject(Code.BAD_REQUEST, "id is not valid UTF-8", ch=ch) from None
    return v


class Pub(msgspec.Struct, frozen=True, gc=False):
    id: str
    ch: str
    body: bytes
    ack: str
    ttl_s: int | None


def parse_pub(obj: dict[str, Any], fmt: Format, max_body: int, max_ttl_s: int) -> Pub:
    raw_id = obj.get("id")
    raw_ch = obj.get("ch")
    ch_hint = raw_ch if isinstance(raw_ch, str) else None
    msg_id = check_id(raw_id, ch_hint)
    try:
        ch = check_channel(raw_ch)
    except BadObject as e:
        e.id = msg_id
        raise
    body = obj.get("body")
    if type(body) is str and body.isascii():
        data = body.encode("ascii")
    elif isinstance(body, str):
        try:
            data = body.encode()
        except UnicodeEncodeError:
            raise BadObject(Code.BAD_REQUEST, "body is not valid UTF-8", id=msg_id, ch=ch) from None
    elif isinstance(body, bytes) and fmt is Format.MSGPACK:
        data = body
    else:
        kind = "bytes or a string" if fmt is Format.MSGPACK else "a string"
        raise BadObject(Code.BAD_REQUEST, f"body must be {kind}", id=msg_id, ch=ch)
    if len(data) > max_body:
        raise BadObject(
            Code.TOO_LARGE, f"body is {len(data)} bytes, over max_body {max_body}", id=msg_id, ch=ch
        )
    ack = obj.get("ack", "log")
    if ack not in ACK_LEVELS:
        raise BadObject(Code.BAD_REQUEST, "ack must be mem, log or remote", id=msg_id, ch=ch)
    ttl = obj.get("ttl_s")
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise BadObject(Code.BAD_REQUEST, "ttl_s must be a number", id=msg_id, ch=ch)
        if not 0 < ttl <= max_ttl_s:
            raise BadObject(
                Code.BAD_REQUEST, f"ttl_s must be in (0, {max_ttl_s}]", id=msg_id, ch=ch
            )
        ttl = int(ttl) or 1
    return Pub(msg_id, ch, data, ack, ttl)


def parse_ids(obj: dict[str, Any], ch: str) -> list[str]:
    ids = obj.get("ids")
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_ACK_IDS:
        raise BadObject(Code.BAD_REQUEST, f"ids must be a list of 1-{MAX_ACK_IDS} ids", ch=ch)
    return [check_id(i, ch) for i in ids]


def decode_body_b64(text: str) -> bytes:
    """Inverse of the ``body_enc: base64`` form, for clients and tests."""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"not base64: {e}") from None
