"""``relay context …`` and how every ops command finds its cluster: ``--redis`` and
``--region``, else the CLI context (:mod:`relay.context`)."""

from __future__ import annotations

# Imports inside functions here are lazy on purpose (tests/unit/test_layers.py allows them
# only at the top layer): the CLI starts fast, and the reactor is installed before
# Twisted loads (relay/entry.py). None hides a cycle.
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from relay.cli_output import EXIT_USAGE, err, say
from relay.redisurl import check_url as check_redis_url

if TYPE_CHECKING:
    from relay.context import Context

_F = TypeVar("_F", bound=Callable[..., Any])

context_option = click.option(
    "--context",
    "context_name",
    default=None,
    help="The CLI context to use (default: $RELAY_CONTEXT, else the current one).",
)


def load_or_exit(name: str, command: str, code: int = EXIT_USAGE, hint: str = "") -> Context:
    """The CLI context ``name``; when it cannot be read, say why on stderr
    (``relay COMMAND: …``, then ``hint``) and exit with ``code``."""
    from relay import context

    try:
        return context.load(name, os.environ)
    except context.ContextError as e:
        err.print(f"relay {command}: {e}{hint}", markup=False, highlight=False)
        sys.exit(code)


def redis_option(f: _F) -> _F:
    """``--redis`` and ``--context``: where the region's Redis is (see :func:`target`)."""
    f = context_option(f)
    opt: _F = click.option(
        "--redis",
        "redis_url",
        default=None,
        envvar="RELAY_CLUSTER__REDIS_URL",
        help="The region's Redis URL (default: RELAY_CLUSTER__REDIS_URL, else the "
        "region's in the CLI context).",
    )(f)
    return opt


def region_option(what: str) -> Callable[[_F], _F]:
    return click.option(
        "--region",
        default=None,
        help=f"{what} Default: the first region of the CLI context.",
    )


def target(
    command: str, context_name: str | None, redis_url: str | None, region: str | None
) -> tuple[str, str, str]:
    """``(redis URL, region, admin token)`` of the command: ``--redis``/``--region`` as
    given, the rest from the CLI context. Exits 2 when neither says, or when the context
    has no such region."""
    from cluster.keys import check_region
    from relay import context

    if region is not None:
        try:
            check_region(region)
        except ValueError as e:
            err.print(f"relay {command}: {e}", markup=False, highlight=False)
            sys.exit(EXIT_USAGE)
    if redis_url and (problem := check_redis_url(redis_url)) is not None:
        from relay.redact import url_without_credentials

        err.print(
            f"relay {command}: --redis {url_without_credentials(redis_url)!r}: {problem}",
            markup=False,
            highlight=False,
        )
        sys.exit(EXIT_USAGE)
    if redis_url and region:
        return redis_url, region, ""
    name = context.selected_name(context_name, os.environ)
    c: context.Context | None = None
    if name:
        c = load_or_exit(name, command)
    if c is None or not c.regions:
        what = "--region" if redis_url else "--redis URL --region R"
        err.print(
            f"relay {command}: no CLI context to find the cluster in; give {what}, "
            "or run `relay dev` (it writes one), or `relay context add`",
            markup=False,
            highlight=False,
        )
        sys.exit(EXIT_USAGE)
    region = region or c.default_region or ""
    if redis_url:
        return redis_url, region, c.admin_token
    if region not in c.regions:
        err.print(
            f"relay {command}: unknown region {region!r}: context {c.name!r} has "
            f"{', '.join(c.regions)}",
            markup=False,
            highlight=False,
        )
        sys.exit(EXIT_USAGE)
    return c.regions[region], region, c.admin_token


def unknown_region_exit(command: str, e: Exception) -> None:
    err.print(f"relay {command}: {e}", markup=False, highlight=False)
    sys.exit(EXIT_USAGE)


@click.group("context")
def context_group() -> None:
    """CLI contexts: where the ops commands find a cluster's Redis, so that `relay
    status`, `links`, `ring …` and `node …` need no --redis/--region (the region
    defaults to the context's first). `relay dev` writes the context "dev" and makes it
    current while it runs. Chosen by --context NAME, else $RELAY_CONTEXT, else the
    current one. Stored under $XDG_CONFIG_HOME/relay (~/.config/relay)."""


@context_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def context_ls(as_json: bool) -> None:
    """Every context; the current one marked with *. Exit 0."""
    from relay import context

    names = context.names(os.environ)
    current = context.selected_name(None, os.environ)
    if as_json:
        click.echo(json.dumps({"contexts": names, "current": current}))
        return
    for n in names:
        say(f"{'*' if n == current else ' '} {n}")


@context_group.command("show")
@click.argument("name", required=False)
@click.option(
    "--show-secrets",
    is_flag=True,
    help="Print Redis passwords and the admin token as stored (hidden by default).",
)
def context_show(name: str | None, show_secrets: bool) -> None:
    """The context NAME (default: the one in use) as JSON, its Redis passwords and admin
    token hidden unless --show-secrets. Exit 0; 2 when there is none."""
    from relay import context
    from relay.redact import REDACTED, url_without_credentials

    name = name or context.selected_name(None, os.environ)
    if not name:
        err.print("relay context show: no context in use")
        sys.exit(EXIT_USAGE)
    c = load_or_exit(name, "context show")
    doc = c.to_doc()
    if not show_secrets:
        for r in doc["regions"].values():
            r["redis"] = url_without_credentials(r["redis"])
        if "admin_token" in doc:
            doc["admin_token"] = REDACTED
    click.echo(json.dumps({"name": c.name, **doc}, indent=2))


@context_group.command("add")
@click.argument("name")
@click.option(
    "--region",
    "regions",
    multiple=True,
    required=True,
    metavar="NAME=REDIS_URL",
    help="A region and its Redis; repeat. The first is the default region.",
)
@click.option("--admin-token", default="", help="The nodes' admin token.")
@click.option("--use", "make_current", is_flag=True, help="Make it the current context.")
def context_add(name: str, regions: tuple[str, ...], admin_token: str, make_current: bool) -> None:
    """Write the context NAME (replacing one of that name). Exit 0; 2 for a bad argument."""
    from cluster.keys import check_region
    from relay import context

    table: dict[str, str] = {}
    for spec in regions:
        region, sep, url = spec.partition("=")
        try:
            check_region(region)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--region") from None
        if not sep or check_redis_url(url) is not None:
            raise click.BadParameter(
                f"{spec!r}: give NAME=redis://… (or rediss://, unix://, redis+cluster://)",
                param_hint="--region",
            )
        table[region] = url
    try:
        path = context.save(
            context.Context(name, table, admin_token), os.environ, make_current=make_current
        )
    except context.ContextError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None
    say(f"wrote {path}" + (" (current)" if make_current else ""))


@context_group.command("use")
@click.argument("name")
def context_use(name: str) -> None:
    """Make NAME the current context. Exit 0; 2 when there is no such context."""
    from relay import context

    try:
        context.load(name, os.environ)
        context.use(name, os.environ)
    except context.ContextError as e:
        err.print(f"relay context use: {e}", markup=False, highlight=False)
        sys.exit(EXIT_USAGE)
    say(f"using context {name}")


@context_group.command("rm")
@click.argument("name")
def context_rm(name: str) -> None:
    """Delete the context NAME. Exit 0."""
    from relay import context

    try:
        context.remove(name, os.environ)
    except context.ContextError as e:
        err.print(f"relay context rm: {e}", markup=False, highlight=False)
        sys.exit(EXIT_USAGE)
    say(f"removed context {name}")
