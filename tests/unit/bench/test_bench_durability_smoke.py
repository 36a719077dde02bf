"""``relay bench durability`` still runs: a tiny run end to end (real node and Redis, kill -9
and restarts), in its own process, so that the figures it prints come from code that works."""

from __future__ import annotations

import json
import sys

from bench.durability import body_pool, expected_ids, one_channel_per_slot, pub_frames, register
from cluster.ring import slot_of
from tests.unit.bench.smoke import command_help, run_json


def test_durability_command_is_registered() -> None:
    out = command_help(register, "durability")
    for option in ("--write-messages", "--restart-messages", "--restart-runs", "--json"):
        assert option in out


def test_frames_hold_every_message_once_and_a_channel_of_every_slot() -> None:
    bodies = body_pool(16, 200)
    assert all(len(b) == 200 and b'"' not in b and b"\\" not in b for b in bodies)
    frames = list(pub_frames(0, 25, 5, 10, bodies))
    assert [n for _, n in frames] == [10, 10, 5]
    ids = [o["id"] for payload, _ in frames for o in json.loads(payload)]
    assert ids == [f"m{i:09d}" for i in range(25)]
    assert expected_ids(2, 25, 5) == [f"m{i:09d}" for i in (2, 7, 12, 17, 22)]
    chans = one_channel_per_slot(500)
    assert [slot_of(ch, 256) for ch in chans] == list(range(256))


def test_tiny_durability_run_prints_one_json_document() -> None:
    cmd = [sys.executable, "-m", "bench.durability", "--write-messages", "3000"]
    cmd += ["--write-ticks", "1", "--quiet", "0.3", "--restart-messages", "3000"]
    cmd += ["--restart-runs", "1", "--snapshot-interval", "0.3", "--checkpoint-interval", "0.3"]
    cmd += ["--timeout", "30", "--json"]
    doc, stderr = run_json(cmd, 90)
    [tick] = doc["write"]["runs"]
    assert tick["files"] == 256 and tick["bytes"] > 0
    assert tick["stall"]["pings"] > 0 and tick["stall"]["gc"] is not None
    [rs] = doc["restart"]
    assert {x["mode"] for x in rs["runs"]} == {"snapshots", "checkpoints"}
    for x in rs["runs"]:
        assert x["pending_messages"] == 3000 and x["sample_messages"] == 3 * 10
        assert 0 < x["ready_s"] <= x["serving_s"]
    by = {x["mode"]: x for x in rs["runs"]}
    assert by["snapshots"]["snapshots_loaded"] > 0
    assert by["checkpoints"]["snapshots_loaded"] == 0
    assert by["checkpoints"]["snapshot_files_deleted"] > 0
    assert "relay bench durability" in stderr
