"""The pure core imports no I/O and no clock (STYLE.md: pure core, thin edges)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = [
    "relay/errors.py",
    "relay/hlc.py",
    "relay/store.py",
    "relay/dedupe.py",
    "relay/ratelimit.py",
    "relay/auth.py",
    "relay/redisurl.py",
    "relay/codec.py",
    "relay/frames.py",
    "relay/session.py",
    "relay/publish.py",
    "relay/node.py",
    "relay/batch.py",
    "relay/snapshot.py",
    "cluster/apply.py",
    "cluster/ring.py",
    "cluster/failure.py",
    "cluster/slots.py",
    "cluster/ownership.py",
    "cluster/regioncore.py",
    "cluster/positions.py",
    "cluster/persist.py",
    "cluster/interest.py",
    "cluster/errors.py",
    "cluster/shaping.py",
    "cluster/wire.py",
    "cluster/checkpoint.py",
    "cluster/chain.py",
    "cluster/rebalance.py",
    "relay/config.py",
    "relay/loopback.py",
    "relay/redact.py",
    "cluster/meshauth.py",
    "cluster/meshops.py",
]
FORBIDDEN = {
    "twisted",
    "asyncio",
    "redis",
    "socket",
    "autobahn",
    "time",
    "random",
    "select",
    "threading",
    "subprocess",
    "psutil",
    "websockets",
}
CORE_MODULES = {p.removesuffix(".py").replace("/", ".") for p in CORE}


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", CORE)
def test_core_module_does_no_io(path: str) -> None:
    names = imported(ROOT / path)
    bad = {n for n in names if n.split(".")[0] in FORBIDDEN}
    assert not bad, f"{path} is core but imports {sorted(bad)}"
    # The core may only lean on other core modules of relay.
    inner = {n for n in names if n.startswith(("relay.", "cluster."))}
    assert inner <= CORE_MODULES, f"{path} imports edge modules {sorted(inner - CORE_MODULES)}"
