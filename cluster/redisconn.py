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

from typing import Any, TypeAlias

import redis
import redis.cluster
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from relay.redisurl import (
    CLUSTER_SCHEMES,
    SERVER_SCHEMES,
    ClusterURL,
    check_url,
    is_cluster,
    parse_cluster_url,
)

__all__ = [
    "CLUSTER_SCHEMES",
    "SERVER_SCHEMES",
    "AsyncClient",
    "ClusterURL",
    "SyncClient",
    "check_url",
    "connect",
    "connect_sync",
    "connection_kwargs",
    "is_cluster",
    "parse_cluster_url",
]

AsyncClient: TypeAlias = Redis | RedisCluster
SyncClient: TypeAlias = redis.Redis | redis.cluster.RedisCluster


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


# Connection kwargs that belong to the pool they were made by, not to its configuration.
_POOL_OWNED = frozenset(
    {
        "maint_notifications_pool_handler",
        "oss_cluster_maint_notifications_handler",
        "himport_registry",
    }
)


def own_connection_kwargs(client: Redis) -> dict[str, Any]:
    """The settings a new connection (or pool) to ``client``'s server needs (address,
    credentials, TLS, database, timeouts), without what belongs to ``client``'s pool."""
    return {
        k: v
        for k, v in client.connection_pool.connection_kwargs.items()
        if k not in _POOL_OWNED and not k.startswith("orig_")
    }
