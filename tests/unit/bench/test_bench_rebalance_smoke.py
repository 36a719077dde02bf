"""``relay bench rebalance`` still runs: one tiny case end to end (a real region and Redis),
in its own process, so the figures it prints come from code that works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_tiny_rebalance_run_prints_one_json_document() -> None:
    cmd = [sys.executable, "-m", "bench.rebalance", "--runs", "1", "--max-moving", "8"]
    cmd += ["--publishers", "2", "--channels", "8", "--before", "0.5", "--json"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)  # stdout holds the document and nothing else
    [case] = doc["runs"]
    assert case["max_moving"] == 8 and case["slots_moved"] > 0
    assert case["acked"] > 0
    assert case["lost"] == 0 and case["doubled"] == 0
    [summary] = doc["summary"]
    assert summary["slots_per_s"] > 0
