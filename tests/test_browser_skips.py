"""Where Chromium is missing, the browser tests are skipped and the run says so at the end."""

from __future__ import annotations

import os
import sys

from tests.conftest import run_at_root


def test_skipped_browser_tests_are_named_in_the_summary() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    r = run_at_root(
        [sys.executable, "-m", "pytest", "tests/browser", "-q"],
        120,
        {**env, "RELAY_CHROMIUM": "/nonexistent/chromium"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "browser tests skipped" in r.stdout
    assert "/nonexistent/chromium is missing (apt-get install -y chromium)" in r.stdout


def test_in_ci_missing_chromium_fails_the_browser_tests() -> None:
    r = run_at_root(
        [sys.executable, "-m", "pytest", "tests/browser", "-q", "-x"],
        120,
        {**os.environ, "CI": "true", "RELAY_CHROMIUM": "/nonexistent/chromium"},
    )
    assert r.returncode == 1
    assert "CI=true: they must" in r.stdout
