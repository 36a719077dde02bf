"""`relay dev` as a newcomer runs it: a node drained or killed leaves the rest serving,
the ops commands work with no flags through the CLI context, `relay dev restart` brings a
node back, `relay node add` starts and adds one; `--port-base` decides every port."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.sync.client import connect

from relay.child import stop_child
from relay.context import config_dir
from relay.dev import port_layout
from tests.conftest import RELAY, run_relay

relay = functools.partial(run_relay, timeout=120)


def poll(cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.2)  # poll interval


@contextmanager
def relay_dev(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`relay dev ARGS` running, its ready file written; yields it and its stderr file."""
    ready = tmp_path / "ready.json"
    out, errf = (tmp_path / "dev.out").open("wb"), tmp_path / "dev.err"
    with errf.open("wb") as e:
        proc = subprocess.Popen(
            [*RELAY, "dev", "--ready-file", str(ready), *args], stdout=out, stderr=e
        )
    try:
        poll(lambda: ready.exists() or proc.poll() is not None, 90, "relay dev to serve")
        assert proc.poll() is None, errf.read_text()
        yield proc, errf
    finally:
        stop_child(proc, 60, signal.SIGINT)
        out.close()


def status() -> dict[str, Any]:
    r = relay("status", "--json")
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def members() -> dict[str, int]:
    return {m["id"]: m["slots"] for m in status()["members"]}


def round_trip(ws_url: str, tag: str) -> None:
    """A subscriber and a publisher on ``ws_url``: the message arrives."""
    with connect(ws_url, open_timeout=10) as a, connect(ws_url, open_timeout=10) as b:
        a.send(json.dumps({"op": "sub", "ch": f"inbox:{tag}"}))
        ops: list[dict[str, Any]] = []
        while not any(o.get("op") == "subscribed" for o in ops):
            d = json.loads(a.recv(timeout=10))
            ops += d if isinstance(d, list) else [d]
        b.send(json.dumps({"op": "pub", "id": tag, "ch": f"inbox:{tag}", "body": tag}))
        while True:
            d = json.loads(a.recv(timeout=10))
            for o in d if isinstance(d, list) else [d]:
                if o.get("op") == "msg":
                    assert o["body"] == tag
                    return


def test_dev_survives_drain_and_kill_restarts_and_adds_nodes(tmp_path: Path) -> None:
    with relay_dev(tmp_path, "--regions", "sg", "--nodes", "3", "--port-base", "0") as (
        proc,
        errf,
    ):
        # The context `relay dev` wrote is current: no --redis, no --region.
        assert (config_dir(os.environ) / "context.txt").read_text().strip() == "dev"
        poll(lambda: sum(members().values()) == 256 and len(members()) == 3, 30, "3 members")
        doc = json.loads((tmp_path / "ready.json").read_text())
        n1 = doc["regions"]["sg"]["nodes"][0]

        r = relay("node", "drain", "sg/n2")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "sg/n2: drained"
        poll(lambda: "node sg/n2 exited with 0" in errf.read_text(), 30, "the exit reported")
        assert proc.poll() is None, "relay dev stopped with a drained node"
        assert set(members()) == {"sg/n1", "sg/n3"}
        round_trip(n1["ws"], "after-drain")

        n3_pid = next(n["pid"] for n in doc["regions"]["sg"]["nodes"] if n["id"] == "sg/n3")
        os.kill(n3_pid, signal.SIGKILL)
        poll(lambda: "node sg/n3 killed by signal 9" in errf.read_text(), 30, "kill reported")
        poll(lambda: members() == {"sg/n1": 256}, 30, "sg/n1 to take every slot")
        assert proc.poll() is None, "relay dev stopped with a killed node"
        round_trip(n1["ws"], "after-kill")

        r = relay("dev", "nodes", "--json")
        assert r.returncode == 0, r.stderr
        states = {n["id"]: n["state"] for n in json.loads(r.stdout)["nodes"]}
        assert states == {"sg/n1": "serving", "sg/n2": "exited", "sg/n3": "exited"}

        for node_id in ("sg/n2", "sg/n3"):
            r = relay("dev", "restart", node_id, "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["id"] == node_id
        poll(lambda: len(members()) == 3 and sum(members().values()) == 256, 30, "3 again")
        # The ready file follows the cluster.
        ready = json.loads((tmp_path / "ready.json").read_text())
        assert len(ready["regions"]["sg"]["nodes"]) == 3

        # A node relay dev has not started: `node add` starts it (weight 0) and adds it.
        r = relay("node", "add", "sg/n4")
        assert r.returncode == 0, r.stderr
        assert "sg/n4 is on the ring" in r.stdout
        assert members()["sg/n4"] > 0
        round_trip(n1["ws"], "after-add")

        r = relay("dev", "restart", "sg/n9")
        assert r.returncode == 1 and "no node sg/n9" in r.stderr
    assert proc.returncode == 0
    # Its context is gone with it.
    assert not (config_dir(os.environ) / "contexts" / "dev.json").exists()
    r = relay("status")
    assert r.returncode == 2 and "no CLI context" in r.stderr


def free_block(span: int) -> int:
    """A base below the ephemeral range (where other tests' free ports come from) whose
    ``span`` ports can all be bound now."""
    for base in range(20000, 30000 - span, 100):
        socks = []
        try:
            for port in range(base, base + span):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free block of ports")


def listening_ports(pid: int) -> set[int]:
    """Every TCP port the process tree of ``pid`` listens on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    ports = set()
    for p in procs:
        for c in p.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN:
                ports.add(c.laddr.port)
    return ports


def test_dev_port_base_decides_every_port(tmp_path: Path) -> None:
    regions = ["sg", "fra"]
    base = free_block(40)
    with relay_dev(
        tmp_path,
        "--regions",
        ",".join(regions),
        "--nodes",
        "2",
        "--port-base",
        str(base),
        "--wan-latency-ms",
        "1",
    ) as (proc, _):
        layout = port_layout(base, regions)
        expected = {p for p, _ in layout.planned(4, wan=True)}
        assert listening_ports(proc.pid) == expected
        doc = json.loads((tmp_path / "ready.json").read_text())
        assert doc["regions"]["fra"]["redis"] == f"redis://127.0.0.1:{base + 13}/0"
        assert doc["regions"]["sg"]["nodes"][1]["ws"] == f"ws://127.0.0.1:{base + 10}/v1/ws"
        assert doc["wan"]["control"] == f"http://127.0.0.1:{base + 9}"
        assert doc["wan"]["pairs"] == {"sg-fra": base + 4, "fra-sg": base + 14}


def test_dev_busy_port_is_one_line_naming_port_and_flag(tmp_path: Path) -> None:
    base = free_block(30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 13))
        s.listen()
        r = relay("dev", "--port-base", str(base), timeout=60)
    assert r.returncode == 1
    # sg, fra, iad: fra's Redis is +3 of block 1; iad's WAN pairs end at +25.
    assert r.stderr.strip().splitlines() == [
        f"relay dev: cannot start: port {base + 13} (Redis of fra) is in use: choose "
        f"another --port-base (this cluster uses {base}-{base + 25})"
    ]


@pytest.mark.parametrize("regions", ["Sg", "sg,sg", "a b", "-x"])
def test_dev_bad_region_name_is_a_usage_error(regions: str) -> None:
    r = relay("dev", "--regions", regions, "--port-base", "0", timeout=60)
    assert r.returncode == 2
    assert "--regions" in r.stderr and "Traceback" not in r.stderr


def test_dev_on_a_redis_cluster_serves_and_the_ops_commands_work(tmp_path: Path) -> None:
    args = ("--regions", "sg", "--nodes", "2", "--port-base", "0", "--redis-cluster", "3")
    with relay_dev(tmp_path, *args) as (proc, _errf):
        doc = json.loads((tmp_path / "ready.json").read_text())
        url = doc["regions"]["sg"]["redis"]
        assert url.startswith("redis+cluster://127.0.0.1:") and url.count(",") == 5
        # The context names the cluster: status reads the leases, ring and owner records
        # from it with no flags.
        poll(lambda: sum(members().values()) == 256 and len(members()) == 2, 30, "2 members")
        round_trip(doc["regions"]["sg"]["nodes"][0]["ws"], "on-a-cluster")
        # A planned change: the lock, the plan and the holds are scripts on the {sg} keys.
        r = relay("ring", "plan", "--weight", "sg/n2=3", "--apply")
        assert r.returncode == 0, r.stderr
        poll(lambda: members().get("sg/n2", 0) > 150, 30, "sg/n2 to take 3/4 of the slots")
        r = relay("node", "drain", "sg/n2")
        assert r.returncode == 0, r.stderr
        poll(lambda: members() == {"sg/n1": 256}, 30, "sg/n1 to take every slot")
        assert proc.poll() is None
