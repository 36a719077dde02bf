"""Mesh op arguments are checked as a client's are."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.meshops import parse_ack, parse_delivery, parse_pub, parse_sub
from relay.errors import Code
from relay.frames import BadObject

GOOD: dict[str, Any] = {
    "ch": "inbox:a",
    "id": "m1",
    "body": b"x",
    "from": "alice",
    "ttl_ms": 1000,
    "ack": "log",
}


def pub(**kw: Any) -> Any:
    return parse_pub({**GOOD, **kw}, max_body=10, max_ttl_ms=60_000)


def test_a_good_pub() -> None:
    p = pub()
    assert (p.ch, p.id, p.body, p.sender, p.ttl_ms, p.ack) == (
        "inbox:a",
        "m1",
        b"x",
        "alice",
        1000,
        "log",
    )


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"id": "i" * 65}, Code.BAD_REQUEST),
        ({"id": ""}, Code.BAD_REQUEST),
        ({"ch": "inbox:*"}, Code.BAD_REQUEST),
        ({"ch": "a\x00b"}, Code.BAD_REQUEST),
        ({"ch": 5}, Code.BAD_REQUEST),
        ({"body": "text"}, Code.BAD_REQUEST),
        ({"body": b"x" * 11}, Code.TOO_LARGE),
        ({"from": "al\nice"}, Code.BAD_REQUEST),
        ({"from": ""}, Code.BAD_REQUEST),
        ({"from": "x" * 257}, Code.BAD_REQUEST),
        ({"ttl_ms": 60_001}, Code.BAD_REQUEST),
        ({"ttl_ms": 0}, Code.BAD_REQUEST),
        ({"ttl_ms": 1.5}, Code.BAD_REQUEST),
        ({"ttl_ms": True}, Code.BAD_REQUEST),
        ({"ack": "all"}, Code.BAD_REQUEST),
    ],
)
def test_bad_pubs(change: dict[str, Any], code: Code) -> None:
    with pytest.raises(BadObject) as e:
        pub(**change)
    assert e.value.code is code


def test_sub_and_ack() -> None:
    assert parse_sub({"ch": "inbox:a"}) == "inbox:a"
    assert parse_ack({"ch": "inbox:a", "ids": ["m1", "m2"]}) == ("inbox:a", ["m1", "m2"])
    for bad in ({"ch": "inbox:a", "ids": []}, {"ch": "inbox:a", "ids": ["i" * 65]}, {"ch": ""}, []):
        with pytest.raises(BadObject):
            parse_ack(bad)
    with pytest.raises(BadObject):
        parse_sub(["inbox:a"])


def test_delivery() -> None:
    fields = ["m1", "inbox:a", "alice", 5, "sg", b"x", 99]
    m = parse_delivery("inbox:a", fields)
    assert (m.id, m.ch, m.sender, m.hlc, m.origin, m.body, m.expires_ms) == tuple(fields)
    for i, bad in ((1, "inbox:b"), (3, "5"), (5, "x"), (4, "")):
        with pytest.raises(BadObject):
            parse_delivery("inbox:a", [*fields[:i], bad, *fields[i + 1 :]])


_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=80),
        st.binary(max_size=80),
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@given(args=st.one_of(_values, st.dictionaries(st.sampled_from(list(GOOD)), _values)))
def test_anything_is_parsed_or_refused_with_a_code(args: Any) -> None:
    for parse in (lambda a: parse_pub(a, max_body=10, max_ttl_ms=60_000), parse_sub, parse_ack):
        try:
            parse(args)
        except BadObject as e:
            assert e.code in (Code.BAD_REQUEST, Code.TOO_LARGE)
