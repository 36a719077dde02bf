"""Cluster URLs: parsed and checked in one place (relay/redisurl.py), refused by the
config with a message naming the fault."""

from __future__ import annotations

import pytest

from cluster.redisconn import check_url, is_cluster, parse_cluster_url
from tests.conftest import node_config


def test_cluster_urls_parse_nodes_credentials_and_tls() -> None:
    p = parse_cluster_url(
        "rediss+cluster://relay:s3cret@10.0.0.1:7000,[::1]:7001?ssl_cert_reqs=none"
    )
    assert p.tls and p.userinfo == "relay:s3cret@"
    assert p.nodes == (("10.0.0.1", 7000), ("::1", 7001))
    assert p.node_url(0) == "rediss://relay:s3cret@10.0.0.1:7000?ssl_cert_reqs=none"
    assert p.node_url(1) == "rediss://relay:s3cret@[::1]:7001?ssl_cert_reqs=none"
    assert parse_cluster_url("redis+cluster://h:1/0").nodes == (("h", 1),)
    assert is_cluster("redis+cluster://h:1") and not is_cluster("redis://h:1")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://", "at least one node"),
        ("redis+cluster://h", "host:port"),
        ("redis+cluster://h:0", "port in 1..65535"),
        ("redis+cluster://h:1,h:x", "host:port"),
        ("redis+cluster://h:1/3", "only database 0"),
        ("http://h:1", "redis+cluster://"),
    ],
)
def test_bad_urls_are_named(url: str, says: str) -> None:
    problem = check_url(url)
    assert problem is not None and says in problem
    with pytest.raises(AssertionError, match=r"cluster\.redis_url"):
        node_config(cluster={"redis_url": url})


def test_config_accepts_a_cluster_and_the_wait_option() -> None:
    c = node_config(
        cluster={"redis_url": "redis+cluster://127.0.0.1:7000,127.0.0.1:7001", "log_replicas": 1}
    )
    assert c.cluster.log_replicas == 1
    assert check_url("redis://h:1/0") is None and check_url("unix:///tmp/r.sock") is None
