"""Servers under test and the load generator, each in its own process.

The node is a real ``relay serve`` (anonymous access; rate limits, channel caps and the
outbound buffer raised so that none binds; auto-ping off). The bare server is
:mod:`bench.bare`. The parent samples the server's CPU time (psutil) when the load
generator opens and closes its measured window.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import psutil

from relay.child import stop_child

ROOT = Path(__file__).resolve().parents[1]

NODE_CONFIG = """\
[node]
id = "bench/n1"

[client]
host = "127.0.0.1"
port = 0
allow_anonymous = true
rate_per_s = 100000000.0
burst = 100000000
ping_interval_s = 0
max_outbound_bytes = 1073741824

[admin]
host = "127.0.0.1"
port = 0

[store]
channel_max_messages = 100000000
channel_max_bytes = 100000000000
memory_high_watermark_bytes = 100000000000
"""


@dataclass
class Server:
    kind: str  # "node" or "bare-asyncio" / "bare-epoll"
    url: str
    proc: subprocess.Popen[bytes]

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def runqueue_wait_s(self) -> float:
        """Seconds the server was runnable but waited for a core (Linux schedstat):
        on a shared machine, the share of its time that other processes took."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/schedstat").read_text().split()
        except OSError:
            return 0.0
        return int(fields[1]) / 1e9


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            doc: dict[str, Any] = json.loads(ready.read_text())
            return doc
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        time.sleep(0.02)
    raise TimeoutError("server did not become ready")


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10) -> None:
    """Stop a benchmark's child process: SIGTERM, then SIGKILL after ``timeout_s``."""
    stop_child(proc, timeout_s)


@contextlib.contextmanager
def baseline_tree(ref: str) -> Iterator[str]:
    """A directory holding the code (``relay/``, and ``cluster/`` and ``bench/`` where the
    revision has them) as of git revision ``ref``, for before/after runs: the node's CLI
    imports the bench commands, which must be of the same revision."""
    with tempfile.TemporaryDirectory(prefix="relay-baseline-") as tmp:
        listed = subprocess.run(
            ["git", "ls-tree", "--name-only", ref], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        dirs = [d for d in ("relay", "cluster", "bench") if d in listed.split()]
        archive = subprocess.run(
            ["git", "archive", ref, *dirs], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield tmp


@contextlib.contextmanager
def server(
    kind: str, mode: str = "ingest", send: str = "prepared", relay_root: str | None = None
) -> Iterator[Server]:
    """Start ``node``, ``bare-asyncio`` or ``bare-epoll``; stop it on exit.

    ``relay_root``: run the node with the ``relay/`` found there (``python -m`` puts the
    working directory first on ``sys.path``), e.g. a :func:`baseline_tree`.
    """
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        ready = Path(tmp) / "ready.json"
        if kind == "node":
            cfg = Path(tmp) / "node.toml"
            cfg.write_text(NODE_CONFIG.replace("[client]", f'data_dir = "{tmp}"\n\n[client]'))
            cmd = [sys.executable, "-m", "relay", "serve", "--config", str(cfg)]
            cmd += ["--ready-file", str(ready), "--log-level", "warning"]
        else:
            reactor = kind.split("-", 1)[1]
            cmd = [sys.executable, "-m", "bench.bare", "--mode", mode, "--reactor", reactor]
            cmd += ["--send", send, "--ready-file", str(ready)]
        cwd = relay_root if relay_root is not None and kind == "node" else tmp
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL)
        try:
            doc = _wait_ready(proc, ready, 30)
            yield Server(kind, doc["ws"], proc)
        finally:
            stop_process(proc)


def run_loadgen(srv: Server, mode: str, **opts: Any) -> dict[str, Any]:
    """Run the load generator against ``srv``; add the server's CPU use in its window."""
    cmd = [sys.executable, "-m", "bench.loadgen", mode, "--url", srv.url]
    for k, v in opts.items():
        cmd += [f"--{k}", str(v)]
    lg = subprocess.Popen(
        cmd, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    assert lg.stdout is not None
    cpu0 = cpu1 = wait0 = wait1 = 0.0
    result: dict[str, Any] | None = None
    for line in lg.stdout:
        line = line.strip()
        if line == "START":
            cpu0, wait0 = srv.cpu_s(), srv.runqueue_wait_s()
        elif line == "END":
            cpu1, wait1 = srv.cpu_s(), srv.runqueue_wait_s()
        elif line.startswith("{"):
            result = json.loads(line)
    if lg.wait() != 0 or result is None:
        raise RuntimeError(f"load generator failed (exit {lg.returncode})")
    result["server_cpu_s"] = round(cpu1 - cpu0, 4)
    secs = result["seconds"]
    result["server_cpu"] = round((cpu1 - cpu0) / secs, 3) if secs else 0.0
    # Busy + waiting for a core near 1.0: the server was the bottleneck, and only the
    # machine's other load kept it from a whole core.
    result["server_wait"] = round((wait1 - wait0) / secs, 3) if secs else 0.0
    return result


@contextlib.contextmanager
def tail_on_failure(log_path: Path, whose: str, lines: int = 40) -> Iterator[None]:
    """When the block raises, print the last ``lines`` of ``log_path`` (the output of
    ``whose``, e.g. "the node's") to stderr, then let the exception go on."""
    try:
        yield
    except Exception:
        if log_path.exists():
            tail = log_path.read_text(errors="replace").splitlines()[-lines:]
            click.echo(f"last lines of {whose} output:\n" + "\n".join(tail), err=True)
        raise


def report(doc: dict[str, Any], lines: list[str], as_json: bool) -> None:
    """Print a benchmark's result: the summary on stdout, or with ``--json`` the summary
    on stderr and one JSON document on stdout."""
    if as_json:
        for line in lines:
            click.echo(line, err=True)
        click.echo(json.dumps(doc, indent=2))
    else:
        for line in lines:
            click.echo(line)
