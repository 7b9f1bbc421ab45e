"""Every statistic the proxy keeps, declared once, in :data:`STATISTICS`.

The relay path and the tracer increment plain integer attributes of
:data:`STATS` (no locks, no label look-ups); the admin endpoint turns the
exported ones into Prometheus metrics named ``pgotel_<name>`` on scrape.
A few are kept for the code's own use (the span builder's parse cache reads
the sqlcommenter counts) and are not exported.

The metrics reference in ``docs/operations.md`` is rendered from the same
list: ``python -m pgotel_proxy.stats --markdown`` prints it.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

__all__ = ["STATS", "Stats", "Statistic", "STATISTICS", "SPAN_PROCESS_COUNTERS", "METRICS",
           "PROMETHEUS_PREFIX", "LATENCY_BOUNDS",
           "metrics_markdown"]

#: Prefix of every exported metric's name.
PROMETHEUS_PREFIX = "pgotel_"


class Statistic(NamedTuple):
    """One statistic: its attribute name on :data:`STATS`, its kind, and what it counts."""

    name: str
    kind: str  # "counter" (only grows) or "gauge" (goes up and down)
    help: str
    exported: bool = True  # shown on /metrics
    #: Counted in the span process (spans, enrichment, histograms): the relay process shows the
    #: values the span process reports (tracing/process.py), not its own.
    in_span_process: bool = False


#: Every statistic. Order is the exposition order.
STATISTICS: tuple[Statistic, ...] = (
    Statistic("connections_accepted", "counter", "Client connections accepted"),
    Statistic("connections_active", "gauge", "Client connections open now"),
    Statistic("connections_refused", "counter",
              "Client connections refused (limit reached, bad start-up, shutting down)"),
    Statistic("protocol_violations", "counter", "Client connections closed for a protocol violation (08P01)"),
    Statistic("upstream_errors", "counter", "Upstream connections that failed or ended unexpectedly"),
    Statistic("cancel_forwarded", "counter", "CancelRequests forwarded upstream"),
    Statistic("cancel_dropped", "counter", "CancelRequests for unknown keys, dropped"),
    Statistic("decode_desyncs", "counter", "Connections whose observation stopped on an unexpected message"),
    Statistic("statements", "counter", "Statements observed",
              in_span_process=True),
    Statistic("spans_started", "counter", "Spans built",
              in_span_process=True),
    Statistic("spans_exported", "counter", "Spans exported successfully",
              in_span_process=True),
    Statistic("spans_dropped", "counter", "Spans dropped because the export queue was full or export failed",
              in_span_process=True),
    Statistic("statements_dropped", "counter",
              "Statements never turned into spans because the record queue was full"),
    Statistic("export_failures", "counter", "Export batches that failed",
              in_span_process=True),
    Statistic("span_process_lifted", "counter",
              "Times the span process, behind, was lifted out of the idle scheduling class"),
    Statistic("span_queue_size", "gauge", "Statements waiting to become spans, plus spans waiting for export"),
    Statistic("span_process_backlog_bytes", "gauge",
              "Bytes of finished statements the span process has not read yet (past 16 MiB, statements are dropped)"),
    Statistic("sqlcomment_invalid_traceparent", "counter", "sqlcommenter traceparent values rejected",
              in_span_process=True),
    Statistic("latency_series_overflow", "counter",
              "Statements recorded in the latency histograms' `other` series: their own series would pass "
              "latency_histogram_series",
              in_span_process=True),
    Statistic("statements_kept", "counter",
              "Failed or slow statements traced although the sample rate or an unsampled parent left them out "
              "(always_trace_errors, always_trace_slower_than)",
              in_span_process=True),
    Statistic("statements_kept_over_rate", "counter",
              "Failed or slow statements left untraced because more than always_trace_rate a second were kept",
              in_span_process=True),
    Statistic("wal_messages_emitted", "counter", "otelwal logical messages emitted"),
    Statistic("wal_emission_disabled", "counter", "Sessions where otelwal emission was turned off"),
    Statistic("enrich_joined", "counter", "Statement spans joined with server-side records",
              in_span_process=True),
    Statistic("enrich_timeouts", "counter", "Statement spans that left without their server-side records",
              in_span_process=True),
    Statistic("explains_run", "counter", "EXPLAINs run on the side connection for slow statement shapes (explain source)",
              in_span_process=True),
    Statistic("explains_skipped", "counter",
              "Slow statements not explained: not a single SELECT/INSERT/UPDATE/DELETE/MERGE, another database, "
              "or $n parameters with neither GENERIC_PLAN (PostgreSQL 16+) nor captured parameters",
              in_span_process=True),
    Statistic("explains_failed", "counter", "EXPLAINs that failed (error, statement_timeout); the shape is not retried "
              "before explain_cache_ttl",
              in_span_process=True),
    Statistic("explains_rate_limited", "counter", "EXPLAIN requests refused by explain_rate; their statements left "
              "without a plan",
              in_span_process=True),
    Statistic("plan_changes", "counter", "Statements whose shape's plan differed from its previous plan (a plan "
              "changed span event)",
              in_span_process=True),
    # sqlcommenter parsing (sqlcomment.parse), once per parse: the span builder caches
    # a parse per statement shape, and compares oversized/malformed before and after a
    # parse to tell whether its result may be cached.
    Statistic("sqlcomment_parsed", "counter", "sqlcommenter comments parsed", exported=False),
    Statistic("sqlcomment_parsed_invalid_traceparent", "counter",
              "Parsed comments whose traceparent was rejected (per parse; the exported count is per statement)",
              exported=False),
    Statistic("sqlcomment_oversized", "counter", "Comments or statements too long to parse", exported=False),
    Statistic("sqlcomment_malformed", "counter", "Comments that are not sqlcommenter key='value' lists",
              exported=False),
    # otelwal contents a CDC consumer examined (wal/carrier.py).
    Statistic("wal_carrier_extracted", "counter", "otelwal contents turned into a trace context", exported=False),
    Statistic("wal_carrier_malformed", "counter", "otelwal contents ignored as malformed", exported=False),
    Statistic("wal_carrier_oversized", "counter", "otelwal contents ignored as too long", exported=False),
)

#: Bucket upper bounds, in seconds, of the latency histograms the span process keeps
#: (tracing/histograms.py) and /metrics shows: OpenTelemetry's explicit boundaries for
#: db.client.operation.duration.
LATENCY_BOUNDS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

#: Statistics the span process counts and reports to the relay process.
SPAN_PROCESS_COUNTERS: tuple[str, ...] = tuple(s.name for s in STATISTICS if s.in_span_process)

#: The exported statistics: name -> (kind, help), in exposition order.
METRICS: dict[str, tuple[str, str]] = {s.name: (s.kind, s.help) for s in STATISTICS if s.exported}


class Stats:
    """Plain integer counters and gauges; one process-wide instance, :data:`STATS`."""

    __slots__ = tuple(s.name for s in STATISTICS)

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        """The exported statistics' values."""
        return {name: getattr(self, name) for name in METRICS}

    def __repr__(self) -> str:
        return f"Stats({ {name: getattr(self, name) for name in self.__slots__} })"


STATS = Stats()


def metrics_markdown() -> str:
    """The metrics reference: a Markdown table of every exported metric, as /metrics names it."""
    rows = ["| Metric | Type | Description |", "| --- | --- | --- |"]
    for s in STATISTICS:
        if not s.exported:
            continue
        # The Prometheus exposition adds _total to a counter's name.
        name = PROMETHEUS_PREFIX + s.name + ("_total" if s.kind == "counter" else "")
        rows.append(f"| `{name}` | {s.kind} | {s.help} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    if argv != ["--markdown"]:
        print("usage: python -m pgotel_proxy.stats --markdown", file=sys.stderr)
        return 2
    sys.stdout.write(metrics_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
