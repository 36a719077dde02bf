"""The node's cloud-init and relay config, rendered as templatefile would, then filled in
by the real relay-bootstrap (offline) and checked by `relay config validate`."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.config import load_config
from tests.certs import write_cert_files
from tests.terraform.hcl import (
    REGION,
    TemplateError,
    module,
    ref,
    referenced_variables,
    render,
    split_top_level,
    templatefile_call,
)

M = module(REGION)
TEMPLATES = REGION / "templates"
BOOTSTRAP = REGION / "files" / "relay-bootstrap.py"
SERVICE = REGION / "files" / "relay.service"

REDIS_HOST = "master.relay-sg.abc123.apse1.cache.amazonaws.com"
PEERS = [
    {"name": "fra", "redis_host": "master.relay-fra.def456.euc1.cache.amazonaws.com"},
    {"name": "us-east", "redis_host": "master.relay-us-east.0ab1c2.use1.cache.amazonaws.com"},
]
# Values as the node would find them. The tokens use every character ElastiCache
# allows that means something in a URL or a TOML string.
VALUES = {
    "INSTANCE_NAME": "i-0123456789abcdef0",
    "PRIVATE_IP": "10.20.3.17",
    "REDIS_AUTH_TOKEN": "Tok#en&w1th$pecial^<chars>-0123",
    "ADMIN_TOKEN": 'admin-"quoted"-and\\backslashed-token-0123456789',
    "AUTH_HS256_SECRET": "hs256-secret-0123456789-0123456789-abcdef",
    "MESH_SECRET": "mesh-secret-0123456789-0123456789-abcdef",
    "PEER_FRA_REDIS_AUTH_TOKEN": "fra-token!#&$^<>-0123456789",
    # PEER_US_EAST_REDIS_AUTH_TOKEN: unreadable at start (its region's SSM is down)
}


def peer_placeholder(name: str) -> str:
    """local.peer_placeholder in main.tf, in Python."""
    return f"PEER_{name.upper().replace('-', '_')}_REDIS_AUTH_TOKEN"


def es256_public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def relay_toml_vars(tmp: Path, *, hs256: bool = True, es256: bool = True) -> dict[str, Any]:
    """The variables main.tf passes to relay.toml.tftpl, with test values; the files the
    config names are made in ``tmp``."""
    certs = write_cert_files(tmp)
    es256_path = ""
    if es256:
        es256_file = tmp / "jwt-es256.pem"
        es256_file.write_text(es256_public_pem())
        es256_path = str(es256_file)
    return {
        "region": "sg",
        "data_dir": M.locals["data_dir"],
        "client_port": 7400,
        "tls_cert_path": str(certs.cert_path),
        "tls_key_path": str(certs.key_path),
        "allowed_origins": ["https://chat.example.com", "https://*.example.com"],
        "hs256_enabled": hs256,
        "es256_public_key_path": es256_path,
        "admin_port": 7401,
        "redis_host": REDIS_HOST,
        "redis_port": 6379,
        "mesh_port": 7402,
        "peers": [
            {**p, "redis_port": 6379, "placeholder": peer_placeholder(p["name"])} for p in PEERS
        ],
    }


def bootstrap_settings(*, hs256: bool = True) -> dict[str, Any]:
    """local.bootstrap_settings in main.tf, with test values."""
    secrets: dict[str, Any] = {
        "REDIS_AUTH_TOKEN": {
            "region": "ap-southeast-1",
            "parameter": "/relay/sg/redis-auth-token",
            "quote": "url",
            "optional": False,
        },
        "ADMIN_TOKEN": {
            "region": "ap-southeast-1",
            "parameter": "/relay/sg/admin-token",
            "quote": "none",
            "optional": False,
        },
        "MESH_SECRET": {
            "region": "ap-southeast-1",
            "parameter": "/relay/sg/mesh-secret",
            "quote": "none",
            "optional": False,
        },
    }
    if hs256:
        secrets["AUTH_HS256_SECRET"] = {
            "region": "ap-southeast-1",
            "parameter": "/relay/sg/jwt-hs256-secret",
            "quote": "none",
            "optional": False,
        }
    for p in PEERS:
        secrets[peer_placeholder(p["name"])] = {
            "region": "eu-central-1",
            "parameter": f"/relay/{p['name']}/redis-auth-token",
            "quote": "url",
            "optional": True,
        }
    return {
        "aws_region": "ap-southeast-1",
        "relay_package": "relay @ https://artifacts.example.com/relay-0.1.0-py3-none-any.whl",
        "python": "python3.11",
        "venv": "/opt/relay",
        "template": "/etc/relay/node.toml.in",
        "config": "/etc/relay/node.toml",
        "tls_cert": M.locals["tls_cert_path"],
        "tls_key": M.locals["tls_key_path"],
        "secrets": secrets,
    }


def cloud_init_vars(relay_toml: str, *, hs256: bool = True, es256_pem: str = "") -> dict[str, Any]:
    settings = bootstrap_settings(hs256=hs256)
    return {
        "relay_toml": relay_toml,
        # As Terraform's jsonencode writes it: compact, keys sorted, <>& escaped.
        "bootstrap_json": render("${jsonencode(s)}", {"s": settings}),
        "bootstrap_script": BOOTSTRAP.read_text(encoding="utf-8"),
        "relay_service": SERVICE.read_text(encoding="utf-8"),
        "jwt_es256_public_key_pem": es256_pem,
        "es256_public_key_path": M.locals["es256_key_path"],
    }


def write_files(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["path"]: f for f in doc["write_files"]}


def relay_env() -> dict[str, str]:
    """The environment without RELAY_* overrides, so only the file is validated."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}


def bootstrap_render(tmp: Path, node_toml_in: str, settings_json: str, values: dict) -> Path:
    """Run the real relay-bootstrap `render --values` on the cloud-init's files."""
    (tmp / "node.toml.in").write_text(node_toml_in)
    (tmp / "bootstrap.json").write_text(settings_json)
    (tmp / "values.json").write_text(json.dumps(values))
    out = tmp / "node.toml"
    r = subprocess.run(
        [
            sys.executable,
            str(BOOTSTRAP),
            "--settings",
            str(tmp / "bootstrap.json"),
            "render",
            "--template",
            str(tmp / "node.toml.in"),
            "--config",
            str(out),
            "--values",
            str(tmp / "values.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return out


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "config", "validate", str(path)],
        capture_output=True,
        text=True,
        env=relay_env(),
        timeout=60,
    )


# -- the templates and main.tf agree ---------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "template", "values"),
    [
        ("relay_toml", "relay.toml.tftpl", lambda tmp: relay_toml_vars(tmp)),
        ("user_data", "cloud-init.yaml.tftpl", lambda tmp: cloud_init_vars("")),
    ],
)
def test_main_tf_passes_each_template_exactly_its_variables(
    tmp_path: Path, local: str, template: str, values: Any
) -> None:
    path, keys = templatefile_call(M.locals[local])
    assert path == f"templates/{template}"
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    assert referenced_variables(text) == set(keys)
    assert set(values(tmp_path)) == set(keys)


def test_the_bootstrap_settings_mirror_main_tf() -> None:
    settings = M.locals["bootstrap_settings"]
    assert set(settings) == set(bootstrap_settings())
    # The certificate relay-bootstrap makes is the one the config names.
    assert ref(settings["tls_cert"]) == "local.tls_cert_path"
    assert ref(settings["tls_key"]) == "local.tls_key_path"
    assert "tls_cert_path = local.tls_cert_path" in M.locals["relay_toml"]
    assert "tls_key_path = local.tls_key_path" in M.locals["relay_toml"]
    secrets = ref(settings["secrets"])
    for name, quote, optional in (
        ("REDIS_AUTH_TOKEN", "url", "false"),
        ("ADMIN_TOKEN", "none", "false"),
        ("MESH_SECRET", "none", "false"),
        ("AUTH_HS256_SECRET", "none", "false"),
    ):
        assert re.search(
            rf'{name} = \{{region = local.aws_region, parameter = [^,]+, quote = "{quote}", '
            rf"optional = {optional}\}}",
            secrets,
        ), name
    assert re.search(r'quote = "url", optional = true\}', secrets)  # the peers
    assert ref(M.locals["peer_placeholder"]) == (
        "{for p in var.peers : p.name => "
        '"PEER_${upper(replace(p.name, "-", "_"))}_REDIS_AUTH_TOKEN"}'
    )


# -- cloud-init ------------------------------------------------------------------------------


def test_cloud_init_is_yaml_that_installs_and_runs_relay(tmp_path: Path) -> None:
    relay_toml = render((TEMPLATES / "relay.toml.tftpl").read_text(), relay_toml_vars(tmp_path))
    pem = es256_public_pem()
    user_data = render(
        (TEMPLATES / "cloud-init.yaml.tftpl").read_text(),
        cloud_init_vars(relay_toml, es256_pem=pem),
    )
    assert user_data.startswith("#cloud-config\n")
    doc = yaml.safe_load(user_data)
    assert {"python3.11", "openssl"} <= set(doc["packages"])
    files = write_files(doc)
    # Each file arrives byte for byte as rendered.
    assert files["/etc/relay/node.toml.in"]["content"] == relay_toml
    assert files["/etc/relay/node.toml.in"]["permissions"] == "0600"
    assert files["/usr/local/sbin/relay-bootstrap"]["content"] == BOOTSTRAP.read_text()
    assert files["/usr/local/sbin/relay-bootstrap"]["permissions"] == "0755"
    assert files["/etc/systemd/system/relay.service"]["content"] == SERVICE.read_text()
    assert files[M.locals["es256_key_path"]]["content"] == pem
    assert json.loads(files["/etc/relay/bootstrap.json"]["content"]) == bootstrap_settings()
    assert doc["runcmd"] == [
        ["/usr/local/sbin/relay-bootstrap", "install"],
        ["systemctl", "enable", "--now", "relay.service"],
    ]
    # EC2 takes at most 16 KiB of user data; the launch template sends it gzipped.
    assert len(gzip.compress(user_data.encode())) < 16384 // 2


def test_cloud_init_without_es256_writes_no_key_file(tmp_path: Path) -> None:
    relay_toml = render(
        (TEMPLATES / "relay.toml.tftpl").read_text(), relay_toml_vars(tmp_path, es256=False)
    )
    doc = yaml.safe_load(
        render((TEMPLATES / "cloud-init.yaml.tftpl").read_text(), cloud_init_vars(relay_toml))
    )
    assert set(write_files(doc)) == {
        "/etc/relay/bootstrap.json",
        "/etc/relay/node.toml.in",
        "/usr/local/sbin/relay-bootstrap",
        "/etc/systemd/system/relay.service",
    }


def test_relay_runs_under_systemd_with_its_data_on_the_instance_disk() -> None:
    unit = SERVICE.read_text()
    assert "ExecStart=/opt/relay/bin/relay serve --config /etc/relay/node.toml\n" in unit
    assert "ExecStartPre=+/usr/local/sbin/relay-bootstrap render\n" in unit
    assert "StateDirectory=relay\n" in unit  # /var/lib/relay, on the root volume
    assert M.locals["data_dir"] == "/var/lib/relay"
    assert "RestartPreventExitStatus=78\n" in unit
    assert "User=relay\n" in unit


# -- the relay config ------------------------------------------------------------------------


def test_the_rendered_config_passes_relay_config_validate(tmp_path: Path) -> None:
    relay_toml = render((TEMPLATES / "relay.toml.tftpl").read_text(), relay_toml_vars(tmp_path))
    doc = yaml.safe_load(
        render((TEMPLATES / "cloud-init.yaml.tftpl").read_text(), cloud_init_vars(relay_toml))
    )
    files = write_files(doc)
    path = bootstrap_render(
        tmp_path,
        files["/etc/relay/node.toml.in"]["content"],
        files["/etc/relay/bootstrap.json"]["content"],
        VALUES,
    )
    r = validate(path)
    assert r.returncode == 0, r.stdout + r.stderr

    cfg = tomllib.loads(path.read_text())
    assert cfg["node"]["id"] == "sg/i-0123456789abcdef0"
    assert cfg["client"]["allow_anonymous"] is False
    assert cfg["client"]["tls_cert"] and cfg["client"]["tls_key"]
    assert cfg["auth"]["hs256_secret"] == VALUES["AUTH_HS256_SECRET"]
    assert cfg["auth"]["es256_public_key"].endswith("jwt-es256.pem")
    assert cfg["admin"]["host"] == "0.0.0.0"
    assert cfg["admin"]["token"] == VALUES["ADMIN_TOKEN"]  # TOML-escaped and back
    assert cfg["cluster"]["mesh_secret"] == VALUES["MESH_SECRET"]
    cluster = cfg["cluster"]
    assert (cluster["mesh_host"], cluster["mesh_port"]) == ("0.0.0.0", 7402)
    assert cluster["advertise_host"] == VALUES["PRIVATE_IP"]

    url = urllib.parse.urlsplit(cluster["redis_url"])
    assert (url.scheme, url.hostname, url.port) == ("rediss", REDIS_HOST, 6379)
    assert urllib.parse.unquote(url.password or "") == VALUES["REDIS_AUTH_TOKEN"]
    # One peer line per region whose token could be read; us-east's SSM was unreachable.
    (peer,) = cluster["peers"]
    name, _, peer_url = peer.partition("=")
    assert name == "fra"
    parsed = urllib.parse.urlsplit(peer_url)
    assert (parsed.scheme, parsed.hostname) == ("rediss", PEERS[0]["redis_host"])
    assert urllib.parse.unquote(parsed.password or "") == VALUES["PEER_FRA_REDIS_AUTH_TOKEN"]

    # The same file through relay's own loader: the typed values relay will run with.
    config = load_config(path, {})
    assert config.node.region == "sg"
    assert config.client.port == 7400 and config.client.tls_enabled
    assert config.client.allowed_origins == ("https://chat.example.com", "https://*.example.com")
    assert config.admin.port == 7401
    assert config.cluster.peers == (peer,)


def test_redis_py_reads_the_token_back_from_the_url(tmp_path: Path) -> None:
    from redis.connection import parse_url

    relay_toml = render((TEMPLATES / "relay.toml.tftpl").read_text(), relay_toml_vars(tmp_path))
    path = bootstrap_render(
        tmp_path, relay_toml, cloud_init_vars(relay_toml)["bootstrap_json"], VALUES
    )
    cluster = tomllib.loads(path.read_text())["cluster"]
    assert parse_url(cluster["redis_url"])["password"] == VALUES["REDIS_AUTH_TOKEN"]
    peer_url = cluster["peers"][0].partition("=")[2]
    assert parse_url(peer_url)["password"] == VALUES["PEER_FRA_REDIS_AUTH_TOKEN"]


def test_an_es256_only_region_without_peers_validates(tmp_path: Path) -> None:
    variables = {**relay_toml_vars(tmp_path, hs256=False), "peers": [], "allowed_origins": []}
    relay_toml = render((TEMPLATES / "relay.toml.tftpl").read_text(), variables)
    settings = cloud_init_vars(relay_toml, hs256=False)["bootstrap_json"]
    values = {k: v for k, v in VALUES.items() if k != "AUTH_HS256_SECRET"}
    path = bootstrap_render(tmp_path, relay_toml, settings, values)
    r = validate(path)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = tomllib.loads(path.read_text())
    assert "hs256_secret" not in cfg["auth"]
    assert cfg["cluster"]["peers"] == []


def test_a_missing_required_secret_stops_the_start(tmp_path: Path) -> None:
    relay_toml = render((TEMPLATES / "relay.toml.tftpl").read_text(), relay_toml_vars(tmp_path))
    settings = cloud_init_vars(relay_toml)["bootstrap_json"]
    (tmp_path / "node.toml.in").write_text(relay_toml)
    (tmp_path / "bootstrap.json").write_text(settings)
    values = {k: v for k, v in VALUES.items() if k != "REDIS_AUTH_TOKEN"}
    (tmp_path / "values.json").write_text(json.dumps(values))
    r = subprocess.run(
        [
            sys.executable,
            str(BOOTSTRAP),
            "--settings",
            str(tmp_path / "bootstrap.json"),
            "render",
            "--template",
            str(tmp_path / "node.toml.in"),
            "--config",
            str(tmp_path / "node.toml"),
            "--values",
            str(tmp_path / "values.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "no value for __REDIS_AUTH_TOKEN__" in r.stderr
    assert not (tmp_path / "node.toml").exists()


def test_the_template_names_only_placeholders_the_bootstrap_knows(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("relay_bootstrap", BOOTSTRAP)
    assert spec and spec.loader
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    relay_toml = render((TEMPLATES / "relay.toml.tftpl").read_text(), relay_toml_vars(tmp_path))
    code = "".join(line for line in relay_toml.splitlines(True) if not line.startswith("#"))
    names = set(bootstrap.PLACEHOLDER.findall(code))
    assert set(bootstrap.INSTANCE_VALUES) == {"INSTANCE_NAME", "PRIVATE_IP"}
    assert names == set(bootstrap.INSTANCE_VALUES) | set(bootstrap_settings()["secrets"])


# -- the renderer itself ---------------------------------------------------------------------


def test_the_renderer_trims_like_hcl() -> None:
    text = "a\n%{~ if on }\n  b: ${x}\n%{~ endif }\nc\n%{ for v in vs ~}\n[${v}]\n%{ endfor ~}\nd"
    assert render(text, {"on": True, "x": 1, "vs": ["p", "q"]}) == "a\n  b: 1\nc\n[p]\n[q]\nd"
    assert render(text, {"on": False, "x": 1, "vs": []}) == "a\nc\nd"
    assert render("${indent(2, s)}", {"s": "x\ny\n"}) == "x\n  y\n  "
    assert render("${jsonencode(v)}", {"v": {"b": "<&>", "a": [1]}}) == (
        '{"a":[1],"b":"\\u003c\\u0026\\u003e"}'
    )
    assert render("$${x} %%{y}", {}) == "${x} %{y}"


@pytest.mark.parametrize("text", ["${upper(x)}", "${x[0]}", "%{ unknown }", "${x"])
def test_the_renderer_refuses_what_it_does_not_know(text: str) -> None:
    with pytest.raises(TemplateError):
        render(text, {"x": "a"})


def test_split_top_level() -> None:
    assert split_top_level('a = f(1, 2), b = "x,y", c = {d = [1, 2]}') == [
        "a = f(1, 2)",
        'b = "x,y"',
        "c = {d = [1, 2]}",
    ]
