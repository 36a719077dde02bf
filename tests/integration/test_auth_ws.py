"""Tokens over real sockets: HS256/ES256, forged, expired, alg none, grants."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import aio
from tests.wsclient import Client

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def token(secret: str = SECRET, **claims: Any) -> str:
    body = {
        "sub": "alice",
        "exp": time.time() + 300,
        "can_pub": ["inbox:*"],
        "can_sub": ["inbox:alice"],
        **claims,
    }
    return jwt.encode(body, secret, algorithm="HS256")


def b64(d: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


@pytest.fixture
def secured(make_node: Any) -> Any:
    return make_node(auth={"hs256_secret": SECRET})


async def refused(url: str, tok: Any) -> tuple[dict[str, Any], int | None]:
    c = await Client.connect(url)
    e = await c.request({"op": "hello", "token": tok}, "error")
    code, _ = await c.closed()
    return e, code


@aio
async def test_good_token_grants_its_channels_only(secured: Any) -> None:
    c = await Client.connect(secured.ws_url)
    await c.request({"op": "hello", "token": token()}, "welcome")
    a = await c.request({"op": "pub", "id": "1", "ch": "inbox:bob", "body": "hi"}, "puback")
    assert a["dup"] is False
    e = await c.request({"op": "pub", "id": "2", "ch": "room:1", "body": "hi"}, "error")
    assert e["code"] == "forbidden" and e["ch"] == "room:1" and e["id"] == "2"
    e = await c.request({"op": "sub", "ch": "inbox:bob"}, "error")
    assert e["code"] == "forbidden"
    e = await c.request({"op": "ack", "ch": "inbox:bob", "ids": ["1"]}, "error")
    assert e["code"] == "forbidden"
    await c.request({"op": "pub", "id": "3", "ch": "inbox:alice", "body": "me"}, "puback")
    await c.request({"op": "sub", "ch": "inbox:alice"}, "subscribed")
    m = await c.expect("msg")
    assert m["from"] == "alice"
    await c.close()


@aio
async def test_es256_token(make_node: Any, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(pem)
    node = make_node(auth={"es256_public_key": str(tmp_path / "pub.pem")})
    tok = jwt.encode(
        {"sub": "bob", "exp": time.time() + 60, "can_sub": ["*"]}, key, algorithm="ES256"
    )
    c = await Client.connect(node.ws_url)
    await c.request({"op": "hello", "token": tok}, "welcome")
    await c.request({"op": "sub", "ch": "x"}, "subscribed")
    await c.close()
    # The public key used as an HS256 secret (algorithm confusion) is refused.
    forged = jwt.encode({"sub": "bob", "exp": time.time() + 60}, "x" * 40, algorithm="HS256")
    e, code = await refused(node.ws_url, forged)
    assert e["code"] == "unauthorized" and code == 1008


@pytest.mark.parametrize(
    "tok",
    [
        token(exp=time.time() - 10),
        token(secret="another-secret-that-is-long-enough-for-hs256"),
        token()[:-4] + "AAAA",
        b64({"alg": "none", "typ": "JWT"}) + "." + b64({"sub": "x", "exp": 2e9}) + ".",
        "not.a.token",
        "",
        "x" * 10_000,
        token(can_pub="inbox:*"),
    ],
    ids=[
        "expired",
        "wrong-secret",
        "forged-sig",
        "alg-none",
        "garbage",
        "empty",
        "huge",
        "bad-claim-type",
    ],
)
@aio
async def test_bad_tokens_are_unauthorized_and_closed_1008(secured: Any, tok: str) -> None:
    e, code = await refused(secured.ws_url, tok)
    assert e["code"] == "unauthorized"
    assert code == 1008


@aio
async def test_ops_before_hello_on_secured_node(secured: Any) -> None:
    c = await Client.connect(secured.ws_url)
    await c.request({"op": "ping"}, "pong")  # allowed before hello
    e = await c.request({"op": "sub", "ch": "inbox:alice"}, "error")
    assert e["code"] == "unauthorized"
    code, _ = await c.closed()
    assert code == 1008


@aio
async def test_hello_without_token_on_secured_node(secured: Any) -> None:
    e, code = await refused(secured.ws_url, None)
    assert e["code"] == "unauthorized" and code == 1008


@aio
async def test_token_expiring_mid_session_closes(secured: Any) -> None:
    c = await Client.connect(secured.ws_url)
    c_exp = time.time() + 1.0
    await c.request({"op": "hello", "token": token(exp=c_exp)}, "welcome")
    await c.request({"op": "sub", "ch": "inbox:alice"}, "subscribed")
    deadline = time.monotonic() + 10
    while True:
        try:
            await c.send({"op": "pub", "id": f"t{time.monotonic()}", "ch": "inbox:x", "body": "b"})
            r = await c.recv()
        except websockets.ConnectionClosed:
            break  # closed at exp by the node, between two pubs
        if r["op"] == "error":
            assert r["code"] == "unauthorized"
            break
        assert r["op"] == "puback" and time.time() < c_exp
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)  # poll interval until the token expires
    code, _ = await c.closed()
    assert code == 1008


async def publisher(url: str) -> Client:
    c = await Client.connect(url)
    tok = token(sub="bob", can_pub=["inbox:*", "room:*"], can_sub=[])
    await c.request({"op": "hello", "token": tok}, "welcome")
    return c


@aio
async def test_a_silent_subscriber_is_closed_when_its_token_expires(secured: Any) -> None:
    """No op after hello: the node still closes at exp (1008), and nothing published
    after it reaches the connection."""
    c = await Client.connect(secured.ws_url)
    exp = time.time() + 1.0
    await c.request({"op": "hello", "token": token(exp=exp)}, "welcome")
    await c.request({"op": "sub", "ch": "inbox:alice"}, "subscribed")
    e = await c.expect("error", timeout_s=5)
    assert e["code"] == "unauthorized" and e["reason"] == "token expired"
    assert time.time() >= exp
    p = await publisher(secured.ws_url)
    await p.request({"op": "pub", "id": "late", "ch": "inbox:alice", "body": "x"}, "puback")
    code, reason = await c.closed()
    assert (code, reason) == (1008, "token expired")
    await p.close()


@aio
async def test_a_token_within_the_configured_leeway_keeps_its_session_until_then(
    make_node: Any,
) -> None:
    """``auth.leeway_s``: a token that expired less than the leeway ago is accepted, and
    its session lasts until exp plus the leeway (not closed at once), then ends 1008."""
    node = make_node(auth={"hs256_secret": SECRET, "leeway_s": 3.0})
    c = await Client.connect(node.ws_url)
    exp = time.time() - 0.5
    await c.request({"op": "hello", "token": token(exp=exp)}, "welcome")
    await c.request({"op": "sub", "ch": "inbox:alice"}, "subscribed")
    await c.request({"op": "pub", "id": "in-leeway", "ch": "inbox:x", "body": "b"}, "puback")
    assert time.time() < exp + 3.0
    e = await c.expect("error", timeout_s=8)
    assert e["code"] == "unauthorized" and e["reason"] == "token expired"
    assert time.time() >= exp + 3.0
    code, _ = await c.closed()
    assert code == 1008
    # Past the leeway, the same token is refused at hello.
    e, code = await refused(node.ws_url, token(exp=time.time() - 3.5))
    assert e["code"] == "unauthorized" and code == 1008


@aio
async def test_a_new_hello_drops_the_subscriptions_it_no_longer_grants(secured: Any) -> None:
    c = await Client.connect(secured.ws_url)
    wide = token(can_sub=["inbox:alice", "room:*"])
    await c.request({"op": "hello", "token": wide}, "welcome")
    await c.request({"op": "sub", "ch": "inbox:alice"}, "subscribed")
    await c.request({"op": "sub", "ch": "room:1"}, "subscribed")
    await c.request({"op": "hello", "token": token(can_sub=["inbox:alice"])}, "welcome")
    assert await c.expect("unsubscribed") == {
        "op": "unsubscribed",
        "ch": "room:1",
        "reason": "not granted by the new token",
    }
    p = await publisher(secured.ws_url)
    await p.request({"op": "pub", "id": "r", "ch": "room:1", "body": "no"}, "puback")
    await p.request({"op": "pub", "id": "i", "ch": "inbox:alice", "body": "yes"}, "puback")
    m = await c.expect("msg")
    assert (m["ch"], m["id"]) == ("inbox:alice", "i")  # never room:1's
    # Leaving a channel needs no grant.
    assert await c.request({"op": "unsub", "ch": "room:2"}, "unsubscribed") == {
        "op": "unsubscribed",
        "ch": "room:2",
    }
    await c.close()
    await p.close()


@pytest.mark.parametrize("sub", ["al\x00ice", "<img src=x onerror=alert(1)>\n", "x" * 257])
@aio
async def test_a_token_whose_sub_is_not_printable_is_refused(secured: Any, sub: str) -> None:
    e, code = await refused(secured.ws_url, token(sub=sub))
    assert (e["code"], code) == ("unauthorized", 1008)


@aio
async def test_a_channel_name_with_a_star_is_refused(secured: Any) -> None:
    """A grant built from a user name ("inbox:" + name) never becomes a prefix."""
    c = await Client.connect(secured.ws_url)
    tok = token(sub="bob*", can_pub=["inbox:*"], can_sub=["inbox:bob*"])
    await c.request({"op": "hello", "token": tok}, "welcome")
    for op in (
        {"op": "sub", "ch": "inbox:bob*"},
        {"op": "pub", "id": "1", "ch": "inbox:bob*", "body": "x"},
    ):
        e = await c.request(op, "error")
        assert e["code"] == "bad_request" and "*" in e["reason"]
    await c.close()
