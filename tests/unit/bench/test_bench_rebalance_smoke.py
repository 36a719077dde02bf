"""``relay bench rebalance`` still runs: one tiny case end to end (a real region and Redis),
in its own process, so the figures it prints come from code that works."""

from __future__ import annotations

import sys

from tests.unit.bench.smoke import run_json


def test_tiny_rebalance_run_prints_one_json_document() -> None:
    cmd = [sys.executable, "-m", "bench.rebalance", "--runs", "1", "--max-moving", "8"]
    cmd += ["--publishers", "2", "--channels", "8", "--before", "0.5", "--json"]
    doc, _ = run_json(cmd, 120)
    [case] = doc["runs"]
    assert case["max_moving"] == 8 and case["slots_moved"] > 0
    assert case["acked"] > 0
    assert case["lost"] == 0 and case["doubled"] == 0
    [summary] = doc["summary"]
    assert summary["slots_per_s"] > 0
