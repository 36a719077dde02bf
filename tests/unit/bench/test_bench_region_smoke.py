"""``relay bench region`` still runs: a tiny region run end to end (real nodes and Redis),
in its own process, so that the figures it prints come from code that works."""

from __future__ import annotations

import sys

from bench.region import register
from tests.unit.bench.smoke import command_help, run_json


def test_region_command_is_registered() -> None:
    out = command_help(register, "region")
    for option in ("--pairs", "--leases", "--failover-runs", "--json"):
        assert option in out


def test_tiny_region_run_prints_one_json_document() -> None:
    cmd = [sys.executable, "-m", "bench.region", "--pairs", "3", "--runs", "1"]
    cmd += ["--duration", "0.3", "--warmup", "0.2", "--paced-rate", "100"]
    cmd += ["--window-mem", "2", "--window-log", "4", "--failover-runs", "1"]
    cmd += ["--leases", "1000:200", "--failover-channels", "1", "--failover-tasks", "2", "4"]
    cmd += ["--failover-before", "0.3", "--failover-after", "0.1", "--json"]
    doc, stderr = run_json(cmd, 90)
    runs = doc["throughput"]["runs"]
    assert {(x["mode"], x["ack"]) for x in runs} == {
        ("closed", "mem"),
        ("closed", "log"),
        ("paced", "mem"),
        ("paced", "log"),
    }
    assert all(x["delivered"] > 0 and x["errors"] == 0 for x in runs)
    [fo] = doc["failover"]["runs"]
    assert fo["first_ok_after_kill_s"] is not None
    assert fo["log"]["published_acked"] > 0 and fo["log"]["lost"] == 0
    assert fo["mem"]["published_acked"] > 0
    assert "relay bench region" in stderr


def test_tiny_redis_cluster_comparison_prints_both_and_their_ratio() -> None:
    cmd = [sys.executable, "-m", "bench.region", "--redis-cluster", "3", "--pairs", "2"]
    cmd += ["--runs", "1", "--duration", "0.3", "--warmup", "0.2", "--json"]
    doc, _ = run_json(cmd, 90)
    runs = doc["cluster_compare"]["runs"]
    assert {(x["redis"], x["ack"]) for x in runs} == {
        (k, a) for k in ("server", "cluster3") for a in ("mem", "log")
    }
    assert all(x["delivered"] > 0 and x["errors"] == 0 for x in runs)
    # A cluster's CPU is every node's: six processes measured, summed as "redis".
    cluster_run = next(x for x in runs if x["redis"] == "cluster3")
    assert sum(k.startswith("redis:") for k in cluster_run["cpu"]) == 6
    assert all(x["redis_us_per_msg"] is not None for x in runs)
    assert any("ratio" in s for s in doc["cluster_compare"]["summary"])
