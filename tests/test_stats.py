"""One statistics registry (pgotel_proxy.stats), what /metrics shows of it, and its reference page."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from pgotel_proxy import stats
from pgotel_proxy.admin import _StatsCollector
from pgotel_proxy.stats import METRICS, STATISTICS, STATS, metrics_markdown

ROOT = Path(__file__).resolve().parent.parent

# What /metrics has always shown; a metric renamed or lost breaks dashboards.
EXPORTED = [
    "connections_accepted", "connections_active", "connections_refused", "protocol_violations",
    "upstream_errors", "cancel_forwarded", "cancel_dropped", "decode_desyncs", "statements",
    "spans_started", "spans_exported", "spans_dropped", "statements_dropped", "export_failures",
    "span_process_lifted", "span_queue_size", "span_process_backlog_bytes",
    "sqlcomment_invalid_traceparent", "latency_series_overflow", "statements_kept",
    "statements_kept_over_rate", "wal_messages_emitted", "wal_emission_disabled",
    "enrich_joined", "enrich_timeouts", "explains_run", "explains_skipped", "explains_failed",
    "explains_rate_limited", "plan_changes",
]


def _block(text: str) -> str:
    m = re.search(r"<!-- metrics:begin -->\n(.*?)<!-- metrics:end -->", text, re.S)
    assert m is not None, "docs/operations.md lacks the metrics block"
    return m[1]


def test_metrics_reference_is_current():
    # Regenerate the block with: python -m pgotel_proxy.stats --markdown
    assert _block((ROOT / "docs" / "operations.md").read_text()) == metrics_markdown()


def test_every_statistic_declared_once():
    names = [s.name for s in STATISTICS]
    assert len(names) == len(set(names))
    assert all(s.kind in ("counter", "gauge") and s.help for s in STATISTICS)
    assert set(STATS.__slots__) == set(names)
    assert list(METRICS) == [s.name for s in STATISTICS if s.exported]


def test_metrics_endpoint_shows_the_same_names():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(None))
    text = generate_latest(registry).decode()
    shown = [re.sub("_total$", "", name) for name in re.findall(r"^# TYPE (\S+) ", text, re.M)]
    assert shown == [stats.PROMETHEUS_PREFIX + name for name in EXPORTED]
    # The reference names each metric as a scrape shows its sample.
    samples = set(re.findall(r"^(\S+) ", text, re.M)) - {"#"}
    documented = re.findall(r"^\| `(\S+)` \|", metrics_markdown(), re.M)
    assert documented and set(documented) == samples


def test_no_second_registry():
    """Counters live on STATS only: no module keeps a Stats class or a STATS of its own."""
    package = ROOT / "pgotel_proxy"
    for path in package.rglob("*.py"):
        if path.name == "stats.py" and path.parent == package:
            continue
        text = path.read_text()
        assert not re.search(r"^class Stats\b|^\w*STATS\s*=", text, re.M), path


def test_sqlcomment_counts_on_the_one_registry():
    from pgotel_proxy.sqlcomment import parse

    before = STATS.sqlcomment_parsed, STATS.sqlcomment_malformed
    parse("SELECT 1 /*a='1'*/")
    parse("SELECT 1 /*" + ",".join(f"k{i}='v'" for i in range(70)) + "*/")
    # (a malformed comment is counted as parsed as well)
    assert (STATS.sqlcomment_parsed, STATS.sqlcomment_malformed) == (before[0] + 2, before[1] + 1)
    assert "sqlcomment_parsed" not in STATS.snapshot()  # kept for the code, not exported
