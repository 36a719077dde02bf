"""The ``relay`` command.

Exit codes (docs/OPERATIONS.md): 0 ok, 1 failed, 2 usage, 69 a node or Redis unreachable,
75 another change in progress, 78 bad configuration. Commands with ``--json`` print one
JSON document on stdout; human text and progress go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from relay import __version__

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78

err = Console(stderr=True, soft_wrap=True)


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
        err.print(f"[bold red]relay: bad configuration[/] ({len(e.problems)} problems):")
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


@cli.command()
@click.option("--regions", default="local", show_default=True, help="Comma-separated region names.")
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
    type=click.IntRange(1024, 65000),
    default=None,
    help="Predictable ports: node i listens on BASE+10*i (WebSocket), "
    "BASE+10*i+1 (admin) and BASE+10*i+2 (mesh). Default: free ports.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help='Once every node serves, write {"regions": {NAME: {"redis", "nodes": '
    '[{"id", "ws", "admin", "pid"}]}}} here.',
)
@click.option(
    "--wan-latency-ms",
    type=click.FloatRange(0, 10_000),
    default=None,
    help="Put a fault proxy with this one-way latency between every pair of regions, so "
    "the links cross a WAN-like path (its control URL goes into the ready file).",
)
@click.option(
    "--wan-jitter-ms",
    type=click.FloatRange(0, 10_000),
    default=0.0,
    show_default=True,
    help="Jitter of that latency (uniform, ±).",
)
def dev(
    regions: str,
    nodes: int,
    port_base: int | None,
    ready_file: str | None,
    wan_latency_ms: float | None,
    wan_jitter_ms: float,
) -> None:
    """Run a local cluster: embedded Redis, anonymous access, until Ctrl-C.

    Prints every node's WebSocket and admin URL, and each region's dashboard and chat
    demo page (open them in a browser). Or try it with any WebSocket client:
    send {"op":"sub","ch":"inbox:alice"} on one connection and
    {"op":"pub","id":"1","ch":"inbox:alice","body":"hi"} on another.
    """
    from relay.dev import DevCluster, page_urls, write_ready_file
    from relay.errors import RelayError

    names = [r.strip() for r in regions.split(",") if r.strip()]
    if len(nodes_set := set(names)) != len(names) or not names:
        raise click.BadParameter("give distinct, non-empty region names", param_hint="--regions")
    del nodes_set
    cluster = DevCluster(
        names,
        nodes_per_region=nodes,
        port_base=port_base,
        wan_latency_ms=wan_latency_ms,
        wan_jitter_ms=wan_jitter_ms,
    )
    try:
        doc = cluster.start()
    except RelayError as e:
        err.print(f"[bold red]relay dev: cannot start:[/] {e}")
        sys.exit(EXIT_FAILED)
    try:
        if ready_file:
            write_ready_file(ready_file, doc)
        for region, r in doc["regions"].items():
            err.print(f"[bold]region {region}[/]  redis {r['redis']}")
            for n in r["nodes"]:
                err.print(f"  node {n['id']}  ws {n['ws']}  admin {n['admin']}  pid {n['pid']}")
            pages = page_urls(doc).get(region, {})
            for page in ("dashboard", "demo"):
                if page in pages:
                    err.print(f"  {page} {pages[page]}", markup=False, highlight=False)
        err.print("relay dev: serving; Ctrl-C stops everything.")
        code = cluster.wait()
    finally:
        cluster.stop()
    sys.exit(code)


# -- config -----------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Check or create node configuration files."""


@config.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def config_validate(file: str, as_json: bool) -> None:
    """Check FILE (with RELAY_* overrides applied); list every problem.

    Exit 0 when the config is good, 78 when it has problems.
    """
    from relay.config import ConfigError, load_config

    try:
        load_config(file, os.environ)
        _warn_if_exposed(file)
    except ConfigError as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "problems": e.problems}))
        else:
            err.print(f"[bold red]{file}: {len(e.problems)} problems[/]")
            for p in e.problems:
                err.print(f"  - {p}", markup=False, highlight=False)
        sys.exit(EXIT_CONFIG)
    if as_json:
        click.echo(json.dumps({"ok": True, "problems": []}))
    else:
        err.print(f"{file}: ok")


@config.command("init")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
def config_init(file: str | None) -> None:
    """Write an annotated default config to FILE (or stdout)."""
    from relay.config import dump_default_toml

    text = dump_default_toml()
    if file is None:
        click.echo(text, nl=False)
        return
    p = Path(file)
    if p.exists():
        err.print(f"relay: {file} exists; not overwriting it")
        sys.exit(EXIT_FAILED)
    # Owner-only from the first byte: this is the file secrets get written into.
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    err.print(f"wrote {file} (mode 0600: keep it so once it holds secrets)")


# -- status, node -----------------------------------------------------------------

_redis_option = click.option(
    "--redis",
    "redis_url",
    required=True,
    envvar="RELAY_CLUSTER__REDIS_URL",
    help="The region's Redis URL (default from RELAY_CLUSTER__REDIS_URL).",
)
_slots_option = click.option(
    "--slots",
    default=256,
    show_default=True,
    type=click.IntRange(1, 65536),
    help="Slots of the region.",
)


@cli.command()
@_redis_option
@click.option("--region", required=True, help="The region to show.")
@_slots_option
@click.option(
    "--admin-token",
    envvar="RELAY_ADMIN__TOKEN",
    default="",
    help="Admin token of the nodes, to read what each holds at risk.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def status(redis_url: str, region: str, slots: int, admin_token: str, as_json: bool) -> None:
    """Members of a region, their weights and slots, the ring epoch and version, and any
    planned change under way, read from its Redis.

    Exit 0, or 69 when the Redis cannot be reached.
    """
    from cluster.status import Unreachable, region_status

    try:
        doc = region_status(redis_url, region, slots, admin_token)
    except Unreachable as e:
        err.print(f"relay status: {e}")
        sys.exit(EXIT_UNAVAILABLE)
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
    Console().print(table)
    if doc["held_slots"]:
        err.print(
            f"[yellow]a planned change is under way or was interrupted: {doc['held_slots']} "
            "slots wait to move (`relay ring apply --resume` finishes it)[/]"
        )
    if doc["unowned_slots"] or doc["slots_by_stale_owner"]:
        err.print(
            f"[yellow]{doc['unowned_slots']} slots unowned, "
            f"{doc['slots_by_stale_owner']} held by nodes without a lease[/]"
        )


@cli.command()
@_redis_option
@click.option("--region", required=True, help="The region whose outgoing links to show.")
@click.option(
    "--admin-token",
    envvar="RELAY_ADMIN__TOKEN",
    default="",
    help="Admin token of the nodes (default from RELAY_ADMIN__TOKEN).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def links(redis_url: str, region: str, admin_token: str, as_json: bool) -> None:
    """Every link out of a region: holder, state, lag, backlog, gaps.

    Exit 0; 69 when the region's Redis cannot be reached.
    """
    from cluster.status import Unreachable, links_status

    try:
        rows = links_status(redis_url, region, admin_token)
    except Unreachable as e:
        err.print(f"relay links: {e}")
        sys.exit(EXIT_UNAVAILABLE)
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
    Console().print(table)


@cli.group()
def ring() -> None:
    """See and plan the region's consistent-hash ring (docs/OPERATIONS.md)."""


@ring.command("show")
@_redis_option
@click.option("--region", required=True, help="The region to show.")
@_slots_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def ring_show(ctx: click.Context, redis_url: str, region: str, slots: int, as_json: bool) -> None:
    """Members, weights, slots per node, the ring epoch and version, and any planned
    change under way (same as `relay status`). Exit 0, or 69 when Redis is unreachable."""
    ctx.invoke(
        status, redis_url=redis_url, region=region, slots=slots, admin_token="", as_json=as_json
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
    from cluster.status import Unreachable

    err.print(f"relay {command}: {e}", markup=False, highlight=False)
    if isinstance(e, Unreachable | NodeDown):
        sys.exit(EXIT_UNAVAILABLE)
    if isinstance(e, ChangeInProgress):
        sys.exit(EXIT_TEMPFAIL)
    if isinstance(e, PlanError):
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
@click.option("--region", required=True, help="The region to plan for.")
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
    redis_url: str,
    region: str,
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

    Exit 0; 2 for a bad change (unknown node, a region left empty); 69 when the
    region's Redis cannot be reached (or, with --apply, a node to add is not running);
    75 while another change is under way; 1 when --apply fails.
    """
    from cluster.errors import RebalanceError
    from cluster.status import Unreachable, ring_plan

    if not (adds or removes or reweights):
        raise click.UsageError("give at least one of --add, --remove, --weight")
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
    except (RebalanceError, Unreachable) as e:
        _rebalance_exit("ring plan", e)
    b, a = doc["before"], doc["after"]
    err.print(
        f"{doc['moving_slots']} slots move, carrying {doc['moving_messages']} pending "
        f"messages ({doc['moving_bytes']} bytes of bodies)"
    )
    err.print(
        f"balance (largest owner / its share): before {b['max_over_share']}, "
        f"after {a['max_over_share']}"
    )
    from rich.table import Table

    table = Table(title="slots per node")
    table.add_column("node")
    table.add_column("before")
    table.add_column("after")
    for n in sorted(set(b["slots_per_node"]) | set(a["slots_per_node"])):
        table.add_row(n, str(b["slots_per_node"].get(n, 0)), str(a["slots_per_node"].get(n, 0)))
    Console(stderr=True).print(table)
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
        err.print(f"{len(result.moved)} slots moved in {result.seconds:.1f} s")
    if as_json:
        click.echo(json.dumps(doc))


@ring.command("apply")
@click.argument("plan_file", type=click.File("r"), required=False, metavar="[PLAN]")
@_redis_option
@click.option("--resume", is_flag=True, help="Finish the change left interrupted.")
@click.option("--region", default="", help="The region (with --resume; a plan names its own).")
@_shape_options
@_apply_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def ring_apply(
    plan_file: Any,
    redis_url: str,
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
    elif not region:
        raise click.UsageError("--resume needs --region")
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
    err.print(
        f"{region}: {len(result.moved)} slots moved in {result.seconds:.1f} s"
        + (" (resumed)" if result.resumed else "")
    )
    if as_json:
        click.echo(json.dumps(_applied_doc(region, result)))


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
    redis_url: str,
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
    change applied slot by slot (see `relay ring apply`).

    Exit 0 when done; 1 when a step failed (resume with `relay ring apply --resume`);
    2 for a bad request; 69 when Redis cannot be reached or the node is not running;
    75 when another change is under way.
    """
    from cluster.errors import RebalanceError
    from cluster.rebalance import Plan
    from cluster.status import Unreachable, ring_plan, ring_weights

    region = node_id.split("/", 1)[0]
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
        except (RebalanceError, Unreachable) as e:
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
    err.print(f"{node_id} is on the ring at weight {weight:g}: {total} slots moved to it")
    if as_json:
        click.echo(json.dumps({"node": node_id, "weight": weight, "steps": done}))


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
def node_drain(node_id: str, redis_url: str, slots: int, timeout_s: float, as_json: bool) -> None:
    """Move NODE_ID's slots to their next owners, then let it leave the ring.

    The node flushes its batches to the slot logs, releases its lease and exits; the
    others take its slots over at once. Exit 0 when done, 1 on timeout, 2 when the node
    is not a member, 69 when the Redis cannot be reached.
    """
    from cluster.status import Unreachable, drain

    region = node_id.split("/", 1)[0]
    try:
        ok = drain(redis_url, region, node_id, slots, timeout_s)
    except Unreachable as e:
        err.print(f"relay node drain: {e}")
        sys.exit(EXIT_UNAVAILABLE)
    except LookupError as e:
        err.print(f"relay node drain: {e}")
        sys.exit(EXIT_USAGE)
    if as_json:
        click.echo(json.dumps({"node": node_id, "drained": ok}))
    else:
        err.print(f"{node_id}: {'drained' if ok else 'still holds slots after the timeout'}")
    sys.exit(EXIT_OK if ok else EXIT_FAILED)


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
