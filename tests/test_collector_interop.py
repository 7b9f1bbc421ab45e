"""Through a real collector: the proxy's spans, sent to the ``rotel`` agent, arrive unchanged.

The proxy encodes OTLP by hand (``tracing/otlp.py``, ``_otlpenc.c``); the
test receiver decodes with Python's protobuf. Here a collector built on
another implementation of the schema (Rust: prost, tonic, hyper) stands
between them: the proxy exports to its HTTP or gRPC receiver (HTTP also
gzip-compressed), the collector decodes, batches and re-encodes, and its
exporter sends the spans on to the test receiver. The same workload sent
straight to the test receiver by a second proxy gives the reference: every
span must come through the collector with the same name, kind, attributes,
status, events, parentage and resource, and the statement spans must still
join the application's traces.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from collector import Collector, agent_path
from otlp_receiver import Span
from tracetree import AppTracer, assert_statement, children, comment

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(agent_path() is None, reason="the rotel wheel (a test dependency) is not installed"),
]

# Values that differ between two runs of the same workload by their nature: each
# proxy is its own service instance, each connection has its own client port
# and server process, and whether a phase's end is exact depends
# on how the server's answers fell into reads (both checked on their own below),
# as do the first row's offset and the client's wait (tests/test_client_wire.py).
_VOLATILE = {"service.instance.id", "network.peer.port", "db.postgresql.backend_pid", "pgotel.timing.exact",
             "pgotel.execute.first_row_offset_ms", "pgotel.client_wait_ms"}


def _workload(proxy, app) -> dict[str, str]:
    """Statements of several kinds; returns the application span ids by label."""
    labels: dict[str, str] = {}
    with psycopg.connect(proxy.dsn()) as conn:
        with app.span("select") as ctx:
            labels[ctx.span_id] = "select"
            assert conn.execute(comment("SELECT %s::int + 1 AS two", ctx, route="%%2Fusers"), (1,)).fetchone() == (2,)
        conn.commit()
        with app.span("write") as ctx:
            labels[ctx.span_id] = "write"
            conn.execute(comment("CREATE TEMP TABLE interop (id int, v text)", ctx))
            conn.execute(comment("INSERT INTO interop VALUES (%s, %s), (%s, %s)", ctx), (1, "a", 2, "b"))
            conn.commit()
        with app.span("fail") as ctx:
            labels[ctx.span_id] = "fail"
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute(comment("SELECT 1 / %s", ctx), (0,))
            conn.rollback()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'interop'").fetchone()  # no context: a new trace
    return labels


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in _VOLATILE}


def _tree(spans: list[Span], span: Span) -> tuple:
    """Everything a span says except ids, times and volatile values, with its subtree."""
    return (
        span.name, span.kind, sorted(_plain(span.attributes).items(), key=repr), span.status_code, span.status_message,
        tuple((e.name, sorted(_plain(e.attributes).items(), key=repr)) for e in span.events),
        tuple(sorted(_plain(link.attributes).items(), key=repr) for link in span.links),
        sorted(_plain(span.resource).items(), key=repr), span.scope,
        tuple(_tree(spans, kid) for kid in children(spans, span)),
    )


def _shape(spans: list[Span], labels: dict[str, str]) -> list[tuple]:
    """The proxy's trees, each under its application span's label ("-" for a trace of its own), in a stable order."""
    ours = [s for s in spans if s.scope == "pgotel_proxy"]
    ids = {s.span_id for s in ours}
    roots = [s for s in ours if s.parent_span_id not in ids]
    return sorted(((labels.get(s.parent_span_id or "", "-"), _tree(ours, s)) for s in roots), key=repr)


def _proxy_spans(spans: list[Span]) -> list[Span]:
    return [s for s in spans if s.scope == "pgotel_proxy"]


@pytest.mark.parametrize("protocol,compression", [
    ("http/protobuf", None),
    ("http/protobuf", "gzip"),
    ("grpc", None),
], ids=["http", "http-gzip", "grpc"])
def test_spans_pass_through_a_real_collector_unchanged(make_proxy, otlp, tmp_path, monkeypatch, protocol, compression):
    app = AppTracer(otlp)
    try:
        # Reference: the same workload exported straight to the test receiver.
        direct = make_proxy()
        labels = _workload(direct, app)
        direct.flush()
        reference = otlp.wait_for(lambda s: len(_proxy_spans(s)) >= 6)
        expected = _shape(reference, labels)
        count = len(_proxy_spans(reference))
        assert {label for label, _ in expected} == {"select", "write", "fail", "-"}
        otlp.clear()

        if compression:
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", compression)
        with Collector(tmp_path, export_to=f"http://{otlp.grpc_endpoint}") as collector:
            endpoint = collector.http_endpoint if protocol == "http/protobuf" else collector.grpc_endpoint
            relayed = make_proxy(otlp_protocol=protocol, otlp_endpoint=endpoint)
            labels = _workload(relayed, app)
            relayed.flush()
            try:
                spans = otlp.wait_for(lambda s: len(_proxy_spans(s)) >= count, timeout=15)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\ncollector output:\n{collector.output()}") from None
            assert otlp.request_count(transport="grpc") >= 1  # the collector's export
    finally:
        app.shutdown()

    assert len(_proxy_spans(spans)) == count
    assert _shape(spans, labels) == expected
    # Still joined to the application's traces, phases nested in their statements.
    by_label = {label: span_id for span_id, label in labels.items()}
    select = [s for s in spans if s.kind == "SERVER" and s.parent_span_id == by_label["select"]]
    assert len(select) == 1
    assert_statement(spans, select[0], name="SELECT", phases=("parse+plan+execute",), parent=by_label["select"])
    app_spans = {s.span_id: s for s in spans if s.scope != "pgotel_proxy"}
    for s in select:
        assert s.trace_id == app_spans[s.parent_span_id].trace_id
    # One service instance id for all of the relayed proxy's spans, not the reference proxy's.
    instances = {s.resource.get("service.instance.id") for s in _proxy_spans(spans)}
    assert len(instances) == 1 and None not in instances
    assert instances != {s.resource.get("service.instance.id") for s in _proxy_spans(reference)}


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"], ids=["http", "grpc"])
def test_latency_histograms_pass_through_a_real_collector(make_proxy, otlp, tmp_path, protocol):
    """The proxy's OTLP metrics (db.client.operation.duration) decoded, batched and re-encoded by a
    collector arrive with their counts, bounds, attributes and exemplars."""
    from pgotel_proxy.tracing.histograms import BOUNDS, METRIC_NAME

    sent, failing = 40, 3
    with Collector(tmp_path, export_to=f"http://{otlp.grpc_endpoint}") as collector:
        endpoint = collector.http_endpoint if protocol == "http/protobuf" else collector.grpc_endpoint
        proxy = make_proxy(otlp_protocol=protocol, otlp_endpoint=endpoint, sample_rate=0.25,
                           latency_histogram_interval=0.2)
        with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
            for i in range(sent):
                conn.execute("SELECT %s::int FROM pg_namespace LIMIT 1", (i,))
            for _ in range(failing):
                with pytest.raises(psycopg.errors.DivisionByZero):
                    conn.execute("SELECT 1/0 FROM pg_namespace")
        proxy.flush()

        def arrived(latest) -> bool:
            counts = {(p.attributes.get("db.query.summary"), p.attributes.get("error.type")): p.count
                      for p in latest.values()}
            return counts.get(("SELECT pg_namespace", None)) == sent and counts.get(
                ("SELECT pg_namespace", "22012")) == failing

        try:
            latest = otlp.wait_for_histograms(METRIC_NAME, arrived, timeout=20)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ncollector output:\n{collector.output()}") from None
        # The proxy was given the collector's address only: what arrived came through it.

    ok = next(p for p in latest.values()
              if p.attributes.get("db.query.summary") == "SELECT pg_namespace" and "error.type" not in p.attributes)
    failed = next(p for p in latest.values() if p.attributes.get("error.type") == "22012")
    assert ok.unit == "s" and ok.explicit_bounds == BOUNDS and sum(ok.bucket_counts) == sent
    assert failed.attributes["db.response.status_code"] == "22012"
    assert failed.attributes["db.operation.name"] == "SELECT"
    # Exemplars survive the collector and still name exported statement spans.
    assert ok.exemplars
    exported = {(s.trace_id, s.span_id): s for s in otlp.spans}
    for trace_id, span_id, _ in ok.exemplars:
        span = exported.get((trace_id, span_id))
        assert span is not None and span.kind == "SERVER"
        assert span.attributes["db.query.summary"] == "SELECT pg_namespace"
