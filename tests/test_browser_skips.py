"""Where Chromium is missing, the browser tests are skipped and the run says so at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_skipped_browser_tests_are_named_in_the_summary() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/browser", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "RELAY_CHROMIUM": "/nonexistent/chromium"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "browser tests skipped" in r.stdout
    assert "/nonexistent/chromium is missing (apt-get install -y chromium)" in r.stdout


def test_in_ci_missing_chromium_fails_the_browser_tests() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/browser", "-q", "-x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CI": "true", "RELAY_CHROMIUM": "/nonexistent/chromium"},
    )
    assert r.returncode == 1
    assert "CI=true: they must" in r.stdout
