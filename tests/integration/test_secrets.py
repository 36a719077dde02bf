"""Secrets stay out of logs and output: the `relay` command and a node as users run them
(real processes, real sockets)."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_cli import RELAY, relay, wait_for_file

PASSWORD = "S3cretRedisPassw0rd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize(
    "command",
    [
        ["status", "--region", "sg"],
        ["links", "--region", "sg"],
        ["ring", "show", "--region", "sg"],
        ["node", "drain", "sg/n1"],
    ],
    ids=["status", "links", "ring-show", "node-drain"],
)
def test_the_cli_never_prints_a_redis_password(command: list[str]) -> None:
    url = f"redis://default:{PASSWORD}@127.0.0.1:{free_port()}/0"
    r = relay(*command, "--redis", url, timeout=60)
    assert r.returncode != 0
    assert "cannot reach redis://REDACTED@127.0.0.1:" in r.stdout + r.stderr
    assert PASSWORD not in r.stdout + r.stderr


def test_config_init_writes_an_owner_only_file_and_readable_secrets_are_warned(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.toml"
    r = relay("config", "init", str(path))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text(path.read_text().replace('token = ""', 'token = "admin-token-0123456789"', 1))
    r = relay("config", "validate", str(path))
    assert r.returncode == 0 and "warning" not in r.stdout + r.stderr, r.stderr
    path.chmod(0o644)
    r = relay("config", "validate", str(path))
    assert r.returncode == 0, r.stderr
    said = r.stdout + r.stderr
    assert "holds secrets (" in said and "admin.token" in said and "chmod 600" in said
    assert "admin-token-0123456789" not in said


def test_validate_checks_the_token_keys_and_serve_exits_78(tmp_path: Path) -> None:
    bad_pem = tmp_path / "key.pem"
    bad_pem.write_text("not a PEM key\n")
    path = tmp_path / "node.toml"
    path.write_text(f'[auth]\nhs256_secret = "short"\nes256_public_key = "{bad_pem}"\n')
    r = relay("config", "validate", str(path))
    assert r.returncode == 78, r.stderr
    assert "auth.hs256_secret: must be at least 32 bytes" in r.stdout + r.stderr
    assert "auth.es256_public_key:" in r.stdout + r.stderr
    r = relay("serve", "--config", str(path), timeout=30)
    assert r.returncode == 78, r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_the_admin_token_never_reaches_the_access_log(tmp_path: Path) -> None:
    token = "admin-token-that-must-not-be-logged-0123"
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\nid = "t/n1"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[client]\nport = 0\nallow_anonymous = true\n[admin]\nport = 0\ntoken = "{token}"\n'
    )
    path.chmod(0o600)
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [*RELAY, "serve", "--config", str(path), "--ready-file", str(ready), "--log-level=info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        doc = wait_for_file(ready, proc)
        admin = doc["admin"]
        req = urllib.request.Request(f"{admin}/status?token={token}")
        req.add_header("Referer", f"{admin}/?token={token}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"{admin}/?x=1&token={token}", timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, errs = proc.communicate(timeout=30)
    assert "/status?token=REDACTED" in errs, errs[-2000:]
    assert "/?x=1&token=REDACTED" in errs
    assert token not in out + errs
    # Dated by the wall clock, not by the reactor's (monotonic) one.
    line = next(x for x in errs.splitlines() if "/status?token=REDACTED" in x)
    assert time.strftime("/%b/%Y:", time.gmtime()) in line, line
