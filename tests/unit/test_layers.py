"""Layering without circles: the node core at the bottom, ``cluster/`` above it, the CLI,
server wiring and ``relay dev`` on top (docs/ARCHITECTURE.md, "Layers")."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The top: command lines, process entry points and server wiring. They may import lazily
# inside functions (start-up speed, the reactor installed before Twisted is imported);
# nothing below them may import them.
TOP = {
    "relay.__main__",
    "relay.entry",
    "relay.cli",
    "relay.cli_context",
    "relay.cli_dev",
    "relay.cli_ops",
    "relay.cli_output",
    "relay.server",
    "relay.admin",
    "relay.metrics",
    "relay.dev",
    "relay.devctl",
    "cluster.wan",  # `python -m cluster.wan`: a process of its own
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    paths = [*(ROOT / "relay").rglob("*.py"), *(ROOT / "cluster").rglob("*.py")]
    return {module_name(p): p for p in paths}


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports(path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(project module imported, inside a function?) for every run-time import."""
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            return  # for the type checker only
        if isinstance(node, ast.Import | ast.ImportFrom):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for n in names:
                while n and n not in known:
                    n = n.rpartition(".")[0]
                if n and n.split(".")[0] in ("relay", "cluster"):
                    out.append((n, local))
                    break
        inner = local or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return out


@functools.cache
def graph() -> dict[str, list[tuple[str, bool]]]:
    mods = project_modules()
    return {m: [(n, lo) for n, lo in imports(p, set(mods)) if n != m] for m, p in mods.items()}


def layer(mod: str) -> int:
    if mod in TOP:
        return 2
    return 1 if mod.startswith("cluster") else 0


def test_no_module_imports_a_layer_above_its_own() -> None:
    bad = [
        f"{m} -> {n}"
        for m, deps in graph().items()
        for n, _ in deps
        if layer(n) > layer(m) and n not in ("relay", "cluster")
    ]
    assert not bad, bad


def test_only_the_top_imports_inside_functions() -> None:
    bad = [f"{m} -> {n}" for m, deps in graph().items() for n, lo in deps if lo and m not in TOP]
    assert not bad, bad


def test_the_import_graph_has_no_cycle() -> None:
    g = {m: sorted({n for n, _ in deps}) for m, deps in graph().items()}
    done: set[str] = set()
    path: list[str] = []

    def walk(m: str) -> None:
        if m in done:
            return
        assert m not in path, "cycle: " + " -> ".join([*path[path.index(m) :], m])
        path.append(m)
        for n in g.get(m, []):
            walk(n)
        path.pop()
        done.add(m)

    for m in sorted(g):
        walk(m)


def test_the_checks_see_a_violation() -> None:
    """The walker finds function-local and top-level imports, but not type-only ones."""
    src = ROOT / "relay" / "admin.py"
    found = imports(src, set(project_modules()))
    assert ("relay.server", False) not in found  # under TYPE_CHECKING only
    assert layer("relay.server") > layer("cluster.region.node") > layer("relay.node")
