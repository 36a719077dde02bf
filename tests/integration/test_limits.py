"""Limits on every client resource, from raw sockets and a real WebSocket client: each is
refused with a coded error or a close, and counted in /metrics."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from relay.server import RelayServer
from tests.conftest import aio, until
from tests.wsclient import Client


def metric(server: RelayServer, name: str, **labels: str) -> float:
    with urllib.request.urlopen(server.admin_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def ws_address(server: RelayServer) -> tuple[str, int]:
    u = urlsplit(server.ws_url)
    assert u.hostname is not None and u.port is not None
    return u.hostname, u.port


async def anon(server: RelayServer) -> Client:
    c = await Client.connect(server.ws_url)
    await c.request({"op": "hello"}, "welcome")
    return c


@aio
async def test_subscriptions_are_capped_per_connection_and_per_node(make_node: Any) -> None:
    node = make_node(
        client={
            "allow_anonymous": True,
            "max_subscriptions_per_connection": 3,
            "max_subscriptions": 5,
        }
    )
    a, b = await anon(node), await anon(node)
    for i in range(3):
        await a.request({"op": "sub", "ch": f"a{i}"}, "subscribed")
    e = await a.request({"op": "sub", "ch": "a3"}, "error")
    assert (e["code"], e["ch"]) == ("too_many", "a3")
    await b.request({"op": "sub", "ch": "b0"}, "subscribed")
    await b.request({"op": "sub", "ch": "b1"}, "subscribed")
    e = await b.request({"op": "sub", "ch": "b2"}, "error")
    assert e["code"] == "overloaded"
    # An unsub gives the place back; a closed connection gives back all of its.
    await b.request({"op": "unsub", "ch": "b1"}, "unsubscribed")
    await b.request({"op": "sub", "ch": "b2"}, "subscribed")
    assert await asyncio.to_thread(metric, node, "relay_subscriptions") == 5
    assert await asyncio.to_thread(metric, node, "relay_subscriptions_refused_total") == 1
    assert await asyncio.to_thread(metric, node, "relay_errors_total", code="too_many") == 1
    await a.close()
    await until(lambda: node.factory.budget.taken == 2, what="a's subscriptions given back")
    await b.close()


def _flood_headers(host: str, port: int, total: int) -> tuple[bytes, int, float]:
    """Send a handshake with ``total`` bytes of headers; what came back, how many bytes
    the node took before closing, and how long that took."""
    started = time.monotonic()
    sent = 0
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        line = b"X-Pad: " + b"a" * 4000 + b"\r\n"
        try:
            while sent < total:
                s.sendall(line)
                sent += len(line)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return data, sent, time.monotonic() - started


@aio
async def test_handshake_headers_are_bounded(anon_node: RelayServer) -> None:
    host, port = ws_address(anon_node)
    data, sent, took = await asyncio.to_thread(_flood_headers, host, port, 32 * 1024 * 1024)
    assert data.startswith(b"HTTP/1.1 431"), data[:80]
    assert sent < 8 * 1024 * 1024 and took < 5, (sent, took)
    got = await asyncio.to_thread(
        metric, anon_node, "relay_connections_refused_total", reason="handshake_too_large"
    )
    assert got == 1
    c = await anon(anon_node)  # still serving
    await c.close()


@aio
async def test_a_connection_that_never_says_hello_is_closed(make_node: Any) -> None:
    node = make_node(client={"hello_timeout_s": 0.5})
    c = await Client.connect(node.ws_url)
    started = time.monotonic()
    code, reason = await c.closed(timeout_s=5)
    assert (code, reason) == (1008, "no hello in time")
    assert time.monotonic() - started < 3
    got = await asyncio.to_thread(
        metric, node, "relay_connections_refused_total", reason="hello_timeout"
    )
    assert got == 1


def _held_open(host: str, port: int, n: int) -> list[bool]:
    """Open ``n`` raw TCP connections at once; for each, whether the node closed it
    within a second (they all stay open until the end)."""
    socks = [socket.create_connection((host, port), timeout=5) for _ in range(n)]
    out = []
    for s in socks:
        s.settimeout(1.0)
        try:
            out.append(s.recv(1) == b"")
        except TimeoutError:
            out.append(False)
        except ConnectionResetError:
            out.append(True)
    for s in socks:
        s.close()
    return out


@aio
async def test_connections_are_capped_in_total_and_per_ip(make_node: Any) -> None:
    total = make_node(client={"allow_anonymous": True, "max_connections": 3})
    host, port = ws_address(total)
    assert await asyncio.to_thread(_held_open, host, port, 5) == [False] * 3 + [True] * 2
    got = await asyncio.to_thread(
        metric, total, "relay_connections_refused_total", reason="max_connections"
    )
    assert got == 2
    await until(lambda: total.factory.sockets == 0, what="the sockets released")
    per_ip = make_node(client={"allow_anonymous": True, "max_connections_per_ip": 2})
    host, port = ws_address(per_ip)
    assert await asyncio.to_thread(_held_open, host, port, 3) == [False, False, True]
    got = await asyncio.to_thread(
        metric, per_ip, "relay_connections_refused_total", reason="max_connections_per_ip"
    )
    assert got == 1
    c = await anon(per_ip)  # the cap is on open connections, not for ever
    await c.close()
