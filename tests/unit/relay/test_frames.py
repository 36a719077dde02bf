"""relay.frames: decoding never fails but with FrameError, validation answers BadObject."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.errors import Code, FrameError
from relay.frames import (
    MAX_ACK_IDS,
    MAX_CHANNEL_BYTES,
    MAX_ID_CHARS,
    MAX_OBJECTS_PER_FRAME,
    BadObject,
    Format,
    Pub,
    body_field,
    check_channel,
    check_id,
    decode_body_b64,
    decode_frame,
    encode_frame,
    parse_ids,
    parse_pub,
)

MAX_BODY = 64
MAX_TTL_S = 3600
FORMATS = [Format.JSON, Format.MSGPACK]


def raw(value: Any, fmt: Format) -> bytes:
    """``value`` as a client would send it, without going through encode_frame."""
    if fmt is Format.JSON:
        return json.dumps(value).encode()
    return msgspec.msgpack.encode(value)


# -- decode_frame ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_object_or_an_array(fmt: Format) -> None:
    assert decode_frame(raw({"op": "ping"}, fmt), fmt) == [{"op": "ping"}]
    objs = [{"op": "ping"}, {"op": "sub", "ch": "c"}]
    assert decode_frame(raw(objs, fmt), fmt) == objs
    # Elements are not checked here: the session answers each one.
    assert decode_frame(raw([1, "x", None], fmt), fmt) == [1, "x", None]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", [[], 1, "s", None, True, 1.5])
def test_frames_that_are_not_an_object_or_a_non_empty_array(fmt: Format, value: Any) -> None:
    with pytest.raises(FrameError):
        decode_frame(raw(value, fmt), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_object_count_limit(fmt: Format) -> None:
    objs = [{"op": "ping"}] * MAX_OBJECTS_PER_FRAME
    assert len(decode_frame(raw(objs, fmt), fmt)) == MAX_OBJECTS_PER_FRAME
    with pytest.raises(FrameError):
        decode_frame(raw([*objs, {"op": "ping"}], fmt), fmt)


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b'{"op":"ping"} x', b"\xff\xfe", b'{"a":"\\ud800"}', b"[1,]", b"NaN", b'"\x00"'],
)
def test_broken_json(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(payload, Format.JSON)


def test_text_frame_to_a_msgpack_session_and_the_reverse() -> None:
    with pytest.raises(FrameError):
        decode_frame(b'{"op":"ping"}', Format.MSGPACK)
    with pytest.raises(FrameError):
        decode_frame(msgspec.msgpack.encode({"op": "ping"}), Format.JSON)


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_deeply_nested_arrays(depth: int) -> None:
    for fmt, payload in [
        (Format.JSON, b"[" * depth + b"]" * depth),
        (Format.JSON, b"[" * depth),  # unterminated
        (Format.MSGPACK, b"\x91" * depth + b"\xc0"),
        (Format.MSGPACK, b"\x91" * depth),
        (Format.JSON, b'[{"a":' * depth),
        (Format.MSGPACK, b"\x81\xa1a" * depth + b"\xc0"),
    ]:
        try:
            objs = decode_frame(payload, fmt)
        except FrameError:
            continue
        assert isinstance(objs, list) and objs


def check_decoded(payload: bytes, fmt: Format) -> list[Any] | None:
    """Decode; the only failure allowed is FrameError, a success is a non-empty list."""
    try:
        objs = decode_frame(payload, fmt)
    except FrameError:
        return None
    assert isinstance(objs, list)
    assert 1 <= len(objs) <= MAX_OBJECTS_PER_FRAME
    return objs


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=300), fmt=st.sampled_from(FORMATS))
@example(payload=b"\xdd\xff\xff\xff\xff", fmt=Format.MSGPACK)  # huge array header
@example(payload=b"\xdf\xff\xff\xff\xff", fmt=Format.MSGPACK)  # huge map header
@example(payload=b"\xd7\xff\xff\xff\xff\xff\xff\xff\xff\xff", fmt=Format.MSGPACK)  # timestamp
@example(payload=b"\x81\x91\x01\x02", fmt=Format.MSGPACK)  # array as a map key
@example(payload=b"\x81\x81\x01\x02\x03", fmt=Format.MSGPACK)  # map as a map key
def test_fuzz_random_bytes(payload: bytes, fmt: Format) -> None:
    check_decoded(payload, fmt)


@settings(max_examples=200)
@given(text=st.text(alphabet='[]{}:,"\\0123456789.eE+-truefalsn u\x00\u00e9\ud7ff', max_size=80))
def test_fuzz_json_like_text(text: str) -> None:
    check_decoded(text.encode("utf-8", "surrogatepass"), Format.JSON)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=200)
@given(value=json_values, fmt=st.sampled_from(FORMATS))
def test_random_values(value: Any, fmt: Format) -> None:
    objs = check_decoded(raw(value, fmt), fmt)
    if isinstance(value, dict):
        assert objs == [value]
    elif isinstance(value, list) and value:
        assert objs == value
    else:
        assert objs is None


# -- encode_frame -----------------------------------------------------------------------

small_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)  # JSON has neither
    | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
objects = st.dictionaries(st.text(max_size=8), small_values, max_size=4)


@settings(max_examples=100)
@given(objs=st.lists(objects, min_size=1, max_size=6), fmt=st.sampled_from(FORMATS))
def test_encode_decode_round_trip(objs: list[dict[str, Any]], fmt: Format) -> None:
    payload = encode_frame(objs, fmt)
    assert decode_frame(payload, fmt) == objs
    if fmt is Format.JSON:
        json.loads(payload)  # plain JSON any client can read


def test_one_reply_is_a_bare_object_several_an_array() -> None:
    assert json.loads(encode_frame([{"op": "pong", "ts": 1}], Format.JSON)) == {
        "op": "pong",
        "ts": 1,
    }
    two = [{"op": "pong", "ts": 1}, {"op": "pong", "ts": 2}]
    assert json.loads(encode_frame(two, Format.JSON)) == two
    assert msgspec.msgpack.decode(encode_frame(two, Format.MSGPACK)) == two


def test_msgpack_bodies_stay_bytes() -> None:
    frame = encode_frame([{"op": "msg", "body": b"\x00\xff"}], Format.MSGPACK)
    assert decode_frame(frame, Format.MSGPACK) == [{"op": "msg", "body": b"\x00\xff"}]


# -- body_field ---------------------------------------------------------------------------


def test_body_field_utf8_to_json_is_a_plain_string() -> None:
    out: dict[str, Any] = {}
    body_field("héllo ☃".encode(), Format.JSON, out)
    assert out == {"body": "héllo ☃"}


def test_body_field_to_msgpack_is_bytes() -> None:
    out: dict[str, Any] = {}
    body_field(b"\xff\x00", Format.MSGPACK, out)
    assert out == {"body": b"\xff\x00"}


@given(body=st.binary(max_size=100))
def test_body_field_base64_for_non_utf8(body: bytes) -> None:
    out: dict[str, Any] = {}
    body_field(body, Format.JSON, out)
    try:
        text = body.decode()
    except UnicodeDecodeError:
        assert out["body_enc"] == "base64"
        assert decode_body_b64(out["body"]) == body
        assert base64.b64decode(out["body"]) == body
    else:
        assert out == {"body": text}
    # Whatever the body, the object can be sent as JSON.
    json.loads(encode_frame([out], Format.JSON))


@pytest.mark.parametrize("text", ["not base64!", "abc", "éé=="])
def test_decode_body_b64_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        decode_body_b64(text)


# -- check_channel and check_id ------------------------------------------------------------

GOOD_CHANNELS = ["c", "inbox:alice", "room 1", "é" * 100, "x" * MAX_CHANNEL_BYTES, "日本:x"]
BAD_CHANNELS: list[Any] = [
    None,
    1,
    b"bytes",
    ["c"],
    "",
    "x" * (MAX_CHANNEL_BYTES + 1),
    "é" * 101,  # 202 bytes, 101 characters
    "a\x00b",
    "inbox:bob*",  # "*" is the grants' wildcard
    "日本:*",
    "tab\there",
    "new\nline",
    "del\x7f",
    "c1\x85",
    "lone\ud800",
    "\u2028",
]
GOOD_IDS = ["1", "m-1", "é" * MAX_ID_CHARS, "x" * MAX_ID_CHARS, "a b"]
BAD_IDS: list[Any] = [
    None,
    7,
    1.5,
    True,
    b"id",
    {"id": 1},
    "",
    "x" * (MAX_ID_CHARS + 1),
    "a\x00",
    "\x1b[31m",
    "x\ud800",
]


@pytest.mark.parametrize("ch", GOOD_CHANNELS)
def test_good_channels(ch: str) -> None:
    assert check_channel(ch) == ch


@pytest.mark.parametrize("ch", BAD_CHANNELS)
def test_bad_channels(ch: Any) -> None:
    with pytest.raises(BadObject) as e:
        check_channel(ch)
    assert e.value.code is Code.BAD_REQUEST


@pytest.mark.parametrize("msg_id", GOOD_IDS)
def test_good_ids(msg_id: str) -> None:
    assert check_id(msg_id) == msg_id


@pytest.mark.parametrize("msg_id", BAD_IDS)
def test_bad_ids_name_the_channel(msg_id: Any) -> None:
    with pytest.raises(BadObject) as e:
        check_id(msg_id, "room")
    assert e.value.code is Code.BAD_REQUEST
    assert e.value.ch == "room"


@settings(max_examples=300)
@given(
    v=st.one_of(
        st.text(max_size=70),
        st.text(st.characters(exclude_categories=()), max_size=70),  # with surrogates
        st.text(st.characters(max_codepoint=0x7FF), min_size=60, max_size=110),  # 2-byte
        st.binary(max_size=5),
        st.integers(),
        st.none(),
    )
)
def test_check_id_and_channel_on_anything(v: Any) -> None:
    is_text = isinstance(v, str) and v.isprintable()
    for check, ok in [
        (check_id, is_text and 1 <= len(v) <= MAX_ID_CHARS),
        (check_channel, is_text and 1 <= len(v.encode()) <= MAX_CHANNEL_BYTES and "*" not in v),
    ]:
        if ok:
            assert check(v) == v
        else:
            with pytest.raises(BadObject) as e:
                check(v)
            assert e.value.code is Code.BAD_REQUEST


# -- parse_pub --------------------------------------------------------------------------


def pub(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"op": "pub", "id": "m-1", "ch": "room", "body": "hi"}
    obj.update(over)
    return {k: v for k, v in obj.items() if v is not DROP}


DROP = object()


def test_parse_pub_defaults() -> None:
    assert parse_pub(pub(), Format.JSON, MAX_BODY, MAX_TTL_S) == Pub(
        "m-1", "room", b"hi", "log", None
    )


@pytest.mark.parametrize(
    ("over", "fmt", "want"),
    [
        ({"ack": "mem"}, Format.JSON, {"ack": "mem"}),
        ({"ack": "remote", "ttl_s": 60}, Format.JSON, {"ack": "remote", "ttl_s": 60}),
        ({"ttl_s": 0.5}, Format.JSON, {"ttl_s": 1}),  # rounds up to a second, never 0
        ({"ttl_s": 2.9}, Format.JSON, {"ttl_s": 2}),
        ({"ttl_s": MAX_TTL_S}, Format.JSON, {"ttl_s": MAX_TTL_S}),
        ({"ttl_s": None}, Format.JSON, {"ttl_s": None}),
        ({"body": "é" * 32}, Format.JSON, {"body": "é".encode() * 32}),  # 64 bytes
        ({"body": b"\xff" * MAX_BODY}, Format.MSGPACK, {"body": b"\xff" * MAX_BODY}),
        ({"body": "text"}, Format.MSGPACK, {"body": b"text"}),
        ({"body": ""}, Format.JSON, {"body": b""}),
        ({"extra": [1, 2]}, Format.JSON, {}),  # unknown fields are ignored
    ],
)
def test_parse_pub_valid(over: dict[str, Any], fmt: Format, want: dict[str, Any]) -> None:
    p = parse_pub(pub(**over), fmt, MAX_BODY, MAX_TTL_S)
    expect = {"id": "m-1", "ch": "room", "body": b"hi", "ack": "log", "ttl_s": None, **want}
    assert p == Pub(**expect)


# One defect each: (field overrides, format, code, whether the error names the id, the ch).
DEFECTS: list[tuple[dict[str, Any], Format, Code, bool, bool]] = [
    ({"id": DROP}, Format.JSON, Code.BAD_REQUEST, False, True),
    ({"id": 5}, Format.JSON, Code.BAD_REQUEST, False, True),
    ({"id": "x" * 65}, Format.JSON, Code.BAD_REQUEST, False, True),
    ({"ch": DROP}, Format.JSON, Code.BAD_REQUEST, True, False),
    ({"ch": ""}, Format.JSON, Code.BAD_REQUEST, True, False),
    ({"ch": ["room"]}, Format.JSON, Code.BAD_REQUEST, True, False),
    ({"body": DROP}, Format.JSON, Code.BAD_REQUEST, True, True),
    ({"body": 12}, Format.JSON, Code.BAD_REQUEST, True, True),
    ({"body": b"bytes"}, Format.JSON, Code.BAD_REQUEST, True, True),
    ({"body": ["a"]}, Format.MSGPACK, Code.BAD_REQUEST, True, True),
    ({"body": "x" * (MAX_BODY + 1)}, Format.JSON, Code.TOO_LARGE, True, True),
    ({"body": "é" * 33}, Format.JSON, Code.TOO_LARGE, True, True),  # 33 chars, 66 bytes
    ({"body": b"x" * (MAX_BODY + 1)}, Format.MSGPACK, Code.TOO_LARGE, True, True),
    ({"ack": "disk"}, Format.JSON, Code.BAD_REQUEST, True, True),
    ({"ack": None}, Format.JSON, Code.BAD_REQUEST, True, True),
    ({"ttl_s": 0}, Format.JSON, Code.BAD_REQUEST, True, True),
    ({"ttl_s": -1}, Format.JSON, Code.BAD_REQUEST, True, True),
    ({"ttl_s": MAX_TTL_S + 1}, Format.JSON, Code.BAD_REQUEST, True, True),
    ({"ttl_s": "60"}, Format.JSON, Code.BAD_REQUEST, True, True),
    ({"ttl_s": True}, Format.JSON, Code.BAD_REQUEST, True, True),
    ({"ttl_s": float("nan")}, Format.MSGPACK, Code.BAD_REQUEST, True, True),
    ({"ttl_s": float("inf")}, Format.MSGPACK, Code.BAD_REQUEST, True, True),
    ({"ttl_s": 10**30}, Format.JSON, Code.BAD_REQUEST, True, True),
]


@pytest.mark.parametrize(("over", "fmt", "code", "names_id", "names_ch"), DEFECTS)
def test_parse_pub_invalid(
    over: dict[str, Any], fmt: Format, code: Code, names_id: bool, names_ch: bool
) -> None:
    with pytest.raises(BadObject) as e:
        parse_pub(pub(**over), fmt, MAX_BODY, MAX_TTL_S)
    assert e.value.code is code
    assert e.value.id == ("m-1" if names_id else None)
    assert e.value.ch == ("room" if names_ch else None)


valid_pubs = st.fixed_dictionaries(
    {
        "op": st.just("pub"),
        "id": st.text(min_size=1, max_size=MAX_ID_CHARS).filter(str.isprintable),
        "ch": st.text(min_size=1, max_size=50).filter(lambda s: s.isprintable() and "*" not in s),
        "body": st.text(max_size=MAX_BODY // 4),
    },
    optional={
        "ack": st.sampled_from(["mem", "log", "remote"]),
        "ttl_s": st.integers(1, MAX_TTL_S) | st.floats(0.001, MAX_TTL_S),
        "junk": json_values,
    },
)


@settings(max_examples=150)
@given(obj=valid_pubs, fmt=st.sampled_from(FORMATS))
def test_parse_pub_generated_valid(obj: dict[str, Any], fmt: Format) -> None:
    # Through the wire format, as a session would see it.
    [decoded] = decode_frame(raw(obj, fmt), fmt)
    p = parse_pub(decoded, fmt, MAX_BODY, MAX_TTL_S)
    assert (p.id, p.ch, p.body, p.ack) == (
        obj["id"],
        obj["ch"],
        obj["body"].encode(),
        obj.get("ack", "log"),
    )
    if "ttl_s" in obj:
        assert p.ttl_s is not None and 1 <= p.ttl_s <= MAX_TTL_S
    else:
        assert p.ttl_s is None


anything = json_values | st.binary(max_size=80) | st.text(max_size=80)
random_pubs = st.fixed_dictionaries(
    {},
    optional={
        "op": st.just("pub"),
        "id": anything | st.sampled_from(GOOD_IDS + BAD_IDS),
        "ch": anything | st.sampled_from(GOOD_CHANNELS + BAD_CHANNELS),
        "body": anything,
        "ack": anything | st.sampled_from(["mem", "log", "remote"]),
        "ttl_s": anything | st.integers(-5, MAX_TTL_S + 5),
    },
)


@settings(max_examples=300)
@given(obj=random_pubs, fmt=st.sampled_from(FORMATS))
def test_parse_pub_on_anything_raises_only_bad_object(obj: dict[str, Any], fmt: Format) -> None:
    try:
        p = parse_pub(obj, fmt, MAX_BODY, MAX_TTL_S)
    except BadObject as e:
        assert e.code in (Code.BAD_REQUEST, Code.TOO_LARGE)
        assert e.reason
        if e.code is Code.TOO_LARGE:
            body = obj["body"]
            size = len(body.encode()) if isinstance(body, str) else len(body)
            assert size > MAX_BODY
        for name in ("id", "ch"):
            v = getattr(e, name)
            assert v is None or v == obj.get(name)
        return
    assert isinstance(p, Pub)
    assert check_id(p.id) == obj["id"] and check_channel(p.ch) == obj["ch"]
    assert len(p.body) <= MAX_BODY
    assert p.ack in ("mem", "log", "remote")
    assert p.ttl_s is None or 1 <= p.ttl_s <= MAX_TTL_S


# -- parse_ids ----------------------------------------------------------------------------


def test_parse_ids_valid() -> None:
    assert parse_ids({"ids": ["a", "b"]}, "room") == ["a", "b"]
    ids = [f"m{i}" for i in range(MAX_ACK_IDS)]
    assert parse_ids({"ids": ids}, "room") == ids


@pytest.mark.parametrize(
    "ids",
    [
        DROP,
        None,
        "a",
        {"a": 1},
        [],
        [f"m{i}" for i in range(MAX_ACK_IDS + 1)],
        ["ok", 3],
        ["ok", ""],
        ["ok", "x" * 65],
        ["ok", "a\x00"],
    ],
)
def test_parse_ids_invalid(ids: Any) -> None:
    obj = {} if ids is DROP else {"ids": ids}
    with pytest.raises(BadObject) as e:
        parse_ids(obj, "room")
    assert e.value.code is Code.BAD_REQUEST
    assert e.value.ch == "room"


@settings(max_examples=200)
@given(ids=st.lists(st.text(max_size=70) | st.integers() | st.none(), max_size=12) | anything)
def test_parse_ids_on_anything(ids: Any) -> None:
    try:
        got = parse_ids({"ids": ids}, "room")
    except BadObject as e:
        assert e.code is Code.BAD_REQUEST
        return
    assert got == ids
    assert all(check_id(i) == i for i in got)
