"""relay.config: defaults, the TOML file, environment overrides, and problem reports."""

from __future__ import annotations

import dataclasses
import pickle
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import (
    AdminConfig,
    AuthConfig,
    ClientConfig,
    ClusterConfig,
    Config,
    ConfigError,
    NodeConfig,
    StoreConfig,
    dump_default_toml,
    env_var_name,
    load_config,
)
from relay.errors import RelayError


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path | None, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    return info.value.problems


# --- defaults ---------------------------------------------------------------------------


def test_defaults_match_the_schema_table() -> None:
    config = load_config(None, {})
    assert config == Config()
    assert config.validate() == []
    assert config.node.id == "local/n1"
    assert config.node.region == "local"
    assert config.node.data_dir == "./data"
    c = config.client
    assert (c.host, c.port, c.allow_anonymous, c.allowed_origins) == ("127.0.0.1", 7400, False, ())
    assert (c.max_body, c.max_frame, c.burst, c.max_outbound_bytes) == (
        65536,
        1048576,
        2000,
        4194304,
    )
    assert (c.rate_per_s, c.ping_interval_s, c.ping_timeout_s, c.handshake_timeout_s) == (
        1000.0,
        20.0,
        10.0,
        10.0,
    )
    assert (c.tls_cert, c.tls_key, c.tls_enabled) == ("", "", False)
    assert (config.auth.hs256_secret, config.auth.es256_public_key) == ("", "")
    assert (config.admin.host, config.admin.port, config.admin.token) == ("127.0.0.1", 7401, "")
    assert config.store == StoreConfig(
        default_ttl_s=604800,
        max_ttl_s=2592000,
        channel_max_messages=10000,
        channel_max_bytes=16777216,
        dedupe_window_s=600,
        dedupe_max_ids=4000000,
        memory_high_watermark_bytes=0,
    )


def test_config_is_frozen_and_hashable() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.client.port = 1  # type: ignore[misc]
    assert hash(config) == hash(Config())


def schema_table() -> dict[str, str]:
    """``section.key`` -> default, as written in the table of docs/ARCHITECTURE.md."""
    doc = Path(__file__).parents[3] / "docs" / "ARCHITECTURE.md"
    table = doc.read_text(encoding="utf-8").split("## Configuration schema", 1)[1]
    rows: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            for name in re.findall(r"`(\w+\.\w+)`", cells[0]):
                rows[name] = cells[2].strip("`")
    return rows


def test_fields_and_defaults_are_the_schema_table() -> None:
    table = schema_table()
    defaults = Config()
    fields = {
        f"{s.name}.{f.name}": getattr(getattr(defaults, s.name), f.name)
        for s in dataclasses.fields(Config)
        for f in dataclasses.fields(getattr(defaults, s.name))
    }
    assert list(fields) == list(table)
    for name, written in table.items():
        value = fields[name]
        if isinstance(value, str) and written != '""':
            assert value == written, name
        else:
            parsed = tomllib.loads(f"v = {written}")["v"]
            assert value == (tuple(parsed) if isinstance(parsed, list) else parsed), name
            assert type(value) is not bool or type(parsed) is bool, name


# --- the file ---------------------------------------------------------------------------


def test_file_values_of_every_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[node]
id = "sg/n2"
data_dir = "/var/lib/relay"

[client]
host = "0.0.0.0"
port = 7500
allow_anonymous = true
allowed_origins = ["https://*.example.com", "https://example.org"]
rate_per_s = 50          # an int is fine for a float key
ping_interval_s = 2.5

[store]
default_ttl_s = 3600
""",
    )
    config = load_config(path, {})
    assert config.node == NodeConfig(id="sg/n2", data_dir="/var/lib/relay")
    assert config.node.region == "sg"
    assert config.client.host == "0.0.0.0"
    assert config.client.port == 7500
    assert config.client.allow_anonymous is True
    assert config.client.allowed_origins == ("https://*.example.com", "https://example.org")
    assert config.client.rate_per_s == 50.0
    assert isinstance(config.client.rate_per_s, float)
    assert config.client.ping_interval_s == 2.5
    assert config.store.default_ttl_s == 3600
    # Untouched keys keep their defaults.
    assert config.client.burst == 2000
    assert config.admin == Config().admin


def test_path_may_be_a_str_or_a_pathlike(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nid = "fra/a"\n')
    assert load_config(str(path), {}).node.id == "fra/a"
    assert load_config(path, {}).node.id == "fra/a"


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), {}) == Config()


# --- the environment --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "raw", "section", "key", "expected"),
    [
        ("RELAY_NODE__ID", "iad/n7", "node", "id", "iad/n7"),
        ("RELAY_NODE__ID", '"iad/n7"', "node", "id", "iad/n7"),  # a quoted TOML string
        ("RELAY_NODE__DATA_DIR", "/tmp/relay data", "node", "data_dir", "/tmp/relay data"),
        ("RELAY_CLIENT__PORT", "7500", "client", "port", 7500),
        ("RELAY_CLIENT__ALLOW_ANONYMOUS", "true", "client", "allow_anonymous", True),
        ("RELAY_CLIENT__ALLOW_ANONYMOUS", "false", "client", "allow_anonymous", False),
        ("RELAY_CLIENT__RATE_PER_S", "1.5", "client", "rate_per_s", 1.5),
        ("RELAY_CLIENT__RATE_PER_S", "12", "client", "rate_per_s", 12.0),
        (
            "RELAY_CLIENT__ALLOWED_ORIGINS",
            '["https://a.example", "https://b.example"]',
            "client",
            "allowed_origins",
            ("https://a.example", "https://b.example"),
        ),
        ("RELAY_CLIENT__ALLOWED_ORIGINS", "[]", "client", "allowed_origins", ()),
        ("RELAY_STORE__DEDUPE_MAX_IDS", "1_000", "store", "dedupe_max_ids", 1000),
        # String keys keep the raw text: a numeric or boolean-looking secret stays a string.
        ("RELAY_AUTH__HS256_SECRET", "1" * 32, "auth", "hs256_secret", "1" * 32),
        ("RELAY_ADMIN__TOKEN", "true", "admin", "token", "true"),
        (
            "RELAY_ADMIN__TOKEN",
            "s3cr3t # not a comment",
            "admin",
            "token",
            "s3cr3t # not a comment",
        ),
    ],
)
def test_env_override_of_each_type(
    var: str, raw: str, section: str, key: str, expected: object
) -> None:
    config = load_config(None, {var: raw})
    value = getattr(getattr(config, section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_env_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[client]\nport = 7500\nburst = 10\n")
    config = load_config(path, {"RELAY_CLIENT__PORT": "7600"})
    assert config.client.port == 7600
    assert config.client.burst == 10


def test_env_beats_a_bad_file_value(tmp_path: Path) -> None:
    path = write(tmp_path, '[client]\nport = "abc"\n')
    assert load_config(path, {"RELAY_CLIENT__PORT": "7600"}).client.port == 7600


def test_unrelated_env_vars_are_ignored() -> None:
    environ = {"PATH": "/bin", "RELAY_CONFIG": "/etc/relay.toml", "RELAYX__A": "1"}
    assert load_config(None, environ) == Config()


def test_env_var_name() -> None:
    assert env_var_name("client", "max_body") == "RELAY_CLIENT__MAX_BODY"


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00")))
def test_any_text_is_a_valid_token(raw: str) -> None:
    token = load_config(None, {"RELAY_ADMIN__TOKEN": raw}).admin.token
    assert isinstance(token, str)
    try:
        quoted = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        quoted = {}
    if not (list(quoted) == ["v"] and isinstance(quoted["v"], str)):
        assert token == raw


# --- problems ---------------------------------------------------------------------------


def test_type_and_range_problems_name_key_value_and_source(tmp_path: Path) -> None:
    path = write(tmp_path, '[client]\nport = "abc"\n')
    assert problems_of(path) == [f'client.port: must be an integer 0..65535, got "abc" (in {path})']
    assert problems_of(None, {"RELAY_CLIENT__PORT": "abc"}) == [
        'client.port: must be an integer 0..65535, got "abc" (from RELAY_CLIENT__PORT)'
    ]
    assert problems_of(None, {"RELAY_ADMIN__PORT": "70000"}) == [
        "admin.port: must be an integer 0..65535, got 70000 (from RELAY_ADMIN__PORT)"
    ]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[client]\nport = true", "client.port: must be an integer 0..65535, got true"),
        ("[client]\nburst = 1.0", "client.burst: must be an integer >= 1, got 1.0"),
        ("[client]\nburst = 0", "client.burst: must be an integer >= 1, got 0"),
        ("[client]\nrate_per_s = true", "client.rate_per_s: must be a number > 0, got true"),
        ("[client]\nrate_per_s = 0", "client.rate_per_s: must be a number > 0, got 0.0"),
        ("[client]\nrate_per_s = nan", "client.rate_per_s: must be a number > 0, got nan"),
        ("[client]\nping_interval_s = -1", "client.ping_interval_s: must be a number >= 0"),
        ("[client]\nping_timeout_s = inf", "client.ping_timeout_s: must be a number > 0"),
        ("[client]\nallow_anonymous = 1", "client.allow_anonymous: must be true or false"),
        ('[client]\nallow_anonymous = "yes"', "client.allow_anonymous: must be true or false"),
        ('[client]\nallowed_origins = "https://a"', "client.allowed_origins: must be a list"),
        ('[client]\nallowed_origins = ["a", 1]', 'got ["a", 1]'),
        ('[client]\nallowed_origins = [""]', "client.allowed_origins: must be a list of non-empty"),
        ('[client]\nhost = ""', 'client.host: must be a non-empty string, got ""'),
        ("[node]\nid = 7", "node.id: must be a string, got 7"),
        ('[node]\ndata_dir = ""', "node.data_dir: must be a non-empty path"),
        ("[store]\nmemory_high_watermark_bytes = -1", "must be an integer >= 0, got -1"),
        ("[admin]\ntoken = {a = 1}", "admin.token: must be a string, got a table {a = 1}"),
    ],
)
def test_wrong_types_and_ranges(tmp_path: Path, toml: str, expected: str) -> None:
    path = write(tmp_path, toml)
    (problem,) = problems_of(path)
    assert expected in problem
    assert problem.endswith(f"(in {path})")


def test_bool_is_not_an_int_from_env_either() -> None:
    (problem,) = problems_of(None, {"RELAY_CLIENT__BURST": "true"})
    assert problem == "client.burst: must be an integer >= 1, got true (from RELAY_CLIENT__BURST)"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[node]
id = "SG/n1"

[client]
prot = 7400
port = -1
max_body = 2000000
tls_cert = "missing.pem"

[clinet]
port = 1
""",
    )
    environ = {"RELAY_STORE__DEFAULT_TTL_S": "99999999", "RELAY_ADMIN__PORT": "x"}
    problems = problems_of(path, environ)
    assert len(problems) == 9, problems
    joined = "\n".join(problems)
    for expected in [
        "clinet: unknown section, did you mean client?",
        "client.prot: unknown key, did you mean client.port?",
        "client.port: must be an integer 0..65535, got -1",
        'node.id: must be "region/name"',
        "client.tls_cert: is set but client.tls_key is not",
        'client.tls_cert: no such file "missing.pem"',
        "client.max_body: must not exceed client.max_frame (1048576), got 2000000",
        "store.default_ttl_s: must not exceed store.max_ttl_s (2592000), got 99999999"
        " (from RELAY_STORE__DEFAULT_TTL_S)",
        'admin.port: must be an integer 0..65535, got "x" (from RELAY_ADMIN__PORT)',
    ]:
        assert expected in joined
    file_problems = [p for p in problems if "RELAY_" not in p]
    assert all(p.endswith(f"(in {path})") for p in file_problems)


def test_config_error_is_a_relay_error_and_reads_well() -> None:
    with pytest.raises(RelayError) as info:
        load_config(None, {"RELAY_CLIENT__PORT": "x", "RELAY_ADMIN__PORT": "y"})
    err = info.value
    assert isinstance(err, ConfigError)
    text = str(err)
    assert text.startswith("2 problems in the configuration:\n  ")
    assert all(p in text for p in err.problems)
    copy = pickle.loads(pickle.dumps(err))
    assert copy.problems == err.problems


# --- unknown names ----------------------------------------------------------------------


def test_unknown_key_in_file_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "[store]\ndefault_ttl = 5\n")
    assert problems_of(path) == [
        f"store.default_ttl: unknown key, did you mean store.default_ttl_s? (in {path})"
    ]


def test_unknown_key_far_from_any_gets_no_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[store]\nzzz = 5\n")
    assert problems_of(path) == [f"store.zzz: unknown key (in {path})"]


def test_key_in_the_wrong_section_names_its_section(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 1\n[node]\ntoken = 'x'\n")
    problems = problems_of(path)
    assert problems == [
        f"port: unknown section, port is a key of [client] or [admin]: put it under that table"
        f" (in {path})",
        f"node.token: unknown key, token is a key of [admin] (in {path})",
    ]


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "client = 5\n")
    assert problems_of(path) == [f"client: must be a table [client], got 5 (in {path})"]


def test_unknown_env_key_suggests_the_variable() -> None:
    assert problems_of(None, {"RELAY_CLIENT__MAX_BODDY": "1"}) == [
        "client.max_boddy: unknown key, did you mean RELAY_CLIENT__MAX_BODY?"
        " (from RELAY_CLIENT__MAX_BODDY)"
    ]
    assert problems_of(None, {"RELAY_CLEINT__PORT": "1"}) == [
        "cleint.port: unknown section, did you mean RELAY_CLIENT__PORT? (from RELAY_CLEINT__PORT)"
    ]
    assert problems_of(None, {"RELAY_CLIENT__TLS__CERT": "x"}) == [
        "client.tls__cert: unknown key, did you mean RELAY_CLIENT__TLS_CERT?"
        " (from RELAY_CLIENT__TLS__CERT)"
    ]


def test_lower_case_env_var_is_refused_with_its_spelling() -> None:
    assert problems_of(None, {"RELAY_client__port": "1"}) == [
        "client.port: the variable must be upper case, did you mean RELAY_CLIENT__PORT?"
        " (from RELAY_client__port)"
    ]


# --- unreadable files -------------------------------------------------------------------


def test_bad_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[client]\nport = 7400\nhost = "unterminated\n')
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: not valid TOML: ")
    assert "line 3" in problem


def test_bad_toml_still_reports_env_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "[client\n")
    problems = problems_of(path, {"RELAY_CLIENT__PORT": "x"})
    assert len(problems) == 2
    assert "line 1" in problems[0]
    assert problems[1].startswith("client.port: must be an integer")


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(b'[node]\nid = "a/b"\n# \xff\n')
    assert problems_of(path) == [f"{path}: not valid TOML: not UTF-8 (at line 3)"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert problems_of(path) == [f"{path}: no such file"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path)
    assert problem.startswith(f"{tmp_path}: cannot read: ")


# --- TLS and key files ------------------------------------------------------------------


def test_tls_needs_both_cert_and_key(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert", "cert.pem")
    key = write(tmp_path, "key", "key.pem")
    assert problems_of(None, {"RELAY_CLIENT__TLS_CERT": str(cert)}) == [
        "client.tls_cert: is set but client.tls_key is not (from RELAY_CLIENT__TLS_CERT)"
    ]
    assert problems_of(None, {"RELAY_CLIENT__TLS_KEY": str(key)}) == [
        "client.tls_key: is set but client.tls_cert is not (from RELAY_CLIENT__TLS_KEY)"
    ]
    config = load_config(
        None, {"RELAY_CLIENT__TLS_CERT": str(cert), "RELAY_CLIENT__TLS_KEY": str(key)}
    )
    assert config.client.tls_enabled
    assert config.client.tls_cert == str(cert)


def test_named_files_must_exist(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[client]
tls_cert = "{tmp_path / "no-cert.pem"}"
tls_key = "{tmp_path}"

[auth]
es256_public_key = "{tmp_path / "no-key.pem"}"
""",
    )
    assert problems_of(path) == [
        f'client.tls_cert: no such file "{tmp_path / "no-cert.pem"}" (in {path})',
        f'client.tls_key: not a regular file "{tmp_path}" (in {path})',
        f'auth.es256_public_key: no such file "{tmp_path / "no-key.pem"}" (in {path})',
    ]


def test_existing_es256_key_is_accepted(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    text = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    pem = write(tmp_path, text, "es256.pem")
    config = load_config(None, {"RELAY_AUTH__ES256_PUBLIC_KEY": str(pem)})
    assert config.auth.es256_public_key == str(pem)


def test_token_keys_are_checked_as_the_verifier_loads_them(tmp_path: Path) -> None:
    pem = write(tmp_path, "-----BEGIN PUBLIC KEY-----\n", "es256.pem")
    env = {"RELAY_AUTH__ES256_PUBLIC_KEY": str(pem), "RELAY_AUTH__HS256_SECRET": "short"}
    hs, es = problems_of(None, env)
    assert hs.startswith("auth.hs256_secret: must be at least 32 bytes")
    assert es.startswith("auth.es256_public_key: ")


def test_tls_enabled_property() -> None:
    assert not ClientConfig(tls_cert="a.pem").tls_enabled
    assert ClientConfig(tls_cert="a.pem", tls_key="b.pem").tls_enabled


# --- node.id ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "node_id", ["sg/n1", "us-east-1/node-02", "0/0", "a" * 32 + "/" + "b" * 32]
)
def test_good_node_ids(node_id: str) -> None:
    config = load_config(None, {"RELAY_NODE__ID": node_id})
    assert config.node.id == node_id
    assert config.node.region == node_id.split("/")[0]


@pytest.mark.parametrize(
    "node_id",
    [
        "",
        "sg",
        "sg/",
        "/n1",
        "sg/n1/x",
        "SG/n1",
        "sg/N1",
        "-sg/n1",
        "sg/-n1",
        "sg/n_1",
        "sg /n1",
        "a" * 33 + "/n1",
        "sg/n1\n",
    ],
)
def test_bad_node_ids(node_id: str) -> None:
    (problem,) = Config(node=NodeConfig(id=node_id)).validate()
    assert problem.startswith('node.id: must be "region/name"')


# --- validate() on a built Config -------------------------------------------------------


def test_validate_checks_types_of_a_built_config() -> None:
    bad = ClientConfig(port="7400", allowed_origins=["ok"])  # type: ignore[arg-type]
    assert Config(client=bad).validate() == ['client.port: must be an integer 0..65535, got "7400"']


def test_validate_accepts_an_int_for_a_float() -> None:
    assert Config(client=ClientConfig(rate_per_s=5)).validate() == []


def test_cross_field_checks() -> None:
    problems = Config(
        client=ClientConfig(max_body=10, max_frame=5),
        store=StoreConfig(default_ttl_s=20, max_ttl_s=10),
    ).validate()
    assert problems == [
        "client.max_body: must not exceed client.max_frame (5), got 10",
        "store.default_ttl_s: must not exceed store.max_ttl_s (10), got 20",
    ]


def test_cross_field_problem_names_both_sources(tmp_path: Path) -> None:
    path = write(tmp_path, "[store]\nmax_ttl_s = 10\n")
    assert problems_of(path, {"RELAY_STORE__DEFAULT_TTL_S": "20"}) == [
        "store.default_ttl_s: must not exceed store.max_ttl_s (10), got 20"
        f" (store.default_ttl_s from RELAY_STORE__DEFAULT_TTL_S, store.max_ttl_s in {path})"
    ]


def test_admin_and_client_ports_must_differ() -> None:
    (problem,) = Config(client=ClientConfig(port=7000), admin=AdminConfig(port=7000)).validate()
    assert problem == "admin.port: is the same as client.port (7000) on an overlapping address"
    # Port 0 picks a free port for each: no clash.
    assert Config(client=ClientConfig(port=0), admin=AdminConfig(port=0)).validate() == []
    # Different addresses may share a port.
    assert Config(admin=AdminConfig(host="127.0.0.2", port=7400)).validate() == []


def test_admin_token_required_off_loopback() -> None:
    (problem,) = problems_of(None, {"RELAY_ADMIN__HOST": "0.0.0.0"})
    assert problem == (
        'admin.token: must be set when admin.host is not a loopback address ("0.0.0.0")'
        " (from RELAY_ADMIN__HOST)"
    )
    config = load_config(None, {"RELAY_ADMIN__HOST": "0.0.0.0", "RELAY_ADMIN__TOKEN": "t"})
    assert config.admin.token == "t"
    for host in ("localhost", "127.0.0.2", "::1"):
        assert load_config(None, {"RELAY_ADMIN__HOST": host}).admin.host == host


@pytest.mark.parametrize("host", ["127.evil.example", "127.0.0.1.nip.io", "0.0.0.0", "10.0.0.5"])
def test_a_name_that_starts_with_127_is_not_loopback(host: str) -> None:
    (problem,) = problems_of(None, {"RELAY_ADMIN__HOST": host})
    assert problem.startswith("admin.token: must be set when admin.host is not a loopback")


def test_mesh_secret_required_off_loopback() -> None:
    env = {"RELAY_CLUSTER__REDIS_URL": "redis://r:6379/0", "RELAY_CLUSTER__MESH_HOST": "0.0.0.0"}
    (problem,) = problems_of(None, env)
    assert problem.startswith(
        "cluster.mesh_secret: must be set when cluster.mesh_host is not a loopback address"
        ' ("0.0.0.0")'
    )
    secret = "k" * 32
    assert load_config(None, {**env, "RELAY_CLUSTER__MESH_SECRET": secret}).cluster.mesh_secret
    (short,) = problems_of(None, {**env, "RELAY_CLUSTER__MESH_SECRET": "short"})
    assert short.startswith("cluster.mesh_secret: must be at least 32 characters, got 5")
    # Loopback, or a standalone node (no mesh at all), needs none.
    assert load_config(None, {**env, "RELAY_CLUSTER__MESH_HOST": "::1"})
    assert load_config(None, {"RELAY_CLUSTER__MESH_HOST": "0.0.0.0"})


def test_redis_url_needs_a_redis_scheme() -> None:
    for url in ("redis://r:6379/0", "rediss://r:6380", "unix:///tmp/r.sock", ""):
        assert Config(cluster=ClusterConfig(redis_url=url)).validate() == [], url
    for url in ("http://r:6379", "r:6379", "localhost"):
        (problem,) = Config(cluster=ClusterConfig(redis_url=url)).validate()
        assert problem.startswith("cluster.redis_url: must be a redis://, rediss:// or unix://")


def test_lease_ttl_must_be_above_its_renewal() -> None:
    for ttl, renew in ((1000, 1000), (500, 1000)):
        (problem,) = Config(
            cluster=ClusterConfig(lease_ttl_ms=ttl, lease_renew_ms=renew)
        ).validate()
        assert problem.startswith(
            f"cluster.lease_ttl_ms: must be above cluster.lease_renew_ms ({renew}), got {ttl}"
        )
    assert Config(cluster=ClusterConfig(lease_ttl_ms=1001, lease_renew_ms=1000)).validate() == []


def test_warning_when_no_client_can_authenticate() -> None:
    (warning,) = Config().warnings()
    assert warning.startswith("no client can connect")
    assert Config(client=ClientConfig(allow_anonymous=True)).warnings() == []
    assert Config(auth=AuthConfig(hs256_secret="x" * 32)).warnings() == []
    assert Config(auth=AuthConfig(es256_public_key="k.pem")).warnings() == []


def test_one_problem_is_one_problem() -> None:
    assert str(ConfigError(["a: bad"])).startswith("1 problem in the configuration:")
    assert str(ConfigError(["a: bad", "b: bad"])).startswith("2 problems in")


# --- the default file -------------------------------------------------------------------


def test_default_toml_with_a_value(tmp_path: Path) -> None:
    path = write(tmp_path, dump_default_toml(hs256_secret="s" * 40))
    config = load_config(path, {})
    assert config.auth.hs256_secret == "s" * 40
    assert config.warnings() == []


def test_default_toml_round_trip(tmp_path: Path) -> None:
    text = dump_default_toml()
    path = write(tmp_path, text)
    assert load_config(path, {}) == Config()


def test_default_toml_has_every_key_with_a_comment() -> None:
    seen: list[str] = []
    section = ""
    lines = dump_default_toml().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key = line.split(" = ")[0]
            seen.append(f"{section}.{key}")
            assert lines[i - 1].startswith("# ")
            assert env_var_name(section, key) in lines[i - 1]
    defaults = Config()
    assert seen == [
        f"{s.name}.{f.name}"
        for s in dataclasses.fields(Config)
        for f in dataclasses.fields(getattr(defaults, s.name))
    ]


def test_link_window_bounds_must_hold_together() -> None:
    problems = Config(
        cluster=ClusterConfig(
            link_window_min_entries=500,
            link_window_max_entries=100,
            link_inflight_min=9,
            link_inflight_max=3,
            link_window_max_bytes=1 << 30,
        )
    ).validate()
    assert [p.split(":")[0] for p in problems] == [
        "cluster.link_window_min_entries",
        "cluster.link_inflight_min",
        "cluster.link_window_max_bytes",
    ]
    (problem,) = Config(cluster=ClusterConfig(link_window_ms=0)).validate()
    assert problem.startswith("cluster.link_window_ms: must be")
    # A window's wait is one blocking read of the log, which blocks 2 s at most.
    (problem,) = Config(cluster=ClusterConfig(link_window_ms=2001)).validate()
    assert problem.startswith("cluster.link_window_ms: must be")
    assert Config(cluster=ClusterConfig(link_window_ms=2000)).validate() == []
