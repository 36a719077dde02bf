"""The ops commands as scripts use them: results on stdout, everything else on stderr,
the documented exit codes, CLI contexts; `relay config init` → `relay token` → a client."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from relay.child import stop_child
from relay.context import Context, config_dir, save
from tests.conftest import RELAY
from tests.conftest import run_relay as relay


def serve(cfg: Path, ready: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*RELAY, "serve", "--config", str(cfg), "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, f"relay serve exited with {proc.returncode}"
        assert time.monotonic() < deadline, "relay serve did not start"
        time.sleep(0.05)  # poll interval
    return proc


@pytest.fixture
def region_t(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A region "t" of one node t/n1 on the test Redis, settled (every slot owned)."""
    cfg = tmp_path / "n1.toml"
    cfg.write_text(
        f'[node]\nid = "t/n1"\ndata_dir = "{tmp_path / "data"}"\n'
        "[client]\nport = 0\nallow_anonymous = true\n[admin]\nport = 0\n"
        f'[cluster]\nredis_url = "{redis_url}"\nmesh_port = 0\n'
    )
    proc = serve(cfg, tmp_path / "ready.json")
    try:
        deadline = time.monotonic() + 30
        while True:
            r = relay("status", "--redis", redis_url, "--region", "t", "--json")
            if r.returncode == 0 and sum(m["slots"] for m in json.loads(r.stdout)["members"]):
                break
            assert time.monotonic() < deadline, r.stderr
            time.sleep(0.1)  # poll interval while the node claims its slots
        yield redis_url
    finally:
        stop_child(proc, 15)


# -- stdout and stderr -------------------------------------------------------------

PLAN_GOLDEN = """\
{moving} slots move, carrying 0 pending messages (0 bytes of bodies)
balance (largest owner / its share): before 1.0, after {after}
slots per node
┏━━━━━━┳━━━━━━━━┳━━━━━━━┓
┃ node ┃ before ┃ after ┃
┡━━━━━━╇━━━━━━━━╇━━━━━━━┩
│ t/n1 │ 256    │ {n1:<5} │
│ t/n2 │ 0      │ {n2:<5} │
└──────┴────────┴───────┘
"""


def test_ring_plan_golden_stdout_and_stderr(region_t: str, tmp_path: Path) -> None:
    args = ("ring", "plan", "--redis", region_t, "--region", "t", "--add", "t/n2")
    doc = json.loads(relay(*args, "--json").stdout)
    per = doc["after"]["slots_per_node"]
    r = relay(*args)
    assert r.returncode == 0, r.stderr
    # `relay ring plan > plan.txt` keeps the whole plan; nothing else is on stdout.
    assert r.stdout == PLAN_GOLDEN.format(
        moving=doc["moving_slots"],
        after=doc["after"]["max_over_share"],
        n1=per["t/n1"],
        n2=per["t/n2"],
    )
    assert r.stderr == ""
    # --json: one JSON document on stdout and nothing else there.
    r = relay(*args, "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["moving_slots"] == doc["moving_slots"]
    assert "slots move" in r.stderr


def test_status_table_is_whole_when_not_a_tty(region_t: str) -> None:
    r = relay("status", "--redis", region_t, "--region", "t", env={"COLUMNS": "60"})
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    row = next(line for line in r.stdout.splitlines() if "t/n1" in line)
    # Every column whole (the URLs uncut), wider than a terminal's 80 columns.
    assert re.search(r"ws://127\.0\.0\.1:\d+/v1/ws", row), row
    assert re.search(r"http://127\.0\.0\.1:\d+ ", row), row
    assert len(row) > 80
    assert "\x1b[" not in r.stdout  # no colour codes in a file


def test_ops_commands_use_the_context(region_t: str) -> None:
    save(Context("mine", {"t": region_t, "u": "redis://127.0.0.1:1/0"}), os.environ)
    r = relay("context", "use", "mine")
    assert r.returncode == 0, r.stderr
    r = relay("status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["region"] == "t"  # the context's first region
    r = relay("ring", "show", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["members"][0]["id"] == "t/n1"
    r = relay("links", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"region": "t", "links": []}
    r = relay("links")  # not an empty table: why there is none
    assert r.returncode == 0 and "no link out of t: no other region is configured" in r.stdout
    r = relay("ring", "apply", "--resume")
    assert r.returncode == 0
    assert "t: nothing to resume (no change of the ring was left interrupted)" in r.stdout
    r = relay("ring", "plan", "--add", "t/n2", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["region"] == "t"
    # RELAY_CONTEXT and --context choose another; the current one stays.
    save(Context("other", {"t": "redis://127.0.0.1:1/0"}), os.environ)
    assert relay("status", env={"RELAY_CONTEXT": "other"}).returncode == 69
    assert relay("status", "--context", "other").returncode == 69
    r = relay("context", "ls")
    assert r.stdout.splitlines() == ["* mine", "  other"]
    assert (
        oct(stat.S_IMODE((config_dir(os.environ) / "contexts" / "mine.json").stat().st_mode))
        == "0o600"
    )


def test_secrets_stay_out_of_what_the_cli_prints(tmp_path: Path) -> None:
    save(Context("mine", {"t": "redis://:pw-in-url@127.0.0.1:1/0"}, "adm-tok"), os.environ)
    r = relay("context", "show", "mine")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["regions"]["t"]["redis"] == "redis://REDACTED@127.0.0.1:1/0"
    assert doc["admin_token"] == "REDACTED"
    r = relay("context", "show", "mine", "--show-secrets")
    assert "pw-in-url" in r.stdout and "adm-tok" in r.stdout
    # A password in the URL's query (redis-py reads it there), in an error.
    r = relay("status", "--redis", "redis://127.0.0.1:1/0?password=pw-in-query", "--region", "t")
    assert r.returncode == 69 and "password=REDACTED" in r.stderr
    assert "pw-in-query" not in r.stdout + r.stderr
    # A mistyped scheme: the config problem quotes the URL, not its password.
    cfg = tmp_path / "n.toml"
    cfg.write_text('[node]\nid = "t/n1"\n[cluster]\nredis_url = "http://u:pw-cfg@127.0.0.1:1"\n')
    r = relay("config", "validate", str(cfg))
    assert r.returncode == 78 and "http://REDACTED@127.0.0.1:1" in r.stdout + r.stderr
    assert "pw-cfg" not in r.stdout + r.stderr


# -- exit codes --------------------------------------------------------------------


def test_no_context_and_no_redis_is_a_usage_error() -> None:
    for args in (
        ("status",),
        ("links",),
        ("ring", "show"),
        ("ring", "plan", "--add", "x/n1"),
        ("node", "drain", "x/n1"),
        ("node", "add", "x/n1"),
        ("ring", "apply", "--resume"),
    ):
        r = relay(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "no CLI context" in r.stderr and "Traceback" not in r.stderr, args


def test_unknown_region_exits_2(region_t: str) -> None:
    for args in (
        ("status", "--region", "nosuch"),
        ("links", "--region", "nosuch"),
        ("ring", "show", "--region", "nosuch"),
        ("ring", "plan", "--region", "nosuch", "--add", "nosuch/n2"),
    ):
        r = relay(*args, "--redis", region_t)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "no region 'nosuch'" in r.stderr, args
        assert r.stdout == ""
    # A region the context does not name.
    save(Context("mine", {"t": region_t}), os.environ)
    r = relay("status", "--context", "mine", "--region", "nosuch")
    assert r.returncode == 2 and "unknown region 'nosuch'" in r.stderr
    # A name no region can have.
    r = relay("status", "--redis", region_t, "--region", "No Such")
    assert r.returncode == 2 and "region must be" in r.stderr


def test_a_malformed_redis_url_is_a_usage_error_without_a_traceback() -> None:
    for url, says in (
        ("http://x", "must be a redis://"),
        ("redis//127.0.0.1:1", "must be a redis://"),
        ("redis://127.0.0.1:notaport", "Port could not be cast"),
        ("redis://:secret@127.0.0.1:99999", "Port out of range"),
        ("redis://127.0.0.1:6379/zero", "the database (the path) must be a number"),
        ("redis://127.0.0.1:0", "port 0"),
    ):
        for args in (
            ("status", "--region", "sg"),
            ("links", "--region", "sg"),
            ("ring", "show", "--region", "sg"),
            ("node", "drain", "sg/n1"),
        ):
            r = relay(*args, "--redis", url)
            assert r.returncode == 2, (args, url, r.stderr)
            assert says in r.stderr and "Traceback" not in r.stderr, (args, url, r.stderr)
            assert "secret" not in r.stderr and r.stdout == ""


def test_a_node_id_without_its_region_is_a_usage_error() -> None:
    for args in (("node", "drain", "nosuch"), ("node", "add", "nosuch")):
        r = relay(*args, "--redis", "redis://127.0.0.1:1")
        assert r.returncode == 2 and 'node id must be "region/name"' in r.stderr, r.stderr


def test_unreachable_redis_exits_69() -> None:
    url = "redis://127.0.0.1:1/0"
    for args in (("status", "--region", "t"), ("links", "--region", "t")):
        r = relay(*args, "--redis", url)
        assert r.returncode == 69, (args, r.stderr)
    assert relay("node", "drain", "t/n1", "--redis", url).returncode == 69


def test_missing_context_exits_2() -> None:
    r = relay("status", "--context", "nosuch")
    assert r.returncode == 2 and "no context 'nosuch'" in r.stderr
    assert relay("context", "use", "nosuch").returncode == 2


def test_dev_commands_without_a_running_dev_exit_69(tmp_path: Path) -> None:
    r = relay("dev", "restart", "local/n1")
    assert r.returncode == 69 and "relay dev" in r.stderr
    save(
        Context("dev", {"local": "redis://127.0.0.1:1/0"}, dev_control=str(tmp_path / "x.sock")),
        os.environ,
    )
    r = relay("dev", "nodes", "--context", "dev")
    assert r.returncode == 69 and "no relay dev answers" in r.stderr


# -- config init, token, validate --------------------------------------------------


def objects(ws: Any, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        data = json.loads(ws.recv(timeout=5))
        out.extend(data if isinstance(data, list) else [data])
    return out


def test_config_init_then_token_then_a_client_publishes(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    r = relay("config", "init", str(cfg))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    r = relay("config", "validate", str(cfg))
    assert r.returncode == 0 and r.stdout == f"{cfg}: ok\n", r.stdout
    r = relay(
        "token",
        "--config",
        str(cfg),
        "--sub",
        "alice",
        "--can-pub",
        "inbox:*",
        "--can-sub",
        "inbox:alice",
        "--ttl",
        "1h",
    )
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.count(".") == 2 and r.stderr == ""
    env = {
        "RELAY_CLIENT__PORT": "0",
        "RELAY_ADMIN__PORT": "0",
        "RELAY_NODE__DATA_DIR": str(tmp_path / "d"),
    }
    proc = serve(cfg, tmp_path / "ready.json", env)
    try:
        ws_url = json.loads((tmp_path / "ready.json").read_text())["ws"]
        with connect(ws_url, subprotocols=["relay.v1.json"]) as ws:
            ws.send(json.dumps({"op": "hello", "token": token}))
            (welcome,) = objects(ws, 1)
            assert welcome["op"] == "welcome", welcome
            ws.send(json.dumps({"op": "pub", "id": "1", "ch": "inbox:bob", "body": "hi"}))
            (ack,) = objects(ws, 1)
            assert ack["op"] == "puback", ack
            ws.send(json.dumps({"op": "sub", "ch": "inbox:bob"}))
            (refused,) = objects(ws, 1)
            assert refused["op"] == "error" and refused["code"] == "forbidden"
        with connect(ws_url, subprotocols=["relay.v1.json"]) as ws:
            ws.send(json.dumps({"op": "hello"}))  # no token: refused
            assert objects(ws, 1)[0]["code"] == "unauthorized"
    finally:
        stop_child(proc, 15)


def test_token_exit_codes(tmp_path: Path) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text("")
    r = relay("token", "--config", str(plain), "--sub", "a")
    assert r.returncode == 78 and "hs256_secret" in r.stderr
    cfg = tmp_path / "node.toml"
    assert relay("config", "init", str(cfg)).returncode == 0
    assert relay("token", "--config", str(cfg), "--sub", "a", "--ttl", "soon").returncode == 2
    assert relay("token", "--config", str(cfg)).returncode == 2  # --sub is required
    # A `*` anywhere but at the end can never match (channel names hold none).
    r = relay("token", "--config", str(cfg), "--sub", "a", "--can-pub", "in*box")
    assert r.returncode == 2 and "prefix ending in one `*`" in r.stderr and not r.stdout
    r = relay("token", "--config", str(cfg), "--sub", "a", "--can-sub", "*")
    assert r.returncode == 0 and r.stdout.count(".") == 2  # every channel: a valid grant
    r = relay("token", "--config", str(cfg), "--sub", "a")  # valid, but grants nothing
    assert r.returncode == 0 and "grants nothing" in r.stderr and r.stdout.count(".") == 2
    assert relay("config", "init", str(cfg)).returncode == 1  # never overwritten


def test_validate_rules_and_warnings(tmp_path: Path) -> None:
    cfg = tmp_path / "n.toml"
    cfg.write_text(
        '[cluster]\nredis_url = "http://localhost:6379"\nlease_ttl_ms = 1000\n'
        "lease_renew_ms = 1000\n"
    )
    r = relay("config", "validate", str(cfg))
    assert r.returncode == 78
    assert "cluster.redis_url: must be a redis://" in r.stdout
    assert "cluster.lease_ttl_ms: must be above cluster.lease_renew_ms" in r.stdout
    assert r.stdout.startswith(f"{cfg}: 2 problems\n")
    # Nobody can authenticate: usable, but said loudly.
    cfg.write_text("")
    r = relay("config", "validate", str(cfg))
    assert r.returncode == 0
    assert "1 warning" in r.stdout and "no client can connect" in r.stdout
    r = relay("config", "validate", "--json", str(cfg))
    assert json.loads(r.stdout)["warnings"][0].startswith("no client can connect")
