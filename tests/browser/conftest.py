"""Browser tests: Playwright driving Debian's Chromium (``apt-get install chromium``).

No browser is downloaded (never ``playwright install``): Playwright launches
``/usr/bin/chromium``, headless. When that browser is missing the tests are skipped, and
the run's summary says so (tests/conftest.py), except in CI (``CI=true``), where they
fail. Screenshots go to ``artifacts/browser/`` (gitignored).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

# RELAY_CHROMIUM: another Chromium binary (the tests of the skip message point it nowhere).
CHROMIUM = os.environ.get("RELAY_CHROMIUM", "/usr/bin/chromium")
SKIP_PREFIX = "browser tests need Debian's Chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "browser"


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    """Skip without Chromium, unless in CI; Playwright itself comes with the test extra."""
    if not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} is missing (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser tests cannot run: {why} (CI=true: they must)")
        pytest.skip(f"{SKIP_PREFIX}: {why}")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'")


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium; closed on exit."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


class PageErrors:
    """Uncaught exceptions and console errors (CSP violations among them) of pages."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page: Any) -> Any:
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))
        page.on(
            "console",
            lambda m: (
                self.errors.append(f"{page.url}: console: {m.text}") if m.type == "error" else None
            ),
        )
        return page


async def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
