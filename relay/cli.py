"""The ``relay`` command.

Exit codes (docs/OPERATIONS.md): 0 ok, 1 failed, 2 usage (an unknown region or node
among them), 69 a node or Redis unreachable, 75 another change in progress, 78 bad
configuration. Every command prints its result on stdout (a table or text for people, or
with ``--json`` one JSON document); progress, warnings and logs go to stderr. The ops
commands find the cluster through a CLI context (:mod:`relay.context`) unless given
``--redis``.
"""

from __future__ import annotations

# Imports inside functions here are lazy on purpose (tests/unit/test_layers.py allows them
# only at the top layer): the CLI starts fast, and the reactor is installed before
# Twisted loads (relay/entry.py). None hides a cycle.
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from relay import __version__
from relay.cli_output import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    err,
    out,
    problems,
    say,
)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    observer: Any = STDLibLogObserver()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _load_config_or_exit(path: str | None) -> Any:
    from relay.config import ConfigError, load_config

    try:
        config = load_config(path, os.environ)
    except ConfigError as e:
        err.print(f"[bold red]relay: bad configuration[/] ({problems(len(e.problems))}):")
        for p in e.problems:
            err.print(f"  - {p}", markup=False, highlight=False)
        sys.exit(EXIT_CONFIG)
    _warn_if_exposed(path)
    return config


def _warn_if_exposed(path: str | None) -> None:
    """Warn (stderr) when a config file that holds secrets is world-readable."""
    from relay.config import exposed_secrets

    if path is None:
        return
    keys = exposed_secrets(path)
    if keys:
        err.print(
            f"relay: warning: {path} holds secrets ({', '.join(keys)}) and any user "
            f"can read it; chmod 600 {path}",
            markup=False,
            highlight=False,
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relay")
def cli() -> None:
    """relay: a multi-region, replicated, in-memory relay for real-time chat.

    \b
    Start here:
      relay dev                      three local regions with anonymous access
      relay status                   (while relay dev runs) its first region
      relay config init node.toml    a node config with a fresh token secret
      relay token --config node.toml --sub alice --can-sub inbox:alice --can-pub 'inbox:*'
                                     a client token and what it may do
      relay serve --config node.toml one node in production

    Results go to stdout (--json: one JSON document), the rest to stderr. Exit codes:
    0 ok, 1 failed, 2 usage (unknown region too), 69 unreachable, 75 another change
    under way, 78 bad configuration (docs/OPERATIONS.md).
    """


# -- serve ------------------------------------------------------------------------


def _stop_on_sigint(reactor: Any) -> None:
    """SIGINT stops the node gracefully, as SIGTERM does, also when it came before the
    reactor runs (the ready file is written as soon as a standalone node listens) and
    when the process was started with SIGINT ignored (a shell script's `relay serve &`:
    Twisted then leaves it ignored)."""
    import signal

    from twisted.internet.error import ReactorNotRunning

    def stop() -> None:
        if not reactor.running:
            reactor.callWhenRunning(stop)
            return
        with contextlib.suppress(ReactorNotRunning):  # a second SIGINT while stopping
            reactor.stop()

    signal.signal(signal.SIGINT, lambda _signum, _frame: reactor.callFromThread(stop))


def _listen_problem(config: Any, e: Any) -> str:
    """A port the node cannot listen on, named by its setting."""
    names = {
        config.client.port: "client.port (RELAY_CLIENT__PORT)",
        config.admin.port: "admin.port (RELAY_ADMIN__PORT)",
        config.cluster.mesh_port: "cluster.mesh_port (RELAY_CLUSTER__MESH_PORT)",
    }
    which = names.get(e.port, "port")
    why = e.socketError.strerror if getattr(e.socketError, "strerror", None) else e.socketError
    return (
        f"{which} {e.port} on {e.interface or '0.0.0.0'}: {why} (another process listens "
        "there: a running `relay dev` uses 7400 and up; choose another port)"
    )


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Node config (TOML). Every key can be overridden by "
    "RELAY_<SECTION>__<KEY>. Without it: defaults plus environment.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write {id, ws, admin, pid} as JSON here once the node serves.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def serve(config_path: str | None, ready_file: str | None, log_level: str) -> None:
    """Run one relay node until SIGTERM or SIGINT.

    On a signal the node stops accepting, closes its clients with 1001 and exits 0.
    A bad config exits 78 listing every problem.
    """
    config = _load_config_or_exit(config_path)
    for w in config.warnings():
        err.print(f"[bold yellow]relay: warning:[/] {w}", highlight=False)
    _setup_logging(log_level)
    from twisted.internet import reactor as _reactor
    from twisted.internet.error import CannotListenError

    from relay.dev import write_ready_file
    from relay.errors import RelayError
    from relay.server import RelayServer

    reactor: Any = _reactor
    _stop_on_sigint(reactor)
    try:
        server = RelayServer(config, reactor)
        started = server.start()
    except CannotListenError as e:
        err.print(f"[bold red]relay: cannot start:[/] {_listen_problem(config, e)}")
        sys.exit(EXIT_FAILED)
    except (RelayError, OSError) as e:
        err.print(f"[bold red]relay: cannot start:[/] {e}")
        sys.exit(EXIT_FAILED)
    reactor.addSystemEventTrigger("before", "shutdown", server.stop)
    exit_code = [EXIT_OK]

    def serving(_: object) -> None:
        if ready_file:
            write_ready_file(
                ready_file,
                {
                    "id": config.node.id,
                    "ws": server.ws_url,
                    "admin": server.admin_url,
                    "pid": os.getpid(),
                },
            )
        err.print(
            f"relay: node {config.node.id} serving {server.ws_url} (admin {server.admin_url})"
        )

    def failed(failure: Any) -> None:
        if failure.check(CannotListenError):  # the mesh port, opened as the node joins
            err.print(f"[bold red]relay: cannot start:[/] {_listen_problem(config, failure.value)}")
            exit_code[0] = EXIT_FAILED
        else:
            why = failure.getErrorMessage()
            err.print(f"[bold red]relay: cannot join the region:[/] {why}")
            exit_code[0] = EXIT_UNAVAILABLE
        reactor.stop()

    started.addCallbacks(serving, failed)
    from relay.gctune import tune

    tune()
    reactor.run()
    sys.exit(exit_code[0])


# -- config -----------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Check or create node configuration files."""


@config.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def config_validate(file: str, as_json: bool) -> None:
    """Check FILE (with RELAY_* overrides applied); list every problem, and warnings
    (a node no client can authenticate to, for one).

    Exit 0 when the config is good (warnings or not), 78 when it has problems.
    """
    from relay.config import ConfigError, load_config

    try:
        config = load_config(file, os.environ)
    except ConfigError as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "problems": e.problems}))
        else:
            say(f"{file}: {problems(len(e.problems))}")
            for p in e.problems:
                say(f"  - {p}")
        sys.exit(EXIT_CONFIG)
    _warn_if_exposed(file)
    warnings = config.warnings()
    if as_json:
        click.echo(json.dumps({"ok": True, "problems": [], "warnings": warnings}))
        return
    say(
        f"{file}: ok"
        + (f", {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else "")
    )
    for w in warnings:
        out().print(f"  - [bold yellow]warning:[/] {w}", highlight=False)


@config.command("init")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
def config_init(file: str | None) -> None:
    """Write an annotated config to FILE (or stdout): every key at its default, plus a
    fresh random auth.hs256_secret, so `relay token --config FILE` can sign tokens that
    a node started with it accepts. FILE is created with mode 0600 (it holds a secret).

    Exit 0; 1 when FILE exists (it is never overwritten).
    """
    import secrets

    from relay.config import dump_default_toml

    text = dump_default_toml(hs256_secret=secrets.token_urlsafe(48))
    if file is None:
        click.echo(text, nl=False)
        return
    p = Path(file)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        err.print(f"relay config init: {file} exists; not overwriting it", markup=False)
        sys.exit(EXIT_FAILED)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    say(
        f"wrote {file} (mode 0600: it holds auth.hs256_secret); "
        f"tokens: relay token --config {file} --sub NAME --can-sub inbox:NAME "
        "--can-pub 'inbox:*'"
    )


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration_s(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` as seconds."""
    t = text.strip().lower()
    unit = _DURATION_UNITS.get(t[-1:], 0)
    num = t[:-1] if unit else t
    try:
        value = int(num) * (unit or 1)
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give seconds or N[smhd], e.g. 1h", param_hint="--ttl"
        ) from None
    if value <= 0:
        raise click.BadParameter(f"{text!r}: must be above 0", param_hint="--ttl")
    return value


@cli.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The node config whose auth.hs256_secret signs the token (RELAY_* overrides apply).",
)
@click.option("--sub", "subject", required=True, help="Who the token is for (the sender name).")
@click.option(
    "--can-pub",
    multiple=True,
    metavar="PATTERN",
    help="Channels it may publish to ('inbox:*'); repeat.",
)
@click.option(
    "--can-sub", multiple=True, metavar="PATTERN", help="Channels it may subscribe to; repeat."
)
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: seconds or N[smhd].")
def token(
    config_path: str, subject: str, can_pub: tuple[str, ...], can_sub: tuple[str, ...], ttl: str
) -> None:
    """Print on stdout an HS256 token signed with the config's auth.hs256_secret.

    \b
      relay config init node.toml
      relay token --config node.toml --sub alice --can-pub 'inbox:*' --can-sub inbox:alice

    Exit 0; 2 for a bad option; 78 when the config is bad or has no hs256_secret.
    """
    import time

    import jwt

    ttl_s = _duration_s(ttl)
    config = _load_config_or_exit(config_path)
    secret = config.auth.hs256_secret
    if not secret:
        err.print(f"relay token: {config_path} has no auth.hs256_secret to sign with", markup=False)
        sys.exit(EXIT_CONFIG)
    for pattern in (*can_pub, *can_sub):
        if "*" in pattern[:-1]:
            raise click.BadParameter(
                f"{pattern!r}: a channel pattern is a channel name, or a prefix ending in "
                "one `*` (channel names hold no `*`)",
                param_hint="--can-pub/--can-sub",
            )
    if not can_pub and not can_sub:
        err.print(
            "relay token: warning: no --can-pub or --can-sub: this token grants nothing "
            "(every pub and sub is refused forbidden)",
            markup=False,
            highlight=False,
        )
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + ttl_s}
    if can_pub:
        claims["can_pub"] = list(can_pub)
    if can_sub:
        claims["can_sub"] = list(can_sub)
    click.echo(jwt.encode(claims, secret, algorithm="HS256"))


# -- the other commands ---------------------------------------------------------------


def _add_commands() -> None:
    from relay.cli_context import context_group
    from relay.cli_dev import dev
    from relay.cli_ops import links, node, ring, status

    for command in (dev, context_group, status, links, ring, node):
        cli.add_command(command)


_add_commands()


# -- bench ------------------------------------------------------------------------


@cli.group()
def bench() -> None:
    """Benchmarks that print figures (see docs/BENCHMARKS.md)."""


def _add_bench_commands() -> None:
    # The benchmarks live in the source tree's bench/ package.
    try:
        from bench.commands import register  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return
    register(bench)


_add_bench_commands()
