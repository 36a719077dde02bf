"""The README's SDK snippet runs against `relay dev`, and its commands are the ones the
project gives."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from relay.cli_dev import DEFAULT_DEV_PORT_BASE
from tests.cluster.test_dev import free_block, relay_dev

README = Path(__file__).resolve().parents[2] / "README.md"


def block(marker: str) -> str:
    """The fenced block between ``<!-- marker -->`` and ``<!-- /marker -->``."""
    text = README.read_text()
    m = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```\n<!-- /{marker} -->", text, re.S)
    assert m, f"no {marker} block in README.md"
    return m.group(1)


def test_readme_dev_command_is_one_line_ending_in_a_bare_relay_dev() -> None:
    (line,) = block("dev-command").splitlines()
    assert line.endswith(".venv/bin/relay dev")


def test_readme_sdk_snippet_runs_against_relay_dev(tmp_path: Path) -> None:
    snippet = block("sdk-snippet")
    # A bare `relay dev` puts its first node where the snippet connects.
    url = f"ws://127.0.0.1:{DEFAULT_DEV_PORT_BASE}/v1/ws"
    assert url in snippet
    # Here the suite picks free ports (other tests and developers may hold 7400).
    base = free_block(30)
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace(url, f"ws://127.0.0.1:{base}/v1/ws"))
    with relay_dev(tmp_path, "--port-base", str(base)):
        r = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60
        )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "anon hello\n"
