"""Every counter and gauge the proxy keeps, declared once.

The relay path increments plain integer attributes (no locks, no label
look-ups); the admin endpoint turns them into Prometheus metrics on scrape.
"""

from __future__ import annotations

__all__ = ["STATS", "Stats", "METRICS"]

# name -> (kind, help). Order is the exposition order.
METRICS: dict[str, tuple[str, str]] = {
    "connections_accepted": ("counter", "Client connections accepted"),
    "connections_active": ("gauge", "Client connections open now"),
    "connections_refused": ("counter", "Client connections refused (limit reached, bad start-up, shutting down)"),
    "protocol_violations": ("counter", "Client connections closed for a protocol violation (08P01)"),
    "upstream_errors": ("counter", "Upstream connections that failed or ended unexpectedly"),
    "cancel_forwarded": ("counter", "CancelRequests forwarded upstream"),
    "cancel_dropped": ("counter", "CancelRequests for unknown keys, dropped"),
    "decode_desyncs": ("counter", "Connections whose observation stopped on an unexpected message"),
    "statements": ("counter", "Statements observed"),
    "spans_started": ("counter", "Spans built"),
    "spans_exported": ("counter", "Spans exported successfully"),
    "spans_dropped": ("counter", "Spans dropped because the export queue was full or export failed"),
    "statements_dropped": ("counter", "Statements never turned into spans because the record queue was full"),
    "export_failures": ("counter", "Export batches that failed"),
    "span_process_lifted": ("counter", "Times the span process, behind, was lifted out of the idle scheduling class"),
    "span_queue_size": ("gauge", "Statements waiting to become spans, plus spans waiting for export"),
    "span_process_backlog_bytes": ("gauge", "Bytes of finished statements the span process has not read yet "
                                   "(past 16 MiB, statements are dropped)"),
    "sqlcomment_invalid_traceparent": ("counter", "sqlcommenter traceparent values rejected"),
    "wal_messages_emitted": ("counter", "otelwal logical messages emitted"),
    "wal_emission_disabled": ("counter", "Sessions where otelwal emission was turned off"),
    "enrich_joined": ("counter", "Statement spans joined with server-side records"),
    "enrich_timeouts": ("counter", "Statement spans that left without their server-side records"),
}


class Stats:
    """Plain integer counters; one process-wide instance, :data:`STATS`."""

    __slots__ = tuple(METRICS)

    def __init__(self) -> None:
        for name in METRICS:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in METRICS}


STATS = Stats()
