"""The `relay` command as users run it: real processes, real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.conftest import RELAY
from tests.conftest import run_relay as relay


def wait_for_file(path: Path, proc: subprocess.Popen[Any], timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} not written in {timeout_s}s"
        time.sleep(0.05)  # poll interval
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def objects(ws: Any, n: int) -> list[dict[str, Any]]:
    """The next ``n`` objects from the node (frames may hold arrays)."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        data = json.loads(ws.recv(timeout=5))
        out.extend(data if isinstance(data, list) else [data])
    assert len(out) == n, out
    return out


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("serve",),
        ("dev",),
        ("dev", "restart"),
        ("dev", "start"),
        ("dev", "nodes"),
        ("config",),
        ("config", "validate"),
        ("config", "init"),
        ("token",),
        ("context",),
        ("context", "add"),
        ("status",),
        ("links",),
        ("ring", "plan"),
        ("node", "add"),
        ("bench",),
    ],
)
def test_every_command_has_help(args: tuple[str, ...]) -> None:
    r = relay(*args, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout


def test_version() -> None:
    r = relay("--version")
    assert r.returncode == 0 and "relay" in r.stdout


def test_config_validate_good_and_bad(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    r = relay("config", "init", str(good))
    assert r.returncode == 0, r.stderr
    assert relay("config", "validate", str(good)).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[client]\nport = "x"\nmax_body = -1\n[nodee]\nid = "a"\n')
    r = relay("config", "validate", str(bad))
    assert r.returncode == 78
    # The problems are the command's result: on stdout.
    assert "client.port" in r.stdout and "client.max_body" in r.stdout and "nodee" in r.stdout
    assert "3 problems" in r.stdout
    r = relay("config", "validate", "--json", str(bad))
    assert r.returncode == 78
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and len(doc["problems"]) >= 3


def test_env_override_is_validated(tmp_path: Path) -> None:
    good = tmp_path / "n.toml"
    good.write_text("")
    r = relay("config", "validate", str(good), env={"RELAY_CLIENT__PORT": "99999"})
    assert r.returncode == 78 and "RELAY_CLIENT__PORT" in r.stdout
    assert "1 problem\n" in r.stdout


def test_serve_refuses_bad_config_with_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[client]\nrate_per_s = 0\n")
    r = relay("serve", "--config", str(bad))
    assert r.returncode == 78 and "client.rate_per_s" in r.stderr


def test_serve_then_sigterm_closes_clients_with_1001(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[node]\nid = "t/n1"\n[client]\nport = 0\nallow_anonymous = true\n[admin]\nport = 0\n'
    )
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [*RELAY, "serve", "--config", str(cfg), "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        info = wait_for_file(ready, proc)
        assert info["id"] == "t/n1" and info["pid"] == proc.pid
        with connect(info["ws"], subprotocols=["relay.v1.json"]) as ws:
            ws.send(json.dumps({"op": "pub", "id": "1", "ch": "c", "body": "x"}))
            assert [o["op"] for o in objects(ws, 2)] == ["welcome", "puback"]
            proc.send_signal(signal.SIGTERM)
            from websockets.exceptions import ConnectionClosed

            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=10)
            assert e.value.rcvd is not None and e.value.rcvd.code == 1001
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_on_a_port_in_use_names_the_setting(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "node.toml"
        cfg.write_text(f'[node]\nid = "t/n1"\n[client]\nport = {port}\n[admin]\nport = 0\n')
        r = relay("serve", "--config", str(cfg))
    assert r.returncode == 1, r.stderr
    assert f"client.port (RELAY_CLIENT__PORT) {port}" in r.stderr and "in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_serve_on_a_mesh_port_in_use_names_the_setting(tmp_path: Path, redis_url: str) -> None:
    # The mesh port opens as the node joins its region, after the client ports.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "node.toml"
        cfg.write_text(
            '[node]\nid = "t/n1"\n[client]\nport = 0\n[admin]\nport = 0\n'
            f'[cluster]\nredis_url = "{redis_url}"\nmesh_port = {port}\n'
            'mesh_host = "127.0.0.1"\n'
        )
        r = relay("serve", "--config", str(cfg))
    assert r.returncode == 1, r.stderr
    assert f"cluster.mesh_port (RELAY_CLUSTER__MESH_PORT) {port}" in r.stderr
    assert "in use" in r.stderr and "Traceback" not in r.stderr


def test_serve_stops_on_sigint_though_started_with_it_ignored(tmp_path: Path) -> None:
    # A shell script's `relay serve &` starts it with SIGINT ignored.
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nid = "t/n1"\n[client]\nport = 0\n[admin]\nport = 0\n')
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [*RELAY, "serve", "--config", str(cfg), "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        wait_for_file(ready, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dev_refuses_a_second_dev_on_its_context_and_stops_on_sighup(tmp_path: Path) -> None:
    # A second `relay dev` would take the running one's CLI context over (and remove it
    # on exit); a closed terminal (SIGHUP) must stop every node, as Ctrl-C does, and the
    # ready file goes with them.
    ready = tmp_path / "ready.json"
    ready.write_text('{"stale": true}')  # an earlier run's: removed at the start
    args = [*RELAY, "dev", "--regions", "local", "--port-base", "0"]
    proc = subprocess.Popen(
        [*args, "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or "stale" in ready.read_text():
            assert proc.poll() is None, f"relay dev exited with {proc.returncode}"
            assert time.monotonic() < deadline, "no new ready file"
            time.sleep(0.05)  # poll until this run's ready file is written
        doc = json.loads(ready.read_text())
        (node,) = doc["regions"]["local"]["nodes"]
        second = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1, second.stderr
        assert "another relay dev is running" in second.stderr
        assert relay("status", "--json").returncode == 0  # the context still points at it
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=30) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(node["pid"], 0)
        assert not ready.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dev_writes_ready_file_and_serves_the_mission(tmp_path: Path) -> None:
    """A bare `relay dev`: three regions over a simulated WAN; a message published in
    one reaches its recipient in another."""
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [*RELAY, "dev", "--ready-file", str(ready), "--port-base", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        doc = wait_for_file(ready, proc, timeout_s=60)
        assert list(doc["regions"]) == ["sg", "fra", "iad"]
        assert doc["wan"]["control"].startswith("http://127.0.0.1:")
        assert set(doc["wan"]["pairs"]) == {
            f"{a}-{b}" for a in doc["regions"] for b in doc["regions"] if a != b
        }
        nodes = {}
        for name, region in doc["regions"].items():
            assert region["redis"].startswith("redis://127.0.0.1:")
            (node,) = region["nodes"]
            assert set(node) == {"id", "ws", "admin", "pid"}
            assert node["id"] == f"{name}/n1"
            nodes[name] = node
        with connect(nodes["fra"]["ws"]) as a, connect(nodes["sg"]["ws"]) as b:
            a.send(json.dumps({"op": "sub", "ch": "inbox:alice"}))
            assert [o["op"] for o in objects(a, 2)] == ["welcome", "subscribed"]
            b.send(json.dumps({"op": "pub", "id": "hi", "ch": "inbox:alice", "body": "hello"}))
            deadline = time.monotonic() + 30  # links start, then one WAN crossing
            while True:
                try:
                    (msg,) = objects(a, 1)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "the message did not cross regions"
            assert msg["op"] == "msg" and msg["body"] == "hello" and msg["origin"] == "sg"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        # Every child is gone.
        for node in nodes.values():
            with pytest.raises(ProcessLookupError):
                os.kill(node["pid"], 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dev_port_base_makes_ports_predictable(tmp_path: Path) -> None:
    import socket

    def free_run(base: int) -> bool:
        """Ports base..base+2 (WebSocket, admin, mesh) can all be bound now."""
        socks = []
        try:
            for port in range(base, base + 3):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
        finally:
            for s in socks:
                s.close()

    # Below the ephemeral range (32768+), where other tests' free ports come from.
    base = next(b for b in range(20000, 30000, 10) if free_run(b))
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [*RELAY, "dev", "--regions", "local", "--ready-file", str(ready), "--port-base", str(base)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        doc = wait_for_file(ready, proc, timeout_s=60)
        node = doc["regions"]["local"]["nodes"][0]
        assert node["ws"] == f"ws://127.0.0.1:{base}/v1/ws"
        assert node["admin"] == f"http://127.0.0.1:{base + 1}"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
