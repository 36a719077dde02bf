"""One relay node, wired together: WebSocket listener, admin HTTP, timers, shutdown.

Create a :class:`RelayServer` from a validated :class:`~relay.config.Config`, call
:meth:`RelayServer.start` once the reactor is installed, and :meth:`RelayServer.stop`
(a Deferred) to shut down gracefully: refuse new clients, close the others with 1001,
wait for them (bounded), then stop the admin port.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry
from twisted.internet import defer, task
from twisted.web.http import combinedLogFormatter, datetimeToLogString
from twisted.web.server import Site

from relay import __version__
from relay.admin import admin_root
from relay.auth import TokenVerifier
from relay.config import Config
from relay.dedupe import DedupeIndex
from relay.loopback import is_loopback
from relay.metrics import NodeCollector
from relay.node import Node
from relay.redact import redact_text
from relay.session import Limits
from relay.store import PendingStore
from relay.ws import RelayFactory

log = logging.getLogger(__name__)

TICK_S = 1.0
SHUTDOWN_GRACE_S = 5.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def build_node(config: Config) -> Node:
    """The pure core of a node, configured."""
    st = config.store
    return Node(
        node_id=config.node.id,
        region=config.node.region,
        store=PendingStore(
            channel_max_messages=st.channel_max_messages,
            channel_max_bytes=st.channel_max_bytes,
        ),
        dedupe=DedupeIndex(window_ms=st.dedupe_window_s * 1000, max_ids=st.dedupe_max_ids),
    )


def build_verifier(config: Config) -> TokenVerifier | None:
    a = config.auth
    # Unset keys are "" in the config; the verifier wants None for "not configured".
    key = Path(a.es256_public_key).read_bytes() if a.es256_public_key else None
    if not a.hs256_secret and key is None:
        return None
    return TokenVerifier(
        hs256_secret=a.hs256_secret or None, es256_public_key_pem=key, leeway_s=a.leeway_s
    )


def redacted_access_log(timestamp: str, request: Any) -> str:
    """The admin port's access-log line (combined format) with every ``token=`` value,
    in the request line and in the Referer, replaced by ``REDACTED``. Its time is the
    wall clock's (Twisted passes the reactor's, monotonic in a node: relay/entry.py)."""
    del timestamp
    line: str = combinedLogFormatter(datetimeToLogString(time.time()), request)
    return redact_text(line)


class RelayServer:
    """A running node (call :meth:`start`; then :attr:`ws_url` and :attr:`admin_url`)."""

    def __init__(self, config: Config, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor: Any = reactor
        self.config = config
        self.node = build_node(config)
        self.process = psutil.Process()
        self.rss_bytes = self.process.memory_info().rss
        wm = config.store.memory_high_watermark_bytes
        self.high_watermark_bytes = wm or int(psutil.virtual_memory().total * 0.8)
        c = config.client
        self.limits = Limits(
            max_body=c.max_body,
            max_frame=c.max_frame,
            rate_per_s=c.rate_per_s,
            burst=c.burst,
            default_ttl_s=config.store.default_ttl_s,
            max_ttl_s=config.store.max_ttl_s,
            allow_anonymous=c.allow_anonymous,
            max_subscriptions=c.max_subscriptions_per_connection,
            max_replay_backlog=2 * config.store.channel_max_bytes,
        )
        scheme = "wss" if c.tls_enabled else "ws"
        self.factory = RelayFactory(
            url=f"{scheme}://{_url_host(c.host)}",
            node=self.node,
            limits=self.limits,
            verifier=build_verifier(config),
            clock_s=time.monotonic,
            clock_ms=wall_ms,
            overloaded=self.overloaded,
            max_outbound_bytes=c.max_outbound_bytes,
            allowed_origins=list(c.allowed_origins),
            ping_interval_s=c.ping_interval_s,
            ping_timeout_s=c.ping_timeout_s,
            handshake_timeout_s=c.handshake_timeout_s,
            max_handshake_bytes=c.max_handshake_bytes,
            hello_timeout_s=c.hello_timeout_s,
            max_connections=c.max_connections,
            max_connections_per_ip=c.max_connections_per_ip,
            max_subscriptions=c.max_subscriptions,
        )
        self.factory.loopback_only = is_loopback(c.host)
        self.router: Any = None
        if config.cluster.redis_url:
            # Lazy: a standalone node never loads the cluster edge (no cycle: cluster
            # imports only the node core).
            from cluster.region import Router

            self.router = Router(
                config=config,
                node=self.node,
                reactor=reactor,
                fan_out=self.factory.fan_out,
                wall_ms=wall_ms,
            )
            self.router.on_drain_requested = self._drain_requested
            self.factory.router = self.router
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(NodeCollector(self))
        self.ws_port: Any = None
        self._ports: tuple[int, int] | None = None
        self._stopping: defer.Deferred[Any] | None = None
        self.admin_port: Any = None
        self._tick = task.LoopingCall(self.tick)
        self._tick.clock = reactor
        self.started_at = time.time()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """Listen; the Deferred fires once the node serves (in a cluster: once it has
        joined its region)."""
        c = self.config.client
        if c.tls_enabled:
            from relay.tls import server_context_factory

            ctx = server_context_factory(c.tls_cert, c.tls_key)
            self.ws_port = self.reactor.listenSSL(c.port, self.factory, ctx, interface=c.host)
        else:
            self.ws_port = self.reactor.listenTCP(c.port, self.factory, interface=c.host)
        a = self.config.admin
        root = admin_root(self, self.registry, a.token, loopback_only=is_loopback(a.host))
        site = Site(root, logFormatter=redacted_access_log)
        site.displayTracebacks = False
        self.admin_port = self.reactor.listenTCP(a.port, site, interface=a.host)
        self._ports = (self.ws_port.getHost().port, self.admin_port.getHost().port)
        self._tick.start(TICK_S, now=False)
        log.info("node %s serving %s (admin %s)", self.node.node_id, self.ws_url, self.admin_url)
        if self.router is None:
            return defer.succeed(None)
        import asyncio

        return defer.Deferred.fromFuture(
            asyncio.ensure_future(self.router.start(ws=self.ws_url, admin=self.admin_url))
        )

    def _drain_requested(self) -> None:
        # Ops asked this node to leave: shut down gracefully (stop() drains first).
        self.reactor.callLater(0, self.reactor.stop)

    def stop(self) -> defer.Deferred[None]:
        """Shut down gracefully; fires when every listener and client is gone.

        Safe to call more than once: later calls wait for the same shutdown.
        """
        if self._stopping is None:
            self._stopping = self._stop()
        d: defer.Deferred[None] = defer.Deferred()

        def done(result: object) -> object:
            d.callback(None)
            return result

        self._stopping.addBoth(done)
        return d

    @defer.inlineCallbacks
    def _stop(self) -> Any:
        if self._tick.running:
            self._tick.stop()
        if self.router is not None:
            import asyncio

            # Hand the slots over first (flush, release the lease), then let clients go.
            yield defer.Deferred.fromFuture(asyncio.ensure_future(self.router.drain()))
        self.factory.close_all()
        if self.ws_port is not None:
            yield self.ws_port.stopListening()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while self.factory.connections and time.monotonic() < deadline:
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        for proto in list(self.factory.connections):
            proto.dropConnection(abort=True)
        if self.admin_port is not None:
            yield self.admin_port.stopListening()
        if self.router is not None:
            import asyncio

            yield defer.Deferred.fromFuture(asyncio.ensure_future(self.router.stop()))

    # -- periodic ------------------------------------------------------------------

    def tick(self) -> None:
        self.node.tick(wall_ms())
        self.rss_bytes = self.process.memory_info().rss

    def overloaded(self) -> bool:
        return bool(self.rss_bytes > self.high_watermark_bytes)

    # -- views ---------------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        c = self.config.client
        scheme = "wss" if c.tls_enabled else "ws"
        port = self._ports[0] if self._ports else c.port
        return f"{scheme}://{_url_host(c.host)}:{port}/v1/ws"

    @property
    def admin_url(self) -> str:
        a = self.config.admin
        port = self._ports[1] if self._ports else a.port
        return f"http://{_url_host(a.host)}:{port}"

    def status(self) -> dict[str, Any]:
        n = self.node
        c = n.counters
        return {
            "node": n.node_id,
            "region": n.region,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "ws": self.ws_url,
            "connections": len(self.factory.connections),
            "channels": n.store.channels,
            "pending": {"messages": n.store.messages, "bytes": n.store.bytes},
            "dedupe_ids": len(n.dedupe),
            "memory": {
                "rss_bytes": self.rss_bytes,
                "high_watermark_bytes": self.high_watermark_bytes,
                "overloaded": self.overloaded(),
            },
            "counters": {
                "accepted": c.accepted,
                "duplicates": c.duplicates,
                "acked": c.acked,
                "evicted": c.evicted,
                "expired": c.expired,
                "delivered": c.delivered + self.factory.stats["delivered"],
            },
            "errors": dict(self.factory.errors),
            "cluster": self.router.status() if self.router is not None else None,
            "disconnects": dict(self.factory.disconnects),
        }


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
