"""The node serves wss:// and a reconnecting client resumes its TLS session."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

from tests.certs import write_cert_files
from tests.conftest import aio
from tests.wsclient import Client


def _upgrade_and_ping(host: str, port: int, ctx: ssl.SSLContext, session: Any) -> tuple[Any, bool]:
    """Open a TLS connection (offering ``session``), do the WebSocket handshake, ping."""
    import socket

    with (
        socket.create_connection((host, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(
            b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += tls.recv(4096)
        assert data.startswith(b"HTTP/1.1 101"), data[:80]
        payload = json.dumps({"op": "ping"}).encode()
        mask = b"\x00\x00\x00\x00"
        tls.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + payload)
        frame = tls.recv(4096)
        assert b'"pong"' in frame
        return tls.session, bool(tls.session_reused)


@aio
async def test_wss_serves_and_resumes_sessions(wss_node: Any) -> None:
    node, files = wss_node
    ctx = ssl.create_default_context(cafile=str(files.ca_path))
    # Through an independent WebSocket client over TLS.
    c = await Client.connect(node.ws_url.replace("127.0.0.1", "localhost"), ssl=ctx)
    await c.request({"op": "hello"}, "welcome")
    await c.close()
    port = int(node.ws_url.rsplit(":", 1)[1].split("/")[0])
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        vctx = ssl.create_default_context(cafile=str(files.ca_path))
        vctx.minimum_version = vctx.maximum_version = version
        session, reused = await asyncio.to_thread(_upgrade_and_ping, "127.0.0.1", port, vctx, None)
        assert not reused
        _, reused = await asyncio.to_thread(_upgrade_and_ping, "127.0.0.1", port, vctx, session)
        assert reused, f"second {version.name} connection did not resume"


@aio
async def test_wss_refuses_tls_1_1(make_node: Any, tmp_path: Path) -> None:
    files = write_cert_files(tmp_path)
    node = make_node(client={"tls_cert": str(files.cert_path), "tls_key": str(files.key_path)})
    port = int(node.ws_url.rsplit(":", 1)[1].split("/")[0])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1

    def attempt() -> None:
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost")

    try:
        await asyncio.to_thread(attempt)
    except (ssl.SSLError, OSError):
        return
    raise AssertionError("a TLS 1.1 client was accepted")
