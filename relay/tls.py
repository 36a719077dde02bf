"""TLS for `wss://` listeners: TLS 1.2 or newer, AEAD ciphers, session resumption.

Chat clients reconnect often (mobile networks, tab wake-ups), so a reconnect should skip
the full handshake. The context resumes sessions both ways:

* **Session tickets**, TLS 1.3 and TLS 1.2 (RFC 5077). OpenSSL seals them with a random
  key drawn when the context is created, so the key belongs to one call of
  :func:`server_context_factory` in one process and is never written anywhere; another
  node, or this one after a restart, answers an old ticket with a full handshake. The key
  is not rotated while the process lives: :data:`SESSION_LIFETIME_S` bounds each ticket.
* **A server-side session cache** (session ids), for TLS 1.2 clients that send no ticket
  extension. It holds OpenSSL's default 20480 sessions; tickets cost the server nothing.

Call :func:`server_context_factory` once per listener at start-up, with the files from
``client.tls_cert`` and ``client.tls_key``, and hand the result to ``listenSSL`` or
``SSL4ServerEndpoint``. It reads and checks the files at once, so a bad deployment fails
at start with :class:`TLSConfigError`, not at the first client.
"""

from __future__ import annotations

import os

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from relay.errors import RelayError

__all__ = [
    "SESSION_LIFETIME_S",
    "TLS12_CIPHERS",
    "ServerTLS",
    "TLSConfigError",
    "server_context_factory",
]

# TLS 1.2 suites: forward-secret ECDHE with AEAD only (Mozilla "intermediate" without DHE).
# TLS 1.3 suites are set apart by OpenSSL, all AEAD; its defaults stand.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

# How long a ticket or cached session may resume (OpenSSL's default, stated here). It bounds
# how long one stolen ticket is worth anything; reconnects come well within it.
SESSION_LIFETIME_S = 7200

# A session resumes only where its id context matches. OpenSSL insists on one (else a fatal
# error) as soon as client certificates are checked; set it now so that cannot bite later.
# Per-context ticket keys already keep other processes' sessions out: a constant will do.
_SESSION_ID_CONTEXT = b"relay-wss"

_SigningKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


class TLSConfigError(RelayError):
    """The certificate or key cannot be used; the message names the file and what is wrong."""


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """TLS server settings for one listener: an ``IOpenSSLServerConnectionCreator``.

    Every connection shares the one :class:`OpenSSL.SSL.Context`, and with it the ticket
    key and the session cache; that sharing is what makes resumption work. Build it with
    :func:`server_context_factory`.
    """

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self.new_connection()

    def new_connection(self) -> SSL.Connection:
        """A connection for one accepted socket; Twisted puts it in accept state."""
        return SSL.Connection(self.context, None)


def server_context_factory(
    cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
) -> ServerTLS:
    """Build the TLS settings of one `wss://` listener from PEM files.

    `cert_path` holds the server certificate first, then its intermediates (a
    "fullchain.pem"); `key_path` holds the certificate's unencrypted private key.

    Keep the result for the life of the listener: the session-ticket key and the session
    cache belong to it, so a second call makes a context that cannot resume the first's
    sessions.

    Raises :class:`TLSConfigError` when a file is missing or unreadable, holds no usable
    certificate or key, or the key does not belong to the certificate.
    """
    chain = _load_chain(cert_path)
    key = _load_key(key_path)
    if chain[0].public_key() != key.public_key():
        raise TLSConfigError(
            f"the private key {os.fspath(key_path)!r} does not match the first certificate "
            f"in {os.fspath(cert_path)!r} (the server certificate must come first, then "
            "its intermediates)"
        )

    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    context.set_options(
        SSL.OP_NO_COMPRESSION  # CRIME
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION  # a client could make the server redo handshakes at will
        # A client that drops TCP without close_notify (a phone changing networks) would
        # otherwise have its session struck from the cache: Twisted then reads EOF, which
        # OpenSSL treats as a fatal error. TLS 1.1+ allows resuming such a session, and
        # WebSocket's own close handshake detects truncation. Cost: Twisted reports such a
        # close as ConnectionDone rather than ConnectionLost.
        | SSL.OP_IGNORE_UNEXPECTED_EOF
    )
    # Idle chat connections are the norm; this frees their ~34 KiB of buffers each.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_session_id(_SESSION_ID_CONTEXT)
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_timeout(SESSION_LIFETIME_S)
    # Tickets are on unless SSL_OP_NO_TICKET is set, and nothing here sets it.
    try:
        context.use_certificate(chain[0])
        for intermediate in chain[1:]:
            context.add_extra_chain_cert(intermediate)
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error as exc:
        raise TLSConfigError(
            f"OpenSSL refused {os.fspath(cert_path)!r} with {os.fspath(key_path)!r}: {exc}"
        ) from exc
    return ServerTLS(context)


def _load_chain(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TLSConfigError(
            f"no PEM certificate in {os.fspath(path)!r} (expected '-----BEGIN CERTIFICATE-----')"
        ) from exc


def _load_key(path: str | os.PathLike[str]) -> _SigningKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        # cryptography's way of saying the key needs a password.
        raise TLSConfigError(
            f"the private key {os.fspath(path)!r} is encrypted; give relay an unencrypted key"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSConfigError(f"no usable PEM private key in {os.fspath(path)!r}") from exc
    if not isinstance(key, _SigningKey):
        raise TLSConfigError(
            f"the private key {os.fspath(path)!r} is a {type(key).__name__}; "
            "TLS needs an RSA, ECDSA or EdDSA key"
        )
    return key


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError as exc:
        raise TLSConfigError(f"TLS {what} file not found: {os.fspath(path)!r}") from exc
    except OSError as exc:
        raise TLSConfigError(
            f"cannot read TLS {what} file {os.fspath(path)!r}: {exc.strerror}"
        ) from exc
