"""The one place that turns a Redis URL into a client: one server or a Redis Cluster.

A region's Redis (``cluster.redis_url``) and a destination region's (``cluster.peers``)
are either one server::

    redis://[user:password@]host:port[/db]     rediss://… (TLS)     unix:///path

or a Redis Cluster, named by one or more of its nodes (the client discovers the rest
with ``CLUSTER SLOTS``, and follows MOVED/ASK and failovers)::

    redis+cluster://[user:password@]host1:port1[,host2:port2…][/0][?query]
    rediss+cluster://…                                               (TLS)

The query string carries the same options as for one server (``ssl_ca_certs=…``,
``ssl_cert_reqs=none``…), and the ACL user and password apply to every node. A cluster
has only database 0.

Every caller (slot logs, membership, ring store, links, ops commands, benches) gets its
client here, so the choice is made once: :func:`connect` (``redis.asyncio``) and
:func:`connect_sync` (``redis``) return a ``Redis`` or a ``RedisCluster``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import redis
import redis.cluster
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

AsyncClient: TypeAlias = Redis | RedisCluster
SyncClient: TypeAlias = redis.Redis | redis.cluster.RedisCluster

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
    return None


def _cluster_kwargs(parsed: ClusterURL, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kwargs = dict(kwargs)
    kwargs.pop("db", None)
    if len(parsed.nodes) > 1:
        kwargs["startup_nodes"] = [ClusterNode(h, p) for h, p in parsed.nodes]
    return parsed.node_url(0), kwargs


def connect(url: str, **kwargs: Any) -> AsyncClient:
    """A ``redis.asyncio`` client for ``url``: ``Redis`` for one server, ``RedisCluster``
    for a cluster URL. ``kwargs`` go to the client (``socket_timeout``…)."""
    if is_cluster(url):
        first, ckw = _cluster_kwargs(parse_cluster_url(url), kwargs)
        if len(parse_cluster_url(url).nodes) > 1:
            # from_url sets host/port from the URL; startup_nodes would be ignored then.
            return _cluster_from_nodes(first, ckw)
        return RedisCluster.from_url(first, **ckw)
    return Redis.from_url(url, **kwargs)


def _cluster_from_nodes(first: str, kwargs: dict[str, Any]) -> RedisCluster:
    from redis.asyncio.connection import SSLConnection, parse_url

    kw = {**kwargs, **parse_url(first)}
    for k in ("host", "port", "db"):
        kw.pop(k, None)
    if kw.pop("connection_class", None) is SSLConnection:
        kw["ssl"] = True
    return RedisCluster(**kw)


def connect_sync(url: str, **kwargs: Any) -> SyncClient:
    """:func:`connect` for the synchronous ``redis`` client (ops commands, benches)."""
    if is_cluster(url):
        parsed = parse_cluster_url(url)
        first, ckw = _cluster_kwargs(parsed, kwargs)
        if "startup_nodes" in ckw:
            ckw["startup_nodes"] = [
                redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
                for h, p in parsed.nodes
            ]
            from redis.connection import SSLConnection, parse_url

            kw = {**ckw, **parse_url(first)}  # type: ignore[no-untyped-call]
            for k in ("host", "port", "db"):
                kw.pop(k, None)
            if kw.pop("connection_class", None) is SSLConnection:
                kw["ssl"] = True
            return redis.cluster.RedisCluster(**kw)
        return redis.cluster.RedisCluster.from_url(first, **ckw)
    return redis.Redis.from_url(url, **kwargs)


def connection_kwargs(client: AsyncClient) -> dict[str, Any]:
    """The connection settings of ``client`` (credentials, TLS, timeouts)."""
    if isinstance(client, RedisCluster):
        return dict(client.get_connection_kwargs())
    return dict(client.connection_pool.connection_kwargs)
