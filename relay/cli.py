"""The ``relay`` command.

Exit codes (docs/OPERATIONS.md): 0 ok, 1 failed, 2 usage (an unknown region or node
among them), 69 a node or Redis unreachable, 75 another change in progress, 78 bad
configuration. Every command prints its result on stdout (a table or text for people, or
with ``--json`` one JSON document); progress, warnings and logs go to stderr. The ops
commands find the cluster through a CLI context (:mod:`relay.context`) unless given
``--redis``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from relay import __version__

_F = TypeVar("_F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78

err = Console(stderr=True, soft_wrap=True)


def _out() -> Console:
    """The console for a command's result on stdout. Not a terminal (a file, a pipe):
    no width to fit, so tables keep every column whole."""
    if sys.stdout.isatty():
        return Console(soft_wrap=True)
    return Console(width=10_000, soft_wrap=True)


def _say(text: str) -> None:
    """One line of a human-readable result on stdout (no markup)."""
    click.echo(text)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    observer: Any = STDLibLogObserver()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _problems(n: int) -> str:
    return f"{n} problem{'' if n == 1 else 's'}"


def _load_config_or_exit(path: str | None) -> Any:
    from relay.config import ConfigError, load_config

    try:
        return load_config(path, os.environ)
    except ConfigError as e:
        err.print(f"[bold red]relay: bad configuration[/] ({_problems(len(e.problems))}):")
        for p in e.problems:
            err.print(f"  - {p}", markup=False, highlight=False)
        sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relay")
def cli() -> None:
    """relay: a multi-region, replicated, in-memory relay for real-time chat.

    \b
    Start here:
      relay dev                      a local cluster with anonymous access
      relay serve --config node.toml one node in production
      relay config validate FILE     check a config file (exit 78 when bad)
    """


# -- serve ------------------------------------------------------------------------


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

    from relay.dev import write_ready_file
    from relay.errors import RelayError
    from relay.server import RelayServer

    try:
        reactor: Any = _reactor
        server = RelayServer(config, reactor)
        started = server.start()
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
        err.print(f"[bold red]relay: cannot join the region:[/] {failure.getErrorMessage()}")
        exit_code[0] = EXIT_UNAVAILABLE
        reactor.stop()

    started.addCallbacks(serving, failed)
    reactor.run()
    sys.exit(exit_code[0])


# -- dev --------------------------------------------------------------------------

# The first node of `relay dev` on the client port a node's config defaults to.
DEFAULT_DEV_PORT_BASE = 7400
# A bare `relay dev` shows the mission: regions a message follows its recipient across,
# one node each (light on a laptop), linked over a simulated WAN.
DEFAULT_DEV_REGIONS = ("sg", "fra", "iad")
DEFAULT_DEV_WAN_LATENCY_MS = 40.0


@cli.group(invoke_without_command=True)
@click.option(
    "--regions",
    default=",".join(DEFAULT_DEV_REGIONS),
    show_default=True,
    help="Comma-separated region names (one, e.g. --regions local, for a single region).",
)
@click.option(
    "--nodes",
    "nodes",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Nodes per region.",
)
@click.option(
    "--port-base",
    type=click.IntRange(0, 65000),
    default=None,
    help="Predictable ports: node i (across regions) listens on BASE+10*i (WebSocket), "
    "+1 (admin), +2 (mesh); region k's Redis on BASE+10*k+3 and its WAN proxy ports on "
    "BASE+10*k+4..8; the WAN control on BASE+9. 0: free ports. Default: "
    f"{DEFAULT_DEV_PORT_BASE} when those ports are free (the first node at "
    f"ws://127.0.0.1:{DEFAULT_DEV_PORT_BASE}/v1/ws), else free ports.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help='Once every node serves, write {"regions": {NAME: {"redis", "nodes": '
    '[{"id", "ws", "admin", "pid"}]}}} here (rewritten when a node restarts).',
)
@click.option(
    "--wan-latency-ms",
    type=click.FloatRange(0, 10_000),
    default=None,
    help="Put a fault proxy with this one-way latency between every pair of regions, so "
    "the links cross a WAN-like path (its control URL goes into the ready file). "
    f"Default with several regions: {DEFAULT_DEV_WAN_LATENCY_MS:g}.",
)
@click.option(
    "--wan-jitter-ms",
    type=click.FloatRange(0, 10_000),
    default=0.0,
    show_default=True,
    help="Jitter of that latency (uniform, ±).",
)
@click.option(
    "--context",
    "context_name",
    default="dev",
    show_default=True,
    help="The CLI context to write and make current while it runs (restored on exit).",
)
@click.pass_context
def dev(
    ctx: click.Context,
    regions: str,
    nodes: int,
    port_base: int | None,
    ready_file: str | None,
    wan_latency_ms: float | None,
    wan_jitter_ms: float,
    context_name: str,
) -> None:
    """Run a local cluster until Ctrl-C: by default three regions (sg, fra, iad) of one
    node each, an embedded Redis per region, links across a simulated WAN (40 ms each
    way), anonymous access.

    Prints every node's WebSocket and admin URL, and each region's dashboard and chat
    demo page (open them in a browser: a message follows its recipient across regions).
    Or try it with any WebSocket client: send {"op":"sub","ch":"inbox:alice"} on one
    connection and {"op":"pub","id":"1","ch":"inbox:alice","body":"hi"} on another.

    \b
    While it runs, the ops commands need no flags (it writes the CLI context "dev"
    and makes it current):
      relay status                   the first region's nodes and slots
      relay links                    its links to the other regions
      relay node add sg/n2           start a new node and move slots to it
      relay node drain sg/n2         the node leaves; the others keep serving
      relay dev restart sg/n2        start it again (or after a kill -9)
    A node that exits is reported; the cluster keeps running.
    """
    if ctx.invoked_subcommand is not None:
        return
    from cluster.keys import check_region
    from relay import context
    from relay.dev import DevCluster, page_urls, write_ready_file
    from relay.errors import RelayError

    names = [r.strip() for r in regions.split(",") if r.strip()]
    if len(set(names)) != len(names) or not names:
        raise click.BadParameter("give distinct, non-empty region names", param_hint="--regions")
    for name in names:
        try:
            check_region(name)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--regions") from None
    try:
        context.check_name(context_name)
    except context.ContextError as e:
        raise click.BadParameter(str(e), param_hint="--context") from None
    if wan_latency_ms is None and len(names) > 1:
        wan_latency_ms = DEFAULT_DEV_WAN_LATENCY_MS
    if 0 < (port_base or 0) < 1024:
        raise click.BadParameter("give 0 (free ports) or 1024..65000", param_hint="--port-base")
    cluster = DevCluster(
        names,
        nodes_per_region=nodes,
        port_base=port_base or None,
        wan_latency_ms=wan_latency_ms,
        wan_jitter_ms=wan_jitter_ms,
    )
    if port_base is None:
        cluster.port_base = DEFAULT_DEV_PORT_BASE
        try:
            cluster.check_ports()
        except RelayError as e:
            err.print(f"relay dev: {e}; using free ports instead", markup=False, highlight=False)
            cluster.port_base = None
    previous = context.current_name(os.environ)

    def publish(doc: dict[str, Any]) -> None:
        """The CLI context and the ready file follow the cluster (the ready file last:
        who sees it may use the context at once)."""
        context.save(
            context.Context(
                context_name,
                {r: d["redis"] for r, d in doc["regions"].items()},
                dev_control=str(cluster.control_path),
            ),
            os.environ,
            make_current=True,
        )
        if ready_file:
            write_ready_file(ready_file, doc)

    try:
        doc = cluster.start()
    except RelayError as e:
        err.print(f"relay dev: cannot start: {e}", markup=False, highlight=False)
        sys.exit(EXIT_FAILED)
    cluster.on_change = publish
    try:
        publish(doc)
        for region, r in doc["regions"].items():
            _say(f"region {region}  redis {r['redis']}")
            for n in r["nodes"]:
                _say(f"  node {n['id']}  ws {n['ws']}  admin {n['admin']}  pid {n['pid']}")
            pages = page_urls(doc).get(region, {})
            for page in ("dashboard", "demo"):
                if page in pages:
                    _say(f"  {page} {pages[page]}")
        _say(
            f"relay dev: serving; the CLI context {context_name!r} points at it "
            "(try `relay status`); Ctrl-C stops everything."
        )
        sys.stdout.flush()
        code = cluster.supervise()
    finally:
        cluster.stop()
        try:
            context.remove(context_name, os.environ)
            if previous and previous != context_name:
                context.use(previous, os.environ)
        except (OSError, context.ContextError):
            pass
    sys.exit(code)


def _dev_control(context_name: str | None) -> str:
    """The control socket of the running ``relay dev`` of the chosen context."""
    from relay import context

    name = context.selected_name(context_name, os.environ)
    if not name:
        err.print("relay dev: no CLI context; is `relay dev` running?")
        sys.exit(EXIT_UNAVAILABLE)
    try:
        c = context.load(name, os.environ)
    except context.ContextError as e:
        err.print(f"relay dev: {e}; is `relay dev` running?", markup=False, highlight=False)
        sys.exit(EXIT_UNAVAILABLE)
    if not c.dev_control:
        err.print(f"relay dev: context {name!r} is not a `relay dev` cluster")
        sys.exit(EXIT_USAGE)
    return c.dev_control


def _dev_request(context_name: str | None, doc: dict[str, Any], command: str) -> dict[str, Any]:
    """Send ``doc`` to the running ``relay dev``; exit 69 when none answers, 1 when it
    refuses."""
    from relay.devctl import ControlUnreachable, request

    try:
        answer = request(_dev_control(context_name), doc)
    except ControlUnreachable as e:
        err.print(f"relay dev {command}: {e}", markup=False, highlight=False)
        sys.exit(EXIT_UNAVAILABLE)
    if not answer.get("ok"):
        err.print(f"relay dev {command}: {answer.get('error')}", markup=False, highlight=False)
        sys.exit(EXIT_FAILED)
    return answer


_context_option = click.option(
    "--context",
    "context_name",
    default=None,
    help="The CLI context to use (default: $RELAY_CONTEXT, else the current one).",
)


@dev.command("restart")
@click.argument("node_id")
@_context_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def dev_restart(node_id: str, context_name: str | None, as_json: bool) -> None:
    """Start NODE_ID of the running `relay dev` again (after a drain, a kill or a crash;
    a running node is stopped first), with its data directory and ports.

    Exit 0 once it serves; 1 when it cannot start or there is no such node; 69 when no
    `relay dev` answers.
    """
    answer = _dev_request(context_name, {"cmd": "restart", "node": node_id}, "restart")
    n = answer["node"]
    if as_json:
        click.echo(json.dumps(n))
    else:
        _say(f"{n['id']} serving at {n['ws']} (admin {n['admin']}, pid {n['pid']})")


@dev.command("start")
@click.argument("node_id")
@click.option(
    "--weight",
    default=None,
    type=click.FloatRange(0, 64),
    help="Its cluster.weight (0: join with no slot, for `relay node add`). Default 1.",
)
@_context_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def dev_start(node_id: str, weight: float | None, context_name: str | None, as_json: bool) -> None:
    """Start a new node NODE_ID ("region/name") in the running `relay dev`.

    Exit 0 once it serves; 1 when it cannot start (a bad name, an unknown region, a node
    that exists); 69 when no `relay dev` answers.
    """
    answer = _dev_request(
        context_name, {"cmd": "start", "node": node_id, "weight": weight}, "start"
    )
    n = answer["node"]
    if as_json:
        click.echo(json.dumps(n))
    else:
        _say(f"{n['id']} serving at {n['ws']} (admin {n['admin']}, pid {n['pid']})")


@dev.command("nodes")
@_context_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def dev_nodes(context_name: str | None, as_json: bool) -> None:
    """Every node the running `relay dev` started: serving, or exited with its code.
    Exit 0; 69 when no `relay dev` answers."""
    rows = _dev_request(context_name, {"cmd": "nodes"}, "nodes")["nodes"]
    if as_json:
        click.echo(json.dumps({"nodes": rows}))
        return
    from rich.table import Table

    table = Table(title="relay dev nodes")
    for col in ("node", "state", "pid", "ws", "admin"):
        table.add_column(col)
    for r in rows:
        state = r["state"] + (f" ({r['exit_code']})" if "exit_code" in r else "")
        table.add_row(r["id"], state, str(r["pid"]), r.get("ws", ""), r.get("admin", ""))
    _out().print(table)


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
            _say(f"{file}: {_problems(len(e.problems))}")
            for p in e.problems:
                _say(f"  - {p}")
        sys.exit(EXIT_CONFIG)
    warnings = config.warnings()
    if as_json:
        click.echo(json.dumps({"ok": True, "problems": [], "warnings": warnings}))
        return
    _say(
        f"{file}: ok"
        + (f", {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else "")
    )
    for w in warnings:
        _out().print(f"  - [bold yellow]warning:[/] {w}", highlight=False)


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
    _say(
        f"wrote {file} (mode 0600: it holds auth.hs256_secret); "
        f"tokens: relay token --config {file} --sub NAME"
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
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + ttl_s}
    if can_pub:
        claims["can_pub"] = list(can_pub)
    if can_sub:
        claims["can_sub"] = list(can_sub)
    click.echo(jwt.encode(claims, secret, algorithm="HS256"))


# -- status, node -----------------------------------------------------------------


def _redis_option(f: _F) -> _F:
    """``--redis`` and ``--context``: where the region's Redis is (see :func:`_target`)."""
    f = _context_option(f)
    opt: _F = click.option(
        "--redis",
        "redis_url",
        default=None,
        envvar="RELAY_CLUSTER__REDIS_URL",
        help="The region's Redis URL (default: RELAY_CLUSTER__REDIS_URL, else the "
        "region's in the CLI context).",
    )(f)
    return opt


def _region_option(what: str) -> Callable[[_F], _F]:
    return click.option(
        "--region",
        default=None,
        help=f"{what} Default: the first region of the CLI context.",
    )


def _target(
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
    if redis_url and region:
        return redis_url, region, ""
    name = context.selected_name(context_name, os.environ)
    c: context.Context | None = None
    if name:
        try:
            c = context.load(name, os.environ)
        except context.ContextError as e:
            err.print(f"relay {command}: {e}", markup=False, highlight=False)
            sys.exit(EXIT_USAGE)
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


def _unknown_region_exit(command: str, e: Exception) -> None:
    err.print(f"relay {command}: {e}", markup=False, highlight=False)
    sys.exit(EXIT_USAGE)


_slots_option = click.option(
    "--slots",
    default=256,
    show_default=True,
    type=click.IntRange(1, 65536),
    help="Slots of the region.",
)


@cli.command()
@_redis_option
@_region_option("The region to show.")
@_slots_option
@click.option(
    "--admin-token",
    envvar="RELAY_ADMIN__TOKEN",
    default="",
    help="Admin token of the nodes, to read what each holds at risk.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def status(
    redis_url: str | None,
    context_name: str | None,
    region: str | None,
    slots: int,
    admin_token: str,
    as_json: bool,
) -> None:
    """Members of a region, their weights and slots, the ring epoch and version, and any
    planned change under way, read from its Redis.

    Exit 0; 2 for an unknown region; 69 when the Redis cannot be reached.
    """
    from cluster.status import UnknownRegion, Unreachable, region_status

    url, region, token = _target("status", context_name, redis_url, region)
    try:
        doc = region_status(url, region, slots, admin_token or token)
    except Unreachable as e:
        err.print(f"relay status: {e}", markup=False, highlight=False)
        sys.exit(EXIT_UNAVAILABLE)
    except UnknownRegion as e:
        _unknown_region_exit("status", e)
    if as_json:
        click.echo(json.dumps(doc))
        return
    from rich.table import Table

    table = Table(
        title=f"region {region} (ring epoch {doc['ring_epoch']}, "
        f"ring version {doc['ring_version']})"
    )
    for col in ("node", "epoch", "slots", "weight", "at risk", "ws", "admin"):
        table.add_column(col)
    for m in doc["members"]:
        risk = m.get("data_at_risk")
        at_risk = (
            "?"
            if risk is None
            else f"{risk['unlogged_events']} unlogged, {risk['unsaved_slots']} unsaved slots"
        )
        table.add_row(
            m["id"],
            str(m["epoch"]),
            str(m["slots"]),
            str(m["weight"]),
            at_risk,
            m["ws"],
            m["admin"],
        )
    out = _out()
    out.print(table)
    if doc["held_slots"]:
        out.print(
            f"[yellow]a planned change is under way or was interrupted: {doc['held_slots']} "
            "slots wait to move (`relay ring apply --resume` finishes it)[/]"
        )
    if doc["unowned_slots"] or doc["slots_by_stale_owner"]:
        out.print(
            f"[yellow]{doc['unowned_slots']} slots unowned, "
            f"{doc['slots_by_stale_owner']} held by nodes without a lease[/]"
        )


@cli.command()
@_redis_option
@_region_option("The region whose outgoing links to show.")
@click.option(
    "--admin-token",
    envvar="RELAY_ADMIN__TOKEN",
    default="",
    help="Admin token of the nodes (default from RELAY_ADMIN__TOKEN).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def links(
    redis_url: str | None,
    context_name: str | None,
    region: str | None,
    admin_token: str,
    as_json: bool,
) -> None:
    """Every link out of a region: holder, state, lag, backlog, gaps.

    Exit 0; 2 for an unknown region; 69 when the region's Redis cannot be reached.
    """
    from cluster.status import UnknownRegion, Unreachable, links_status

    url, region, token = _target("links", context_name, redis_url, region)
    try:
        rows = links_status(url, region, admin_token or token)
    except Unreachable as e:
        err.print(f"relay links: {e}", markup=False, highlight=False)
        sys.exit(EXIT_UNAVAILABLE)
    except UnknownRegion as e:
        _unknown_region_exit("links", e)
    if as_json:
        click.echo(json.dumps({"region": region, "links": rows}))
        return
    from rich.table import Table

    table = Table(title=f"links from {region}")
    for col in ("to", "holder", "state", "lag s", "backlog", "copied", "gaps"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["to"],
            str(r["holder"]),
            r["state"],
            str(r.get("lag_s", "")),
            str(r.get("backlog_entries", "")),
            str(r.get("copied_entries", "")),
            str(r.get("gaps_total", "")),
        )
    _out().print(table)


@cli.group()
def ring() -> None:
    """See and plan the region's consistent-hash ring (docs/OPERATIONS.md)."""


@ring.command("show")
@_redis_option
@_region_option("The region to show.")
@_slots_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def ring_show(
    ctx: click.Context,
    redis_url: str | None,
    context_name: str | None,
    region: str | None,
    slots: int,
    as_json: bool,
) -> None:
    """Members, weights, slots per node, the ring epoch and version, and any planned
    change under way (same as `relay status`). Exit 0; 2 for an unknown region; 69 when
    Redis is unreachable."""
    ctx.invoke(
        status,
        redis_url=redis_url,
        context_name=context_name,
        region=region,
        slots=slots,
        admin_token="",
        as_json=as_json,
    )


def _shape_options(f: Any) -> Any:
    f = click.option(
        "--replicas",
        default=None,
        type=click.IntRange(1, 8),
        help="Copies of each slot, owner included. Default: what the region's nodes "
        "recorded (2 if none did).",
    )(f)
    f = click.option(
        "--slots",
        default=None,
        type=click.IntRange(1, 65536),
        help="Slots of the region. Default: what its nodes recorded (256 if none did).",
    )(f)
    return f


def _weights(values: tuple[str, ...], option: str, default: float | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for v in values:
        node_id, sep, w = v.partition("=")
        if not sep and default is None:
            raise click.BadParameter(f"{v!r}: give NODE=WEIGHT", param_hint=option)
        try:
            weight = float(w) if sep else float(default or 1.0)
        except ValueError:
            raise click.BadParameter(
                f"{v!r}: the weight must be a number", param_hint=option
            ) from None
        if weight <= 0:
            raise click.BadParameter(f"{v!r}: the weight must be > 0", param_hint=option)
        out[node_id] = weight
    return out


def _rebalance_exit(command: str, e: Exception) -> None:
    """Print why a ring change cannot go on, and exit with its code."""
    from cluster.errors import ChangeInProgress, NodeDown, PlanError
    from cluster.status import UnknownRegion, Unreachable

    err.print(f"relay {command}: {e}", markup=False, highlight=False)
    if isinstance(e, Unreachable | NodeDown):
        sys.exit(EXIT_UNAVAILABLE)
    if isinstance(e, ChangeInProgress):
        sys.exit(EXIT_TEMPFAIL)
    if isinstance(e, PlanError | UnknownRegion):
        sys.exit(EXIT_USAGE)
    sys.exit(EXIT_FAILED)


def _apply_options(f: Any) -> Any:
    f = click.option(
        "--move-timeout",
        "move_timeout_s",
        default=60.0,
        show_default=True,
        type=click.FloatRange(min=0.1),
        help="Seconds one slot may take to reach its new owner before the apply stops "
        "(what is left stays held; --resume goes on).",
    )(f)
    f = click.option(
        "--max-moving",
        default=4,
        show_default=True,
        type=click.IntRange(1, 65536),
        help="How many slots may be moving at once.",
    )(f)
    return f


def _carry_out(
    redis_url: str,
    plan: Any,
    *,
    region: str,
    max_moving: int,
    move_timeout_s: float,
    slots: int | None,
    replicas: int | None,
    command: str,
) -> Any:
    """Apply ``plan`` (None: resume) with a progress bar on stderr; exit on failure."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cluster.errors import RebalanceError
    from cluster.status import Unreachable, apply_change

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        console=Console(stderr=True),
        transient=False,
    )
    task = bar.add_task(f"{region}: moving slots", total=None, last="")

    def on_progress(p: Any) -> None:
        last = f"slot {p.move.slot}: {p.move.from_node} → {p.move.to_node}" if p.move else ""
        bar.update(task, total=p.total, completed=p.done, last=last)

    try:
        with bar:
            return apply_change(
                redis_url,
                plan,
                region=region,
                max_moving=max_moving,
                move_timeout_s=move_timeout_s,
                on_progress=on_progress,
                slots=slots or 256,
                replicas=replicas or 2,
            )
    except (RebalanceError, Unreachable) as e:
        _rebalance_exit(command, e)
        raise  # unreachable: _rebalance_exit exits


def _applied_doc(region: str, result: Any) -> dict[str, Any]:
    return {
        "region": region,
        "resumed": result.resumed,
        "moved": [{"slot": m.slot, "from": m.from_node, "to": m.to_node} for m in result.moved],
        "moved_slots": len(result.moved),
        "seconds": round(result.seconds, 3),
    }


@ring.command("plan")
@_redis_option
@_region_option("The region to plan for.")
@click.option(
    "--add",
    "adds",
    multiple=True,
    metavar="NODE[=W]",
    help="A node to put on the ring, with its weight (default 1). To apply, it must be "
    "running (start it with cluster.weight = 0 to join without slots).",
)
@click.option(
    "--remove",
    "removes",
    multiple=True,
    metavar="NODE",
    help="A node to take off the ring (weight 0: it keeps running, with no slot).",
)
@click.option(
    "--weight", "reweights", multiple=True, metavar="NODE=W", help="A member's new weight."
)
@_shape_options
@click.option(
    "--admin-token",
    envvar="RELAY_ADMIN__TOKEN",
    default="",
    help="Admin token of the nodes, to read what each slot holds.",
)
@click.option("--apply", "apply_now", is_flag=True, help="Carry the plan out at once.")
@_apply_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def ring_plan_cmd(
    redis_url: str | None,
    context_name: str | None,
    region: str | None,
    adds: tuple[str, ...],
    removes: tuple[str, ...],
    reweights: tuple[str, ...],
    slots: int | None,
    replicas: int | None,
    admin_token: str,
    apply_now: bool,
    max_moving: int,
    move_timeout_s: float,
    as_json: bool,
) -> None:
    """The exact slot moves a change would make, the pending messages and bytes each
    would carry, and the balance before and after. Changes nothing, unless --apply.

    Save the plan with --json and carry it out with `relay ring apply PLAN`; that
    refuses if the ring moved meanwhile.

    Exit 0; 2 for a bad change (unknown node or region, a region left empty); 69 when
    the region's Redis cannot be reached (or, with --apply, a node to add is not
    running); 75 while another change is under way; 1 when --apply fails.
    """
    from cluster.errors import RebalanceError
    from cluster.status import UnknownRegion, Unreachable, ring_plan

    if not (adds or removes or reweights):
        raise click.UsageError("give at least one of --add, --remove, --weight")
    redis_url, region, token = _target("ring plan", context_name, redis_url, region)
    admin_token = admin_token or token
    try:
        doc = ring_plan(
            redis_url,
            region,
            add=_weights(adds, "--add", 1.0),
            remove=list(removes),
            weights=_weights(reweights, "--weight", None),
            slots=slots,
            replicas=replicas,
            admin_token=admin_token,
            live_adds=apply_now,
        )
    except (RebalanceError, Unreachable, UnknownRegion) as e:
        _rebalance_exit("ring plan", e)
    b, a = doc["before"], doc["after"]
    # The plan is the result: on stdout, unless --json puts the document there.
    out = Console(stderr=True, soft_wrap=True) if as_json else _out()
    out.print(
        f"{doc['moving_slots']} slots move, carrying {doc['moving_messages']} pending "
        f"messages ({doc['moving_bytes']} bytes of bodies)",
        highlight=False,
    )
    out.print(
        f"balance (largest owner / its share): before {b['max_over_share']}, "
        f"after {a['max_over_share']}",
        highlight=False,
    )
    from rich.table import Table

    table = Table(title="slots per node")
    table.add_column("node")
    table.add_column("before")
    table.add_column("after")
    for n in sorted(set(b["slots_per_node"]) | set(a["slots_per_node"])):
        table.add_row(n, str(b["slots_per_node"].get(n, 0)), str(a["slots_per_node"].get(n, 0)))
    out.print(table)
    if apply_now:
        from cluster.rebalance import Plan

        result = _carry_out(
            redis_url,
            Plan.from_doc(doc["plan"]),
            region=region,
            max_moving=max_moving,
            move_timeout_s=move_timeout_s,
            slots=slots,
            replicas=replicas,
            command="ring plan --apply",
        )
        doc["applied"] = _applied_doc(region, result)
        out.print(f"{len(result.moved)} slots moved in {result.seconds:.1f} s", highlight=False)
    if as_json:
        click.echo(json.dumps(doc))


@ring.command("apply")
@click.argument("plan_file", type=click.File("r"), required=False, metavar="[PLAN]")
@_redis_option
@click.option("--resume", is_flag=True, help="Finish the change left interrupted.")
@click.option(
    "--region",
    default="",
    help="The region (with --resume; a plan names its own). Default: the first region "
    "of the CLI context.",
)
@_shape_options
@_apply_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def ring_apply(
    plan_file: Any,
    redis_url: str | None,
    context_name: str | None,
    resume: bool,
    region: str,
    slots: int | None,
    replicas: int | None,
    max_moving: int,
    move_timeout_s: float,
    as_json: bool,
) -> None:
    """Carry out PLAN (the output of `relay ring plan --json`; - for stdin) slot by slot.

    Each moving slot is handed over: its old owner stops serving it, appends what it
    batched, writes a checkpoint and releases it; the new owner claims it under a new
    epoch and reads the checkpoint and the log before it serves. Clients publishing to
    a moving slot get `unavailable` for a moment and retry; nothing is lost or doubled.
    A progress bar goes to stderr. One change runs at a time (a lock in Redis).

    Interrupted (killed, --move-timeout), the change stays in Redis: the cluster keeps
    serving (slots not yet moved stay with their old owners) and `relay ring apply
    --resume --region R` finishes it.

    Exit 0 when every slot moved; 1 when the plan is stale (plan again) or a slot did
    not move in time; 2 for a bad plan; 69 when Redis or a node to add is unreachable;
    75 when another change is running or an interrupted one must be resumed first.
    """
    from cluster.errors import PlanError
    from cluster.rebalance import Plan

    if resume == (plan_file is not None):
        raise click.UsageError("give a PLAN file, or --resume (with --region)")
    plan: Plan | None = None
    if plan_file is not None:
        try:
            doc = json.loads(plan_file.read())
            plan = Plan.from_doc(doc.get("plan", doc) if isinstance(doc, dict) else doc)
        except (ValueError, PlanError) as e:
            err.print(f"relay ring apply: {e}", markup=False, highlight=False)
            sys.exit(EXIT_USAGE)
        if region and region != plan.region:
            raise click.UsageError(f"the plan is for region {plan.region}, not {region}")
        region = plan.region
    redis_url, region, _ = _target("ring apply", context_name, redis_url, region or None)
    result = _carry_out(
        redis_url,
        plan,
        region=region,
        max_moving=max_moving,
        move_timeout_s=move_timeout_s,
        slots=slots,
        replicas=replicas,
        command="ring apply",
    )
    line = f"{region}: {len(result.moved)} slots moved in {result.seconds:.1f} s" + (
        " (resumed)" if result.resumed else ""
    )
    if as_json:
        err.print(line, markup=False, highlight=False)
        click.echo(json.dumps(_applied_doc(region, result)))
    else:
        _say(line)


@cli.group()
def node() -> None:
    """Act on one node of a region."""


@node.command("add")
@click.argument("node_id")
@_redis_option
@click.option(
    "--weight",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True, max=64),
    help="The weight to reach.",
)
@click.option(
    "--steps",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Ramp the weight up in this many equal steps, each applied in full before the "
    "next (a cold node takes load gradually).",
)
@_shape_options
@_apply_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def node_add(
    node_id: str,
    redis_url: str | None,
    context_name: str | None,
    weight: float,
    steps: int,
    slots: int | None,
    replicas: int | None,
    max_moving: int,
    move_timeout_s: float,
    as_json: bool,
) -> None:
    """Put a running NODE_ID on the ring, moving slots to it by handoff.

    Start the node first with `cluster.weight = 0` (it joins its region with no
    slot); this then raises its weight to --weight in --steps steps, each a planned
    change applied slot by slot (see `relay ring apply`). Against a running `relay dev`
    (its CLI context), a node it has not started is started first, with weight 0.

    Exit 0 when done; 1 when a step failed (resume with `relay ring apply --resume`);
    2 for a bad request (an unknown region among them); 69 when Redis cannot be reached
    or the node is not running; 75 when another change is under way.
    """
    from cluster.errors import RebalanceError
    from cluster.rebalance import Plan
    from cluster.status import UnknownRegion, Unreachable, ring_plan, ring_weights

    region = node_id.split("/", 1)[0]
    redis_url, region, _ = _target("node add", context_name, redis_url, region)
    _dev_start_if_new(context_name, node_id)
    done: list[dict[str, Any]] = []
    for i in range(1, steps + 1):
        w = round(weight * i / steps, 6)
        try:
            on_ring = ring_weights(redis_url, region)
            change: dict[str, Any] = (
                {"weights": {node_id: w}} if node_id in on_ring else {"add": {node_id: w}}
            )
            doc = ring_plan(
                redis_url,
                region,
                add=change.get("add", {}),
                remove=[],
                weights=change.get("weights", {}),
                slots=slots,
                replicas=replicas,
                live_adds=True,
            )
        except (RebalanceError, Unreachable, UnknownRegion) as e:
            _rebalance_exit("node add", e)
        err.print(f"step {i}/{steps}: {node_id} weight {w:g}, {doc['moving_slots']} slots move")
        result = _carry_out(
            redis_url,
            Plan.from_doc(doc["plan"]),
            region=region,
            max_moving=max_moving,
            move_timeout_s=move_timeout_s,
            slots=slots,
            replicas=replicas,
            command="node add",
        )
        done.append({"weight": w, **_applied_doc(region, result)})
    total = sum(d["moved_slots"] for d in done)
    line = f"{node_id} is on the ring at weight {weight:g}: {total} slots moved to it"
    if as_json:
        err.print(line, markup=False, highlight=False)
        click.echo(json.dumps({"node": node_id, "weight": weight, "steps": done}))
    else:
        _say(line)


def _dev_start_if_new(context_name: str | None, node_id: str) -> None:
    """When the CLI context is a running `relay dev` that has not started ``node_id``,
    have it start the node with weight 0 (to be added to the ring next)."""
    from relay import context
    from relay.devctl import ControlUnreachable, request

    name = context.selected_name(context_name, os.environ)
    try:
        c = context.load(name, os.environ) if name else None
    except context.ContextError:
        return
    if c is None or not c.dev_control:
        return
    try:
        known = {n["id"] for n in request(c.dev_control, {"cmd": "nodes"}).get("nodes", [])}
    except ControlUnreachable:
        return
    if node_id in known:
        return
    err.print(f"relay node add: starting {node_id} in relay dev (weight 0)", markup=False)
    _dev_request(context_name, {"cmd": "start", "node": node_id, "weight": 0}, "start")


@node.command("drain")
@click.argument("node_id")
@_redis_option
@_slots_option
@click.option(
    "--timeout",
    "timeout_s",
    default=30.0,
    show_default=True,
    help="Seconds to wait for the node's slots to move.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def node_drain(
    node_id: str,
    redis_url: str | None,
    context_name: str | None,
    slots: int,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Move NODE_ID's slots to their next owners, then let it leave the ring.

    The node flushes its batches to the slot logs, releases its lease and exits; the
    others take its slots over at once (in `relay dev`, `relay dev restart NODE_ID`
    starts it again). Exit 0 when done, 1 on timeout, 2 when the node is not a member,
    69 when the Redis cannot be reached.
    """
    from cluster.status import Unreachable, drain

    region = node_id.split("/", 1)[0]
    redis_url, region, _ = _target("node drain", context_name, redis_url, region)
    try:
        ok = drain(redis_url, region, node_id, slots, timeout_s)
    except Unreachable as e:
        err.print(f"relay node drain: {e}", markup=False, highlight=False)
        sys.exit(EXIT_UNAVAILABLE)
    except LookupError as e:
        err.print(f"relay node drain: {e}", markup=False, highlight=False)
        sys.exit(EXIT_USAGE)
    if as_json:
        click.echo(json.dumps({"node": node_id, "drained": ok}))
    else:
        _say(f"{node_id}: {'drained' if ok else 'still holds slots after the timeout'}")
    sys.exit(EXIT_OK if ok else EXIT_FAILED)


# -- context ----------------------------------------------------------------------


@cli.group("context")
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
        _say(f"{'*' if n == current else ' '} {n}")


@context_group.command("show")
@click.argument("name", required=False)
def context_show(name: str | None) -> None:
    """The context NAME (default: the one in use) as JSON. Exit 0; 2 when there is none."""
    from relay import context

    name = name or context.selected_name(None, os.environ)
    if not name:
        err.print("relay context show: no context in use")
        sys.exit(EXIT_USAGE)
    try:
        c = context.load(name, os.environ)
    except context.ContextError as e:
        err.print(f"relay context show: {e}", markup=False, highlight=False)
        sys.exit(EXIT_USAGE)
    click.echo(json.dumps({"name": c.name, **c.to_doc()}, indent=2))


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
        if not sep or not url.startswith(("redis://", "rediss://", "unix://")):
            raise click.BadParameter(
                f"{spec!r}: give NAME=redis://… (or rediss://, unix://)", param_hint="--region"
            )
        table[region] = url
    try:
        path = context.save(
            context.Context(name, table, admin_token), os.environ, make_current=make_current
        )
    except context.ContextError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None
    _say(f"wrote {path}" + (" (current)" if make_current else ""))


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
    _say(f"using context {name}")


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
    _say(f"removed context {name}")


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
