"""The chat demo in Chromium: live across regions, and from the pending store after the
recipient reloads the page in a third region."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from relay.dev import page_urls
from tests.browser.conftest import PageErrors, chromium, screenshot
from tests.cluster.conftest import FAST, running
from tests.conftest import aio

REGIONS = ["sg", "fra", "iad"]
CONVERGE_MS = 20_000  # fresh regions settle and their links start
DELIVER_MS = 10_000  # a message crosses regions (milliseconds here)


@pytest.fixture
def world() -> Iterator[dict[str, Any]]:
    """Three regions of one node each, with short leases."""
    with running(REGIONS, settle=False, nodes_per_region=1, cluster_settings=FAST) as (_, doc):
        yield doc


async def wait_settled(page: Any, url: str) -> None:
    """Through the region's dashboard: every slot owned, every link running."""
    from playwright.async_api import expect

    await page.goto(url)
    await expect(page.locator("#tile-slots .value")).to_have_text("256/256", timeout=CONVERGE_MS)
    await expect(page.locator("#tile-links .value")).to_have_text("2/2", timeout=CONVERGE_MS)


async def connect(page: Any, url: str, name: str) -> None:
    from playwright.async_api import expect

    await page.goto(url)
    await expect(page.locator("body")).to_have_attribute("data-ready", "1")
    await page.fill("#name", name)
    await page.click("#connect")
    await expect(page.locator("#status")).to_contain_text("pending from the store, then live")


async def send(page: Any, to: str, text: str) -> None:
    from playwright.async_api import expect

    await page.fill("#to", to)
    await page.fill("#text", text)
    await page.click("#send")
    sent = page.locator("#sent li.msg", has_text=text)
    await expect(sent.locator("[data-field=state]")).to_have_text(
        re.compile(r"^✓ log · origin sg$"), timeout=DELIVER_MS
    )


@aio
async def test_demo_delivers_live_across_regions_and_from_the_store_in_a_third(
    world: dict[str, Any],
) -> None:
    from playwright.async_api import expect

    doc = world
    urls = page_urls(doc)
    errors = PageErrors()
    async with chromium() as browser:
        alice = errors.watch(await browser.new_page(viewport={"width": 1300, "height": 900}))
        bob = errors.watch(await browser.new_page(viewport={"width": 1300, "height": 900}))
        for region in REGIONS:
            await wait_settled(alice, urls[region]["dashboard"])

        # Alice in sg, Bob in fra: a message arrives live, and is acked on display.
        await connect(alice, urls["sg"]["demo"], "alice")
        await expect(alice.locator("#region")).to_have_value("sg")
        bob_fra = urls["fra"]["demo"]
        await connect(bob, bob_fra, "bob")
        await expect(bob.locator("#region")).to_have_value("fra")
        await send(alice, "bob", "hello bob, from sg")
        first = bob.locator("#inbox li.msg", has_text="hello bob, from sg")
        await expect(first).to_have_attribute("data-how", "live", timeout=DELIVER_MS)
        await expect(first).to_have_attribute("data-origin", "sg")
        # The authenticated sender (relay dev is anonymous), and the name in the body
        # shown as an unverified claim only.
        await expect(first).to_have_attribute("data-from", "anon")
        await expect(first).to_have_attribute("data-claimed", "alice")
        await expect(first.locator(".who")).to_have_text("anon")
        await expect(first.locator("[data-field=ack]")).to_have_text("acked")
        await screenshot(bob, "demo-bob-fra-live")

        # Bob leaves; Alice writes twice more. iad's dashboard shows both pending there
        # (and the first one gone: Bob acked it in fra).
        await bob.click("#disconnect")
        await expect(bob.locator("#status")).to_have_text("disconnected")
        for text in ("are you there?", "call me when you land"):
            await send(alice, "bob", text)
        await screenshot(alice, "demo-alice-sg")
        await bob.goto(urls["iad"]["dashboard"])
        await expect(bob.locator("#tile-pending .value")).to_have_text("2", timeout=DELIVER_MS)

        # Bob's page reloads in iad: the two unacked messages come from the pending store.
        await bob.goto(urls["iad"]["demo"] + "&name=bob&connect=1")
        await expect(bob.locator("#region")).to_have_value("iad")
        await expect(bob.locator("#status")).to_contain_text(
            "connected to iad as bob: 2 pending from the store"
        )
        inbox = bob.locator("#inbox li.msg")
        await expect(inbox).to_have_count(2, timeout=DELIVER_MS)
        for text in ("are you there?", "call me when you land"):
            m = bob.locator("#inbox li.msg", has_text=text)
            await expect(m).to_have_attribute("data-how", "stored")
            await expect(m).to_have_attribute("data-origin", "sg")
            await expect(m.locator("[data-field=ack]")).to_have_text("acked")
        await screenshot(bob, "demo-bob-iad-stored")
    assert errors.errors == []


@pytest.fixture
def one_region() -> Iterator[dict[str, Any]]:
    with running(["sg"], settle=False, nodes_per_region=1, cluster_settings=FAST) as (_, doc):
        yield doc


@aio
async def test_demo_idle_hint_is_not_an_error_and_an_empty_name_says_why(
    one_region: dict[str, Any],
) -> None:
    from playwright.async_api import expect

    url = page_urls(one_region)["sg"]["demo"]
    errors = PageErrors()
    async with chromium() as browser:
        page = errors.watch(await browser.new_page(viewport={"width": 1300, "height": 900}))
        await page.goto(url)
        await expect(page.locator("body")).to_have_attribute("data-ready", "1")
        status = page.locator("#status")

        def color() -> Any:
            return status.evaluate("e => getComputedStyle(e).color")

        bad = await page.evaluate(
            "() => { const e = document.createElement('span');"
            " e.style.color = 'var(--bad)'; document.body.append(e);"
            " const c = getComputedStyle(e).color; e.remove(); return c; }"
        )
        await expect(status).to_contain_text("Pick a name and a region")
        assert await color() != bad  # a hint, not an alarm
        await page.click("#connect")
        await expect(status).to_contain_text("type your name first")
        assert await color() == bad
        await expect(page.locator("#name")).to_be_focused()
        await page.fill("#name", "bob")
        await page.click("#connect")
        await expect(status).to_contain_text("pending from the store, then live")
        await page.click("#disconnect")
        await expect(status).to_have_text("disconnected")
        assert await color() != bad
    assert errors.errors == []
