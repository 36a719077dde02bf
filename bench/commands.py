"""``relay bench …``: the benchmarks of docs/BENCHMARKS.md as click commands.

Every case runs its server and its load generator as separate processes, several times,
with the servers compared interleaved (A, B, A, B…) so that a noisy machine hurts both
alike; figures are medians over the runs and ratios are taken within a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Any

import click

from bench.procs import ROOT, baseline_tree, run_loadgen, server


def _machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _out(doc: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for line in lines:
            click.echo(line)


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


# -- ingest ----------------------------------------------------------------------------


def ingest_cases(
    *,
    conns: int,
    batches: list[int],
    window: int | None,
    duration_s: float,
    warmup_s: float,
    runs: int,
    baseline_root: str | None = None,
) -> dict[str, Any]:
    """Node and bare server, side by side, per batch size; returns the raw and the medians."""
    kinds = ["bare-asyncio", "node"] + (["node-baseline"] if baseline_root else [])
    raw: list[dict[str, Any]] = []
    for run in range(runs):
        for batch in batches:
            w = window if window is not None else (4 if batch == 1 else 1)
            order = kinds if run % 2 == 0 else kinds[::-1]
            for kind in order:
                root = baseline_root if kind == "node-baseline" else None
                with server(kind.removesuffix("-baseline"), relay_root=root) as srv:
                    r = run_loadgen(
                        srv,
                        "ingest",
                        conns=conns,
                        batch=batch,
                        window=w,
                        duration=duration_s,
                        warmup=warmup_s,
                    )
                r.update(server=kind, run=run)
                r["server_us_per_msg"] = (
                    round(r["server_cpu_s"] / r["msgs"] * 1e6, 3) if r["msgs"] else None
                )
                raw.append(r)
                _progress(
                    f"  run {run + 1}/{runs} {kind:13} batch {batch:3}: "
                    f"{r['msgs_per_s']:>9,} msgs/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                    f"server CPU {r['server_cpu']:.2f} (+{r['server_wait']:.2f} waiting for a "
                    f"core)  loadgen CPU {r['loadgen_cpu']:.2f}"
                )
    summary = []
    for batch in batches:
        row: dict[str, Any] = {"batch": batch}
        for kind in kinds:
            rs = [r for r in raw if r["batch"] == batch and r["server"] == kind]
            row[kind] = {
                "msgs_per_s": round(_med([r["msgs_per_s"] for r in rs])),
                "p50_ms": round(_med([r["p50_ms"] for r in rs]), 3),
                "p99_ms": round(_med([r["p99_ms"] for r in rs]), 3),
                "server_us_per_msg": round(_med([r["server_us_per_msg"] for r in rs]), 3),
                # What one whole core would do at that CPU cost per message.
                "one_core_msgs_per_s": round(
                    _med([1e6 / r["server_us_per_msg"] for r in rs if r["server_us_per_msg"]])
                ),
                "server_cpu": round(_med([r["server_cpu"] for r in rs]), 3),
                "server_wait": round(_med([r["server_wait"] for r in rs]), 3),
                "loadgen_cpu": round(_med([r["loadgen_cpu"] for r in rs]), 3),
                "errors": sum(r["errors"] for r in rs),
            }
        ratios = []
        cpu_ratios = []
        for run in range(runs):
            by = {r["server"]: r for r in raw if r["batch"] == batch and r["run"] == run}
            if by["bare-asyncio"]["msgs_per_s"]:
                ratios.append(by["node"]["msgs_per_s"] / by["bare-asyncio"]["msgs_per_s"])
            if by["node"]["server_us_per_msg"]:
                cpu_ratios.append(
                    by["bare-asyncio"]["server_us_per_msg"] / by["node"]["server_us_per_msg"]
                )
        row["node_over_bare_rate"] = round(_med(ratios), 3)
        row["node_over_bare_cpu_efficiency"] = round(_med(cpu_ratios), 3)
        if baseline_root:
            speed = []
            for run in range(runs):
                by = {r["server"]: r for r in raw if r["batch"] == batch and r["run"] == run}
                if by["node"]["server_us_per_msg"]:
                    speed.append(
                        by["node-baseline"]["server_us_per_msg"] / by["node"]["server_us_per_msg"]
                    )
            row["node_cpu_speedup_over_baseline"] = round(_med(speed), 3)
        summary.append(row)
    return {"summary": summary, "runs": raw}


@click.command("ingest")
@click.option("--conns", default=100, show_default=True, help="Publishing connections.")
@click.option(
    "--batch",
    "batches",
    multiple=True,
    type=int,
    default=(1, 100),
    show_default=True,
    help="Messages per frame (repeat the option for several cases).",
)
@click.option(
    "--window",
    type=int,
    default=None,
    help="Frames outstanding per connection [default: 4 at one message a frame, else 1].",
)
@click.option("--duration", default=5.0, show_default=True, help="Measured seconds per case.")
@click.option("--warmup", default=1.0, show_default=True, help="Seconds before measuring.")
@click.option("--runs", default=3, show_default=True, help="Runs of every case (medians).")
@click.option(
    "--baseline",
    default=None,
    help="Also run the node from this git revision's relay/ (before/after in one run).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def ingest_cmd(
    conns: int,
    batches: tuple[int, ...],
    window: int | None,
    duration: float,
    warmup: float,
    runs: int,
    baseline: str | None,
    as_json: bool,
) -> None:
    """Publish throughput and puback latency: node vs bare Autobahn, same run.

    CONNS connections publish 200-byte messages at ack=mem, closed loop, to a
    `relay serve` subprocess and to the bare Autobahn server (asyncio reactor) that
    only counts messages and answers each frame with one byte.
    """
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(baseline_tree(baseline)) if baseline else None
        doc = ingest_cases(
            conns=conns,
            batches=list(batches),
            window=window,
            duration_s=duration,
            warmup_s=warmup,
            runs=runs,
            baseline_root=root,
        )
    doc["machine"] = _machine()
    doc["baseline"] = baseline
    lines = [f"ingest: {conns} connections, 200-byte bodies, ack=mem, medians of {runs} runs"]
    for row in doc["summary"]:
        for kind in ("bare-asyncio", "node", "node-baseline"):
            if kind not in row:
                continue
            k = row[kind]
            lines.append(
                f"  batch {row['batch']:3}  {kind:13} {k['msgs_per_s']:>9,} msgs/s  "
                f"p50 {k['p50_ms']:8.2f} ms  p99 {k['p99_ms']:8.2f} ms  "
                f"server {k['server_us_per_msg']:6.2f} µs CPU/msg "
                f"(one core: {k['one_core_msgs_per_s']:,} msgs/s; "
                f"waited {k['server_wait']:.2f})"
            )
        if "node_cpu_speedup_over_baseline" in row:
            lines.append(
                f"  batch {row['batch']:3}  node CPU/msg, baseline over now: "
                f"x{row['node_cpu_speedup_over_baseline']}"
            )
        lines.append(
            f"  batch {row['batch']:3}  node/bare rate {row['node_over_bare_rate']:.2f}, "
            f"CPU efficiency {row['node_over_bare_cpu_efficiency']:.2f}"
        )
    _out(doc, as_json, lines)


# -- delivery --------------------------------------------------------------------------

DELIVERY_SERVERS = [
    ("bare-epoll", "prepared"),
    ("bare-asyncio", "prepared"),
    ("node", "prepared"),
]
DELIVERY_DIAGNOSTICS = [
    ("bare-epoll", "lean"),
    ("bare-asyncio", "lean"),
    ("bare-epoll", "direct"),
    ("bare-asyncio", "direct"),
]


def delivery_cases(
    *,
    subs: int,
    window: int,
    duration_s: float,
    warmup_s: float,
    runs: int,
    diagnostics: bool,
    baseline_root: str | None = None,
) -> dict[str, Any]:
    cases = DELIVERY_SERVERS + (DELIVERY_DIAGNOSTICS if diagnostics else [])
    if baseline_root:
        cases = [*cases, ("node-baseline", "prepared")]
    raw: list[dict[str, Any]] = []
    for run in range(runs):
        order = cases if run % 2 == 0 else cases[::-1]
        for kind, send in order:
            root = baseline_root if kind == "node-baseline" else None
            base = kind.removesuffix("-baseline")
            with server(base, mode="fanout", send=send, relay_root=root) as srv:
                r = run_loadgen(
                    srv,
                    "fanout",
                    conns=subs,
                    window=window,
                    duration=duration_s,
                    warmup=warmup_s,
                )
            name = kind if kind.startswith("node") else f"{kind}/{send}"
            r.update(server=name, run=run)
            r["server_us_per_delivery"] = (
                round(r["server_cpu_s"] / r["deliveries"] * 1e6, 3) if r["deliveries"] else None
            )
            raw.append(r)
            _progress(
                f"  run {run + 1}/{runs} {name:22} {r['deliveries_per_s']:>8,} deliveries/s  "
                f"{r['server_us_per_delivery']} µs CPU each  server CPU {r['server_cpu']:.2f} "
                f"(+{r['server_wait']:.2f} waiting)  loadgen CPU {r['loadgen_cpu']:.2f}"
            )
    names = list(dict.fromkeys(r["server"] for r in raw))
    summary: dict[str, Any] = {}
    for name in names:
        rs = [r for r in raw if r["server"] == name]
        summary[name] = {
            "us_per_delivery": round(_med([r["server_us_per_delivery"] for r in rs]), 3),
            "deliveries_per_s": round(_med([r["deliveries_per_s"] for r in rs])),
            "server_cpu": round(_med([r["server_cpu"] for r in rs]), 3),
            "server_wait": round(_med([r["server_wait"] for r in rs]), 3),
            "loadgen_cpu": round(_med([r["loadgen_cpu"] for r in rs]), 3),
        }

    def ratio(a: str, b: str) -> float | None:
        xs = []
        for run in range(runs):
            by = {r["server"]: r for r in raw if r["run"] == run}
            if a in by and b in by and by[b]["server_us_per_delivery"]:
                xs.append(by[a]["server_us_per_delivery"] / by[b]["server_us_per_delivery"])
        return round(_med(xs), 3) if xs else None

    ratios = {
        "bare asyncio / bare epoll": ratio("bare-asyncio/prepared", "bare-epoll/prepared"),
        "node / bare epoll": ratio("node", "bare-epoll/prepared"),
        "node / bare asyncio": ratio("node", "bare-asyncio/prepared"),
    }
    if baseline_root:
        ratios["node baseline / node"] = ratio("node-baseline", "node")
    if diagnostics:
        ratios["lean asyncio / lean epoll"] = ratio("bare-asyncio/lean", "bare-epoll/lean")
        ratios["direct asyncio / direct epoll"] = ratio("bare-asyncio/direct", "bare-epoll/direct")
    return {"summary": summary, "ratios": ratios, "runs": raw}


@click.command("delivery")
@click.option("--subs", default=500, show_default=True, help="Subscribed connections.")
@click.option(
    "--window",
    default=4,
    show_default=True,
    help="Messages in flight: the publisher waits until every subscriber has the older ones.",
)
@click.option("--duration", default=5.0, show_default=True, help="Measured seconds per case.")
@click.option("--warmup", default=1.0, show_default=True, help="Seconds before measuring.")
@click.option("--runs", default=3, show_default=True, help="Runs of every case (medians).")
@click.option(
    "--diagnostics",
    is_flag=True,
    help="Also run the bare server writing with transport.write and straight to the socket.",
)
@click.option(
    "--baseline",
    default=None,
    help="Also run the node from this git revision's relay/ (before/after in one run).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def delivery_cmd(
    subs: int,
    window: int,
    duration: float,
    warmup: float,
    runs: int,
    diagnostics: bool,
    baseline: str | None,
    as_json: bool,
) -> None:
    """Server CPU per message delivered to SUBS subscribers of one channel.

    One publisher, SUBS subscribers; the server's CPU time (user + system, psutil) over
    the measured window divided by the deliveries. Beside it, the bare Autobahn server
    fanning the same frame out with sendPreparedMessage on Twisted's epoll reactor and
    on its asyncio reactor.
    """
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(baseline_tree(baseline)) if baseline else None
        doc = delivery_cases(
            subs=subs,
            window=window,
            duration_s=duration,
            warmup_s=warmup,
            runs=runs,
            diagnostics=diagnostics,
            baseline_root=root,
        )
    doc["machine"] = _machine()
    doc["baseline"] = baseline
    lines = [f"delivery: 1 publisher, {subs} subscribers, medians of {runs} runs"]
    for name, s in doc["summary"].items():
        lines.append(
            f"  {name:22} {s['us_per_delivery']:6.2f} µs CPU/delivery  "
            f"{s['deliveries_per_s']:>8,} deliveries/s"
        )
    for k, v in doc["ratios"].items():
        lines.append(f"  {k}: {v}")
    _out(doc, as_json, lines)


# -- memory ----------------------------------------------------------------------------


@click.command("memory")
@click.option("--messages", default=1_000_000, show_default=True)
@click.option("--channels", default=100_000, show_default=True)
@click.option("--body-bytes", default=200, show_default=True)
@click.option("--runs", default=3, show_default=True, help="Fresh processes (median).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def memory_cmd(messages: int, channels: int, body_bytes: int, runs: int, as_json: bool) -> None:
    """RSS per pending message held by the node's store and dedupe, in a fresh process."""
    rs = []
    for i in range(runs):
        cmd = [sys.executable, "-m", "bench.memory", "--messages", str(messages)]
        cmd += ["--channels", str(channels), "--body-bytes", str(body_bytes)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        r = json.loads(p.stdout)
        rs.append(r)
        _progress(f"  run {i + 1}/{runs}: {r['bytes_per_msg']} bytes/msg")
    best = sorted(rs, key=lambda r: float(r["bytes_per_msg"]))[len(rs) // 2]
    doc = {"median": best, "runs_bytes_per_msg": [r["bytes_per_msg"] for r in rs]}
    doc["machine"] = _machine()
    m = best
    lines = [
        f"memory: {m['messages']:,} messages of {m['body_bytes']} bytes over "
        f"{m['channels']:,} channels, median of {runs} fresh processes",
        f"  {m['bytes_per_msg']} bytes RSS per message; msgpack msg object "
        f"{m['encoded_msg_bytes']} bytes (x{m['ratio_to_encoded']})",
        f"  goal <= 1.5 x encoded + 64 = {m['goal_bytes_per_msg']} bytes: "
        f"{'met' if m['meets_goal'] else 'NOT met'}",
    ]
    _out(doc, as_json, lines)


# -- hot path --------------------------------------------------------------------------


def _hotpath(relay_root: str, batch: int, msgs: int) -> dict[str, Any]:
    # ``-m`` puts the working directory first on sys.path: its relay/ is the one measured.
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "bench.hotpath", "--batch", str(batch), "--msgs", str(msgs)]
    cmd += ["--repeat", "1"]
    p = subprocess.run(cmd, cwd=relay_root, env=env, capture_output=True, text=True, check=True)
    r: dict[str, Any] = json.loads(p.stdout)
    return r


@click.command("hotpath")
@click.option(
    "--baseline",
    default="HEAD",
    show_default=True,
    help="Git revision whose relay/ to compare against (the working tree is 'current').",
)
@click.option("--batch", "batches", multiple=True, type=int, default=(1, 100), show_default=True)
@click.option("--msgs", default=200_000, show_default=True)
@click.option("--runs", default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def hotpath_cmd(
    baseline: str, batches: tuple[int, ...], msgs: int, runs: int, as_json: bool
) -> None:
    """µs per published message through Session.receive → Node.publish → replies encoded,
    for the working tree and for BASELINE's relay/, alternated in one run."""
    with baseline_tree(baseline) as tmp:
        paths = {"baseline": tmp, "current": str(ROOT)}
        raw: list[dict[str, Any]] = []
        for run in range(runs):
            for batch in batches:
                order = ["baseline", "current"] if run % 2 == 0 else ["current", "baseline"]
                for which in order:
                    r = _hotpath(paths[which], batch, msgs)
                    if which == "baseline" and not r["relay"].startswith(tmp):
                        raise click.ClickException(f"baseline imported {r['relay']}")
                    r.update(code=which, run=run)
                    raw.append(r)
                    _progress(
                        f"  run {run + 1}/{runs} {which:8} batch {batch:3}: "
                        f"{r['us_per_msg']} µs/msg"
                    )
    summary = []
    for batch in batches:
        row: dict[str, Any] = {"batch": batch}
        for which in ("baseline", "current"):
            row[which] = round(
                _med([r["us_per_msg"] for r in raw if r["batch"] == batch and r["code"] == which]),
                3,
            )
        speedups = []
        for run in range(runs):
            by = {r["code"]: r for r in raw if r["batch"] == batch and r["run"] == run}
            speedups.append(by["baseline"]["us_per_msg"] / by["current"]["us_per_msg"])
        row["speedup"] = round(_med(speedups), 3)
        summary.append(row)
    doc = {"baseline": baseline, "summary": summary, "runs": raw, "machine": _machine()}
    lines = [f"hotpath: µs per message, medians of {runs} runs (baseline {baseline})"]
    for row in summary:
        lines.append(
            f"  batch {row['batch']:3}  baseline {row['baseline']:6.3f}  "
            f"current {row['current']:6.3f}  speedup x{row['speedup']}"
        )
    _out(doc, as_json, lines)


def register(group: click.Group) -> None:
    """Add the benchmark commands to ``relay bench``."""
    for cmd in (ingest_cmd, delivery_cmd, memory_cmd, hotpath_cmd):
        group.add_command(cmd)
    from bench.durability import register as register_durability
    from bench.peer import register as register_peer
    from bench.rebalance import register as register_rebalance
    from bench.region import register as register_region
    from bench.replication import register as register_replication

    register_region(group)
    register_replication(group)
    register_durability(group)
    register_rebalance(group)
    register_peer(group)
