#!/usr/bin/env python3
"""relay-bootstrap: install relay on a node and fill in its config before every start.

Written to /usr/local/sbin/relay-bootstrap by cloud-init (terraform/modules/region). Runs
on the system Python of Amazon Linux 2023 (3.9), standard library only.

  relay-bootstrap install   once, from cloud-init: the relay user, a venv at /opt/relay
                            with relay_package installed, systemd reloaded
  relay-bootstrap render    before every start (relay.service ExecStartPre, as root):
                            /etc/relay/node.toml.in -> /etc/relay/node.toml, each
                            __PLACEHOLDER__ filled from the instance metadata (IMDSv2)
                            and SSM Parameter Store; the node's TLS certificate made
                            if there is none

Settings come from /etc/relay/bootstrap.json (rendered by terraform): where the
template and config live, and for each secret placeholder its SSM parameter, its AWS
region, how it is quoted ("url": percent-encoded, it sits in a rediss:// URL) and
whether it is optional. An optional value that cannot be had (a peer region's SSM
unreachable, and nothing cached) drops the config lines that name it; a required one
stops the start. Values read once are cached (root only) for the next start.

`render --values FILE` takes the values from a JSON object instead of IMDS and SSM and
makes no certificate: an offline dry run (the tests use it).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

SETTINGS = "/etc/relay/bootstrap.json"
CACHE = "/etc/relay/secrets.cache.json"
USER = "relay"
IMDS = "http://169.254.169.254/latest"
PLACEHOLDER = re.compile(r"__([A-Z0-9]+(?:_[A-Z0-9]+)*)__")
# Values that come from the instance, not from SSM.
INSTANCE_VALUES = ("INSTANCE_NAME", "PRIVATE_IP")


class BootstrapError(Exception):
    """The node cannot be set up; the message says why."""


def log(msg: str) -> None:
    print(f"relay-bootstrap: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], attempts: int = 1, delay_s: float = 5.0) -> str:
    """Run ``cmd``; its stdout. Retried ``attempts`` times (network at first boot)."""
    for attempt in range(1, attempts + 1):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout
        detail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        log(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} failed ({attempt}/{attempts}): {detail[0]}")
        if attempt < attempts:
            time.sleep(delay_s)
    raise BootstrapError(f"command failed: {' '.join(cmd[:3])} ...")


# -- values --------------------------------------------------------------------------


def imds(path: str) -> str:
    """One instance-metadata value over IMDSv2 (the launch template requires tokens)."""
    put = urllib.request.Request(
        f"{IMDS}/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )
    with urllib.request.urlopen(put, timeout=5) as r:
        token = r.read().decode()
    get = urllib.request.Request(
        f"{IMDS}/meta-data/{path}", headers={"X-aws-ec2-metadata-token": token}
    )
    with urllib.request.urlopen(get, timeout=5) as r:
        return r.read().decode().strip()


def ssm_parameter(region: str, name: str) -> str:
    out = run(
        [
            "aws",
            "ssm",
            "get-parameter",
            "--region",
            region,
            "--name",
            name,
            "--with-decryption",
            "--query",
            "Parameter.Value",
            "--output",
            "text",
        ],
        attempts=3,
    )
    return out.rstrip("\n")


def load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise BootstrapError(f"{path}: not a JSON object")
    return data


def write_file(path: str, text: str, mode: int, group: str | None) -> None:
    """Write ``text`` to ``path`` atomically with ``mode`` (and ``group`` when root)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if group and os.geteuid() == 0:
            os.chown(tmp, 0, pwd.getpwnam(group).pw_gid)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def gather_values(settings: dict) -> dict[str, str | None]:
    """Every placeholder's value, from IMDS and SSM (cached values when SSM fails)."""
    values: dict[str, str | None] = {
        "INSTANCE_NAME": imds("instance-id").lower(),
        "PRIVATE_IP": imds("local-ipv4"),
    }
    cache = load_json(CACHE)
    for name, spec in settings["secrets"].items():
        try:
            values[name] = ssm_parameter(spec["region"], spec["parameter"])
        except BootstrapError as e:
            values[name] = cache.get(name)
            how = "using the cached value" if values[name] is not None else "no cached value"
            log(f"{name}: {spec['parameter']} in {spec['region']} unreadable ({e}); {how}")
    fresh = {k: v for k, v in values.items() if k in settings["secrets"] and v is not None}
    write_file(CACHE, json.dumps(fresh), 0o600, None)
    return values


# -- render --------------------------------------------------------------------------


def toml_escape(value: str) -> str:
    """``value`` as the inside of a TOML basic string (JSON escapes are TOML escapes)."""
    return json.dumps(value)[1:-1]


def render(template: str, values: dict[str, str | None], secrets: dict) -> str:
    """``template`` with every ``__NAME__`` filled in.

    A line naming an optional value that is missing is left out; a missing required
    value, or a placeholder nobody knows, is an error. Comment lines are kept as they are.
    """
    out = []
    for lineno, line in enumerate(template.splitlines(keepends=True), 1):
        if line.lstrip().startswith("#"):
            out.append(line)
            continue
        names = PLACEHOLDER.findall(line)
        unknown = [n for n in names if n not in INSTANCE_VALUES and n not in secrets]
        if unknown:
            raise BootstrapError(f"line {lineno}: unknown placeholder __{unknown[0]}__")
        missing = [n for n in names if values.get(n) is None]
        if missing:
            if all(secrets.get(n, {}).get("optional") for n in missing):
                log(f"line {lineno} left out: no value for {', '.join(missing)}")
                continue
            raise BootstrapError(f"line {lineno}: no value for __{missing[0]}__")

        def fill(m: re.Match[str]) -> str:
            value = values[m.group(1)]
            assert value is not None
            if secrets.get(m.group(1), {}).get("quote") == "url":
                value = urllib.parse.quote(value, safe="")
            return toml_escape(value)

        out.append(PLACEHOLDER.sub(fill, line))
    return "".join(out)


def make_certificate(cert: str, key: str, ip: str) -> None:
    """A self-signed certificate for the client port: the load balancer re-encrypts to
    the node with it (it does not verify target certificates)."""
    if os.path.exists(cert) and os.path.exists(key):
        return
    os.makedirs(os.path.dirname(cert), mode=0o750, exist_ok=True)
    os.makedirs(os.path.dirname(key), mode=0o750, exist_ok=True)
    run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-sha256",
            "-days",
            "3650",
            "-nodes",
            "-subj",
            f"/CN={ip}",
            "-addext",
            f"subjectAltName=IP:{ip}",
            "-keyout",
            key,
            "-out",
            cert,
        ]
    )
    gid = pwd.getpwnam(USER).pw_gid
    for path, mode in ((key, 0o640), (cert, 0o644)):
        os.chown(path, 0, gid)
        os.chmod(path, mode)
    os.chown(os.path.dirname(key), 0, gid)


def cmd_render(args: argparse.Namespace) -> None:
    settings = load_json(args.settings)
    if not settings:
        raise BootstrapError(f"{args.settings}: missing or empty")
    template_path = args.template or settings["template"]
    config_path = args.config or settings["config"]
    with open(template_path, encoding="utf-8") as fh:
        template = fh.read()
    if args.values:
        values = load_json(args.values)
        group = None
    else:
        values = gather_values(settings)
        make_certificate(settings["tls_cert"], settings["tls_key"], str(values["PRIVATE_IP"]))
        group = USER
    text = render(template, values, settings["secrets"])
    write_file(config_path, text, 0o640, group)
    log(f"wrote {config_path}")


# -- install -------------------------------------------------------------------------


def cmd_install(args: argparse.Namespace) -> None:
    settings = load_json(args.settings)
    try:
        pwd.getpwnam(USER)
    except KeyError:
        run(["useradd", "--system", "--no-create-home", "--shell", "/sbin/nologin", USER])
    venv = settings["venv"]
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        run([settings["python"], "-m", "venv", venv])
    package = settings["relay_package"]
    if package.startswith("s3://"):
        download = tempfile.mkdtemp(prefix="relay-wheel-")
        local = os.path.join(download, package.rsplit("/", 1)[-1])
        run(["aws", "s3", "cp", "--region", settings["aws_region"], package, local], attempts=5)
        package = local
    pip = os.path.join(venv, "bin", "pip")
    run([pip, "install", "--no-cache-dir", "--upgrade", "pip"], attempts=5)
    run([pip, "install", "--no-cache-dir", package], attempts=5)
    run([os.path.join(venv, "bin", "relay"), "--help"])
    run(["systemctl", "daemon-reload"])
    log(f"installed {settings['relay_package']} into {venv}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay-bootstrap", description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=SETTINGS, help="bootstrap settings (JSON)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="install relay (once, from cloud-init)")
    r = sub.add_parser("render", help="write the node config (before every start)")
    r.add_argument("--template", help="config template (default: from the settings)")
    r.add_argument("--config", help="config to write (default: from the settings)")
    r.add_argument("--values", help="placeholder values (JSON) instead of IMDS and SSM")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            cmd_install(args)
        else:
            cmd_render(args)
    except (BootstrapError, OSError, KeyError, ValueError) as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
