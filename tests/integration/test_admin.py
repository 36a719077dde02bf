"""Admin HTTP over real sockets: /metrics and /status, with and without a token."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

from relay.server import RelayServer
from tests.conftest import aio
from tests.wsclient import Client


def _get(url: str, token: str | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode()


async def get(url: str, token: str | None = None) -> tuple[int, str, str]:
    # Blocking HTTP in a thread: the node under test runs on this loop.
    return await asyncio.to_thread(_get, url, token)


@aio
async def test_metrics_and_status(anon_node: RelayServer) -> None:
    c = await Client.connect(anon_node.ws_url)
    await c.send(
        [
            {"op": "pub", "id": "1", "ch": "a", "body": "x"},
            {"op": "pub", "id": "1", "ch": "a", "body": "x"},
            {"op": "bogus"},
        ]
    )
    for op in ("welcome", "puback", "puback", "error"):
        await c.expect(op)
    code, ctype, text = await get(anon_node.admin_url + "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    for name in (
        "relay_connections",
        "relay_channels",
        "relay_pending_messages",
        "relay_pending_bytes",
        "relay_messages_in_total",
        "relay_messages_out_total",
        "relay_duplicates_total",
        "relay_evictions_total",
        "relay_rate_limited_total",
        "relay_disconnects_total",
        "relay_errors_total",
    ):
        assert name in text, name
    assert 'relay_errors_total{code="bad_request",node="test/n1",region="test"} 1.0' in text
    assert 'relay_duplicates_total{node="test/n1",region="test"} 1.0' in text
    # Never labelled by channel.
    assert 'ch="' not in text and "channel=" not in text
    code, ctype, text = await get(anon_node.admin_url + "/status")
    assert code == 200 and ctype == "application/json"
    doc: dict[str, Any] = json.loads(text)
    assert doc["node"] == "test/n1" and doc["connections"] == 1
    assert doc["pending"]["messages"] == 1 and doc["counters"]["duplicates"] == 1
    await c.close()


@aio
async def test_admin_token_required_when_configured(make_node: Any) -> None:
    node = make_node(admin={"token": "s3cret-admin-token"})
    for path in ("/metrics", "/status"):
        code, _, body = await get(node.admin_url + path)
        assert code == 401 and "unauthorized" in body
        code, _, _ = await get(node.admin_url + path, token="wrong")
        assert code == 401
        code, _, _ = await get(node.admin_url + path, token="s3cret-admin-token")
        assert code == 200
    code, _, _ = await get(node.admin_url + "/status?token=s3cret-admin-token")
    assert code == 200


@aio
async def test_unknown_admin_path_is_404(anon_node: RelayServer) -> None:
    code, _, _ = await get(anon_node.admin_url + "/nope")
    assert code == 404
