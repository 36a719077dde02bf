"""The dashboard tells the truth about a cut link: stalled, with data at risk, then healed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest

from relay.dev import page_urls
from tests.browser.conftest import PageErrors, chromium, screenshot
from tests.cluster.conftest import FAST, running
from tests.conftest import aio
from tests.faults.history import History, steady, wan


@pytest.fixture
def linked(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """sg and fra, one node each, an 80 ms WAN between them."""
    monkeypatch.setenv("RELAY_CLIENT__RATE_PER_S", "100000")
    monkeypatch.setenv("RELAY_CLIENT__BURST", "100000")
    with running(["sg", "fra"], cluster_settings=FAST, wan_latency_ms=80) as (_, doc):
        yield doc


@aio
async def test_the_dashboard_raises_the_stalled_link_alarm_while_the_link_is_cut(
    linked: dict[str, Any],
) -> None:
    from playwright.async_api import expect

    doc = linked
    h = History()
    load = asyncio.ensure_future(
        steady(
            doc["regions"]["sg"]["nodes"][0]["ws"],
            h,
            channels=[f"room:{i}" for i in range(50)],
            rate=100,
            duration_s=25,
            prefix="d",
        )
    )
    errors = PageErrors()
    async with chromium() as browser:
        page = errors.watch(await browser.new_page(viewport={"width": 1400, "height": 950}))
        await page.goto(page_urls(doc)["sg"]["dashboard"])
        link = page.locator('#links tr[data-link="sg>fra"]')
        await expect(link.locator("[data-field=state]")).to_have_text("running", timeout=20_000)
        await expect(page.locator("#alarms li[data-level=bad]")).to_have_count(0)

        wan(doc, "/set", pair="sg-fra", blackhole=1)
        stalled = page.locator("#alarms li[data-level=bad]", has_text="link → fra is stalled")
        await expect(stalled).to_have_count(1, timeout=10_000)
        await expect(link.locator("[data-field=state]")).to_have_text("stalled")
        # Data at risk counts what has not reached fra.
        await expect(page.locator('#risk tr[data-risk="link:fra"]')).to_have_count(1)
        await expect(page.locator("#tile-risk .value")).not_to_have_text(re.compile(r"^0$"))
        await screenshot(page, "dashboard-link-stalled")

        wan(doc, "/reset", pair="sg-fra")
        wan(doc, "/set", pair="sg-fra", blackhole=0)
        await expect(link.locator("[data-field=state]")).to_have_text("running", timeout=30_000)
        await expect(stalled).to_have_count(0, timeout=10_000)
    await load
    assert errors.errors == []
