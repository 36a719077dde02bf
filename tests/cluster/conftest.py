"""Whole regions as real processes: `relay serve` nodes and a real Redis (relay.dev).

A test marked ``@pytest.mark.redis_cluster`` runs twice, through the ``redis_kind``
fixture: against one Redis server per region and against a local Redis Cluster (3
primaries, a replica each) per region. Unmarked tests run against one server only.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from cluster.redisconn import connect_sync
from cluster.status import owners
from relay.dev import DevCluster

# Short leases so failover tests finish quickly (production: 3000 / 1000 ms).
FAST = {"lease_ttl_ms": 1500, "lease_renew_ms": 300, "batch_window_ms": 20}


def admin_status(admin_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(admin_url + "/status", timeout=5) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def settled(cluster: DevCluster, live: list[dict[str, Any]]) -> bool:
    """Every live node sees the same members alive and together they own every slot."""
    try:
        docs = [admin_status(n["admin"]) for n in live]
    except OSError:
        return False
    ids = {n["id"] for n in live}
    region = live[0]["id"].split("/")[0]
    with connect_sync(cluster.redis[region].url) as r:
        records = Counter(o for o, _ in owners(r, region, 256))
    owned = 0
    for n, d in zip(live, docs, strict=True):
        c = d["cluster"]
        alive = {m for m, s in c["members"].items() if s in ("alive", "suspect")}
        if alive != ids or c["batcher"]["in_flight"]:
            return False
        if records.get(n["id"], 0) != c["owned_slots"]:
            return False
        owned += c["owned_slots"]
    return owned == 256


def wait_settled(cluster: DevCluster, live: list[dict[str, Any]], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not settled(cluster, live):
        assert time.monotonic() < deadline, "region did not settle"
        time.sleep(0.1)  # poll interval


@contextmanager
def running(
    regions: list[str], *, settle: bool = True, timeout_s: float = 60, **options: Any
) -> Iterator[tuple[DevCluster, dict[str, Any]]]:
    """A ``DevCluster(regions, **options)`` started, with every region settled (unless
    ``settle=False``: pages that show the regions settling); stopped on exit."""
    cluster = DevCluster(regions, **options)
    doc = cluster.start(timeout_s=timeout_s)
    try:
        if settle:
            for r in regions:
                wait_settled(cluster, doc["regions"][r]["nodes"])
        yield cluster, doc
    finally:
        cluster.stop()


# Primaries of the Redis Cluster of a region, in the cluster variant of a test.
CLUSTER_PRIMARIES = 3


def redis_cluster_of(redis_kind: str) -> int:
    """``DevCluster(redis_cluster=…)`` for a ``redis_kind``."""
    return CLUSTER_PRIMARIES if redis_kind == "cluster" else 0


@pytest.fixture
def region3(redis_kind: str) -> Iterator[tuple[DevCluster, dict[str, Any]]]:
    """One region of three nodes, settled: every slot owned."""
    with running(
        ["sg"],
        nodes_per_region=3,
        cluster_settings=FAST,
        redis_cluster=redis_cluster_of(redis_kind),
    ) as world:
        yield world


async def pending_ids(url: str, ch: str) -> list[str]:
    """Every pending id of ``ch``, raw (no client-side dedupe), through node ``url``."""
    from tests.wsclient import Client

    c = await Client.connect(url)
    await c.request({"op": "hello"}, "welcome")
    s = await c.request({"op": "sub", "ch": ch}, "subscribed")
    ids = [(await c.expect("msg"))["id"] for _ in range(s["pending"])]
    await c.close()
    return ids
