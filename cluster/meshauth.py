"""Mesh authentication: a challenge–response in ``HELLO`` keyed by the region's secret.

Both ends of a mesh connection send ``HELLO`` (node id, epoch, a fresh random nonce),
then ``AUTH`` with a proof: HMAC-SHA256 under the region's ``cluster.mesh_secret`` over a
domain tag, the sender's role on this connection (``dial`` or ``listen``), both node ids
and both nonces (the sender's first). Each end checks the other's proof before it
accepts any other message. The nonces make a proof good for one connection only; the
role and the ids stop a proof being reflected back at its author or relayed from one
connection to another (a listener never produces the ``dial`` proof an impostor would
need, and the smaller id always dials).

Pure: the caller supplies the nonces (``os.urandom``) and compares nothing itself.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

NONCE_BYTES: Final = 16
PROOF_BYTES: Final = 32
_DOMAIN: Final = b"relay-mesh-auth-v1"
DIAL: Final = "dial"
LISTEN: Final = "listen"


def secret_key(secret: str) -> bytes:
    """The HMAC key for a configured secret."""
    return secret.encode("utf-8")


def proof(
    key: bytes,
    *,
    role: str,
    sender: str,
    receiver: str,
    sender_nonce: bytes,
    receiver_nonce: bytes,
) -> bytes:
    """What ``sender`` sends to prove it holds ``key`` on this connection."""
    fields = [_DOMAIN, role.encode(), sender.encode(), receiver.encode()]
    msg = b"".join(len(f).to_bytes(2, "big") + f for f in fields)
    msg += sender_nonce + receiver_nonce
    return hmac.new(key, msg, hashlib.sha256).digest()


def verify(
    keys: tuple[bytes, ...],
    got: object,
    *,
    role: str,
    sender: str,
    receiver: str,
    sender_nonce: bytes,
    receiver_nonce: bytes,
) -> bool:
    """Whether ``got`` is ``sender``'s proof under any of ``keys`` (the current secret,
    and during a rotation the other one), compared in constant time."""
    if not isinstance(got, bytes) or len(got) != PROOF_BYTES:
        return False
    ok = False
    for key in keys:
        want = proof(
            key,
            role=role,
            sender=sender,
            receiver=receiver,
            sender_nonce=sender_nonce,
            receiver_nonce=receiver_nonce,
        )
        ok |= hmac.compare_digest(want, got)
    return ok
