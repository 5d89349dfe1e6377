"""`GET /metrics`: the node's counters in the Prometheus text format (docs/http.md).

Nothing is counted here on the hot path: the hub already keeps plain integer counters
(`HubStats`), and a collector turns them into metric families when Prometheus scrapes. Each
`Node` has its own `CollectorRegistry` (`node.metrics.registry`), so two nodes in one process
(tests, say) never share or clash; add your own collectors to it if you like.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from ..hub.hub import Hub
from ..hub.limits import ConnectionsPerAddress, KeyFailures
from .gate import Gate
from .http import HttpError, HttpExchange
from .plugins import ReportsLag, Source, Transport


class Measured(Protocol):
    """What `/metrics` reads (`Node` is one)."""

    hub: Hub
    transports: list[Transport]
    sources: list[Source]
    key_failures: KeyFailures
    connections_per_address: ConnectionsPerAddress
    gate: Gate


METRICS_PATH = "/metrics"

REFUSED_STATUSES = (400, 408, 413, 431, 501)
"""The statuses of requests the front door refuses for how they were sent (docs/http.md)."""

# The classic text format, which `generate_latest` writes (our names need no escaping) and
# every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NodeMetrics:
    """A node's metrics: the registry `/metrics` serves, and the few counts the hub cannot
    keep because they happen outside it (REST API requests)."""

    def __init__(self, node: Measured) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.api_messages_in = 0
        """`POST /api/publish` requests that published (one per request, however many
        channels it named; publications are counted per channel by the hub)."""
        self.connection_errors: collections.Counter[str] = collections.Counter()
        """Connections ended by an exception while serving them, by transport or plugin."""
        self.source_events_skipped: collections.Counter[str] = collections.Counter()
        """Events a source could not decode or publish and skipped, by source."""
        self.write_timeouts: collections.Counter[str] = collections.Counter()
        """Connections closed because a write made no progress for write_timeout."""
        self.http_refused = dict.fromkeys(REFUSED_STATUSES, 0)
        """Requests refused for their framing, size or lateness, by status."""
        self.registry.register(_HubCollector(node, self))

    def count_refused(self, status: int) -> None:
        self.http_refused[status] = self.http_refused.get(status, 0) + 1

    async def route(self, node: object, exchange: HttpExchange) -> bool:
        """Serves `GET /metrics` (no API key: like most exporters, protect it by network)."""
        if exchange.request.path != METRICS_PATH:
            return False
        if exchange.request.method != "GET":
            error = HttpError(405, f"use GET for {METRICS_PATH}")
            await exchange.respond(405, error.body(), headers=[("allow", "GET")])
            return True
        await exchange.respond(200, generate_latest(self.registry), CONTENT_TYPE)
        return True


class _HubCollector(Collector):
    """Reads the hub's counters at scrape time."""

    def __init__(self, node: Measured, metrics: NodeMetrics) -> None:
        self._node = node
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        hub = self._node.hub
        stats = hub.stats

        connections = GaugeMetricFamily(
            "pyrt_connections", "Open client connections, by transport.", labels=["transport"]
        )
        by_transport = dict.fromkeys((t.name for t in self._node.transports), 0)
        by_transport.update(hub.connections_by_transport())
        for transport, count in sorted(by_transport.items()):
            connections.add_metric([transport], count)
        yield connections

        yield GaugeMetricFamily(
            "pyrt_channels",
            "Channels and patterns with at least one subscriber.",
            value=len(hub.channels()),
        )
        yield CounterMetricFamily(
            "pyrt_connections_opened", "Client connections opened.", stats.connections_opened
        )

        messages_in = CounterMetricFamily(
            "pyrt_messages_in",
            "Messages received: frames from clients, and REST API publish requests.",
            labels=["source"],
        )
        messages_in.add_metric(["client"], stats.frames_in)
        messages_in.add_metric(["api"], self._metrics.api_messages_in)
        yield messages_in

        yield CounterMetricFamily(
            "pyrt_messages_out", "Frames queued for clients.", stats.frames_out
        )
        yield CounterMetricFamily(
            "pyrt_bytes_out", "Bytes of the frames queued for clients.", stats.bytes_out
        )
        yield CounterMetricFamily(
            "pyrt_publications", "Publications (one per channel published to).", stats.publications
        )
        yield CounterMetricFamily(
            "pyrt_outbox_dropped",
            "Publications dropped from slow clients' outboxes (drop_oldest, conflate).",
            stats.evicted,
        )
        yield CounterMetricFamily(
            "pyrt_slow_disconnects",
            "Connections closed as slow (4008): their outbox overflowed, or the hub's"
            " outbox budget was full.",
            stats.slow_disconnects,
        )
        yield CounterMetricFamily(
            "pyrt_budget_disconnects",
            "Connections closed as slow (4008) because hub.outbox_total_bytes was full.",
            stats.budget_disconnects,
        )
        fanout = hub.fanout_stats()
        yield GaugeMetricFamily(
            "pyrt_outbox_bytes",
            "Bytes queued for clients, in outboxes and fan-out backlogs, counted against"
            " hub.outbox_total_bytes.",
            value=hub.outbox_budget.held,
        )
        yield GaugeMetricFamily(
            "pyrt_backlog_bytes",
            "Of pyrt_outbox_bytes, the bytes in the Rust fan-out's backlogs.",
            value=fanout["backlog_bytes"],
        )
        history = hub.history_budget
        yield GaugeMetricFamily(
            "pyrt_history_bytes",
            "Bytes every channel's history holds, counted against hub.history_max_bytes.",
            value=history.bytes,
        )
        yield GaugeMetricFamily(
            "pyrt_history_publications",
            "Publications every channel's history holds.",
            value=history.retained,
        )
        yield CounterMetricFamily(
            "pyrt_history_evictions",
            "Publications history forgot, oldest first across channels, because"
            " hub.history_max_bytes was full.",
            history.evicted,
        )

        recoveries = CounterMetricFamily(
            "pyrt_recoveries",
            "Joins with `since`: hit when every missed publication was replayed.",
            labels=["result"],
        )
        recoveries.add_metric(["hit"], stats.recoveries)
        recoveries.add_metric(["miss"], stats.recovery_misses)
        yield recoveries

        yield CounterMetricFamily(
            "pyrt_errors", "Error replies and pushes sent to clients.", stats.errors
        )
        yield self._by_label(
            "pyrt_connection_errors",
            "Connections ended by an exception while serving them (closed 1011, logged with"
            " the traceback), by transport or plugin.",
            "plugin",
            {t.name: 0 for t in self._node.transports} | dict(self._metrics.connection_errors),
        )
        yield self._by_label(
            "pyrt_write_timeouts",
            "Connections closed because a write to them made no progress for write_timeout,"
            " by transport.",
            "transport",
            {t.name: 0 for t in self._node.transports} | dict(self._metrics.write_timeouts),
        )
        yield self._by_label(
            "pyrt_source_events_skipped",
            "Events a source could not decode or publish (logged and skipped), by source.",
            "source",
            {s.name: 0 for s in self._node.sources} | dict(self._metrics.source_events_skipped),
        )
        refused = CounterMetricFamily(
            "pyrt_http_refused",
            "HTTP requests refused for how they were sent: a malformed, ambiguous or too long"
            " head, a body too long, malformed or late; by status.",
            labels=["status"],
        )
        for status, count in sorted(self._metrics.http_refused.items()):
            refused.add_metric([str(status)], count)
        yield refused
        yield from self._limits()
        yield CounterMetricFamily(
            "pyrt_direct_frames",
            "Frames the Rust fan-out took for WebSocket connections (written, or kept for"
            " their writer) instead of their outbox.",
            fanout["direct_frames"],
        )
        yield CounterMetricFamily(
            "pyrt_direct_writes",
            "Socket writes (system calls) the Rust fan-out made; fewer than frames when"
            " frames were gathered (corked).",
            fanout["writes"],
        )
        yield CounterMetricFamily(
            "pyrt_direct_overflows",
            "Frames handed to the outbox because a connection's fan-out backlog (or the"
            " hub's outbox budget) was full.",
            fanout["overflows"],
        )
        lag_bytes = GaugeMetricFamily(
            "pyrt_source_lag_bytes",
            "What a source has read upstream and not yet put in history, in bytes (the WAL"
            " source: server WAL end - acked); sources that report lag only.",
            labels=["source"],
        )
        lag_seconds = GaugeMetricFamily(
            "pyrt_source_lag_seconds",
            "Seconds from a commit to its changes being in history (the open transaction's"
            " age while one is being read).",
            labels=["source"],
        )
        for source in self._node.sources:
            # Sources that know their lag say so (`ReportsLag`: the WAL source).
            if isinstance(source, ReportsLag):
                lag_bytes.add_metric([source.name], source.lag_bytes)
                lag_seconds.add_metric([source.name], source.lag_seconds)
        yield lag_bytes
        yield lag_seconds

        yield from self._records()

        yield SummaryMetricFamily(
            "pyrt_match_seconds",
            "Time spent finding the recipients of publications.",
            count_value=stats.matches,
            sum_value=stats.match_seconds,
        )

    @staticmethod
    def _by_label(name: str, documentation: str, label: str, counts: dict[str, int]) -> Metric:
        family = CounterMetricFamily(name, documentation, labels=[label])
        for value, count in sorted(counts.items()):
            family.add_metric([value], count)
        return family

    def _limits(self) -> Iterator[Metric]:
        """What the abuse limits refused (docs/http.md, docs/protocol.md)."""
        node = self._node
        stats, keys = node.hub.stats, node.key_failures
        refusals = CounterMetricFamily(
            "pyrt_refusals",
            "Refused by a limit: connections over max_connections_per_ip (503), commands over"
            " command_rate (430), publications over channel_publish_rate (432/429), REST"
            " requests from an address paused for wrong API keys (429), and writes to"
            " channels a source owns (423).",
            labels=["reason"],
        )
        for reason, count in (
            ("connections_per_ip", node.connections_per_address.refused),
            ("command_rate", stats.rate_limited),
            ("channel_publish_rate", stats.channel_rate_limited),
            ("api_key_pause", keys.refused),
            ("read_only", stats.read_only_refused),
        ):
            refusals.add_metric([reason], count)
        yield refusals
        yield CounterMetricFamily(
            "pyrt_rate_limit_disconnects",
            "Connections closed for going on far over command_rate (4029).",
            stats.rate_limit_closes,
        )
        yield CounterMetricFamily(
            "pyrt_auth_refused",
            "Refused by authentication or authorization: commands the channel rules or the"
            " authorize hook refused (403), tokens refused (401, 4401), recoveries refused for"
            " want of history (docs/auth.md).",
            stats.auth_refused + node.gate.refused,
        )
        yield CounterMetricFamily(
            "pyrt_tokens_expired",
            "Connections closed because their token expired without a refresh (4419).",
            stats.tokens_expired,
        )
        yield CounterMetricFamily(
            "pyrt_api_key_failures", "Requests with a wrong API key.", keys.failed
        )
        yield CounterMetricFamily(
            "pyrt_api_key_pauses",
            "Addresses paused for api_key_max_failures wrong keys within the window.",
            keys.pauses,
        )

    def _records(self) -> Iterator[Metric]:
        """Records channels, by conflict policy: mutations and what the stores hold."""
        hub = self._node.hub
        names = dict.fromkeys(sorted(set(hub.config.record_policies.values())))
        mutations = CounterMetricFamily(
            "pyrt_record_mutations",
            "Record mutations, by the channel's conflict policy and outcome: applied,"
            " unchanged, conflict (refused by the policy), duplicate (sent again, not applied).",
            labels=["policy", "outcome"],
        )
        records = GaugeMetricFamily(
            "pyrt_records", "Records held that exist, by conflict policy.", labels=["policy"]
        )
        tombstones = GaugeMetricFamily(
            "pyrt_record_tombstones",
            "Deleted records held as tombstones, by conflict policy.",
            labels=["policy"],
        )
        compacted = CounterMetricFamily(
            "pyrt_record_tombstones_compacted",
            "Tombstones forgotten after hub.tombstone_ttl, by conflict policy.",
            labels=["policy"],
        )
        totals = {name: [0] * 7 for name in names}
        for store in hub.record_stores.values():
            row = totals.setdefault(store.policy.name, [0] * 7)
            stats = store.stats
            counts = (stats.applied, stats.unchanged, stats.rejected, stats.duplicates)
            held = (len(store) - store.tombstones, store.tombstones, stats.compacted)
            for index, count in enumerate((*counts, *held)):
                row[index] += count
        for name, row in sorted(totals.items()):
            for outcome, count in zip(_OUTCOMES, row[:4], strict=True):
                mutations.add_metric([name, outcome], count)
            records.add_metric([name], row[4])
            tombstones.add_metric([name], row[5])
            compacted.add_metric([name], row[6])
        yield from (mutations, records, tombstones, compacted)


_OUTCOMES = ("applied", "unchanged", "conflict", "duplicate")
