"""The node's Prometheus metrics (``relay_*``), read from live counters at scrape time.

Counting on the hot path is plain integer arithmetic in the core and the edge; this
collector turns those counters into metrics only when ``/metrics`` is scraped. No metric
is labelled by channel (unbounded cardinality).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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
        yield gauge(
            "relay_subscriptions", "Subscriptions held by this node's clients", f.budget.taken
        )
        refused = CounterMetricFamily(
            "relay_connections_refused_total",
            "Client connections refused or closed by a limit, by reason",
            labels=[*labels, "reason"],
        )
        for reason in (
            "max_connections",
            "max_connections_per_ip",
            "handshake_too_large",
            "hello_timeout",
        ):
            refused.add_metric([*who, reason], f.refused.get(reason, 0))
        yield refused
        yield counter(
            "relay_subscriptions_refused_total",
            "Subscriptions refused at the node's max_subscriptions",
            f.budget.refused,
        )
        router = getattr(s, "router", None)
        if router is not None:
            yield from cluster_metrics(router, labels, who)
        disc = CounterMetricFamily(
            "relay_disconnects_total",
            "Connections the node closed, by close code or reason",
            labels=[*labels, "code"],
        )
        for code, n in sorted(f.disconnects.items()):
            disc.add_metric([*who, code], n)
        yield disc


def cluster_metrics(router: Any, labels: list[str], who: list[str]) -> Iterator[Metric]:
    """The region's metrics as this node sees them (cluster mode only)."""
    members = GaugeMetricFamily(
        "relay_ring_members", "Members of the region by state", labels=[*labels, "state"]
    )
    states = Counter(s.name.lower() for s in router.detector.members().values())
    for state in ("alive", "suspect", "dead", "left"):
        members.add_metric([*who, state], states.get(state, 0))
    yield members
    owned = GaugeMetricFamily("relay_owned_slots", "Slots this node owns", labels=labels)
    owned.add_metric(who, len(router.owned))
    yield owned
    for name, doc, key in (
        ("relay_failovers_total", "Members declared dead whose slots moved", "failovers"),
        ("relay_fenced_writes_total", "Slot-log writes refused by fencing", "fenced"),
        ("relay_slot_log_appends_total", "Slot-log entries appended", "appends"),
        ("relay_slot_log_append_errors_total", "Slot-log appends that failed", "append_errors"),
    ):
        c = CounterMetricFamily(name, doc, labels=labels)
        c.add_metric(who, router.counters[key])
        yield c
    mesh = router.mesh
    for name, doc, value in (
        (
            "relay_mesh_refused_total",
            "Mesh connections refused before admission (handshake, proof, lease, duplicate)",
            mesh.counters["refused"] if mesh is not None else 0,
        ),
        (
            "relay_mesh_bad_requests_total",
            "Mesh requests and deliveries refused for their arguments",
            router.mesh_counters["bad_requests"],
        ),
        (
            "relay_slot_log_encode_failures_total",
            "Slot-log entries that could not be encoded (a bug; their waiters got internal)",
            router.mesh_counters["encode_failures"],
        ),
    ):
        c = CounterMetricFamily(name, doc, labels=labels)
        c.add_metric(who, value)
        yield c
    risk = router.data_at_risk()
    for name, doc, value in (
        (
            "relay_data_at_risk_messages",
            "Events accepted but not yet in the slot log (a crash now loses them)",
            risk["unlogged_events"],
        ),
        (
            "relay_unsaved_slots",
            "Owned slots changed since their last snapshot",
            risk["unsaved_slots"],
        ),
        (
            "relay_snapshot_age_seconds",
            "Age of the oldest change not yet on disk",
            risk["snapshot_age_s"],
        ),
    ):
        g = GaugeMetricFamily(name, doc, labels=labels)
        g.add_metric(who, value)
        yield g
    st = router.snapshot_stats
    for name, doc, key in (
        ("relay_snapshot_bytes", "Bytes of slot snapshots written", "bytes"),
        ("relay_snapshots_written_total", "Slot snapshots written", "written"),
        (
            "relay_snapshot_failures_total",
            "Slot snapshot writes that failed (disk full?)",
            "failures",
        ),
        ("relay_snapshots_refused_total", "Snapshots refused at start (corrupt)", "refused"),
    ):
        c = CounterMetricFamily(name, doc, labels=labels)
        c.add_metric(who, st[key])
        yield c
    links = getattr(router, "links", [])
    if links:
        now_ms = router.wall_ms()
        per_peer: list[tuple[str, str, Any, Callable[[Any], float]]] = [
            (
                "relay_link_lag_seconds",
                "Age of the oldest entry the peer has not confirmed (0 when caught up)",
                GaugeMetricFamily,
                lambda link: link.lag_s(now_ms),
            ),
            (
                "relay_link_backlog_entries",
                "Entries waiting for the link that it has seen (a lower bound)",
                GaugeMetricFamily,
                lambda link: link.backlog_entries,
            ),
            (
                "relay_link_bytes_total",
                "Bytes copied to the peer's mirrors",
                CounterMetricFamily,
                lambda link: link.bytes_total,
            ),
            (
                "relay_link_gaps_total",
                "Slots resynchronised from a checkpoint (log trimmed)",
                CounterMetricFamily,
                lambda link: link.gaps_total,
            ),
            (
                "relay_link_stalled",
                "1 while entries wait and the link has made no progress for 2 s",
                GaugeMetricFamily,
                lambda link: int(link.holding and link.stalled),
            ),
            (
                "relay_link_holder",
                "1 when this node holds the link's lease",
                GaugeMetricFamily,
                lambda link: int(link.holding),
            ),
            (
                "relay_link_running",
                "1 when this node holds the link and it runs (the destination answers)",
                GaugeMetricFamily,
                lambda link: int(link.holding and link.state == "running" and not link.stalled),
            ),
            (
                "relay_link_errors_total",
                "Copy attempts that failed (WAN cut, destination Redis down or refusing)",
                CounterMetricFamily,
                lambda link: link.errors_total,
            ),
        ]
        for name, doc, family, value in per_peer:
            m = family(name, doc, labels=[*labels, "peer"])
            for link in links:
                m.add_metric([*who, link.dest], value(link))
            yield m
    for name, doc, buckets in (
        (
            "relay_slot_log_append_seconds",
            "Time of one pipelined slot-log append",
            router.append_seconds,
        ),
        ("relay_batch_events", "Events per slot-log entry", router.batch_events),
    ):
        h = HistogramMetricFamily(name, doc, labels=labels)
        h.add_metric(who, buckets.cumulative(), buckets.sum)
        yield h
