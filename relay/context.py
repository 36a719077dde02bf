"""CLI contexts: where the ops commands find a cluster, so they need no ``--redis``.

A context names a cluster's regions, each with its Redis URL (in order: the first is
the default region), and, for a running ``relay dev``, its control socket. Contexts are
JSON files under ``$XDG_CONFIG_HOME/relay/contexts/`` (``~/.config/relay/`` without
it), written with mode 0600; ``context.txt`` there names the current one. ``relay dev``
writes the context ``dev`` and makes it current while it runs. The one used is the
``--context NAME`` option, else ``$RELAY_CONTEXT``, else the current one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from relay.errors import RelayError

CURRENT_FILE: Final = "context.txt"
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ContextError(RelayError):
    """No such context, or a context file that cannot be read."""


@dataclass(frozen=True, slots=True)
class Context:
    name: str
    # region -> its Redis URL, the default region first.
    regions: dict[str, str] = field(default_factory=dict)
    admin_token: str = ""
    # The control socket of the `relay dev` that wrote it (relay.devctl).
    dev_control: str = ""

    @property
    def default_region(self) -> str | None:
        return next(iter(self.regions), None)

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"regions": {r: {"redis": u} for r, u in self.regions.items()}}
        if self.admin_token:
            doc["admin_token"] = self.admin_token
        if self.dev_control:
            doc["dev_control"] = self.dev_control
        return doc

    @classmethod
    def from_doc(cls, name: str, doc: Any) -> Context:
        if not isinstance(doc, dict) or not isinstance(doc.get("regions"), dict):
            raise ContextError(f"context {name}: no regions")
        regions = {}
        for r, v in doc["regions"].items():
            url = v.get("redis") if isinstance(v, dict) else None
            if not isinstance(url, str):
                raise ContextError(f"context {name}: region {r} has no redis URL")
            regions[str(r)] = url
        return cls(
            name,
            regions,
            str(doc.get("admin_token", "")),
            str(doc.get("dev_control", "")),
        )


def config_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/relay``, or ``~/.config/relay``."""
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")) / ".config")
    return Path(base).expanduser() / "relay"


def check_name(name: str) -> str:
    """Return ``name`` if it can name a context, else raise ContextError."""
    if not _NAME.fullmatch(name):
        raise ContextError(f"bad context name {name!r} (letters, digits, '.', '_', '-')")
    return name


def _path(name: str, environ: Mapping[str, str]) -> Path:
    return config_dir(environ) / "contexts" / f"{check_name(name)}.json"


def current_name(environ: Mapping[str, str]) -> str | None:
    """The name in ``context.txt``, or None."""
    try:
        name = (config_dir(environ) / CURRENT_FILE).read_text().strip()
    except OSError:
        return None
    return name or None


def selected_name(option: str | None, environ: Mapping[str, str]) -> str | None:
    """The context to use: ``option``, else ``$RELAY_CONTEXT``, else the current one."""
    return option or environ.get("RELAY_CONTEXT") or current_name(environ)


def load(name: str, environ: Mapping[str, str]) -> Context:
    path = _path(name, environ)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ContextError(f"no context {name!r} (none at {path})") from None
    except (OSError, ValueError) as e:
        raise ContextError(f"context {name!r}: cannot read {path}: {e}") from None
    return Context.from_doc(name, doc)


def save(ctx: Context, environ: Mapping[str, str], *, make_current: bool = False) -> Path:
    """Write ``ctx`` (mode 0600); with ``make_current``, select it too."""
    path = _path(ctx.name, environ)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(ctx.to_doc(), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    if make_current:
        use(ctx.name, environ)
    return path


def use(name: str | None, environ: Mapping[str, str]) -> None:
    """Make ``name`` the current context (None: no current one)."""
    d = config_dir(environ)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    current = d / CURRENT_FILE
    if name is None:
        current.unlink(missing_ok=True)
        return
    _path(name, environ)  # checks the name
    current.write_text(name + "\n")


def remove(name: str, environ: Mapping[str, str]) -> None:
    _path(name, environ).unlink(missing_ok=True)
    if current_name(environ) == name:
        use(None, environ)


def names(environ: Mapping[str, str]) -> list[str]:
    d = config_dir(environ) / "contexts"
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []
