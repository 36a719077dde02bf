"""``relay bench replication --soak`` still runs: a tiny soak end to end (two real regions,
their Redis servers and the WAN proxy), in its own process, so the figures it prints come
from code that works."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import run_at_root
from tests.unit.bench.smoke import run_json


def test_tiny_soak_prints_one_json_document_and_loses_nothing() -> None:
    cmd = [sys.executable, "-m", "bench.replication", "--soak", "--duration-s", "4"]
    cmd += ["--sample-s", "1", "--settle-s", "1", "--rate", "200", "--channels", "20"]
    cmd += ["--dedupe-window-s", "2", "--wan-latency-ms", "5", "--json"]
    doc, _ = run_json(cmd, 180)
    assert doc["published"] > 0 and doc["lost"] == 0
    assert doc["left_pending"] == {"sg": 0, "fra": 0}
    for region in ("sg", "fra"):
        g = doc["growth"][region]
        assert {"used_memory_growth", "log_entries_end", "checkpoint_bytes_end"} <= set(g)
    assert [s for s in doc["samples"] if s["t_s"] == "end"]


def test_side_by_side_without_nats_server_says_so_and_exits_3(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # a PATH with no nats-server on it
    r = run_at_root([sys.executable, "-m", "bench.replication", "--quick", "--json"], 60, env)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "nats-server is not on the PATH" in r.stderr and r.stdout == ""


@pytest.mark.skipif(shutil.which("nats-server") is None, reason="needs nats-server")
def test_tiny_side_by_side_prints_every_key_it_promises() -> None:
    cmd = [sys.executable, "-m", "bench.replication", "--quick", "--json", "--messages", "2000"]
    cmd += ["--rates", "2000", "--steady-s", "1", "--wan-latency-ms", "80"]
    doc, _ = run_json(cmd, 180)
    for key in ("drain_ratio_0ms", "drain_ratio_80ms", "bytes_ratio_2k", "p99_ms_2k_80ms"):
        assert isinstance(doc[key], float) and doc[key] > 0, key
    assert doc["lost"] == 0 and doc["doubled"] == 0


@pytest.mark.skipif(shutil.which("nats-server") is None, reason="needs nats-server")
def test_tiny_drain_only_run_prints_the_drain_figures_alone() -> None:
    cmd = [sys.executable, "-m", "bench.replication", "--quick", "--json", "--drain-only"]
    cmd += ["--messages", "2000", "--wan-latency-ms", "20"]
    doc, _ = run_json(cmd, 180)
    assert doc["drain_ratio_0ms"] > 0 and doc["drain_ratio_20ms"] > 0
    assert "bytes_ratio_2k" not in doc and doc["lost"] == 0 and doc["doubled"] == 0
    assert doc["medians"]["drain_relay_0ms"]["cpu_us_per_msg"] > 0
    # fra's receiver ran in a process of its own, and reported its CPU.
    assert doc["medians"]["drain_relay_0ms"]["receiver_cpu_us_per_msg"] > 0
