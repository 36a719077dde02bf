"""The mesh handshake's proof: bound to the secret, both nonces, both ids and the role."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cluster import meshauth

KEY = meshauth.secret_key("k" * 32)
NA, NB = b"a" * 16, b"b" * 16


def handshake(**kw: object) -> dict[str, object]:
    """The arguments of one handshake's proof, with ``kw`` changed."""
    return {
        "role": meshauth.DIAL,
        "sender": "sg/a",
        "receiver": "sg/b",
        "sender_nonce": NA,
        "receiver_nonce": NB,
        **kw,
    }


def proof(**kw: object) -> bytes:
    args = handshake(**kw)
    key = args.pop("key", KEY)
    return meshauth.proof(key, **args)  # type: ignore[arg-type]


def verify(got: object, keys: tuple[bytes, ...] = (KEY,), **kw: object) -> bool:
    return meshauth.verify(keys, got, **handshake(**kw))  # type: ignore[arg-type]


def test_the_right_proof_verifies_under_any_accepted_key() -> None:
    assert verify(proof())
    other = meshauth.secret_key("o" * 32)
    assert verify(proof(), keys=(other, KEY))
    assert not verify(proof(), keys=(other,))


def test_a_proof_is_bound_to_every_field() -> None:
    good = proof()
    assert not verify(good, role=meshauth.LISTEN)  # reflected back as the other role
    assert not verify(good, sender="sg/b", receiver="sg/a")  # reflected to its author
    assert not verify(good, receiver="sg/c")  # relayed to another node
    assert not verify(good, sender_nonce=NB, receiver_nonce=NA)  # nonces swapped
    assert not verify(good, receiver_nonce=b"c" * 16)  # replayed on a new connection


def test_ids_cannot_be_shifted_between_fields() -> None:
    # Length-prefixed fields: "sg/a" + "b/x" is not "sg/ab" + "/x".
    assert proof(sender="sg/a", receiver="b/x") != proof(sender="sg/ab", receiver="/x")


@given(st.one_of(st.none(), st.binary(max_size=64), st.text(max_size=40), st.integers()))
def test_anything_else_is_refused(got: object) -> None:
    assert not verify(got)
