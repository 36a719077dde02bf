"""ruff and mypy --strict on relay/ and cluster/, run by the test command so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args",
    [
        ("ruff", "check", "relay", "cluster", "bench", "tests"),
        ("ruff", "format", "--check", "relay", "cluster", "bench", "tests"),
    ],
    ids=["ruff-check", "ruff-format"],
)
def test_ruff(args: tuple[str, ...]) -> None:
    r = run(*args)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict() -> None:
    r = run("mypy")  # files and --strict come from pyproject.toml
    assert r.returncode == 0, r.stdout + r.stderr
