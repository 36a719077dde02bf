"""Static tools for terraform/ where no terraform binary exists.

- :func:`module` parses every ``.tf`` of a directory with python-hcl2 into a
  :class:`Module` (resources, data sources, variables, outputs, locals, module calls,
  providers), expressions kept as their source text (``"${var.x}"``).
- :func:`render` is ``templatefile`` for the subset of the template language that
  ``terraform/modules/region/templates`` use: ``${expr}``, ``%{ if }``/``%{ else }``/
  ``%{ endif }``, ``%{ for x in list }``/``%{ endfor }``, the ``~`` strip markers with
  HCL's exact trimming rules, and the functions ``indent``, ``jsonencode`` and
  ``length``. Anything else raises :class:`TemplateError` rather than guess.
- :func:`fmt_problems` checks what ``terraform fmt`` would change that matters most to a
  reader: indentation and the vertical alignment of ``=`` (hclwrite's rules).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
from hcl2 import SerializationOptions

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "terraform"
REGION = TERRAFORM / "modules" / "region"
INTERREGION = TERRAFORM / "modules" / "interregion"
EXAMPLE = TERRAFORM / "examples" / "two_region"

_OPTIONS = SerializationOptions(
    with_comments=False,
    explicit_blocks=False,
    preserve_heredocs=False,
    strip_string_quotes=True,
)


def tf_files(directory: Path = TERRAFORM) -> list[Path]:
    """Every ``.tf`` file under ``directory``, sorted."""
    return sorted(p for p in directory.rglob("*.tf") if ".terraform" not in p.parts)


@functools.cache
def parse(path: Path) -> dict[str, Any]:
    """One ``.tf`` file as python-hcl2 reads it."""
    with path.open(encoding="utf-8") as fh:
        return dict(hcl2.load(fh, serialization_options=_OPTIONS))


@dataclass
class Module:
    """The top-level blocks of one Terraform module (all its ``.tf`` files)."""

    path: Path
    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    data: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    providers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    terraform: list[dict[str, Any]] = field(default_factory=list)

    def of_type(self, rtype: str) -> dict[str, dict[str, Any]]:
        """The resources of one type, by name."""
        return {name: body for (t, name), body in self.resources.items() if t == rtype}


@functools.cache
def module(directory: Path) -> Module:
    """Parse the ``.tf`` files directly in ``directory`` (not its subdirectories)."""
    m = Module(directory)
    for path in sorted(directory.glob("*.tf")):
        doc = parse(path)
        for block in doc.get("resource", []):
            for rtype, named in block.items():
                for name, body in named.items():
                    assert (rtype, name) not in m.resources, f"{rtype}.{name} twice"
                    m.resources[(rtype, name)] = body
        for block in doc.get("data", []):
            for dtype, named in block.items():
                for name, body in named.items():
                    m.data[(dtype, name)] = body
        for kind, target in (("variable", m.variables), ("output", m.outputs)):
            for block in doc.get(kind, []):
                target.update(block)
        for block in doc.get("locals", []):
            for key, value in block.items():
                assert key not in m.locals, f"local.{key} twice"
                m.locals[key] = value
        for block in doc.get("module", []):
            m.modules.update(block)
        for block in doc.get("provider", []):
            m.providers.extend(block.items())
        m.terraform.extend(doc.get("terraform", []))
    return m


def blocks(body: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    """The nested blocks ``name`` of a body (python-hcl2 gives a list, or nothing)."""
    found = body.get(name, [])
    return list(found) if isinstance(found, list) else [found]


def ref(value: Any) -> str:
    """The expression inside a whole-value interpolation: ``"${var.x}"`` -> ``var.x``."""
    assert isinstance(value, str), value
    if value.startswith("${") and value.endswith("}") and _balanced_interp(value):
        return value[2:-1]
    return value


def _balanced_interp(value: str) -> bool:
    depth = 0
    for i, ch in enumerate(value):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0 and i != len(value) - 1:
                return False
    return depth == 0


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split on ``sep`` outside brackets and quotes (HCL argument lists)."""
    parts, depth, quote, start, i = [], 0, False, 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quote = False
        elif ch == '"':
            quote = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
        i += 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def templatefile_call(expr: str) -> tuple[str, list[str]]:
    """``templatefile("<path>", {k = v, ...})`` -> (the template's file name, the keys)."""
    m = re.fullmatch(r'\$\{templatefile\("\$\{path\.module\}/([^"]+)", \{(.*)\}\)\}', expr, re.S)
    assert m, f"not a templatefile(path.module/..., {{...}}) call: {expr[:80]}"
    keys = [part.split("=", 1)[0].strip() for part in split_top_level(m.group(2))]
    return m.group(1), keys


# -- templatefile ------------------------------------------------------------------------


class TemplateError(Exception):
    """The template uses something this renderer does not do, or is malformed."""


@dataclass
class _Lit:
    text: str


@dataclass
class _Seq:
    kind: str  # "interp", "if", "else", "endif", "for", "endfor"
    expr: str
    strip_left: bool
    strip_right: bool


def _tokens(text: str) -> list[_Lit | _Seq]:
    """Literals and ``${ }``/``%{ }`` sequences, with the strip markers applied as HCL's
    parser does: ``~`` trims *all* whitespace (newlines too) of the neighbouring literal."""
    out: list[_Lit | _Seq] = []
    lit: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith(("$${", "%%{"), i):
            lit.append(text[i + 1 : i + 3])
            i += 3
            continue
        if text.startswith(("${", "%{"), i):
            end = _closing_brace(text, i + 2)
            inner = text[i + 2 : end]
            strip_left = inner.startswith("~")
            strip_right = inner.endswith("~")
            inner = inner[1 if strip_left else 0 : len(inner) - (1 if strip_right else 0)]
            out.append(_Lit("".join(lit)))
            lit = []
            if text[i] == "$":
                out.append(_Seq("interp", inner.strip(), strip_left, strip_right))
            else:
                word, _, rest = inner.strip().partition(" ")
                if word not in ("if", "else", "endif", "for", "endfor"):
                    raise TemplateError(f"unknown directive %{{{word}}}")
                out.append(_Seq(word, rest.strip(), strip_left, strip_right))
            i = end + 1
            continue
        lit.append(text[i])
        i += 1
    out.append(_Lit("".join(lit)))
    for k, tok in enumerate(out):
        if isinstance(tok, _Seq):
            before, after = out[k - 1], out[k + 1]
            if tok.strip_left and isinstance(before, _Lit):
                before.text = before.text.rstrip()
            if tok.strip_right and isinstance(after, _Lit):
                after.text = after.text.lstrip()
    return out


def _closing_brace(text: str, start: int) -> int:
    depth, quote, i = 1, False, start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quote = False
        elif ch == '"':
            quote = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise TemplateError(f"unclosed sequence at offset {start - 2}")


def _parse_body(tokens: list[_Lit | _Seq], pos: int, until: tuple[str, ...]) -> tuple[list, int]:
    """A list of nodes up to one of the ``until`` directives; (nodes, index of it)."""
    nodes: list[Any] = []
    while pos < len(tokens):
        tok = tokens[pos]
        if isinstance(tok, _Lit):
            nodes.append(("lit", tok.text))
            pos += 1
        elif tok.kind == "interp":
            nodes.append(("interp", tok.expr))
            pos += 1
        elif tok.kind in until:
            return nodes, pos
        elif tok.kind == "if":
            then, pos = _parse_body(tokens, pos + 1, ("else", "endif"))
            other: list[Any] = []
            if tokens[pos].kind == "else":  # type: ignore[union-attr]
                other, pos = _parse_body(tokens, pos + 1, ("endif",))
            nodes.append(("if", tok.expr, then, other))
            pos += 1
        elif tok.kind == "for":
            m = re.fullmatch(r"([A-Za-z_]\w*)\s+in\s+(.+)", tok.expr, re.S)
            if not m:
                raise TemplateError(f"unsupported for directive: {tok.expr!r}")
            body, pos = _parse_body(tokens, pos + 1, ("endfor",))
            nodes.append(("for", m.group(1), m.group(2), body))
            pos += 1
        else:
            raise TemplateError(f"unexpected %{{{tok.kind}}}")
    if until:
        raise TemplateError(f"missing %{{{until[-1]}}}")
    return nodes, pos


def _run(nodes: list[Any], scope: Mapping[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "lit":
            out.append(node[1])
        elif node[0] == "interp":
            out.append(_to_string(evaluate(node[1], scope)))
        elif node[0] == "if":
            cond = evaluate(node[1], scope)
            if not isinstance(cond, bool):
                raise TemplateError(f"if condition is not a bool: {node[1]!r}")
            _run(node[2] if cond else node[3], scope, out)
        else:  # for
            items = evaluate(node[2], scope)
            if not isinstance(items, list | tuple):
                raise TemplateError(f"for over a non-list: {node[2]!r}")
            for item in items:
                _run(node[3], {**scope, node[1]: item}, out)


def _to_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise TemplateError(f"cannot interpolate {type(value).__name__} (use jsonencode)")


def render(text: str, variables: Mapping[str, Any]) -> str:
    """``templatefile`` of ``text`` with ``variables`` (the supported subset)."""
    nodes, _ = _parse_body(_tokens(text), 0, ())
    out: list[str] = []
    _run(nodes, variables, out)
    return "".join(out)


def referenced_variables(text: str) -> set[str]:
    """The template variables ``text`` refers to (not loop variables or functions)."""
    names: set[str] = set()

    def walk(nodes: list[Any], bound: frozenset[str]) -> None:
        for node in nodes:
            exprs: list[str] = []
            if node[0] == "interp":
                exprs = [node[1]]
            elif node[0] == "if":
                exprs = [node[1]]
                walk(node[2], bound)
                walk(node[3], bound)
            elif node[0] == "for":
                exprs = [node[2]]
                walk(node[3], bound | {node[1]})
            for expr in exprs:
                for kind, text in _expr_tokens(expr):
                    head = text.split(".")[0]
                    if kind == "name" and text not in _FUNCTIONS and head not in bound:
                        names.add(head)

    nodes, _ = _parse_body(_tokens(text), 0, ())
    walk(nodes, frozenset())
    return names - {"true", "false"}


# -- expressions: names, attributes, literals, == != > && || !, and three functions ------


def _jsonencode(value: Any) -> str:
    # Terraform: compact, keys sorted, and <, >, & escaped as Go's encoder does.
    text = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _indent(spaces: Any, text: Any) -> str:
    if not isinstance(spaces, int) or not isinstance(text, str):
        raise TemplateError("indent(number, string)")
    return text.replace("\n", "\n" + " " * spaces)


def _length(value: Any) -> int:
    if not isinstance(value, str | list | tuple | dict):
        raise TemplateError("length of a non-collection")
    return len(value)


_FUNCTIONS = {"indent": _indent, "jsonencode": _jsonencode, "length": _length}

_TOKEN = re.compile(
    r'\s*(?:(?P<num>\d+)|(?P<str>"(?:[^"\\$%]|\\.)*")|(?P<name>[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)'
    r"|(?P<op>==|!=|>=|<=|&&|\|\||[()><!,]))"
)


def _expr_tokens(expr: str) -> Iterator[tuple[str, str]]:
    pos = 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"unsupported expression {expr!r} at {expr[pos:]!r}")
        kind = m.lastgroup
        assert kind is not None
        yield kind, m.group(kind)
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1


def evaluate(expr: str, scope: Mapping[str, Any]) -> Any:
    """One expression of the supported subset, against ``scope``."""
    tokens = list(_expr_tokens(expr))
    value, pos = _or(tokens, 0, scope)
    if pos != len(tokens):
        raise TemplateError(f"unsupported expression {expr!r}")
    return value


def _or(t: Sequence[tuple[str, str]], i: int, s: Mapping[str, Any]) -> tuple[Any, int]:
    left, i = _and(t, i, s)
    while i < len(t) and t[i] == ("op", "||"):
        right, i = _and(t, i + 1, s)
        left = left or right
    return left, i


def _and(t: Sequence[tuple[str, str]], i: int, s: Mapping[str, Any]) -> tuple[Any, int]:
    left, i = _cmp(t, i, s)
    while i < len(t) and t[i] == ("op", "&&"):
        right, i = _cmp(t, i + 1, s)
        left = left and right
    return left, i


def _cmp(t: Sequence[tuple[str, str]], i: int, s: Mapping[str, Any]) -> tuple[Any, int]:
    left, i = _unary(t, i, s)
    ops = {
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        ">": lambda a, b: a > b,
        "<": lambda a, b: a < b,
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
    }
    if i < len(t) and t[i][0] == "op" and t[i][1] in ops:
        op = t[i][1]
        right, i = _unary(t, i + 1, s)
        return ops[op](left, right), i
    return left, i


def _unary(t: Sequence[tuple[str, str]], i: int, s: Mapping[str, Any]) -> tuple[Any, int]:
    if i < len(t) and t[i] == ("op", "!"):
        value, i = _unary(t, i + 1, s)
        return not value, i
    return _primary(t, i, s)


def _primary(t: Sequence[tuple[str, str]], i: int, s: Mapping[str, Any]) -> tuple[Any, int]:
    if i >= len(t):
        raise TemplateError("expression ends early")
    kind, text = t[i]
    if kind == "num":
        return int(text), i + 1
    if kind == "str":
        return json.loads(text), i + 1
    if kind == "op" and text == "(":
        value, i = _or(t, i + 1, s)
        if i >= len(t) or t[i] != ("op", ")"):
            raise TemplateError("missing )")
        return value, i + 1
    if kind == "name":
        if text in ("true", "false"):
            return text == "true", i + 1
        if i + 1 < len(t) and t[i + 1] == ("op", "("):
            if text not in _FUNCTIONS:
                raise TemplateError(f"unsupported function {text}()")
            args, i = [], i + 2
            while t[i] != ("op", ")"):
                arg, i = _or(t, i, s)
                args.append(arg)
                if t[i] == ("op", ","):
                    i += 1
            return _FUNCTIONS[text](*args), i + 1
        head, *attrs = text.split(".")
        if head not in s:
            raise TemplateError(f"unknown variable {head!r}")
        value = s[head]
        for attr in attrs:
            value = value[attr]
        return value, i + 1
    raise TemplateError(f"unexpected {text!r}")


# -- terraform fmt (indentation and "=" alignment) ---------------------------------------


def _code_only(line: str) -> str:
    """``line`` with string contents blanked and any trailing comment cut off; brackets
    of ``${ }`` interpolations inside strings balance, so they are blanked too."""
    out, i, quote = [], 0, False
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                out.append("  ")
                i += 2
                continue
            if line.startswith(("${", "%{"), i):
                end = _closing_brace(line, i + 2)
                out.append(" " * (end + 1 - i))
                i = end + 1
                continue
            if ch == '"':
                quote = False
            out.append(ch if ch == '"' else " ")
        elif ch == '"':
            quote = True
            out.append(ch)
        elif ch == "#" or line.startswith("//", i):
            break
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def fmt_problems(path: Path) -> list[str]:
    """Lines that ``terraform fmt`` would re-indent or re-align (hclwrite's format.go):
    each line that opens brackets indents what follows by one level; consecutive lines
    that assign a whole single-line value align their ``=`` one column after the longest
    name. Also trailing whitespace and tabs. Heredocs are not supported."""
    problems: list[str] = []
    stack: list[int] = []
    chain: list[tuple[int, int, int]] = []  # (line number, "=" column, name end)

    def close_chain() -> None:
        if chain:
            want = max(end for _, _, end in chain) + 1
            for n, col, _ in chain:
                if col != want:
                    problems.append(
                        f"{path}:{n}: '=' at column {col + 1}, fmt puts it at {want + 1}"
                    )
        chain.clear()

    for n, raw in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if "<<" in raw:
            raise AssertionError(f"{path}:{n}: heredocs are not checked here; avoid them")
        if raw != raw.rstrip() or "\t" in raw:
            problems.append(f"{path}:{n}: trailing whitespace or tab")
        code = _code_only(raw)
        net = sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
        if raw.strip():
            closed = -net
            while closed > 0 and stack:
                if closed >= stack[-1]:
                    closed -= stack.pop()
                else:
                    stack[-1] -= closed
                    closed = 0
            want = 2 * len(stack)
            if net > 0:
                stack.append(net)
            have = len(raw) - len(raw.lstrip(" "))
            if have != want:
                problems.append(f"{path}:{n}: indented {have}, fmt indents {want}")
        eq = re.search(r"(?<![=!<>])=(?![=>])", code)
        rhs = code[eq.start() :] if eq else ""
        if (
            eq
            and code[: eq.start()].strip()
            and sum(rhs.count(c) for c in "([{") == sum(rhs.count(c) for c in ")]}")
        ):
            chain.append((n, eq.start(), len(code[: eq.start()].rstrip())))
        else:
            close_chain()
    close_chain()
    return problems
