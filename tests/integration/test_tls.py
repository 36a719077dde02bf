"""relay.tls against real sockets: a Twisted TLS echo server, stdlib `ssl` clients.

The clients block, so they run in the reactor's thread pool while the reactor serves.
Resumption is what a reconnecting chat client gets: connect, read the echo, keep the
session, connect again with it. The echo matters for TLS 1.3, whose tickets arrive after
the handshake: reading it makes the client process them before `.session` is taken.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import protocol, task, threads
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator

from relay.errors import RelayError
from relay.tls import TLSConfigError, server_context_factory
from tests.certs import CertFiles, write_cert_files

PING = b"ping\n"
CLIENT_TIMEOUT_S = 10.0
SERVER_CLOSE_TIMEOUT_S = 10.0
# What TLS12_CIPHERS allows; TLS 1.3 suites are OpenSSL's (all AEAD).
TLS12_AEAD_ECDHE = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
}


def _reactor() -> Any:
    # pytest-twisted installs the asyncio reactor at configure time; look it up late.
    from twisted.internet import reactor

    return reactor


class _Echo(protocol.Protocol):
    factory: _EchoFactory

    def connectionMade(self) -> None:
        self.factory.open_connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: object = None) -> None:
        self.factory.open_connections.discard(self)


class _EchoFactory(protocol.Factory):
    protocol = _Echo

    def __init__(self) -> None:
        # Open server-side connections: the test ends only when none are left.
        self.open_connections: set[_Echo] = set()


@dataclass(frozen=True)
class EchoServer:
    port: int
    files: CertFiles
    connections: _EchoFactory


@dataclass(frozen=True)
class Visit:
    """What one client connection saw."""

    version: str
    cipher: str
    session_reused: bool
    session: ssl.SSLSession


async def _until(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    reactor = _reactor()
    deadline = reactor.seconds() + timeout_s
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await task.deferLater(reactor, 0.01, lambda: None)  # poll interval


def _start(files: CertFiles, *, session_cache: bool = True) -> tuple[IListeningPort, EchoServer]:
    tls = server_context_factory(files.cert_path, files.key_path)
    if not session_cache:
        tls.context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    connections = _EchoFactory()
    listener = _reactor().listenSSL(0, connections, tls, interface="127.0.0.1")
    return listener, EchoServer(listener.getHost().port, files, connections)


async def _stop(listener: IListeningPort, server: EchoServer) -> None:
    await listener.stopListening()
    await _until(
        lambda: not server.connections.open_connections,
        "the server's connections to close",
        SERVER_CLOSE_TIMEOUT_S,
    )


@pytest_twisted.async_yield_fixture
async def echo_server(tmp_path: Path) -> AsyncIterator[EchoServer]:
    listener, server = _start(write_cert_files(tmp_path, intermediate=True))
    yield server
    await _stop(listener, server)


def _client_context(
    files: CertFiles, *, max_version: ssl.TLSVersion | None = None, tickets: bool = True
) -> ssl.SSLContext:
    # Trusts only the root: a verified handshake shows the server sent its intermediate.
    context = ssl.create_default_context(cafile=os.fspath(files.ca_path))
    if max_version is not None:
        context.maximum_version = max_version
    if not tickets:
        context.options |= ssl.OP_NO_TICKET
    return context


def _visit(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None, close_notify: bool
) -> Visit:
    """Connect, echo PING, close with or without close_notify. Blocking: run in a thread."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(PING)
        echoed = b""
        while len(echoed) < len(PING):
            chunk = tls.recv(len(PING) - len(echoed))
            if not chunk:
                break
            echoed += chunk
        assert echoed == PING
        visit = Visit(
            version=tls.version() or "",
            cipher=(tls.cipher() or ("",))[0],
            session_reused=bool(tls.session_reused),
            session=tls.session,
        )
        if close_notify:
            tls.unwrap()
        # Else the socket just closes, as when a phone drops off the network.
    return visit


async def _visit_in_thread(
    port: int,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    *,
    close_notify: bool = True,
) -> Visit:
    visit: Visit = await threads.deferToThread(_visit, port, context, session, close_notify)
    return visit


RESUMPTION_CASES = {
    # name: (client's highest version, client takes tickets, expected version)
    "tls1.3-ticket": (None, True, "TLSv1.3"),
    "tls1.2-ticket": (ssl.TLSVersion.TLSv1_2, True, "TLSv1.2"),
    "tls1.2-session-id": (ssl.TLSVersion.TLSv1_2, False, "TLSv1.2"),
}


@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "abrupt"])
@pytest.mark.parametrize("case", list(RESUMPTION_CASES))
@pytest_twisted.ensureDeferred
async def test_reconnect_resumes_session(
    echo_server: EchoServer, case: str, close_notify: bool
) -> None:
    max_version, tickets, version = RESUMPTION_CASES[case]
    context = _client_context(echo_server.files, max_version=max_version, tickets=tickets)

    first = await _visit_in_thread(echo_server.port, context, close_notify=close_notify)
    assert first.version == version
    assert not first.session_reused
    # A ticket in the session means ticket resumption, none means the server's cache.
    assert first.session.has_ticket is tickets

    second = await _visit_in_thread(echo_server.port, context, first.session)
    assert second.version == version
    assert second.session_reused


@pytest.mark.parametrize("max_version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
@pytest_twisted.ensureDeferred
async def test_tickets_resume_without_server_cache(
    tmp_path: Path, max_version: ssl.TLSVersion | None
) -> None:
    """Stateless tickets: with SSL_OP_NO_TICKET, TLS 1.3 would fall back to the cache."""
    listener, server = _start(write_cert_files(tmp_path), session_cache=False)
    try:
        context = _client_context(server.files, max_version=max_version)
        first = await _visit_in_thread(server.port, context)
        second = await _visit_in_thread(server.port, context, first.session)
        assert second.session_reused
    finally:
        await _stop(listener, server)


@pytest_twisted.ensureDeferred
async def test_another_context_cannot_resume(echo_server: EchoServer) -> None:
    """Each factory call draws its own ticket key: same cert, same process, no resumption."""
    listener, other = _start(echo_server.files)
    try:
        context = _client_context(echo_server.files)
        first = await _visit_in_thread(echo_server.port, context)
        assert first.session.has_ticket
        elsewhere = await _visit_in_thread(other.port, context, first.session)
        assert not elsewhere.session_reused
        again = await _visit_in_thread(echo_server.port, context, first.session)
        assert again.session_reused
    finally:
        await _stop(listener, other)


@pytest.mark.parametrize("max_version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
@pytest_twisted.ensureDeferred
async def test_only_forward_secret_aead_ciphers(
    echo_server: EchoServer, max_version: ssl.TLSVersion | None
) -> None:
    context = _client_context(echo_server.files, max_version=max_version)
    visit = await _visit_in_thread(echo_server.port, context)
    if max_version is None:
        assert visit.version == "TLSv1.3"
        assert visit.cipher.startswith("TLS_")
    else:
        assert visit.cipher in TLS12_AEAD_ECDHE


def _refused_handshake(port: int, context: ssl.SSLContext) -> ssl.SSLError:
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as raw:
        try:
            context.wrap_socket(raw, server_hostname="localhost").close()
        except ssl.SSLError as exc:
            return exc
    raise AssertionError("the handshake succeeded")


@pytest_twisted.ensureDeferred
async def test_cbc_only_client_is_refused(echo_server: EchoServer) -> None:
    context = _client_context(echo_server.files, max_version=ssl.TLSVersion.TLSv1_2)
    context.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256")

    error: ssl.SSLError = await threads.deferToThread(_refused_handshake, echo_server.port, context)
    assert error.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE", error


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    "max_version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"]
)
@pytest_twisted.ensureDeferred
async def test_tls_below_1_2_is_refused(
    echo_server: EchoServer, max_version: ssl.TLSVersion
) -> None:
    context = _client_context(echo_server.files)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = max_version
    # The client's own OpenSSL only offers TLS < 1.2 at security level 0.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")

    error: ssl.SSLError = await threads.deferToThread(_refused_handshake, echo_server.port, context)
    # The server's alert, not the client giving up on its own before sending a hello.
    assert error.reason == "TLSV1_ALERT_PROTOCOL_VERSION", error


def test_factory_provides_server_connection_creator(tmp_path: Path) -> None:
    files = write_cert_files(tmp_path)
    tls = server_context_factory(str(files.cert_path), str(files.key_path))
    assert IOpenSSLServerConnectionCreator.providedBy(tls)


def test_missing_certificate_file(tmp_path: Path) -> None:
    files = write_cert_files(tmp_path)
    with pytest.raises(TLSConfigError, match=r"certificate file not found: .*nope\.crt"):
        server_context_factory(tmp_path / "nope.crt", files.key_path)


def test_missing_key_file(tmp_path: Path) -> None:
    files = write_cert_files(tmp_path)
    with pytest.raises(TLSConfigError, match=r"private key file not found: .*nope\.key"):
        server_context_factory(files.cert_path, tmp_path / "nope.key")


def test_key_of_another_certificate(tmp_path: Path) -> None:
    ours = write_cert_files(tmp_path, name="ours")
    theirs = write_cert_files(tmp_path, name="theirs")
    with pytest.raises(TLSConfigError, match=r"theirs\.key.* does not match .*ours\.crt"):
        server_context_factory(ours.cert_path, theirs.key_path)


def test_chain_in_the_wrong_order(tmp_path: Path) -> None:
    files = write_cert_files(tmp_path, intermediate=True)
    leaf, intermediate = _split_pem(files.cert_path.read_bytes())
    files.cert_path.write_bytes(intermediate + leaf)
    with pytest.raises(TLSConfigError, match="server certificate must come first"):
        server_context_factory(files.cert_path, files.key_path)


def test_key_and_certificate_swapped(tmp_path: Path) -> None:
    files = write_cert_files(tmp_path)
    with pytest.raises(TLSConfigError, match="no PEM certificate"):
        server_context_factory(files.key_path, files.cert_path)


def test_encrypted_key(tmp_path: Path) -> None:
    files = write_cert_files(tmp_path)
    key = serialization.load_pem_private_key(files.key_path.read_bytes(), password=None)
    files.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="encrypted"):
        server_context_factory(files.cert_path, files.key_path)


def test_config_error_is_a_relay_error() -> None:
    assert issubclass(TLSConfigError, RelayError)


def _split_pem(data: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----\n"
    return [block + end for block in data.split(end) if block.strip()]
