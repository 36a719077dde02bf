"""The admin port's pages (dashboard, chat demo) over real sockets: content types, the
admin token, and nothing loaded from outside the node."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from relay.server import RelayServer
from tests.conftest import aio

STATIC = Path(__file__).resolve().parents[2] / "relay" / "static"
TOKEN = "s3cret-admin-token"
HTML = "text/html; charset=utf-8"
PAGES = ["/", "/dashboard", "/dashboard/", "/demo", "/demo/"]
ASSETS = {
    "/static/relay.css": "text/css; charset=utf-8",
    "/static/dashboard.js": "text/javascript; charset=utf-8",
    "/static/demo.js": "text/javascript; charset=utf-8",
}
# Identifiers that look like URLs but are never fetched.
NOT_FETCHED = {"http://www.w3.org/2000/svg"}


def _get(url: str, token: str | None = None) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


async def get(url: str, token: str | None = None) -> tuple[int, dict[str, str], str]:
    # Blocking HTTP in a thread: the node under test runs on this loop.
    return await asyncio.to_thread(_get, url, token)


def references(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html)


@aio
async def test_pages_and_assets_have_their_content_types(anon_node: RelayServer) -> None:
    base = anon_node.admin_url
    for path in PAGES:
        code, headers, body = await get(base + path)
        assert code == 200, path
        assert headers["content-type"] == HTML, path
        assert body.lstrip().lower().startswith("<!doctype html>"), path
        assert headers["x-content-type-options"] == "nosniff"
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        # Every script and stylesheet a page names is served, with its type.
        for ref in references(body):
            if ref.startswith("/static/"):
                assert ref in ASSETS, ref
    for path, ctype in ASSETS.items():
        code, headers, body = await get(base + path)
        assert code == 200 and headers["content-type"] == ctype, path
        assert body.strip()
    code, headers, body = await get(base + "/demo/config")
    assert code == 200 and headers["content-type"] == "application/json"
    cfg = json.loads(body)
    assert cfg == {
        "node": "test/n1",
        "region": "test",
        "ws": anon_node.ws_url,
        "regions": {"test": anon_node.ws_url},
        "anonymous": True,
    }


@aio
async def test_status_carries_the_dashboard_view(anon_node: RelayServer) -> None:
    code, headers, body = await get(anon_node.admin_url + "/status?peers=1")
    assert code == 200 and headers["content-type"] == "application/json"
    doc: dict[str, Any] = json.loads(body)
    view = doc["view"]
    assert view["node"] == "test/n1" and view["standalone"] is True and view["slots"] == 0
    assert [m["id"] for m in view["members"]] == ["test/n1"]
    assert view["at_risk"] == {"remote_waiting": 0}
    assert doc["peers"] == {}  # a standalone node has nobody to ask
    code, _, body = await get(anon_node.admin_url + "/status?view=1")
    doc = json.loads(body)
    assert code == 200 and doc["view"]["node"] == "test/n1" and "peers" not in doc
    code, _, body = await get(anon_node.admin_url + "/status")
    doc = json.loads(body)
    assert code == 200 and "view" not in doc and "peers" not in doc  # /status as it was


@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static/nope.js",
        "/static/dashboard.html",
        "/static/..%2Fadmin.py",
        "/static/..%2F..%2Fpyproject.toml",
        "/static/a/b.js",
        "/dashboard/x",
        "/demo/nope",
    ],
)
@aio
async def test_only_the_static_files_are_served(anon_node: RelayServer, path: str) -> None:
    code, _, body = await get(anon_node.admin_url + path)
    assert code == 404, (path, body[:200])


@aio
async def test_pages_need_the_admin_token_when_configured(make_node: Any) -> None:
    node = make_node(admin={"token": TOKEN})
    base = node.admin_url
    for path in [*PAGES, "/demo/config", "/status", "/status?peers=1"]:
        code, _, body = await get(base + path)
        assert code == 401 and "unauthorized" in body, path
        assert "<html" not in body.lower()
        code, _, _ = await get(base + path, token="wrong")
        assert code == 401, path
        code, _, _ = await get(base + path, token=TOKEN)
        assert code == 200, path
        sep = "&" if "?" in path else "?"
        code, _, _ = await get(f"{base}{path}{sep}token={TOKEN}")
        assert code == 200, path
    # Scripts and styles hold no data: a page opened with ?token= loads them as is.
    for path in ASSETS:
        code, _, body = await get(base + path)
        assert code == 200 and TOKEN not in body, path


def test_pages_reference_no_external_urls() -> None:
    files = sorted(STATIC.iterdir())
    assert {f.name for f in files} >= {"dashboard.html", "demo.html", "relay.css"}
    for f in files:
        text = f.read_text()
        for url in re.findall(r"""[a-z][a-z0-9+.-]*://[^\s"'`)<>]*""", text, re.I):
            assert url in NOT_FETCHED, f"{f.name} names {url}"
        # Protocol-relative URLs and CSS imports would load from elsewhere too.
        assert not re.search(r"""["'(]\s*//""", text), f.name
        assert "@import" not in text, f.name
        for m in re.findall(r"url\(\s*([^)]*)\)", text):
            assert m.strip("'\" ").startswith(("/", "data:")), f"{f.name}: url({m})"
        if f.suffix == ".html":
            for ref in references(text):
                assert ref.startswith(("/", "data:", "#")), f"{f.name}: {ref}"


def test_relay_dev_prints_the_pages_of_every_region(tmp_path: Path) -> None:
    """``relay dev`` prints each region's dashboard and a demo URL naming every region."""
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "relay", "dev", "--regions", "sg,fra"),
            *("--ready-file", str(ready), "--port-base", "0"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        # The URLs are the command's output: on stdout.
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("relay dev: serving"):
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(timeout=60), "\n".join(lines[-20:])
        doc = json.loads(ready.read_text())
        ws = {r: d["nodes"][0]["ws"] for r, d in doc["regions"].items()}
        pages = [line.split() for line in lines if line.startswith(("  dashboard ", "  demo "))]
        assert [p[0] for p in pages] == ["dashboard", "demo", "dashboard", "demo"]
        for region, dash, demo in zip(["sg", "fra"], pages[::2], pages[1::2], strict=True):
            admin = doc["regions"][region]["nodes"][0]["admin"]
            assert dash[1] == admin + "/"
            url = urllib.parse.urlsplit(demo[1])
            assert f"{url.scheme}://{url.netloc}" == admin and url.path == "/demo"
            query = urllib.parse.parse_qs(url.query)
            assert query["region"] == [region]
            assert json.loads(query["regions"][0]) == ws
            for page in (dash[1], demo[1]):
                code, headers, _ = _get(page)
                assert code == 200 and headers["content-type"] == HTML
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(timeout=10)
