"""The Python SDK (relay/client.py) is the base install: it imports without Twisted, and
what it needs is exactly the base dependencies (the server is the ``server`` extra)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ["twisted", "autobahn", "txaio", "zope", "redis", "hiredis", "click", "lz4"]

# A meta-path finder that refuses the server's packages, as if they were not installed.
BLOCKED = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")
        return None
sys.meta_path.insert(0, Block())
import relay.client as c
assert c.RelayClient and c.Subscription
bad = sorted(m for m in sys.modules if m.split(".")[0] in {SERVER_ONLY!r})
print("loaded:", bad)
assert not bad, bad
"""


def test_the_sdk_imports_without_twisted() -> None:
    r = subprocess.run(
        [sys.executable, "-c", BLOCKED], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "loaded: []" in r.stdout


def test_the_block_would_catch_a_server_import() -> None:
    """The same finder makes a server module fail: the check above can fail."""
    code = BLOCKED.replace("import relay.client as c", "import relay.server as c")
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "(blocked)" in r.stderr


def third_party(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"relay", "__future__"}


def test_the_base_dependencies_are_the_sdks() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {d.split(">")[0].split("[")[0].split("=")[0] for d in project["dependencies"]}
    sdk = set().union(
        *(third_party(ROOT / "relay" / f) for f in ("client.py", "frames.py", "errors.py"))
    )
    assert sdk == base == {"msgspec", "websockets"}
    assert not base & set(SERVER_ONLY)
    # The README's commands install the server through the extras.
    extras = project["optional-dependencies"]
    assert "relay[server]" in extras["embedded"] and "relay[embedded]" in extras["test"]
    assert any(d.startswith("twisted") for d in extras["server"])
