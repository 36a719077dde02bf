"""The dashboard of a running dev cluster, in Chromium: every node and link, live."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from relay.dev import page_urls
from tests.browser.conftest import PageErrors, chromium, screenshot
from tests.cluster.conftest import FAST, running
from tests.conftest import aio

REGIONS = ["sg", "fra"]
DRAIN = [sys.executable, "-m", "relay", "node", "drain"]
CONVERGE_MS = 20_000  # a fresh region settles, a drained node's slots and links move


@pytest.fixture
def cluster2x2() -> Iterator[dict[str, Any]]:
    """Two regions of two nodes each, with short leases; not waited on: the pages show
    the regions settling."""
    with running(REGIONS, settle=False, nodes_per_region=2, cluster_settings=FAST) as (_, doc):
        yield doc


async def expect_region(page: Any, doc: dict[str, Any], region: str) -> None:
    """The page shows every node of ``region`` alive, every slot owned, every link up."""
    from playwright.async_api import expect

    nodes = [n["id"] for n in doc["regions"][region]["nodes"]]
    await expect(page.locator("#region")).to_have_text(region)
    for node_id in nodes:
        row = page.locator(f'#nodes tr[data-node="{node_id}"]')
        await expect(row.locator("[data-field=state]")).to_have_text("alive", timeout=CONVERGE_MS)
        await expect(row.locator("[data-field=lease]")).to_have_text(
            # renewed every 300 ms (FAST): its age stays well under a second
            re.compile(r"^0\.\d\d s$")
        )
        await expect(page.locator(f'#legend li[data-node="{node_id}"]')).to_have_count(1)
    await expect(page.locator("#nodes tbody tr")).to_have_count(len(nodes))
    await expect(page.locator("#tile-nodes .value")).to_have_text(f"{len(nodes)}/{len(nodes)}")
    await expect(page.locator("#tile-slots .value")).to_have_text("256/256", timeout=CONVERGE_MS)
    await expect(page.locator("#ring path.slot[data-slot]")).to_have_count(256)
    await expect(page.locator("#ring path.slot.unowned")).to_have_count(0)
    others = [r for r in REGIONS if r != region]
    await expect(page.locator("#links tbody tr")).to_have_count(len(others))
    for dest in others:
        link = page.locator(f'#links tr[data-link="{region}>{dest}"]')
        await expect(link.locator("[data-field=state]")).to_have_text(
            "running", timeout=CONVERGE_MS
        )
        await expect(link.locator("[data-field=backlog]")).to_have_text("0")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "ok")


@aio
async def test_dashboard_shows_every_node_and_link_and_follows_a_drain(
    cluster2x2: dict[str, Any],
) -> None:
    from playwright.async_api import expect

    doc = cluster2x2
    urls = page_urls(doc)
    errors = PageErrors()
    async with chromium() as browser:
        pages = {}
        for region in REGIONS:
            page = errors.watch(await browser.new_page(viewport={"width": 1400, "height": 950}))
            await page.goto(urls[region]["dashboard"])
            pages[region] = page
        for region in REGIONS:
            await expect_region(pages[region], doc, region)
            await screenshot(pages[region], f"dashboard-{region}")

        # Drain sg/n2: the page on sg/n1 shows it leave and sg/n1 take every slot.
        sg = pages["sg"]
        r = await asyncio.to_thread(
            subprocess.run,
            [*DRAIN, "sg/n2", "--redis", doc["regions"]["sg"]["redis"], "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"node": "sg/n2", "drained": True, "failed_over": False}
        drained = sg.locator('#nodes tr[data-node="sg/n2"]')
        await expect(drained.locator("[data-field=state]")).to_have_text("left", timeout=5000)
        await expect(drained).to_have_class("gone")
        await expect(sg.locator('#legend li[data-node="sg/n2"]')).to_have_count(0)
        await expect(sg.locator("#tile-nodes .value")).to_have_text("1/1")
        await expect(sg.locator('#nodes tr[data-node="sg/n1"] [data-field=slots]')).to_have_text(
            "256", timeout=CONVERGE_MS
        )
        await expect(sg.locator("#ring path.slot[data-owner='sg/n1']")).to_have_count(256)
        await expect(sg.locator('#links tr[data-link="sg>fra"] [data-field=state]')).to_have_text(
            "running", timeout=CONVERGE_MS
        )
        await screenshot(sg, "dashboard-sg-drained")
    assert errors.errors == []


@aio
async def test_pages_opened_with_the_admin_token(make_node: Any) -> None:
    """A node with an admin token: the pages pass ``?token=`` on to what they fetch."""
    from playwright.async_api import expect

    node = make_node(admin={"token": "t0ken"}, client={"allow_anonymous": True})
    errors = PageErrors()
    async with chromium() as browser:
        page = errors.watch(await browser.new_page())
        await page.goto(node.admin_url + "/?token=t0ken")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "ok")
        await expect(page.locator("#viewer")).to_have_text("test/n1")
        await expect(
            page.locator('#nodes tr[data-node="test/n1"] [data-field=state]')
        ).to_have_text("alive")
        await expect(page.locator("#tile-slots .detail")).to_have_text("standalone")
        await page.click("#demo-link")
        await expect(page.locator("body")).to_have_attribute("data-ready", "1")
        await expect(page.locator("#region")).to_have_value("test")
        await expect(page.locator("#ws-url")).to_have_value(node.ws_url)
    assert errors.errors == []
