"""How the ``relay`` command speaks: exit codes, and the consoles for results (stdout)
and for progress, warnings and errors (stderr).

Exit codes (docs/OPERATIONS.md): 0 ok, 1 failed, 2 usage (an unknown region or node
among them), 69 a node or Redis unreachable, 75 another change in progress, 78 bad
configuration. Every command prints its result on stdout (a table or text for people, or
with ``--json`` one JSON document); progress, warnings and logs go to stderr.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78
# relay links: some link is not running (stalled, failing, down or unknown).
EXIT_LINK_UNHEALTHY = 1

# Progress, warnings, errors.
err = Console(stderr=True, soft_wrap=True)


def out() -> Console:
    """The console for a command's result on stdout. Not a terminal (a file, a pipe):
    no width to fit, so tables keep every column whole."""
    if sys.stdout.isatty():
        return Console(soft_wrap=True)
    return Console(width=10_000, soft_wrap=True)


def say(text: str) -> None:
    """One line of a human-readable result on stdout (no markup)."""
    click.echo(text)


def problems(n: int) -> str:
    """``1 problem``, ``2 problems``."""
    return f"{n} problem{'' if n == 1 else 's'}"
