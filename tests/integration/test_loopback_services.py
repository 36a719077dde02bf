"""Services on loopback answer loopback only: Host checks (DNS rebinding), Origin checks
(cross-site WebSockets) and the WAN proxy's control port, from raw sockets and real
processes."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import websockets

from relay.server import RelayServer
from tests.cluster.conftest import running
from tests.conftest import aio, run_relay


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, body: str = ""
) -> tuple[int, str]:
    """One raw HTTP/1.0 request (the Host header exactly as given); status and body."""
    u = urlsplit(url)
    assert u.hostname and u.port
    head = {"Host": f"{u.hostname}:{u.port}", **(headers or {})}
    if body:
        head["Content-Type"] = "application/x-www-form-urlencoded"
        head["Content-Length"] = str(len(body))
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    lines = [f"{method} {path} HTTP/1.0", *(f"{k}: {v}" for k, v in head.items()), "", body]
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        s.sendall("\r\n".join(lines).encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2].decode(errors="replace")


@aio
async def test_the_admin_port_on_loopback_refuses_other_hosts(anon_node: RelayServer) -> None:
    url = anon_node.admin_url + "/status"
    for host in ("attacker.example", "attacker.example:80", "127.evil.example", "10.0.0.1"):
        status, _ = await asyncio.to_thread(http, url, headers={"Host": host})
        assert status == 421, host
    port = urlsplit(url).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1"):
        status, body = await asyncio.to_thread(http, url, headers={"Host": host})
        assert status == 200 and json.loads(body)["node"], host


@pytest.fixture(scope="module")
def dev_node() -> Iterator[dict[str, Any]]:
    with running(["sg"], settle=False, nodes_per_region=1) as (_, doc):
        yield doc["regions"]["sg"]["nodes"][0]


@aio
async def test_relay_dev_refuses_other_sites_origins(dev_node: dict[str, Any]) -> None:
    with pytest.raises(websockets.InvalidStatus) as e:
        await websockets.connect(dev_node["ws"], origin="http://evil.example")  # type: ignore[arg-type]
    assert e.value.response.status_code == 403
    admin_port = urlsplit(dev_node["admin"]).port
    ok = await websockets.connect(dev_node["ws"], origin=f"http://127.0.0.1:{admin_port}")  # type: ignore[arg-type]
    await ok.close()


@pytest.fixture
def wan(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ready = tmp_path / "wan.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.wan", f"--ready-file={ready}", f"--pair=a-b=0:{target}"],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)  # poll interval while the proxy starts
        assert ready.stat().st_mode & 0o077 == 0
        yield json.loads(ready.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_wan_control_needs_post_the_token_and_good_values(wan: dict[str, Any]) -> None:
    control, auth = wan["control"], {"Authorization": f"Bearer {wan['token']}"}
    # A cross-site GET (an <img> on any page) changes nothing.
    assert http(f"{control}/set?pair=a-b&blackhole=1")[0] == 405
    assert http(f"{control}/set", "POST", body="pair=a-b&blackhole=1")[0] == 401
    rebound = {**auth, "Host": "attacker.example"}
    assert http(f"{control}/set", "POST", rebound, "pair=a-b&blackhole=1")[0] == 421
    bads = (
        "latency_ms=-1",
        "latency_ms=nan",
        "bandwidth=0",
        "bandwidth=x",
        "pair=zz",
        "latency_ms=7&blackhole=1x",
    )
    for bad in bads:
        status, body = http(
            f"{control}/set", "POST", auth, f"pair=a-b&{bad}".replace("pair=a-b&pair=", "pair=")
        )
        assert status == 400, (bad, status, body)
    status, body = http(f"{control}/status", headers=auth)
    assert status == 200 and json.loads(body)["a-b"]["blackholed"] is False
    assert json.loads(body)["a-b"]["latency_ms"] == 0  # a refused request changed nothing
    assert http(f"{control}/set", "POST", auth, "pair=a-b&blackhole=1&latency_ms=5")[0] == 200
    after = json.loads(http(f"{control}/status", headers=auth)[1])["a-b"]
    assert (after["blackholed"], after["latency_ms"]) == (True, 5.0)


def test_a_name_starting_with_127_is_not_loopback_for_config_validate(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[admin]\nhost = "127.evil.example"\n')
    r = run_relay("config", "validate", str(path))
    assert r.returncode == 78, r.stderr
    assert (
        "admin.token: must be set when admin.host is not a loopback address" in r.stdout + r.stderr
    )


def ws_handshake_status(host_port: tuple[str, int], host_header: str) -> int:
    """The status line's code of a WebSocket opening handshake sent with ``host_header``."""
    request = (
        "GET /v1/ws HTTP/1.1\r\n"
        f"Host: {host_header}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(host_port, timeout=5) as s, s.makefile("rb") as answer:
        s.sendall(request.encode())
        status_line = answer.readline()
    return int(status_line.split(b" ", 2)[1])


@aio
async def test_the_client_port_on_loopback_refuses_other_hosts(anon_node: RelayServer) -> None:
    u = urlsplit(anon_node.ws_url)
    assert u.hostname and u.port
    address = (u.hostname, u.port)
    for bad in ("attacker.example", f"attacker.example:{u.port}", "127.evil.example"):
        assert await asyncio.to_thread(ws_handshake_status, address, bad) == 421, bad
    good = f"127.0.0.1:{u.port}"
    assert await asyncio.to_thread(ws_handshake_status, address, good) == 101


def test_config_validate_refuses_an_open_mesh_without_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    base = '[cluster]\nredis_url = "redis://127.0.0.1:6379/0"\nmesh_host = "0.0.0.0"\n'
    path.write_text(base)
    r = run_relay("config", "validate", str(path))
    assert r.returncode == 78, r.stderr
    assert (
        "cluster.mesh_secret: must be set when cluster.mesh_host is not a loopback"
        in r.stdout + r.stderr
    )
    path.write_text(base + f'mesh_secret = "{"m" * 32}"\n')
    path.chmod(0o600)
    r = run_relay("config", "validate", str(path))
    assert r.returncode == 0, r.stderr
