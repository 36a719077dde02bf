"""A Redis Cluster primary killed with -9 under ``ack=log`` load: its replica is promoted,
the region keeps serving, and what was acknowledged is counted after the relay node is
killed too (so only Redis holds the region's state), with and without
``cluster.log_replicas`` (WAIT). Prints the counts (docs/BENCHMARKS.md §9).

The owner of a slot keeps its state in RAM and on disk and checkpoints it, so a Redis
that forgets entries heals at the next checkpoint while the owner lives. What Redis alone
promises shows when the owner dies with the primary and its disk is lost too: the second
test does that, with the replica made to lag first (its replication link cut 0.3 s
before the kill; on loopback a live link is never behind), so the promoted replica
misses what the primary acknowledged meanwhile
— the window WAIT closes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from cluster.keys import log_key
from cluster.ring import slot_of
from relay.client import RelayClient, RetryPolicy
from relay.dev import DevCluster
from relay.redis_server import RedisClusterServers
from tests.cluster.conftest import FAST, wait_settled
from tests.conftest import aio
from tests.faults.history import History, check, steady

PATIENT = RetryPolicy(max_attempts=400, base_delay_s=0.05, max_delay_s=0.2)
CHANNELS = [f"inbox:f{i}" for i in range(64)]


@contextlib.asynccontextmanager
async def one_node_region(
    settings: dict[str, Any],
) -> AsyncIterator[tuple[DevCluster, dict[str, Any], RedisClusterServers]]:
    """Region sg: one relay node on a 3-shard Redis Cluster (``FAST`` plus ``settings``),
    settled; stopped on exit."""
    cluster = DevCluster(
        ["sg"], nodes_per_region=1, cluster_settings={**FAST, **settings}, redis_cluster=3
    )
    doc = await asyncio.to_thread(cluster.start, 60)
    try:
        node = doc["regions"]["sg"]["nodes"][0]
        await asyncio.to_thread(wait_settled, cluster, [node])
        servers = cluster.redis["sg"]
        assert isinstance(servers, RedisClusterServers)
        yield cluster, node, servers
    finally:
        await asyncio.to_thread(cluster.stop)


async def promoted(servers: RedisClusterServers, key: str, old: Any, timeout_s: float) -> Any:
    """Wait until another server serves ``key`` as primary; return it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            now = await asyncio.to_thread(servers.primary_of, key)
        except Exception:
            now = None  # no primary serves it yet (or the node asked is down)
        if now is not None and now is not old:
            return now
        assert time.monotonic() < deadline, "no replica was promoted"
        await asyncio.sleep(0.1)  # poll interval while the cluster fails over


async def replica_online(primary: Any, timeout_s: float) -> None:
    """Wait until ``primary`` has a replica in sync (``state=online``): with
    ``log_replicas = 1`` a claim on its shard waits for one."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with redis.Redis(host=primary.host, port=primary.port) as r:
                info = await asyncio.to_thread(r.info, "replication")
        except redis.RedisError:
            info = {}
        if any(isinstance(v, dict) and v.get("state") == "online" for v in info.values()):
            return
        assert time.monotonic() < deadline, "the restarted primary did not rejoin as a replica"
        await asyncio.sleep(0.1)  # poll interval while it syncs


def replica_of(servers: RedisClusterServers, primary: Any) -> Any:
    for srv in servers.servers:
        if srv is primary:
            continue
        with redis.Redis(host=srv.host, port=srv.port, socket_timeout=2) as r:
            role = r.execute_command("ROLE")
        if role[0] in (b"slave", "slave") and int(role[2]) == primary.port:
            return srv
    raise AssertionError(f"no replica of {primary.port}")


@pytest.mark.parametrize("log_replicas", [0, 1])
@aio
async def test_kill_9_of_a_redis_primary_under_ack_log_load(log_replicas: int) -> None:
    async with one_node_region({"log_replicas": log_replicas}) as (cluster, node, servers):
        # The shard of the first channel's slot log: its primary dies under the load.
        key = log_key("sg", slot_of(CHANNELS[0], 256))
        victim = await asyncio.to_thread(servers.primary_of, key)
        h = History()
        load = asyncio.ensure_future(
            steady(node["ws"], h, channels=CHANNELS, rate=400, duration_s=10, prefix="r")
        )
        while len(h.published) < 1000:
            assert not load.done(), h.errors
            await asyncio.sleep(0.05)  # poll interval while the load builds
        victim.kill()
        killed_at = len(h.published)
        started = time.monotonic()
        await promoted(servers, key, victim, 30)
        failover_s = time.monotonic() - started
        # The old primary comes back as a replica of the promoted one (WAIT needs one).
        await asyncio.to_thread(victim.start)
        await load
        # The region serves the killed shard's slots again.
        c = await RelayClient.connect(node["ws"], retry=PATIENT)
        ack = await c.publish(CHANNELS[0], "after", id="after-failover", ack="log", timeout_s=30)
        assert ack.ack == "log"
        await c.close()
        # Only Redis holds the region now: whatever it lost is lost.
        os.kill(node["pid"], signal.SIGKILL)
        node = await asyncio.to_thread(cluster.restart, "sg/n1")
        await asyncio.to_thread(wait_settled, cluster, [node])
        verdict = await check("sg", node["ws"], h)
        print(
            f"\nRedis primary kill -9, log_replicas={log_replicas}: {len(h.published)} "
            f"acked at log ({killed_at} before the kill), {len(verdict.lost)} lost; "
            f"replica promoted in {failover_s:.1f} s; errors {dict(h.errors)}"
        )
        assert len(h.published) > killed_at, "nothing acknowledged after the failover"
        if log_replicas:
            assert not verdict.lost, verdict


@pytest.mark.parametrize("log_replicas", [0, 1])
@aio
async def test_a_primary_and_the_owner_lost_together(log_replicas: int) -> None:
    async with one_node_region({"log_replicas": log_replicas, "log_replicas_timeout_ms": 200}) as (
        cluster,
        node,
        servers,
    ):
        mine = [ch for ch in CHANNELS if slot_of(ch, 256) == slot_of(CHANNELS[0], 256)]
        key = log_key("sg", slot_of(CHANNELS[0], 256))
        victim = await asyncio.to_thread(servers.primary_of, key)
        replica = replica_of(servers, victim)
        c = await RelayClient.connect(node["ws"])
        acked: list[tuple[str, str]] = []

        async def stream(ch: str) -> None:
            i = 0
            while True:
                try:
                    await c.publish(ch, "x" * 200, id=f"{ch}-{i}", ack="log", timeout_s=3)
                except Exception:
                    return  # the node is gone
                acked.append((ch, f"{ch}-{i}"))
                i += 1

        tasks = [asyncio.ensure_future(stream(ch)) for ch in mine + CHANNELS[1:8]]
        while len(acked) < 300:
            await asyncio.sleep(0.05)  # poll interval while the load builds
        before = len(acked)
        # Cut the replication link and keep it cut (the replica now authenticates as a
        # user the primary does not have): the primary acknowledges what it lacks.
        with redis.Redis(host=replica.host, port=replica.port) as r:
            r.config_set("masteruser", "nobody")
            r.config_set("masterauth", "wrong")
        with redis.Redis(host=victim.host, port=victim.port) as r:
            r.execute_command("CLIENT", "KILL", "TYPE", "replica")
        await asyncio.sleep(0.3)  # writes acknowledged by the primary alone
        os.kill(node["pid"], signal.SIGKILL)  # the owner, RAM and disk, with the primary
        victim.kill()
        await asyncio.gather(*tasks)
        await c.close()
        await promoted(servers, key, victim, 30)
        # Ops bring the dead primary back; it rejoins as a replica of the promoted one
        # (with log_replicas = 1, a shard without a replica can neither take an append
        # nor a claim of a slot: the fence waits for a replica too).
        await asyncio.to_thread(victim.start)
        if log_replicas:
            await replica_online(await promoted(servers, key, victim, 30), 30)
        assert cluster.workdir is not None
        shutil.rmtree(cluster.workdir / "sg" / "n1" / "data")
        node = await asyncio.to_thread(cluster.restart, "sg/n1")
        await asyncio.to_thread(wait_settled, cluster, [node])
        h = History()
        h.attempted = h.published = set(acked)
        verdict = await check("sg", node["ws"], h)
        print(
            f"\nRedis primary and owner (disk lost) kill -9, lagging replica, "
            f"log_replicas={log_replicas}: {len(acked)} acked at log ({len(acked) - before} "
            f"while the replica lagged), {len(verdict.lost)} lost"
        )
        if log_replicas:
            assert not verdict.lost, verdict
