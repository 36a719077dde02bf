"""``relay bench peer`` still runs: a tiny run end to end (real relay nodes, Redis and
nats-server), in its own process, and without nats-server it says so and exits 3."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from bench.peer import EXIT_NO_NATS, register
from tests.conftest import ROOT, run_at_root
from tests.unit.bench.smoke import command_help, run_json


def test_peer_command_is_registered() -> None:
    out = command_help(register, "peer")
    for option in ("--channels", "--pubs", "--subs", "--rate", "--systems", "--json"):
        assert option in out


def test_without_nats_server_it_says_so_and_exits_3(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.peer", "--runs", "1", "--json"]
    r = run_at_root(cmd, 30, env)
    assert r.returncode == EXIT_NO_NATS == 3
    assert "nats-server not found" in r.stderr
    assert r.stdout == ""


@pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server not installed")
def test_tiny_peer_run_prints_one_json_document() -> None:
    cmd = [sys.executable, "-m", "bench.peer", "--channels", "6", "--pubs", "2", "--subs", "2"]
    cmd += ["--window", "3", "--rate", "1000", "--duration", "1.0", "--warmup", "0.2"]
    cmd += ["--runs", "1", "--json"]
    doc, stderr = run_json(cmd, 90)
    for key in (
        "max_ratio_per_core",
        "cpu_ratio_5k",
        "ack_p50_ms_5k",
        "delivery_p99_ms_5k",
        "three_vs_one_node",
    ):
        assert doc[key] is not None and doc[key] > 0, key
    runs = doc["runs"]
    assert {(x["system"], x["mode"]) for x in runs} == {
        (s, m)
        for s in ("relay-1", "relay-3", "nats-memory", "nats-file")
        for m in ("closed", "paced")
    }
    assert all(x["accepted"] > 0 and x["errors"] == 0 for x in runs), runs
    assert all(x["delivery_p50_ms"] is not None for x in runs)
    assert "relay-1/nats-memory" in doc["ratios"] and "relay-1/nats-file" in doc["ratios"]
    assert "relay bench peer" in stderr
