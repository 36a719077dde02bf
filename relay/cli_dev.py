"""``relay dev …``: run a local cluster, and steer the running one (restart a node,
start one, list them) through its control socket (:mod:`relay.devctl`)."""

from __future__ import annotations

# Imports inside functions here are lazy on purpose (tests/unit/test_layers.py allows them
# only at the top layer): the CLI starts fast, and the reactor is installed before
# Twisted loads (relay/entry.py). None hides a cycle.
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from relay.cli_context import context_option, load_or_exit
from relay.cli_output import EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE, err, out, say

# The first node of `relay dev` on the client port a node's config defaults to.
DEFAULT_DEV_PORT_BASE = 7400
# A bare `relay dev` shows the mission: regions a message follows its recipient across,
# one node each (light on a laptop), linked over a simulated WAN.
DEFAULT_DEV_REGIONS = ("sg", "fra", "iad")
DEFAULT_DEV_WAN_LATENCY_MS = 40.0

F = TypeVar("F", bound=Callable[..., Any])


def redis_cluster_option(help: str) -> Callable[[F], F]:
    """``--redis-cluster N``: a local Redis Cluster of N primaries (0: none), as ``relay
    dev`` starts it (also ``relay bench region``)."""
    return click.option(
        "--redis-cluster",
        "redis_cluster",
        type=click.IntRange(0, 16),
        default=0,
        show_default=True,
        help=help,
    )


@click.group(invoke_without_command=True)
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
@redis_cluster_option(
    "N > 0: each region's Redis is a local Redis Cluster of N primaries with a "
    "replica each (free ports; the ready file's redis is its redis+cluster:// URL). "
    "Runs without the WAN proxy (--wan-latency-ms)."
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
    redis_cluster: int,
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
    if redis_cluster and wan_latency_ms is not None:
        raise click.BadParameter(
            "a WAN proxy cannot stand before a Redis Cluster", param_hint="--wan-latency-ms"
        )
    if wan_latency_ms is None and len(names) > 1 and not redis_cluster:
        wan_latency_ms = DEFAULT_DEV_WAN_LATENCY_MS
    if 0 < (port_base or 0) < 1024:
        raise click.BadParameter("give 0 (free ports) or 1024..65000", param_hint="--port-base")
    # Before the port check: a running relay dev holds those ports, and the check would
    # first announce free ports for a cluster that is then refused.
    _refuse_a_running_dev(context_name)
    cluster = DevCluster(
        names,
        nodes_per_region=nodes,
        port_base=port_base or None,
        wan_latency_ms=wan_latency_ms,
        wan_jitter_ms=wan_jitter_ms,
        redis_cluster=redis_cluster,
    )
    if port_base is None:
        cluster.port_base = DEFAULT_DEV_PORT_BASE
        try:
            cluster.check_ports()
        except RelayError as e:
            busy = str(e).split(": choose", 1)[0]
            err.print(
                f"relay dev: {busy}; using free ports instead (--port-base N to choose)",
                markup=False,
                highlight=False,
            )
            cluster.port_base = None
    previous = context.current_name(os.environ)
    if ready_file:
        Path(ready_file).unlink(missing_ok=True)  # a waiting script must not see an old one

    def publish(doc: dict[str, Any]) -> None:
        """The CLI context and the ready file follow the cluster (the ready file last:
        who sees it may use the context at once)."""
        try:
            context.save(
                context.Context(
                    context_name,
                    {r: d["redis"] for r, d in doc["regions"].items()},
                    dev_control=str(cluster.control_path),
                ),
                os.environ,
                make_current=True,
            )
        except OSError as e:
            err.print(
                f"relay dev: cannot write the CLI context ({e}); give the ops commands "
                "--redis and --region",
                markup=False,
                highlight=False,
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
            say(f"region {region}  redis {r['redis']}")
            for n in r["nodes"]:
                say(f"  node {n['id']}  ws {n['ws']}  admin {n['admin']}  pid {n['pid']}")
            pages = page_urls(doc).get(region, {})
            for page in ("dashboard", "demo"):
                if page in pages:
                    say(f"  {page} {pages[page]}")
        say(
            f"relay dev: serving; the CLI context {context_name!r} points at it "
            "(try `relay status`); Ctrl-C stops everything."
        )
        sys.stdout.flush()
        code = cluster.supervise()
    finally:
        cluster.stop()
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)  # its pids are gone
        try:
            context.remove(context_name, os.environ)
            if previous and previous != context_name:
                context.use(previous, os.environ)
        except (OSError, context.ContextError):
            pass
    sys.exit(code)


def _refuse_a_running_dev(context_name: str) -> None:
    """Exit 1 when the context ``context_name`` names a ``relay dev`` still listening:
    starting another would take its context over, and remove it on exit."""
    import socket

    from relay import context

    try:
        c = context.load(context_name, os.environ)
    except (OSError, context.ContextError):
        return
    if not c.dev_control:
        return
    # Whether something listens on its control socket (a busy relay dev, restarting a
    # node, may take long to answer a request: it is running all the same).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect(c.dev_control)
        except OSError:
            return  # no socket, or nobody listens: a context left behind, ours to replace
    err.print(
        f"relay dev: another relay dev is running with the CLI context {context_name!r} "
        "(stop it first, or give this one --context NAME)",
        markup=False,
        highlight=False,
    )
    sys.exit(EXIT_FAILED)


def _dev_control(context_name: str | None) -> str:
    """The control socket of the running ``relay dev`` of the chosen context."""
    from relay import context

    name = context.selected_name(context_name, os.environ)
    if not name:
        err.print("relay dev: no CLI context; is `relay dev` running?")
        sys.exit(EXIT_UNAVAILABLE)
    c = load_or_exit(name, "dev", EXIT_UNAVAILABLE, "; is `relay dev` running?")
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


def _say_node(n: dict[str, Any], as_json: bool) -> None:
    """A node the running ``relay dev`` (re)started: JSON, or one line."""
    if as_json:
        click.echo(json.dumps(n))
    else:
        say(f"{n['id']} serving at {n['ws']} (admin {n['admin']}, pid {n['pid']})")


@dev.command("restart")
@click.argument("node_id")
@context_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def dev_restart(node_id: str, context_name: str | None, as_json: bool) -> None:
    """Start NODE_ID of the running `relay dev` again (after a drain, a kill or a crash;
    a running node is stopped first), with its data directory and ports.

    Exit 0 once it serves; 1 when it cannot start or there is no such node; 69 when no
    `relay dev` answers.
    """
    answer = _dev_request(context_name, {"cmd": "restart", "node": node_id}, "restart")
    _say_node(answer["node"], as_json)


@dev.command("start")
@click.argument("node_id")
@click.option(
    "--weight",
    default=None,
    type=click.FloatRange(0, 64),
    help="Its cluster.weight (0: join with no slot, for `relay node add`). Default 1.",
)
@context_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def dev_start(node_id: str, weight: float | None, context_name: str | None, as_json: bool) -> None:
    """Start a new node NODE_ID ("region/name") in the running `relay dev`.

    Exit 0 once it serves; 1 when it cannot start (a bad name, an unknown region, a node
    that exists); 69 when no `relay dev` answers.
    """
    answer = _dev_request(
        context_name, {"cmd": "start", "node": node_id, "weight": weight}, "start"
    )
    _say_node(answer["node"], as_json)


@dev.command("nodes")
@context_option
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
    out().print(table)


def dev_start_if_new(context_name: str | None, node_id: str) -> None:
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
