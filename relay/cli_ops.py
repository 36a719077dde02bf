"""The ops commands of a region: ``relay status``, ``relay links``, ``relay ring
show|plan|apply``, ``relay node add|drain``. They read and steer the region through its
Redis, found with ``--redis``/``--region`` or the CLI context (:mod:`relay.cli_context`).
"""

from __future__ import annotations

# Imports inside functions here are lazy on purpose (tests/unit/test_layers.py allows them
# only at the top layer): the CLI starts fast, and the reactor is installed before
# Twisted loads (relay/entry.py). None hides a cycle.
import json
import sys
from typing import Any

import click
from rich.console import Console

from relay.cli_context import redis_option, region_option, target, unknown_region_exit
from relay.cli_dev import dev_start_if_new
from relay.cli_output import (
    EXIT_FAILED,
    EXIT_LINK_UNHEALTHY,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    err,
    out,
    say,
)

_slots_option = click.option(
    "--slots",
    default=256,
    show_default=True,
    type=click.IntRange(1, 65536),
    help="Slots of the region.",
)


@click.command()
@redis_option
@region_option("The region to show.")
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

    url, region, token = target("status", context_name, redis_url, region)
    try:
        doc = region_status(url, region, slots, admin_token or token)
    except Unreachable as e:
        err.print(f"relay status: {e}", markup=False, highlight=False)
        sys.exit(EXIT_UNAVAILABLE)
    except UnknownRegion as e:
        unknown_region_exit("status", e)
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
    result = out()
    result.print(table)
    if doc["held_slots"]:
        result.print(
            f"[yellow]a planned change is under way or was interrupted: {doc['held_slots']} "
            "slots wait to move (`relay ring apply --resume` finishes it)[/]"
        )
    if doc["unowned_slots"] or doc["slots_by_stale_owner"]:
        result.print(
            f"[yellow]{doc['unowned_slots']} slots unowned, "
            f"{doc['slots_by_stale_owner']} held by nodes without a lease[/]"
        )


@click.command()
@redis_option
@region_option("The region whose outgoing links to show.")
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

    Exit 0 when every link runs; 1 when one is stalled, failing, down (nobody holds it)
    or unknown (its holder does not answer); 2 for an unknown region; 69 when the
    region's Redis cannot be reached.
    """
    from cluster.status import UnknownRegion, Unreachable, links_status

    url, region, token = target("links", context_name, redis_url, region)
    try:
        rows = links_status(url, region, admin_token or token)
    except Unreachable as e:
        err.print(f"relay links: {e}", markup=False, highlight=False)
        sys.exit(EXIT_UNAVAILABLE)
    except UnknownRegion as e:
        unknown_region_exit("links", e)
    unhealthy = [r["to"] for r in rows if r["state"] != "running"]
    if as_json:
        click.echo(json.dumps({"region": region, "links": rows}))
        if unhealthy:
            sys.exit(EXIT_LINK_UNHEALTHY)
        return
    if not rows:
        say(
            f"no link out of {region}: no other region is configured (cluster.peers "
            "names the regions to replicate to), or no node has started one yet"
        )
        return
    from rich.table import Table

    table = Table(title=f"links from {region}")
    cols = ("to", "holder", "state", "lag s", "backlog", "copied", "gaps")
    for col in (*cols, "rtt ms", "in flight", "conns", "B/msg", "ratio"):
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
            str(r.get("rtt_ms", "") or ""),
            str(r.get("inflight_windows", "")),
            str(r.get("connections", "") or ""),
            str(r.get("bytes_per_message", "") or ""),
            str(r.get("compression_ratio", "") or ""),
        )
    out().print(table)
    if unhealthy:
        err.print(f"relay links: not running: {', '.join(unhealthy)}", markup=False)
        sys.exit(EXIT_LINK_UNHEALTHY)


@click.group()
def ring() -> None:
    """See and plan the region's consistent-hash ring (docs/OPERATIONS.md)."""


@ring.command("show")
@redis_option
@region_option("The region to show.")
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


def _region_of(node_id: str, command: str) -> str:
    """The region of ``node_id``; exit 2 when it is not a node id."""
    from cluster.keys import check_node_id

    try:
        check_node_id(node_id)
    except ValueError as e:
        err.print(f"relay {command}: {e}", markup=False, highlight=False)
        sys.exit(EXIT_USAGE)
    return node_id.split("/", 1)[0]


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
        "nothing_to_resume": result.nothing_to_resume,
        "moved": [{"slot": m.slot, "from": m.from_node, "to": m.to_node} for m in result.moved],
        "moved_slots": len(result.moved),
        "seconds": round(result.seconds, 3),
    }


@ring.command("plan")
@redis_option
@region_option("The region to plan for.")
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
    redis_url, region, token = target("ring plan", context_name, redis_url, region)
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
    shown = Console(stderr=True, soft_wrap=True) if as_json else out()
    shown.print(
        f"{doc['moving_slots']} slots move, carrying {doc['moving_messages']} pending "
        f"messages ({doc['moving_bytes']} bytes of bodies)",
        highlight=False,
    )
    shown.print(
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
    shown.print(table)
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
        shown.print(f"{len(result.moved)} slots moved in {result.seconds:.1f} s", highlight=False)
    if as_json:
        click.echo(json.dumps(doc))


@ring.command("apply")
@click.argument("plan_file", type=click.File("r"), required=False, metavar="[PLAN]")
@redis_option
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
    redis_url, region, _ = target("ring apply", context_name, redis_url, region or None)
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
    if result.nothing_to_resume:
        line = f"{region}: nothing to resume (no change of the ring was left interrupted)"

    if as_json:
        err.print(line, markup=False, highlight=False)
        click.echo(json.dumps(_applied_doc(region, result)))
    else:
        say(line)


@click.group()
def node() -> None:
    """Act on one node of a region."""


@node.command("add")
@click.argument("node_id")
@redis_option
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

    region = _region_of(node_id, "node add")
    redis_url, region, _ = target("node add", context_name, redis_url, region)
    dev_start_if_new(context_name, node_id)
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
        say(line)


@node.command("drain")
@click.argument("node_id")
@redis_option
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
    starts it again). Exit 0 when done, 1 on timeout or when the node's lease ran out
    instead (it was dead: its slots failed over, nothing was handed over), 2 when the
    node is not a member, 69 when the Redis cannot be reached.
    """
    from cluster.status import Unreachable, drain

    region = _region_of(node_id, "node drain")
    redis_url, region, _ = target("node drain", context_name, redis_url, region)
    try:
        outcome = drain(redis_url, region, node_id, slots, timeout_s)
    except Unreachable as e:
        err.print(f"relay node drain: {e}", markup=False, highlight=False)
        sys.exit(EXIT_UNAVAILABLE)
    except LookupError as e:
        err.print(f"relay node drain: {e}", markup=False, highlight=False)
        sys.exit(EXIT_USAGE)
    ok = outcome == "drained"
    if as_json:
        click.echo(json.dumps({"node": node_id, "drained": ok, "failed_over": outcome == "died"}))
    elif ok:
        say(f"{node_id}: drained")
    elif outcome == "died":
        say(
            f"{node_id}: its lease ran out before it drained (the node was killed or cut "
            "off): the others took its slots over without a hand-over"
        )
    else:
        say(f"{node_id}: still holds slots after the timeout")
    sys.exit(EXIT_OK if ok else EXIT_FAILED)
