"""The node's Prometheus metrics (``relay_*``), read from live counters at scrape time.

Counting on the hot path is plain integer arithmetic in the core and the edge; this
collector turns those counters into metrics only when ``/metrics`` is scraped. No metric
is labelled by channel (unbounded cardinality).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from relay.server import RelayServer


class NodeCollector(Collector):
    """Exports one relay server's counters and gauges."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        node = s.node
        c = node.counters
        f = s.factory
        labels = ["node", "region"]
        who = [node.node_id, node.region]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(who, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=labels)
            m.add_metric(who, value)
            return m

        yield gauge("relay_connections", "Open client connections", len(f.connections))
        yield gauge("relay_channels", "Channels with pending messages", node.store.channels)
        yield gauge(
            "relay_subscribed_channels", "Channels with a subscriber here", len(node.subscribers)
        )
        yield gauge("relay_pending_messages", "Undelivered messages held", node.store.messages)
        yield gauge("relay_pending_bytes", "Bytes of undelivered messages held", node.store.bytes)
        yield gauge("relay_dedupe_ids", "Message ids remembered for dedupe", len(node.dedupe))
        yield gauge("relay_rss_bytes", "Resident memory of the node", s.rss_bytes)
        yield gauge(
            "relay_memory_high_watermark_bytes",
            "RSS above which pub is refused",
            s.high_watermark_bytes,
        )
        yield gauge("relay_overloaded", "1 while pub is refused for memory", int(s.overloaded()))
        yield counter("relay_messages_in_total", "Messages accepted (not duplicates)", c.accepted)
        yield counter(
            "relay_messages_out_total",
            "Messages sent to subscribers",
            f.stats["delivered"] + c.delivered,
        )
        yield counter("relay_duplicates_total", "Publishes answered dup: true", c.duplicates)
        yield counter("relay_acked_total", "Messages removed by ack", c.acked)
        yield counter("relay_evictions_total", "Messages evicted by a channel cap", c.evicted)
        yield counter("relay_expired_total", "Messages dropped at their TTL", c.expired)
        yield counter(
            "relay_dedupe_forgotten_early_total",
            "Ids forgotten before the window ended (dedupe_max_ids)",
            node.dedupe.forgotten_early,
        )
        yield counter(
            "relay_rate_limited_total", "Ops refused rate_limited", f.errors.get("rate_limited", 0)
        )
        errors = CounterMetricFamily(
            "relay_errors_total", "Errors answered, by code", labels=[*labels, "code"]
        )
        for code, n in sorted(f.errors.items()):
            errors.add_metric([*who, code], n)
        yield errors
        disc = CounterMetricFamily(
            "relay_disconnects_total",
            "Connections the node closed, by close code or reason",
            labels=[*labels, "code"],
        )
        for code, n in sorted(f.disconnects.items()):
            disc.add_metric([*who, code], n)
        yield disc
