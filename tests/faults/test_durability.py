"""A one-node region killed with -9 and restarted: what acks promise survives, what the
disk alone keeps when Redis is lost too, a corrupt snapshot, a full disk."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.client import RelayClient, RetryPolicy
from relay.dev import DevCluster
from relay.redis_server import RedisServer
from tests.cluster.conftest import FAST, admin_status, pending_ids, running, wait_settled
from tests.conftest import aio, small_tmpfs

PATIENT = RetryPolicy(max_attempts=400, base_delay_s=0.05, max_delay_s=0.2)
SETTINGS = {**FAST, "batch_window_ms": 100}


@pytest.fixture
def one() -> Iterator[tuple[DevCluster, dict[str, Any]]]:
    with running(["sg"], nodes_per_region=1, cluster_settings=SETTINGS) as world:
        yield world


def node_of(doc: dict[str, Any]) -> dict[str, Any]:
    n: dict[str, Any] = doc["regions"]["sg"]["nodes"][0]
    return n


async def status(node: dict[str, Any]) -> dict[str, Any]:
    return await asyncio.to_thread(admin_status, node["admin"])


async def restart(cluster: DevCluster, doc: dict[str, Any]) -> dict[str, Any]:
    node = await asyncio.to_thread(cluster.restart, "sg/n1")
    doc["regions"]["sg"]["nodes"][0] = node
    await asyncio.to_thread(wait_settled, cluster, [node])
    return node


async def until_saved(node: dict[str, Any], timeout_s: float = 30) -> None:
    """Until every slot is written (a quiet slot waits up to node.snapshot_max_age_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        risk = (await status(node))["cluster"]["data_at_risk"]
        if risk["unsaved_slots"] == 0 and risk["unlogged_events"] == 0:
            return
        assert time.monotonic() < deadline, risk
        await asyncio.sleep(0.1)  # poll interval while snapshots are written


@aio
async def test_kill_9_under_load_keeps_every_log_ack(one: Any) -> None:
    cluster, doc = one
    node = node_of(doc)
    c = await RelayClient.connect(node["ws"], retry=PATIENT)
    acked: dict[str, list[str]] = {"log": [], "mem": []}

    async def stream(level: str, ch: str) -> None:
        i = 0
        while True:
            mid = f"{ch}-{i}"
            try:
                await c.publish(ch, "x" * 200, id=mid, ack=level, timeout_s=5)
            except Exception:
                return  # the node is gone
            acked[level].append(mid)
            i += 1

    tasks = [
        asyncio.ensure_future(stream(level, f"inbox:{level}{k}"))
        for level in ("log", "mem")
        for k in range(10)
    ]
    while len(acked["log"]) < 300 or len(acked["mem"]) < 300:
        await asyncio.sleep(0.05)  # poll interval while the load runs
    os.kill(node["pid"], signal.SIGKILL)
    await asyncio.gather(*tasks)
    await c.close()
    node = await restart(cluster, doc)
    got: set[str] = set()
    for level in ("log", "mem"):
        for k in range(10):
            got |= set(await pending_ids(node["ws"], f"inbox:{level}{k}"))
    assert set(acked["log"]) <= got, "a message acknowledged at log was lost"
    lost_mem = [m for m in acked["mem"] if m not in got]
    print(
        f"\nkill -9: {len(acked['log'])} acked at log, all kept; {len(acked['mem'])} "
        f"acked at mem, {len(lost_mem)} lost (batch window 100 ms)"
    )


@aio
async def test_redis_lost_too_recovers_from_disk_snapshots(one: Any) -> None:
    cluster, doc = one
    node = node_of(doc)
    c = await RelayClient.connect(node["ws"], retry=PATIENT)
    ids = [f"d{i}" for i in range(50)]
    for i in ids:
        await c.publish(f"inbox:{int(i[1:]) % 7}", i, id=i, ack="log")
    await c.ack("inbox:0", ["d0"])
    await c.close()
    await until_saved(node)
    os.kill(node["pid"], signal.SIGKILL)
    # The region's Redis restarts empty (no persistence): only the disk remembers.
    old = cluster.redis["sg"]
    port = old.port
    old.stop()
    cluster.redis["sg"] = RedisServer(port=port).start()
    node = await restart(cluster, doc)
    got: list[str] = []
    for ch in range(7):
        got += await pending_ids(node["ws"], f"inbox:{ch}")
    assert sorted(got) == sorted(i for i in ids if i != "d0")
    # The snapshot's tombstone: d0, acked before the crash, is a duplicate, not new.
    c = await RelayClient.connect(node["ws"], retry=PATIENT)
    again = await c.publish("inbox:0", "d0", id="d0", ack="log")
    await c.close()
    assert again.dup
    assert "d0" not in await pending_ids(node["ws"], "inbox:0")


@aio
async def test_a_corrupt_snapshot_is_refused_and_rebuilt_from_the_region(one: Any) -> None:
    cluster, doc = one
    node = node_of(doc)
    c = await RelayClient.connect(node["ws"], retry=PATIENT)
    for i in range(20):
        await c.publish("inbox:eve", f"m{i}", id=f"m{i}", ack="log")
    await c.close()
    await until_saved(node)
    os.kill(node["pid"], signal.SIGKILL)
    snaps = list(Path(cluster.workdir or "").glob("sg/n1/data/slots/*.snap"))
    assert snaps
    for p in snaps:
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    node = await restart(cluster, doc)
    st = (await status(node))["cluster"]["snapshots"]
    assert st["refused"] == len(snaps)
    assert sorted(await pending_ids(node["ws"], "inbox:eve")) == sorted(f"m{i}" for i in range(20))


@aio
async def test_a_full_disk_does_not_stop_the_node(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "256k") as mnt:
        cluster = DevCluster(["sg"], nodes_per_region=1, cluster_settings=SETTINGS, workdir=None)
        try:
            doc = await asyncio.to_thread(cluster.start, 60)
            node = node_of(doc)
            await asyncio.to_thread(wait_settled, cluster, [node])
            # Point the node's data directory at the tiny disk and restart it there.
            os.kill(node["pid"], signal.SIGKILL)
            cfg = Path(cluster.workdir or "") / "sg" / "n1" / "node.toml"
            text = cfg.read_text().replace(
                str(Path(cluster.workdir or "") / "sg" / "n1" / "data"), str(mnt / "data")
            )
            cfg.write_text(text)
            node = await restart(cluster, doc)
            c = await RelayClient.connect(node["ws"], retry=PATIENT)
            body = "y" * 60_000
            deadline = time.monotonic() + 30
            i = 0
            while (await status(node))["cluster"]["snapshots"]["failures"] == 0:
                assert time.monotonic() < deadline, "the disk never filled"
                await c.publish(f"inbox:{i % 40}", body, id=f"f{i}", ack="log")
                i += 1
            # Still serving, and still acknowledging at log.
            a = await c.publish("inbox:after", "still here", id="after", ack="log")
            assert a.ack == "log"
            await c.close()
        finally:
            await asyncio.to_thread(cluster.stop)
