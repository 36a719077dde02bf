"""Redis URLs of a region: one server or a Redis Cluster, parsed and checked.

Pure parsing (no client), so that the configuration checks a URL without importing the
cluster package; :mod:`cluster.redisconn` makes the clients::

    redis://[user:password@]host:port[/db]     rediss://… (TLS)     unix:///path
    redis+cluster://[user:password@]host1:port1[,host2:port2…][/0][?query]
    rediss+cluster://…                                               (TLS)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")
SERVER_SCHEMES: Final = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True, slots=True)
class ClusterURL:
    """A parsed ``redis+cluster://`` URL: TLS or not, credentials, nodes, query."""

    tls: bool
    userinfo: str  # "user:password@" as written, or ""
    nodes: tuple[tuple[str, int], ...]
    query: str

    def node_url(self, i: int = 0) -> str:
        """A one-server URL of node ``i``, with the credentials and query."""
        host, port = self.nodes[i]
        shown = f"[{host}]" if ":" in host else host
        q = f"?{self.query}" if self.query else ""
        return f"{'rediss' if self.tls else 'redis'}://{self.userinfo}{shown}:{port}{q}"


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return isinstance(url, str) and url.startswith(CLUSTER_SCHEMES)


def _host_port(part: str) -> tuple[str, int]:
    if part.startswith("["):
        host, sep, rest = part[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad node {part!r}: expected [ipv6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = part.rpartition(":")
        if not sep:
            raise ValueError(f"bad node {part!r}: expected host:port")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad node {part!r}: expected host:port with a port in 1..65535")
    return host, int(port_text)


def parse_cluster_url(url: str) -> ClusterURL:
    """Parse a ``redis+cluster://`` URL, or raise ValueError saying what is wrong."""
    if not is_cluster(url):
        raise ValueError(f"not a cluster URL (redis+cluster:// or rediss+cluster://): {url!r}")
    tls = url.startswith("rediss+")
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, got /{path}")
    userinfo, at, hosts = netloc.rpartition("@")
    if not hosts:
        raise ValueError("a cluster URL names at least one node: redis+cluster://host:port")
    nodes = tuple(_host_port(p) for p in hosts.split(","))
    return ClusterURL(tls, userinfo + at, nodes, query)


def check_url(url: str) -> str | None:
    """What is wrong with ``url`` as a region's Redis, or None when it is usable."""
    if is_cluster(url):
        try:
            parse_cluster_url(url)
        except ValueError as e:
            return str(e)
        return None
    if not isinstance(url, str) or not url.startswith(SERVER_SCHEMES):
        return (
            "must be a redis://, rediss:// or unix:// URL (one server), or "
            "redis+cluster:// or rediss+cluster:// (a Redis Cluster)"
        )
    if url.startswith("unix://"):
        return None
    parts = urlsplit(url)
    try:
        port = parts.port  # a port that is not a number, or out of range
    except ValueError as e:
        return f"bad port: {e}"
    if not parts.hostname:
        return "no host"
    if port == 0:
        return "port 0 is no server's port"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"the database (the path) must be a number, not {db!r}"
    return None
