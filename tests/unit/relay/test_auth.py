"""relay.auth: token verification (HS256, ES256, every refusal) and channel grants."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import example, given
from hypothesis import strategies as st

from relay.auth import (
    MAX_TOKEN_CHARS,
    Grants,
    TokenError,
    TokenVerifier,
    key_problems,
)
from relay.errors import RelayError

SECRET = "s" * 32
NOW = 1_700_000_000.0

ES_KEY = ec.generate_private_key(ec.SECP256R1())
ES_PEM = ES_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
OTHER_ES_KEY = ec.generate_private_key(ec.SECP256R1())

HS = TokenVerifier(hs256_secret=SECRET, es256_public_key_pem=None)
ES = TokenVerifier(hs256_secret=None, es256_public_key_pem=ES_PEM)
BOTH = TokenVerifier(hs256_secret=SECRET, es256_public_key_pem=ES_PEM)


def claims(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "sub": "alice",
        "exp": NOW + 60,
        "can_pub": ["inbox:*", "room:1"],
        "can_sub": ["inbox:alice"],
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not _DROP}


_DROP = object()


def hs(payload: dict[str, Any] | None = None, secret: str = SECRET) -> str:
    return jwt.encode(claims() if payload is None else payload, secret, algorithm="HS256")


def es(payload: dict[str, Any] | None = None, key: Any = ES_KEY) -> str:
    return jwt.encode(claims() if payload is None else payload, key, algorithm="ES256")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def by_hand(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token assembled without pyjwt, HMAC-SHA256-signed with ``key`` (or unsigned)."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def refused(verifier: TokenVerifier, token: Any, now_s: float = NOW) -> str:
    with pytest.raises(TokenError) as info:
        verifier.verify(token, now_s)
    assert info.value.reason == str(info.value)
    return info.value.reason


# ---------------------------------------------------------------- accepted tokens


def test_hs256_good() -> None:
    g = HS.verify(hs(), NOW)
    assert g == Grants("alice", ("inbox:*", "room:1"), ("inbox:alice",), NOW + 60)
    assert g.may_pub("inbox:bob") and g.may_pub("room:1") and not g.may_pub("room:2")
    assert g.may_sub("inbox:alice") and not g.may_sub("inbox:bob")


def test_es256_good() -> None:
    assert ES.verify(es(), NOW).subject == "alice"


def test_both_keys_configured_accept_both_algorithms() -> None:
    assert BOTH.algorithms == ("HS256", "ES256")
    assert BOTH.verify(hs(), NOW).subject == "alice"
    assert BOTH.verify(es(), NOW).subject == "alice"


def test_missing_grant_lists_grant_nothing() -> None:
    g = HS.verify(hs(claims(can_pub=_DROP, can_sub=None)), NOW)
    assert g.can_pub == () and g.can_sub == ()
    assert not g.may_pub("x") and not g.may_sub("x")


def test_nbf_in_the_past_and_unknown_claims_are_fine() -> None:
    assert HS.verify(hs(claims(nbf=NOW - 1, iat=NOW - 1, jti="j", extra=[1])), NOW)


# ---------------------------------------------------------------- time


def test_expired() -> None:
    token = hs(claims(exp=NOW))
    assert HS.verify(token, NOW - 0.001).subject == "alice"
    assert refused(HS, token, NOW) == "expired"
    assert refused(HS, token, NOW + 3600) == "expired"


def test_leeway_extends_exp_and_nbf() -> None:
    lenient = TokenVerifier(hs256_secret=SECRET, es256_public_key_pem=None, leeway_s=10)
    assert lenient.verify(hs(claims(exp=NOW - 5)), NOW)
    assert refused(lenient, hs(claims(exp=NOW - 10)), NOW) == "expired"
    assert lenient.verify(hs(claims(nbf=NOW + 5)), NOW)
    # The session ends where the verifier would refuse the token: exp plus the leeway.
    assert lenient.verify(hs(claims(exp=NOW - 5)), NOW).expires_s == NOW + 5
    assert HS.verify(hs(claims(exp=NOW + 5)), NOW).expires_s == NOW + 5


def test_not_yet_valid() -> None:
    assert refused(HS, hs(claims(nbf=NOW + 5)), NOW) == "not yet valid"


def test_missing_exp() -> None:
    assert refused(HS, hs(claims(exp=_DROP))) == "missing exp"
    assert refused(HS, hs(claims(exp=None))) == "missing exp"


@pytest.mark.parametrize("exp", ["2000000000", True, [1], {"a": 1}, float("nan"), float("inf")])
def test_bad_exp(exp: Any) -> None:
    assert refused(HS, hs(claims(exp=exp))) == "bad exp"


def test_huge_integer_exp_does_not_overflow() -> None:
    assert HS.verify(hs(claims(exp=10**400)), NOW)
    assert refused(HS, hs(claims(exp=-(10**400)))) == "expired"


def test_bad_nbf() -> None:
    assert refused(HS, hs(claims(nbf="soon"))) == "bad nbf"


# ---------------------------------------------------------------- signatures and algorithms


def test_wrong_secret() -> None:
    assert refused(HS, hs(secret="t" * 32)) == "bad signature"


def test_forged_payload() -> None:
    header, _, sig = hs().split(".")
    forged = b64url(json.dumps(claims(can_sub=["*"])).encode())
    assert refused(HS, f"{header}.{forged}.{sig}") == "bad signature"


def test_es256_signed_by_another_key() -> None:
    assert refused(ES, es(key=OTHER_ES_KEY)) == "bad signature"


def test_es256_with_truncated_signature() -> None:
    token = es()
    assert refused(ES, token[:-10]) in {"bad signature", "malformed"}


def test_alg_none_is_refused() -> None:
    token = by_hand({"alg": "none", "typ": "JWT"}, claims(), key=None)
    for verifier in (HS, ES, BOTH):
        assert refused(verifier, token) == "algorithm not allowed"
    for alg in ("None", "NONE", "", None, 5):
        assert refused(HS, by_hand({"alg": alg}, claims(), key=None)) == "algorithm not allowed"
    assert refused(HS, by_hand({"typ": "JWT"}, claims(), key=None)) == "algorithm not allowed"


def test_hs256_signed_with_the_es256_public_key_is_refused() -> None:
    # The classic algorithm confusion: the public key used as an HMAC secret.
    token = by_hand({"alg": "HS256", "typ": "JWT"}, claims(), key=ES_PEM)
    assert refused(ES, token) == "algorithm not allowed"
    assert refused(BOTH, token) == "bad signature"


def test_algorithm_not_configured() -> None:
    assert refused(ES, hs()) == "algorithm not allowed"
    assert refused(HS, es()) == "algorithm not allowed"
    nobody = TokenVerifier(hs256_secret=None, es256_public_key_pem=None)
    assert nobody.algorithms == ()
    assert refused(nobody, hs()) == "algorithm not allowed"


def test_other_algorithms_are_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tokens = [
        jwt.encode(claims(), SECRET * 2, algorithm="HS512"),
        jwt.encode(claims(), p384, algorithm="ES384"),
        jwt.encode(claims(), rsa_key, algorithm="RS256"),
    ]
    for token in tokens:
        assert refused(BOTH, token) == "algorithm not allowed"


# ---------------------------------------------------------------- claims


def test_missing_sub() -> None:
    assert refused(HS, hs(claims(sub=_DROP))) == "missing sub"


@pytest.mark.parametrize(
    "sub", ["", 5, ["alice"], True, "al\x00ice", "bob\n", "a\u202e", "x" * 257]
)
def test_bad_sub(sub: Any) -> None:
    assert refused(HS, hs(claims(sub=sub))) == "bad sub"


@pytest.mark.parametrize("value", ["inbox:*", [1], ["ok", None], [""], {"a": 1}, 5, True])
@pytest.mark.parametrize("name", ["can_pub", "can_sub"])
def test_bad_grant_lists(name: str, value: Any) -> None:
    assert refused(HS, hs(claims(**{name: value}))) == f"bad {name}"


def test_token_meant_for_an_audience_is_refused() -> None:
    assert refused(HS, hs(claims(aud="other-service"))) == "audience not accepted"


def test_payload_not_an_object() -> None:
    header = b64url(json.dumps({"alg": "HS256"}).encode())
    payload = b64url(b"[1, 2]")
    sig = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert refused(HS, f"{header}.{payload}.{b64url(sig)}") == "malformed"


# ---------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b.c",
        "..",
        "a.b",
        "a.b.c.d",
        "\ud800.\ud800.\ud800",
        "ü.ü.ü",
        None,
        b"bytes.are.no",
        5,
    ],
)
def test_garbage_is_malformed(token: Any) -> None:
    assert refused(HS, token) == "malformed"


def test_empty_payload_and_signature() -> None:
    # The signature is checked before the payload is parsed.
    assert refused(HS, "eyJhbGciOiJIUzI1NiJ9..") == "bad signature"


def test_token_length_is_bounded() -> None:
    big = hs(claims(pad="x" * MAX_TOKEN_CHARS))
    assert "longer than" in refused(HS, big)


@given(st.text(max_size=300))
@example("e30.e30.")  # {} . {} . empty signature
def test_random_text_only_ever_raises_token_error(token: str) -> None:
    for verifier in (HS, ES, BOTH):
        with pytest.raises(TokenError):
            verifier.verify(token, NOW)


@given(st.data())
def test_any_single_character_change_is_refused_or_harmless(data: st.DataObject) -> None:
    token = data.draw(st.sampled_from([HS_TOKEN, ES_TOKEN]))
    i = data.draw(st.integers(0, len(token) - 1))
    c = data.draw(st.characters(codec="ascii").filter(lambda c: c != token[i]))
    changed = token[:i] + c + token[i + 1 :]
    try:
        g = BOTH.verify(changed, NOW)
    except TokenError:
        return
    # Base64 padding bits can change without changing the decoded bytes.
    assert g == BOTH.verify(token, NOW)


HS_TOKEN = hs()
ES_TOKEN = es()


def test_token_error_is_a_relay_error() -> None:
    assert issubclass(TokenError, RelayError)
    assert TokenError("expired").reason == "expired"


# ---------------------------------------------------------------- key configuration


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier(hs256_secret="short", es256_public_key_pem=None)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier(hs256_secret="", es256_public_key_pem=None)


def test_bad_public_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="not a PEM public key"):
        TokenVerifier(hs256_secret=None, es256_public_key_pem=b"garbage")
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem384 = p384.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ValueError, match="P-256"):
        TokenVerifier(hs256_secret=None, es256_public_key_pem=pem384)


def test_key_problems_lists_every_problem() -> None:
    assert key_problems(SECRET, ES_PEM) == []
    assert key_problems(None, None) == []
    problems = key_problems("short", b"garbage")
    assert len(problems) == 2
    assert "hs256_secret" in problems[0] and "es256_public_key" in problems[1]


@pytest.mark.parametrize("leeway", [-1.0, float("nan"), float("inf")])
def test_bad_leeway(leeway: float) -> None:
    with pytest.raises(ValueError, match="leeway_s"):
        TokenVerifier(hs256_secret=SECRET, es256_public_key_pem=None, leeway_s=leeway)


# ---------------------------------------------------------------- grants


def test_anonymous_grants_everything() -> None:
    g = Grants.anonymous()
    assert g.subject == "anon"
    assert g.can_pub == ("*",) and g.can_sub == ("*",)
    assert g.may_pub("inbox:alice") and g.may_sub("room:x")


@pytest.mark.parametrize(
    ("pattern", "ch", "expected"),
    [
        ("inbox:alice", "inbox:alice", True),
        ("inbox:alice", "inbox:alicex", False),
        ("inbox:alice", "inbox:alic", False),
        ("inbox:*", "inbox:alice", True),
        ("inbox:*", "inbox:", True),
        ("inbox:*", "inbox", False),
        ("inbox:*", "outbox:alice", False),
        ("*", "anything", True),
        ("a*b", "a*b", True),  # only a trailing * is a wildcard
        ("a*b", "axb", False),
        ("a*", "a*", True),
        ("**", "*x", True),  # prefix "*"
        ("**", "x", False),
    ],
)
def test_patterns(pattern: str, ch: str, expected: bool) -> None:
    g = Grants("u", (pattern,), ())
    assert g.may_pub(ch) is expected
    assert g.may_sub(ch) is False
    g = Grants("u", (), (pattern,))
    assert g.may_sub(ch) is expected
    assert g.may_pub(ch) is False


def test_no_patterns_grant_nothing() -> None:
    g = Grants("u", (), ())
    assert not g.may_pub("x") and not g.may_sub("x")


def test_grants_compare_by_their_fields() -> None:
    assert Grants("u", ("a*",), ()) == Grants("u", ("a*",), ())
    assert Grants("u", ("a*",), ()) != Grants("u", ("b*",), ())
    assert hash(Grants("u", ("a*",), ())) == hash(Grants("u", ("a*",), ()))
    assert (
        repr(Grants("u", (), ())) == "Grants(subject='u', can_pub=(), can_sub=(), expires_s=None)"
    )


_chars = st.text(max_size=30)


@given(prefix=_chars, rest=_chars)
def test_prefix_pattern_matches_every_extension(prefix: str, rest: str) -> None:
    assert Grants("u", (prefix + "*",), ()).may_pub(prefix + rest)


@given(prefix=_chars, ch=_chars)
def test_prefix_pattern_matches_only_extensions(prefix: str, ch: str) -> None:
    assert Grants("u", (), (prefix + "*",)).may_sub(ch) is ch.startswith(prefix)


@given(patterns=st.lists(_chars, max_size=5), ch=_chars)
def test_any_pattern_list_is_the_union_of_its_patterns(patterns: list[str], ch: str) -> None:
    whole = Grants("u", tuple(patterns), ())
    assert whole.may_pub(ch) == any(Grants("u", (p,), ()).may_pub(ch) for p in patterns)
    exact_only = [p for p in patterns if not p.endswith("*")]
    if ch in exact_only:
        assert whole.may_pub(ch)
