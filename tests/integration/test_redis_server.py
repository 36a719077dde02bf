"""Local Redis servers for `relay dev` and the tests (relay/redis_server.py): a server
counts as started only when the process we ran answers, not another one on its port."""

from __future__ import annotations

from typing import Any

import pytest

from relay import redis_server
from relay.redis_server import RedisServer, RedisServerError, server_pid


def test_a_port_another_server_holds_is_refused_not_taken_for_ours() -> None:
    first = RedisServer().start()
    try:
        assert server_pid(first.host, first.port) == first.proc.pid  # type: ignore[union-attr]
        with pytest.raises(RedisServerError, match=f"port {first.port} is taken"):
            RedisServer(port=first.port).start()
    finally:
        first.stop()


def test_a_picked_port_that_turns_out_taken_is_picked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = RedisServer().start()
    picks = [first.port]  # the first pick collides with a live server
    real = redis_server.free_port

    def pick(host: str = "127.0.0.1") -> int:
        return picks.pop(0) if picks else real(host)

    monkeypatch.setattr(redis_server, "free_port", pick)
    second: Any = None
    try:
        second = RedisServer().start()
        assert second.port != first.port
        assert server_pid(second.host, second.port) == second.proc.pid
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_nothing_listening_has_no_pid() -> None:
    port = redis_server.free_port()
    assert server_pid("127.0.0.1", port) is None
