"""``relay bench replication --soak`` still runs: a tiny soak end to end (two real regions,
their Redis servers and the WAN proxy), in its own process, so the figures it prints come
from code that works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_tiny_soak_prints_one_json_document_and_loses_nothing() -> None:
    cmd = [sys.executable, "-m", "bench.replication", "--soak", "--duration-s", "4"]
    cmd += ["--sample-s", "1", "--settle-s", "1", "--rate", "200", "--channels", "20"]
    cmd += ["--dedupe-window-s", "2", "--wan-latency-ms", "5", "--json"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)  # stdout holds the document and nothing else
    assert doc["published"] > 0 and doc["lost"] == 0
    assert doc["left_pending"] == {"sg": 0, "fra": 0}
    for region in ("sg", "fra"):
        g = doc["growth"][region]
        assert {"used_memory_growth", "log_entries_end", "checkpoint_bytes_end"} <= set(g)
    assert [s for s in doc["samples"] if s["t_s"] == "end"]


def test_without_soak_it_says_what_is_built() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bench.replication"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--soak" in r.stderr
