"""The slot log's lean connections (cluster/slotlog/leanpipe.py) against a real Redis:
pipelined replies in order, error replies as redis-py raises them, a broken or silent
connection failing what is in flight (never re-sent) and replaced on the next call; the
group commit's appends and the blocking tails over them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cluster.slotlog import START_ID, RedisSlotLog, SlotLogError, TailEntry
from cluster.slotlog.leanpipe import LeanPipe, pack
from cluster.slotlog.rediscalls import _tail_entry
from tests.conftest import aio, next_turn, until

A = "sg/a"


@contextlib.asynccontextmanager
async def lean(redis_url: str, **client_kwargs: Any) -> AsyncIterator[LeanPipe]:
    """A lean pipe on a client of ``redis_url`` (socket_timeout 5 s unless given)."""
    client = Redis.from_url(redis_url, **{"socket_timeout": 5, **client_kwargs})
    pipe = LeanPipe(client)
    try:
        yield pipe
    finally:
        await pipe.close()
        await client.aclose()


def test_pack_is_resp() -> None:
    assert pack(("SET", "k", b"\x00\r\n")) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n\x00\r\n\r\n"
    assert pack(("PING",)) == b"*1\r\n$4\r\nPING\r\n"
    assert pack(("ECHO", "é")) == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"


@aio
async def test_many_callers_pipeline_and_get_their_own_replies(redis_url: str) -> None:
    async with lean(redis_url) as pipe:
        got = await asyncio.gather(*(pipe.call("ECHO", f"v{i}") for i in range(200)))
        assert got == [f"v{i}".encode() for i in range(200)]
        assert await pipe.call("INCRBY", "n", "3") == 3
        assert await pipe.call("LRANGE", "missing", "0", "-1") == []
        assert pipe.connects == 1  # one connection for all of it


@aio
async def test_the_collector_does_not_close_the_connection_under_a_call(redis_url: str) -> None:
    """redis-py's connection and stream writer close the transport when collected: the
    pipe keeps them, and once it closes it, nothing warns of an unclosed connection."""
    admin = redis.Redis.from_url(redis_url)
    async with lean(redis_url) as pipe:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert await pipe.call("PING") == b"PONG"
            blocked = asyncio.ensure_future(pipe.call("BLPOP", "k", "3"))
            await next_turn()  # the task has run: the BLPOP is sent
            for generation in (0, 1, 2):
                gc.collect(generation)
            admin.rpush("k", "v")
            assert await blocked == [b"k", b"v"]
            gc.collect()
            assert await pipe.call("PING") == b"PONG"
            assert pipe.connects == 1
            await pipe.close()
            gc.collect()
        assert not [w for w in caught if "nclosed" in str(w.message)]
    admin.close()


@aio
async def test_replies_are_resp2_whatever_the_clients_protocol(redis_url: str) -> None:
    async with lean(redis_url, socket_timeout=5, protocol=3) as pipe:
        await pipe.call("HSET", "h", "f", "v")
        assert await pipe.call("HGETALL", "h") == [b"f", b"v"]  # RESP3 would be a map


@aio
async def test_error_replies_raise_as_redis_py_does_and_the_connection_stays(
    redis_url: str,
) -> None:
    async with lean(redis_url) as pipe:
        with pytest.raises(NoScriptError):
            await pipe.call("EVALSHA", "0" * 40, "0")
        with pytest.raises(ResponseError, match="wrong number of arguments"):
            await pipe.call("GET")
        sha = await pipe.call("SCRIPT", "LOAD", "return ARGV[1]")
        assert await pipe.call("EVALSHA", sha, "0", b"x") == b"x"
        assert pipe.connects == 1


@aio
async def test_call_many_sends_every_command_before_a_reply_and_lists_errors(
    redis_url: str,
) -> None:
    async with lean(redis_url) as pipe:
        assert await pipe.call_many([]) == []
        await pipe.call("PING")  # open
        calls = asyncio.ensure_future(
            pipe.call_many([("SET", "a", "1"), ("GET",), ("INCR", "a"), ("EVALSHA", "0" * 40, "0")])
        )
        await next_turn()
        # Sent in one step: another caller's command comes after all of them.
        assert await pipe.call("GET", "a") == b"2"
        ok, wrong, incr, noscript = await calls
        assert ok == b"OK" and incr == 2
        assert isinstance(wrong, ResponseError) and isinstance(noscript, NoScriptError)
        assert pipe.connects == 1


@aio
async def test_call_many_cancelled_drops_its_replies_in_order(redis_url: str) -> None:
    async with lean(redis_url) as pipe:
        await pipe.call("PING")
        calls = asyncio.ensure_future(pipe.call_many([("BLPOP", "nothing", "0.3"), ("PING",)]))
        await next_turn()
        calls.cancel()
        with pytest.raises(asyncio.CancelledError):
            await calls
        assert await pipe.call("ECHO", "after") == b"after"  # the late replies skipped
        assert pipe.connects == 1


@aio
async def test_a_killed_connection_fails_what_is_in_flight_and_the_next_call_reconnects(
    redis_url: str,
) -> None:
    admin = redis.Redis.from_url(redis_url)
    async with lean(redis_url) as pipe:
        cid = await pipe.call("CLIENT", "ID")
        blocked = asyncio.ensure_future(pipe.call("BLPOP", "nothing", "5"))
        await until(
            lambda: any(c["id"] == str(cid) and c["cmd"] == "blpop" for c in admin.client_list()),
            what="the BLPOP blocked in the server",
        )
        admin.client_kill_filter(_id=cid)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(blocked, 5)
        assert await pipe.call("PING") == b"PONG"
        assert pipe.connects == 2
    admin.close()


@aio
async def test_a_reply_later_than_socket_timeout_fails_every_call_in_flight(
    redis_url: str,
) -> None:
    async with lean(redis_url, socket_timeout=0.2) as pipe:
        slow = asyncio.ensure_future(pipe.call("BLPOP", "nothing", "2"))
        behind = asyncio.ensure_future(pipe.call("PING"))  # queued behind the slow one
        with pytest.raises(RedisTimeoutError):
            await slow
        with pytest.raises(RedisTimeoutError):
            await behind
        assert await pipe.call("PING") == b"PONG"  # a new connection
        assert pipe.connects == 2


@aio
async def test_the_group_commits_appends_go_over_it_and_survive_a_script_flush(
    redis_url: str,
) -> None:
    log = RedisSlotLog.from_url(redis_url, "sg")
    admin = redis.Redis.from_url(redis_url)
    try:
        for slot in (1, 2):
            assert await log.claim(slot, A, 0) == 1
        first = await log.append_many([(1, b"a"), (2, b"b"), (1, b"c")], A, {1: 1, 2: 1})
        admin.script_flush()  # NOSCRIPT next: loaded again on the same connection
        second = await log.append_many([(2, b"d")], A, {2: 1})
        lean: Any = log._lean
        assert lean is not None and lean.connects == 1
        assert [e.data for e in await log.read(1)] == [b"a", b"c"]
        assert [e.data for e in await log.read(2)] == [b"b", b"d"]
        assert [e.id for e in await log.read(1)] == [first[0], first[2]]
        assert [e.id for e in await log.read(2)] == [first[1], second[0]]
        assert isinstance(second[0], str)
    finally:
        admin.close()
        await log.close()


# ---- tails ---------------------------------------------------------------------------


def test_a_tail_row_is_read_in_each_layout() -> None:
    log_row = [b"d", b"data", b"e", b"3", b"p", b"1-0"]  # the slot log (append.lua)
    mirror_row = [b"d", b"data", b"p", b"1-0"]  # a mirror (cluster/receiver.py)
    other = [b"p", b"1-0", b"x", b"y", b"d", b"data"]  # any other order or field
    for row in (log_row, mirror_row, other):
        assert _tail_entry(7, b"2-0", row) == TailEntry(7, "2-0", b"data", "1-0")
    assert _tail_entry(7, b"2-0", [b"d", b"data"]) == TailEntry(7, "2-0", b"data", "")
    # A repeated field: the last one wins, as redis-py's reading of the row did.
    assert _tail_entry(7, b"2-0", [b"d", b"a", b"d", b"b", b"p", b"1-0"]).data == b"b"
    with pytest.raises(SlotLogError):
        _tail_entry(7, b"2-0", None)  # no fields at all
    with pytest.raises(SlotLogError):
        _tail_entry(7, b"2-0", [b"e", b"3"])  # no data


@aio
async def test_blocked_tails_at_once_each_hold_a_connection_and_get_their_entries(
    redis_url: str,
) -> None:
    log = RedisSlotLog.from_url(redis_url, "sg", max_block_ms=5000)
    try:
        for slot in (1, 2, 3):
            assert await log.claim(slot, A, 0) == 1
        tails = [asyncio.ensure_future(log.tail({s: START_ID}, 5000)) for s in (1, 2, 3)]
        await until(lambda: len(log._tails_all) == 3, what="three tails under way")
        ids = [await log.append(s, A, 1, f"to {s}".encode()) for s in (3, 1, 2)]
        got = await asyncio.wait_for(asyncio.gather(*tails), 5)
        assert [[(e.slot, e.data) for e in g] for g in got] == [
            [(1, b"to 1")],
            [(2, b"to 2")],
            [(3, b"to 3")],
        ]
        assert sorted(e.id for g in got for e in g) == sorted(ids)
        assert len(log._tails_idle) == 3  # given back for the next tails
        # Cancelled while blocked: its connection is closed, not given back.
        blocked = asyncio.ensure_future(log.tail({1: ids[1]}, 5000))
        await until(lambda: len(log._tails_idle) == 2, what="an idle connection taken")
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert len(log._tails_all) == 2 and len(log._tails_idle) == 2
        assert await log.tail({1: START_ID}, None) == [TailEntry(1, ids[1], b"to 1", START_ID)]
    finally:
        await log.close()
    assert not log._tails_all
    with pytest.raises(RedisConnectionError, match="closed"):
        await log.tail({1: START_ID}, None)  # no connection opened after close
    assert not log._tails_all and not log._tails_idle
