"""The node's configuration: one TOML file, overridden key by key from the environment.

``load_config(path, os.environ)`` reads the file, applies every ``RELAY_<SECTION>__<KEY>``
variable, checks the result with :meth:`Config.validate` and either returns a frozen
:class:`Config` or raises :class:`ConfigError` listing *every* problem found, each naming
its key and where the value came from. The schema is the table in
``docs/ARCHITECTURE.md``; each field's type, range and comment live next to its default
below, so the checks and :func:`dump_default_toml` cannot drift apart.

Relative paths (``data_dir``, TLS and key files) are taken relative to the working
directory of the process, as a shell user would expect.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from relay.auth import key_problems
from relay.errors import RelayError
from relay.loopback import is_loopback
from relay.redact import redact_text
from relay.redisurl import check_url as check_redis_url

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "ClientConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "NodeConfig",
    "StoreConfig",
    "dump_default_toml",
    "env_var_name",
    "exposed_secrets",
    "load_config",
]

ENV_PREFIX: Final = "RELAY_"
# A link's log reads block at most this long (cluster/link.py: 4 × TAIL_BLOCK_MS), and a
# window's wait is one of them.
LINK_WINDOW_MS_MAX: Final = 2000
# Connections a link may spread a backlog over (cluster/window.py's bound too).
LINK_CONNECTIONS_MAX: Final = 16

_Kind = Literal["str", "path", "int", "float", "bool", "list[str]"]
_T = TypeVar("_T")


class ConfigError(RelayError):
    """The configuration cannot be used; ``problems`` lists every reason, one line each.

    The caller should print all of them and exit (``relay config validate`` exits 78).
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__(list(problems))
        self.problems: list[str] = list(problems)

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the configuration:"
        return "\n  ".join([head, *self.problems])


@dataclass(frozen=True, slots=True)
class _Rule:
    """What one key accepts, and the comment written above it in the default file."""

    kind: _Kind
    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed
    nonempty: bool = False

    def describe(self) -> str:
        """The expected value in words: the tail of ``must be …``."""
        if self.kind in ("int", "float"):
            words = "an integer" if self.kind == "int" else "a number"
            if self.lo is not None and self.hi is not None:
                return f"{words} {_num(self.lo)}..{_num(self.hi)}"
            if self.lo is not None:
                return f"{words} {'>' if self.lo_open else '>='} {_num(self.lo)}"
            return words
        if self.kind == "bool":
            return "true or false"
        if self.kind == "list[str]":
            return "a list of non-empty strings" if self.nonempty else "a list of strings"
        noun = "path" if self.kind == "path" else "string"
        return f"a non-empty {noun}" if self.nonempty else f"a {noun}"

    def accepts(self, value: object) -> bool:
        """Whether ``value`` has the right type and lies in range."""
        if self.kind in ("str", "path"):
            return isinstance(value, str) and (bool(value) or not self.nonempty)
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "list[str]":
            return isinstance(value, tuple | list) and all(
                isinstance(v, str) and (v or not self.nonempty) for v in value
            )
        # bool is an int subclass, but `port = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, int) and abs(value) > sys.float_info.max:
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi


def _opt(default: _T, kind: _Kind, doc: str, **limits: Any) -> _T:
    """A dataclass field with its rule attached (typed as its default for mypy)."""
    return field(default=default, metadata={"rule": _Rule(kind, doc, **limits)})


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_PORT: Final = {"lo": 0, "hi": 65535}
_POSITIVE: Final = {"lo": 1}


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """This relay process."""

    id: str = _opt(
        "local/n1", "str", 'the node\'s id "region/name"; the region is the part before "/"'
    )
    data_dir: str = _opt("./data", "path", "directory for slot snapshots", nonempty=True)
    snapshot_interval_s: float = _opt(
        2.0,
        "float",
        "how often changed slots are checked for writing to data_dir",
        lo=0,
        lo_open=True,
    )
    snapshot_max_age_s: float = _opt(
        10.0,
        "float",
        "a changed slot is written after its next checkpoint, or once its oldest"
        " unwritten change is this old, seconds (0 = every tick)",
        lo=0,
        hi=3600,
    )

    @property
    def region(self) -> str:
        """The region this node belongs to: the part of ``id`` before ``/``."""
        return self.id.partition("/")[0]


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """The WebSocket port chat clients connect to."""

    host: str = _opt("127.0.0.1", "str", "client (WebSocket) listen address", nonempty=True)
    port: int = _opt(7400, "int", "client port (0 = pick a free one)", **_PORT)
    allow_anonymous: bool = _opt(False, "bool", "accept clients without a token")
    allowed_origins: tuple[str, ...] = _opt(
        (),
        "list[str]",
        'allowed Origin headers ("*" patterns); empty = any',
        nonempty=True,
    )
    max_body: int = _opt(65536, "int", "largest message body, bytes", **_POSITIVE)
    max_frame: int = _opt(1048576, "int", "largest WebSocket frame/message, bytes", **_POSITIVE)
    rate_per_s: float = _opt(
        1000.0, "float", "sustained ops per second per connection", lo=0, lo_open=True
    )
    burst: int = _opt(2000, "int", "token-bucket size (ops)", **_POSITIVE)
    ping_interval_s: float = _opt(20.0, "float", "WebSocket auto-ping interval (0 = off)", lo=0)
    ping_timeout_s: float = _opt(
        10.0, "float", "close a peer that does not answer a ping in time", lo=0, lo_open=True
    )
    handshake_timeout_s: float = _opt(
        10.0,
        "float",
        "close a connection whose opening handshake takes longer",
        lo=0,
        lo_open=True,
    )
    max_outbound_bytes: int = _opt(
        4194304,
        "int",
        "per-connection send buffer; above it the client is cut off (slow consumer)",
        **_POSITIVE,
    )
    max_handshake_bytes: int = _opt(
        16384, "int", "largest opening handshake (request line and headers), bytes", lo=1024
    )
    hello_timeout_s: float = _opt(
        10.0,
        "float",
        "close a connection with no hello (nor an op other than ping) this long after opening",
        lo=0,
        lo_open=True,
    )
    max_connections: int = _opt(50000, "int", "open client connections per node", **_POSITIVE)
    max_connections_per_ip: int = _opt(
        0,
        "int",
        "open client connections from one IP address (0 = no cap; behind a load balancer "
        "every client has its address)",
        lo=0,
    )
    max_subscriptions_per_connection: int = _opt(
        1000, "int", "channels one connection may subscribe", **_POSITIVE
    )
    max_subscriptions: int = _opt(
        1000000, "int", "subscriptions of all connections of the node together", **_POSITIVE
    )
    tls_cert: str = _opt("", "path", "PEM certificate chain; set it and tls_key to serve wss://")
    tls_key: str = _opt("", "path", "PEM private key of tls_cert")

    @property
    def tls_enabled(self) -> bool:
        """Whether clients connect with ``wss://`` (both ``tls_cert`` and ``tls_key`` set)."""
        return bool(self.tls_cert and self.tls_key)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How client tokens (JWT) are verified."""

    hs256_secret: str = _opt("", "str", "shared secret for HS256 tokens")
    es256_public_key: str = _opt("", "path", "PEM public key file for ES256 tokens")
    leeway_s: float = _opt(
        0.0,
        "float",
        "clock skew allowed on a token's exp and nbf; its session ends at exp plus this",
        lo=0,
        hi=300,
    )


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The private admin HTTP port: /metrics, /status."""

    host: str = _opt("127.0.0.1", "str", "admin HTTP address", nonempty=True)
    port: int = _opt(7401, "int", "admin HTTP port (0 = pick a free one)", **_PORT)
    token: str = _opt(
        "",
        "str",
        "bearer token required by the admin port; must be set unless host is loopback",
    )


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Pending messages kept in RAM."""

    default_ttl_s: int = _opt(604800, "int", "TTL of a message that names none", **_POSITIVE)
    max_ttl_s: int = _opt(2592000, "int", "largest ttl_s a client may ask for", **_POSITIVE)
    channel_max_messages: int = _opt(
        10000, "int", "per-channel cap on pending messages", **_POSITIVE
    )
    channel_max_bytes: int = _opt(16777216, "int", "per-channel cap on pending bytes", **_POSITIVE)
    dedupe_window_s: int = _opt(600, "int", "idempotency window", **_POSITIVE)
    dedupe_max_ids: int = _opt(
        4000000,
        "int",
        "bound on remembered ids (oldest forgotten first, counted)",
        **_POSITIVE,
    )
    memory_high_watermark_bytes: int = _opt(
        0, "int", "RSS above which pub is refused overloaded (0 = 80 % of RAM)", lo=0
    )


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The region: Redis, mesh, ring, slot logs (no redis_url: a standalone node)."""

    redis_url: str = _opt(
        "",
        "str",
        "the region's Redis: one server (redis://, rediss://, unix://) or a Redis Cluster "
        "(redis+cluster://host:port[,host:port…], rediss+cluster:// for TLS); "
        "empty = a standalone node",
    )
    mesh_host: str = _opt("127.0.0.1", "str", "mesh listen address", nonempty=True)
    mesh_port: int = _opt(7402, "int", "mesh port (0 = pick a free one)", **_PORT)
    advertise_host: str = _opt(
        "", "str", "address the region's other nodes dial for the mesh (empty = mesh_host)"
    )
    mesh_secret: str = _opt(
        "",
        "str",
        "the region's mesh secret (every node the same, 32+ characters); nodes prove it "
        "to each other before any mesh op; required unless mesh_host is loopback",
    )
    mesh_accept_secrets: tuple[str, ...] = _opt(
        (),
        "list[str]",
        "other mesh secrets accepted from peers, while the secret is being rotated",
        nonempty=True,
    )
    weight: float = _opt(
        1.0,
        "float",
        "this node's share of the ring; 0 = join with no slot (`relay node add` ramps it)",
        lo=0,
        hi=64,
    )
    slots: int = _opt(256, "int", "slots per region; fixed for the cluster's life", **_POSITIVE)
    replicas: int = _opt(2, "int", "copies of each slot: its owner and replicas", **_POSITIVE)
    lease_ttl_ms: int = _opt(3000, "int", "a node whose lease is this old is dead", lo=100)
    lease_renew_ms: int = _opt(1000, "int", "how often a node renews its lease", lo=10)
    batch_window_ms: int = _opt(
        100,
        "int",
        "retry pace after a failed slot-log append (appends go by group commit: the next "
        "as soon as the previous one returned)",
        lo=1,
    )
    log_replicas: int = _opt(
        0,
        "int",
        "ack=log waits until this many replicas of the Redis (shard) hold the entry (WAIT); "
        "0 = the primary alone: a failover can lose what it acknowledged",
        lo=0,
        hi=16,
    )
    log_replicas_timeout_ms: int = _opt(
        1000,
        "int",
        "how long an append waits for cluster.log_replicas; short of them it is retried "
        "and ack=log is not answered",
        lo=1,
    )
    peers: tuple[str, ...] = _opt(
        (),
        "list[str]",
        'the other regions, "name=redis-url" each; links copy this region\'s slot logs there',
    )
    checkpoint_interval_s: float = _opt(
        5.0, "float", "how often changed slots are checkpointed to Redis", lo=0, lo_open=True
    )
    checkpoint_version: int = _opt(
        3,
        "int",
        "the checkpoint format written: 3 (ack tombstones encoded once), or 2 while nodes "
        "of an earlier build, which cannot read 3, still run in the region",
        lo=2,
        hi=3,
    )
    link_max_backlog_s: float = _opt(
        120.0,
        "float",
        "a slot log is kept for a link at most this far behind; past it the link resyncs "
        "the slot from its checkpoint",
        lo=0,
        lo_open=True,
    )
    link_window_ms: int = _opt(
        100,
        "int",
        "a link cuts a window at most this long after its first entry",
        lo=1,
        hi=LINK_WINDOW_MS_MAX,
    )
    link_window_min_entries: int = _opt(
        64, "int", "entries a window may hold even when little waits (the adaptive floor)", lo=1
    )
    link_window_max_entries: int = _opt(
        4000, "int", "entries a window holds at most (reached while a backlog drains)", lo=1
    )
    link_window_max_bytes: int = _opt(1 << 20, "int", "entry bytes a window holds at most", lo=1024)
    link_inflight_min: int = _opt(
        2, "int", "windows a link keeps in flight at least (the adaptive floor)", lo=1
    )
    link_inflight_max: int = _opt(
        16,
        "int",
        "windows a link keeps in flight at most, per connection in use (reached on a busy WAN)",
        lo=1,
    )
    link_inflight_max_bytes: int = _opt(
        16 << 20,
        "int",
        "compressed bytes a link keeps in flight at most, per connection in use",
        lo=1024,
    )
    link_connections: int = _opt(
        4,
        "int",
        "connections a link spreads a backlog's windows over, by slot (1: one connection always)",
        lo=1,
        hi=LINK_CONNECTIONS_MAX,
    )


_SECTIONS: Final[dict[str, type[Any]]] = {
    "node": NodeConfig,
    "client": ClientConfig,
    "auth": AuthConfig,
    "admin": AdminConfig,
    "store": StoreConfig,
    "cluster": ClusterConfig,
}

MIN_MESH_SECRET_CHARS: Final = 32
_NODE_ID_PART: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True, slots=True)
class _Problem:
    """One problem; ``keys`` are the dotted keys involved, the first one names it."""

    keys: tuple[str, ...]
    text: str


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration of one node; ``Config()`` is the defaults."""

    node: NodeConfig = field(default_factory=NodeConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> list[str]:
        """Every problem with this configuration (``[]`` when it is usable).

        Checks each key's type and range, then the rules between keys; looks at the
        files that ``tls_cert``, ``tls_key`` and ``es256_public_key`` name.
        """
        return [f"{p.keys[0]}: {p.text}" for p in self._problems()]

    def warnings(self) -> list[str]:
        """What is usable but probably not meant (``relay config validate`` prints it)."""
        out = []
        if not (
            self.client.allow_anonymous or self.auth.hs256_secret or self.auth.es256_public_key
        ):
            out.append(
                "no client can connect: client.allow_anonymous is false and neither "
                "auth.hs256_secret nor auth.es256_public_key is set (`relay config init` "
                "writes a secret; `relay token` signs tokens with it)"
            )
        return out

    def _problems(self) -> Iterator[_Problem]:
        bad: set[str] = set()
        for section, key, rule, value in _walk(self):
            if not rule.accepts(value):
                bad.add(f"{section}.{key}")
                yield _Problem(
                    (f"{section}.{key}",), f"must be {rule.describe()}, got {_show(value)}"
                )

        def ok(*keys: str) -> bool:  # cross-field rules only look at well-typed values
            return not bad.intersection(keys)

        if ok("node.id"):
            parts = self.node.id.split("/")
            if len(parts) != 2 or not all(_NODE_ID_PART.fullmatch(p) for p in parts):
                yield _Problem(
                    ("node.id",),
                    'must be "region/name", each part 1-32 characters of a-z, 0-9 and "-" '
                    f'not starting with "-", got {_show(self.node.id)}',
                )

        c = self.client
        if ok("client.tls_cert", "client.tls_key"):
            if c.tls_cert and not c.tls_key:
                yield _Problem(("client.tls_cert",), "is set but client.tls_key is not")
            if c.tls_key and not c.tls_cert:
                yield _Problem(("client.tls_key",), "is set but client.tls_cert is not")
        file_ok: set[str] = set()
        for key, path in (
            ("client.tls_cert", c.tls_cert),
            ("client.tls_key", c.tls_key),
            ("auth.es256_public_key", self.auth.es256_public_key),
        ):
            if ok(key) and path:
                problem = _file_problem(path)
                if problem:
                    yield _Problem((key,), problem)
                else:
                    file_ok.add(key)
        # The token keys as the verifier will load them, so `serve` never dies on one.
        au = self.auth
        if ok("auth.hs256_secret") and au.hs256_secret:
            for text in key_problems(au.hs256_secret, None):
                yield _Problem(("auth.hs256_secret",), text.removeprefix("auth.hs256_secret "))
        if "auth.es256_public_key" in file_ok:
            try:
                with open(au.es256_public_key, "rb") as f:
                    pem = f.read()
            except OSError as e:
                yield _Problem(("auth.es256_public_key",), f"cannot be read: {e.strerror}")
            else:
                for text in key_problems(None, pem):
                    yield _Problem(
                        ("auth.es256_public_key",), text.removeprefix("auth.es256_public_key: ")
                    )

        if ok("cluster.peers", "node.id"):
            seen: set[str] = set()
            for entry in self.cluster.peers:
                name, sep, url = entry.partition("=")
                if not sep or not _NODE_ID_PART.fullmatch(name):
                    yield _Problem(
                        ("cluster.peers",), f'entries are "region=redis-url", got {_show(entry)}'
                    )
                elif name == self.node.region or name in seen:
                    yield _Problem(
                        ("cluster.peers",), f"region {name!r} is this region or listed twice"
                    )
                elif (url_problem := check_redis_url(url)) is not None:
                    yield _Problem(("cluster.peers",), f"{name}: the URL {url_problem}")
                seen.add(name)
            if self.cluster.peers and not self.cluster.redis_url:
                yield _Problem(("cluster.peers",), "needs cluster.redis_url (links run from it)")

        if ok("client.max_body", "client.max_frame") and c.max_body > c.max_frame:
            yield _Problem(
                ("client.max_body", "client.max_frame"),
                f"must not exceed client.max_frame ({c.max_frame}), got {c.max_body}",
            )
        s = self.store
        if ok("store.default_ttl_s", "store.max_ttl_s") and s.default_ttl_s > s.max_ttl_s:
            yield _Problem(
                ("store.default_ttl_s", "store.max_ttl_s"),
                f"must not exceed store.max_ttl_s ({s.max_ttl_s}), got {s.default_ttl_s}",
            )

        cl = self.cluster
        if ok("cluster.mesh_secret", "cluster.mesh_accept_secrets"):
            for key, secret in (
                ("cluster.mesh_secret", cl.mesh_secret),
                *(("cluster.mesh_accept_secrets", x) for x in cl.mesh_accept_secrets),
            ):
                if secret and len(secret) < MIN_MESH_SECRET_CHARS:
                    yield _Problem(
                        (key,),
                        f"must be at least {MIN_MESH_SECRET_CHARS} characters, got {len(secret)}",
                    )
        # Anyone who can reach the mesh port could otherwise act as a node of the region.
        if (
            ok("cluster.mesh_host", "cluster.mesh_secret", "cluster.redis_url")
            and cl.redis_url
            and not cl.mesh_secret
            and not _is_loopback(cl.mesh_host)
        ):
            yield _Problem(
                ("cluster.mesh_secret", "cluster.mesh_host"),
                "must be set when cluster.mesh_host is not a loopback address "
                f"({_show(cl.mesh_host)}): the mesh would be open to anyone who reaches it",
            )

        a = self.admin
        if (
            ok("admin.port", "client.port", "admin.host", "client.host")
            and a.port != 0
            and a.port == c.port
            and (a.host == c.host or {a.host, c.host} & _WILDCARD_HOSTS)
        ):
            yield _Problem(
                ("admin.port", "client.port"),
                f"is the same as client.port ({c.port}) on an overlapping address",
            )
        cl = self.cluster
        if (
            ok("cluster.redis_url")
            and cl.redis_url
            and (url_problem := check_redis_url(cl.redis_url)) is not None
        ):
            yield _Problem(("cluster.redis_url",), f"{url_problem}, got {_show(cl.redis_url)}")
        if ok("cluster.lease_ttl_ms", "cluster.lease_renew_ms") and (
            cl.lease_ttl_ms <= cl.lease_renew_ms
        ):
            yield _Problem(
                ("cluster.lease_ttl_ms", "cluster.lease_renew_ms"),
                f"must be above cluster.lease_renew_ms ({cl.lease_renew_ms}), got "
                f"{cl.lease_ttl_ms} (a lease would expire before it is renewed)",
            )
        for lo_key, hi_key in (
            ("link_window_min_entries", "link_window_max_entries"),
            ("link_inflight_min", "link_inflight_max"),
            ("link_window_max_bytes", "link_inflight_max_bytes"),
        ):
            lo_v, hi_v = getattr(cl, lo_key), getattr(cl, hi_key)
            if ok(f"cluster.{lo_key}", f"cluster.{hi_key}") and lo_v > hi_v:
                yield _Problem(
                    (f"cluster.{lo_key}", f"cluster.{hi_key}"),
                    f"must be at most cluster.{hi_key} ({hi_v}), got {lo_v}",
                )
        if ok("cluster.link_window_max_entries") and cl.link_window_max_entries > 100_000:
            yield _Problem(
                ("cluster.link_window_max_entries",),
                f"must be at most 100000 (a window's limit), got {cl.link_window_max_entries}",
            )

        # The admin port can drain nodes and move slots: never open it to a network
        # without a token.
        if ok("admin.host", "admin.token") and not a.token and not _is_loopback(a.host):
            yield _Problem(
                ("admin.token", "admin.host"),
                f"must be set when admin.host is not a loopback address ({_show(a.host)})",
            )


def exposed_secrets(path: str | os.PathLike[str]) -> list[str]:
    """The secret keys a config file holds while every user may read it (mode o+r);
    empty when it holds none or is not world-readable (a file shared with the service's
    own group, as the terraform nodes do, is fine). The caller warns."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []
    if not mode & 0o004:
        return []
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return []
    held = []
    for section, key in _SECRET_KEYS:
        table = doc.get(section)
        if isinstance(table, dict) and table.get(key):
            held.append(f"{section}.{key}")
    for section, key in (("cluster", "redis_url"), ("cluster", "peers")):
        table = doc.get(section)
        values = table.get(key) if isinstance(table, dict) else None
        for v in values if isinstance(values, list) else [values]:
            if isinstance(v, str) and re.search(r"://[^/@\s]*:[^/@\s]*@", v):
                held.append(f"{section}.{key}")
                break
    return held


_SECRET_KEYS: Final = (
    ("auth", "hs256_secret"),
    ("admin", "token"),
    ("cluster", "mesh_secret"),
    ("cluster", "mesh_accept_secrets"),
)


def _walk(config: Config) -> Iterator[tuple[str, str, _Rule, object]]:
    """(section, key, rule, value) for every key, in schema order."""
    for section in _SECTIONS:
        obj = getattr(config, section)
        for f in dataclasses.fields(obj):
            yield section, f.name, f.metadata["rule"], getattr(obj, f.name)


def _rules(section: str) -> dict[str, _Rule]:
    return {f.name: f.metadata["rule"] for f in dataclasses.fields(_SECTIONS[section])}


def _homes(key: str, but: str = "") -> str:
    """The sections that have ``key``, as ``[client] or [admin]`` (``""`` if none)."""
    return " or ".join(f"[{s}]" for s in _SECTIONS if s != but and key in _rules(s))


def _is_loopback(host: str) -> bool:
    return is_loopback(host)


def _file_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return f"no such file {_show(path)}"
    if not os.path.isfile(path):
        return f"not a regular file {_show(path)}"
    if not os.access(path, os.R_OK):
        return f"file not readable {_show(path)}"
    return None


def _show(value: object) -> str:
    """``value`` as it would be written in TOML, so problems quote what the user wrote."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A URL's password stays out of the message.
        return json.dumps(redact_text(value), ensure_ascii=False)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a table {" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def env_var_name(section: str, key: str) -> str:
    """The environment variable that overrides ``section.key``."""
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def _all_env_names() -> list[str]:
    return [env_var_name(s, k) for s in _SECTIONS for k in _rules(s)]


def _suggest(word: str, choices: list[str], prefix: str = "") -> str:
    """``, did you mean <closest>?`` or ``""`` when nothing is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f", did you mean {prefix}{close[0]}?" if close else ""


def _env_value(raw: str, kind: _Kind) -> object:
    """An environment value: a TOML value where it parses as one, else the string.

    For string keys the raw text is kept unless it is a quoted TOML string, so a
    secret or token such as ``123456`` or ``true`` is not turned into a number or bool.
    """
    try:
        doc = tomllib.loads(f"v = {raw}")
    except ValueError:
        return raw
    if list(doc) != ["v"]:  # the raw text smuggled in more keys: not a single value
        return raw
    value = doc["v"]
    if kind in ("str", "path") and not isinstance(value, str):
        return raw
    return value


def _read_file(path: str) -> tuple[dict[str, Any], str | None]:
    """The parsed document, or ``{}`` and a problem saying why it cannot be read."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return {}, f"{path}: no such file"
    except OSError as exc:
        return {}, f"{path}: cannot read: {exc.strerror or exc}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return {}, f"{path}: not valid TOML: not UTF-8 (at line {line})"
    try:
        return tomllib.loads(text), None
    except tomllib.TOMLDecodeError as exc:
        return {}, f"{path}: not valid TOML: {exc}"


def load_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Config:
    """Read ``path`` (TOML; ``None`` = defaults only), apply ``RELAY_<SECTION>__<KEY>``
    overrides from ``environ``, validate, and return the config.

    Raises :class:`ConfigError` with every problem found, each naming its key and source
    (``in <file>`` or ``from <variable>``). Pass ``os.environ`` in production.
    """
    problems: list[str] = []
    values: dict[str, dict[str, object]] = {s: {} for s in _SECTIONS}
    sources: dict[str, str] = {}  # "section.key" -> "in file.toml" / "from RELAY_..."

    if path is not None:
        fname = os.fspath(path)
        doc, problem = _read_file(fname)
        if problem:
            problems.append(problem)
        where = f"in {fname}"
        for section, table in doc.items():
            if section not in _SECTIONS:
                homes = _homes(section)
                hint = (
                    f", {section} is a key of {homes}: put it under that table"
                    if homes
                    else _suggest(section, list(_SECTIONS))
                )
                problems.append(f"{section}: unknown section{hint} ({where})")
                continue
            if not isinstance(table, dict):
                problems.append(
                    f"{section}: must be a table [{section}], got {_show(table)} ({where})"
                )
                continue
            rules = _rules(section)
            for key, value in table.items():
                if key not in rules:
                    hint = _suggest(key, list(rules), prefix=f"{section}.")
                    if not hint and _homes(key, but=section):
                        hint = f", {key} is a key of {_homes(key, but=section)}"
                    problems.append(f"{section}.{key}: unknown key{hint} ({where})")
                    continue
                values[section][key] = value
                sources[f"{section}.{key}"] = where

    known_env = _all_env_names()
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
            continue  # not an override (e.g. RELAY_CONFIG belongs to the CLI)
        up_section, _, up_key = name[len(ENV_PREFIX) :].partition("__")
        section, key = up_section.lower(), up_key.lower()
        if name not in known_env and name.upper() in known_env:
            problems.append(
                f"{section}.{key}: the variable must be upper case, "
                f"did you mean {name.upper()}? (from {name})"
            )
            continue
        if name not in known_env:
            what = "unknown section" if section not in _SECTIONS else "unknown key"
            hint = _suggest(name.upper(), known_env)
            problems.append(f"{section}.{key}: {what}{hint} (from {name})")
            continue
        values[section][key] = _env_value(environ[name], _rules(section)[key].kind)
        sources[f"{section}.{key}"] = f"from {name}"

    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        rules = _rules(section)
        kwargs: dict[str, Any] = {}
        for key, value in values[section].items():
            kind = rules[key].kind
            if kind == "float" and type(value) is int and abs(value) <= sys.float_info.max:
                value = float(value)
            elif kind == "list[str]" and isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        sections[section] = cls(**kwargs)
    config = Config(**sections)

    for p in config._problems():
        problems.append(f"{p.keys[0]}: {p.text}{_where(p.keys, sources)}")
    if problems:
        raise ConfigError(problems)
    return config


def _where(keys: tuple[str, ...], sources: Mapping[str, str]) -> str:
    """`` (in x.toml)`` for the keys of a problem that did not keep their default."""
    found = [(k, sources[k]) for k in keys if k in sources]
    if not found:
        return ""
    if len({s for _, s in found}) == 1:
        return f" ({found[0][1]})"
    return " (" + ", ".join(f"{k} {s}" for k, s in found) + ")"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string (ASCII, \u escapes) is a TOML basic string
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def dump_default_toml(**values: object) -> str:
    """An annotated config file holding every key at its default, but for ``values``
    (``hs256_secret=…``: a key of any section by its name) (``relay config init``)."""
    lines = [
        "# relay node configuration (TOML).",
        "#",
        "# Every key can be overridden by the environment variable RELAY_<SECTION>__<KEY>,",
        "# e.g. RELAY_CLIENT__PORT=7500. The value is read as a TOML value where it parses",
        '# as one (true, 12, 1.5, ["a", "b"]), else as a plain string.',
        "# Relative paths are relative to the working directory of the node.",
    ]
    defaults = Config()
    for section, cls in _SECTIONS.items():
        lines += ["", f"[{section}]", f"# {(cls.__doc__ or '').strip()}"]
        obj = getattr(defaults, section)
        for f in dataclasses.fields(obj):
            rule: _Rule = f.metadata["rule"]
            lines += [
                "",
                f"# {rule.doc}.",
                f"# {rule.describe()}; env {env_var_name(section, f.name)}",
                f"{f.name} = {_toml(values.get(f.name, getattr(obj, f.name)))}",
            ]
    return "\n".join(lines) + "\n"
