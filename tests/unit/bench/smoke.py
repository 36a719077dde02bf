"""Shared by the bench smoke tests: a command's ``--help`` as ``relay bench`` registers it,
and a tiny run of a bench module in its own process, its one JSON document parsed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
from click.testing import CliRunner

from tests.conftest import run_at_root


def command_help(register: Callable[[click.Group], Any], name: str) -> str:
    """The ``--help`` text of ``name`` once ``register`` has added it to a group."""

    @click.group()
    def group() -> None:
        pass

    register(group)
    return CliRunner().invoke(group, [name, "--help"]).output


def run_json(cmd: list[str], timeout_s: float) -> tuple[dict[str, Any], str]:
    """Run ``cmd`` from the repository root; it must exit 0 and print one JSON document,
    and nothing else, on stdout. The document and the run's stderr."""
    r = run_at_root(cmd, timeout_s)
    assert r.returncode == 0, r.stderr[-3000:]
    doc: dict[str, Any] = json.loads(r.stdout)  # stdout holds the document and nothing else
    return doc, r.stderr
