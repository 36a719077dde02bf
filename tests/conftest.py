"""Shared fixtures: an in-process relay node on the test reactor, asyncio test support.

pytest runs with ``--reactor=asyncio`` (pyproject.toml), so Twisted's reactor *is* an
asyncio loop: asyncio clients (``websockets``, ``relay.client``) and the node under test
run on the same loop. Mark coroutine tests with :func:`aio`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from relay.config import Config, load_config
from relay.dedupe import DedupeIndex
from relay.node import Node
from relay.server import RelayServer
from relay.store import PendingStore

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]

# The `relay` command as users run it.
RELAY = [sys.executable, "-m", "relay"]


def run_relay(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``relay ARGS`` as a real process (``env`` added to the test's environment, ``stdin``
    fed to it); its output captured as text. The caller checks the return code."""
    return subprocess.run(
        [*RELAY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        env={**os.environ, **(env or {})},
    )


def aio(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run an ``async def`` test as an asyncio task on the reactor's loop."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # pytest-twisted calls tests in the reactor's greenlet and waits for a
        # returned Deferred.
        return Deferred.fromFuture(asyncio.ensure_future(fn(*args, **kwargs)))

    return wrapper


async def until(cond: Callable[[], Any], timeout_s: float = 5.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail after a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)  # poll interval


async def next_turn() -> None:
    """Let the loop run what is ready (callbacks, other tasks) once, then go on."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(fut.set_result, None)
    await fut


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``redis_kind``: "server" (one Redis per region), and also "cluster" (a local Redis
    Cluster per region) for tests marked ``@pytest.mark.redis_cluster``."""
    if "redis_kind" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker("redis_cluster") is not None
        metafunc.parametrize("redis_kind", ["server", "cluster"] if marked else ["server"])


@pytest.fixture(autouse=True)
def _cli_context_home(tmp_path_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI contexts (``relay dev`` writes one) go to a temporary directory, never the
    real home; no context or Redis URL is inherited from the environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))
    monkeypatch.delenv("RELAY_CONTEXT", raising=False)
    monkeypatch.delenv("RELAY_CLUSTER__REDIS_URL", raising=False)


def run_at_root(
    cmd: list[str], timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` from the repository root (``env``: its whole environment, default the
    test's), its output captured as text. The caller checks the return code."""
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)


def memory_node(
    node_id: str = "eu/n1",
    *,
    max_messages: int = 1000,
    max_bytes: int = 1 << 24,
    window_ms: int = 600_000,
    max_ids: int = 10_000,
    **options: Any,
) -> Node:
    """A node core of ``node_id``'s region with these channel caps and dedupe bounds
    (``options``: the rest of :class:`relay.node.Node`'s arguments), for unit tests."""
    return Node(
        node_id=node_id,
        region=node_id.split("/")[0],
        store=PendingStore(channel_max_messages=max_messages, channel_max_bytes=max_bytes),
        dedupe=DedupeIndex(window_ms=window_ms, max_ids=max_ids),
        **options,
    )


@contextmanager
def small_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``"64k"``) mounted at the new directory ``mnt`` while the block
    runs (a full disk on demand), or a skip where mounting is not allowed. Unmounted lazily
    on exit, so a file a stopped process left open does not keep it."""
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def node_config(**sections: dict[str, Any]) -> Config:
    """A config for a test node on free loopback ports, with overrides per section."""
    base = load_config(
        None, {"RELAY_CLIENT__PORT": "0", "RELAY_ADMIN__PORT": "0", "RELAY_NODE__ID": "test/n1"}
    )
    for name, values in sections.items():
        base = replace(base, **{name: replace(getattr(base, name), **values)})
    problems = base.validate()
    assert not problems, problems
    return base


def start_node(config: Config) -> RelayServer:
    from twisted.internet import reactor

    server = RelayServer(config, reactor)
    server.start()
    return server


def stop_node(server: RelayServer) -> None:
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def make_node() -> Iterator[Callable[..., RelayServer]]:
    """Start nodes with ``make_node(client={...}, store={...})``; all stopped at the end."""
    started: list[RelayServer] = []

    def make(**sections: dict[str, Any]) -> RelayServer:
        server = start_node(node_config(**sections))
        started.append(server)
        return server

    yield make
    for s in started:
        stop_node(s)


@pytest.fixture
def anon_node(make_node: Callable[..., RelayServer]) -> RelayServer:
    """A node that allows anonymous clients."""
    return make_node(client={"allow_anonymous": True})


@pytest.fixture
def wss_node(make_node: Callable[..., RelayServer], tmp_path: Path) -> tuple[RelayServer, Any]:
    """A node that allows anonymous clients on wss://, and its certificate files
    (``tests.certs.CertFiles``: trust ``ca_path``)."""
    from tests.certs import write_cert_files

    certs = write_cert_files(tmp_path)
    node = make_node(
        client={
            "allow_anonymous": True,
            "tls_cert": str(certs.cert_path),
            "tls_key": str(certs.key_path),
        }
    )
    assert node.ws_url.startswith("wss://")
    return node, certs


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """One real Redis-compatible server for the session (Debian redis-server or the
    embedded valkey-server), on a free loopback port."""
    from relay.redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    """The session's Redis, emptied for this test."""
    import redis as redis_sync

    with redis_sync.Redis.from_url(redis_server.url) as r:
        r.flushall()
        r.config_set("notify-keyspace-events", "")
    url: str = redis_server.url
    return url


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say at the end of the run when the browser tests were skipped, and why: a green
    run without them has not tested the dashboard or the demo."""
    from tests.browser.conftest import SKIP_PREFIX

    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else ""
        if SKIP_PREFIX in str(reason):
            why = str(reason).split(SKIP_PREFIX, 1)[1].lstrip(": ")
            reasons[why] = reasons.get(why, 0) + 1
    for why, n in reasons.items():
        terminalreporter.write_sep("=", "browser tests skipped", yellow=True, bold=True)
        terminalreporter.write_line(
            f"{n} browser test{'s' if n != 1 else ''} did not run: {why}. "
            "The dashboard and the demo page are untested in this run."
        )


class FakeClock:
    """A monotonic clock the test sets by hand (``clock.now = …``), for ``Router(clock=)``."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def memory_router(
    node_id: str,
    log: Any,
    wall_ms: Callable[[], int] = lambda: 1_000_000,
    clock: Callable[[], float] = time.monotonic,
    env: dict[str, str] | None = None,
) -> Any:
    """A region router on an in-memory slot log (no Redis is ever reached), its lease
    taken as fresh: for router tests and the cluster scenarios. ``env``: more
    ``RELAY_*`` settings."""
    from cluster.router import Router  # the cluster edge: only the tests that use it load it
    from relay.config import load_config
    from relay.server import build_node

    cfg = load_config(
        None,
        {
            "RELAY_CLUSTER__REDIS_URL": "redis://127.0.0.1:1/0",
            "RELAY_NODE__ID": node_id,
            **(env or {}),
        },
    )
    r = Router(
        config=cfg,
        node=build_node(cfg),
        reactor=None,
        fan_out=lambda m, h: None,
        wall_ms=wall_ms,
        clock=clock,
    )
    r.slotlog = log
    r.lease_fresh = lambda: True  # type: ignore[method-assign]
    return r


def publish_at(r: Any, ch: str, msg_id: str, ack: str = "log", reply: Any = None) -> None:
    """A client's ``pub`` of a one-byte body on router ``r`` (a minute's TTL)."""
    r.publish(
        ch=ch,
        msg_id=msg_id,
        body=b"x",
        sender="s",
        ttl_ms=60_000,
        ack=ack,
        reply=reply if reply is not None else (lambda *a: None),
    )
