"""Latency histograms per statement shape (tracing/histograms.py), against a real PostgreSQL.

Counts equal the statements sent even at a sample rate of 0.01, on the admin
/metrics (Prometheus text and OpenMetrics, read by prometheus_client's
parsers) and in the OTLP metrics the receiver decodes; an exemplar's ids are
those of an exported statement span; past the series limit, statements go to
one ``other`` series and are counted.
"""

from __future__ import annotations

import os
import time
import types
import urllib.request

import psycopg
import pytest
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from pgotel_proxy.protocol.events import Completion, Statement
from pgotel_proxy.stats import STATS
from codec_twin import interpreted_histograms
from pgotel_proxy.tracing import histograms as histograms_module, otlp as otlp_encoding
from pgotel_proxy.tracing.histograms import BOUNDS, METRIC_NAME, OTHER, LatencyHistograms, span_ids
from tracetree import server_spans

PROM_NAME = "db_client_operation_duration_seconds"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TP = f"00-{TRACE}-00f067aa0ba902b7-01"


def _scrape(proxy, openmetrics: bool) -> str:
    req = urllib.request.Request(proxy.admin_url + "/metrics")
    if openmetrics:
        req.add_header("Accept", "application/openmetrics-text; version=1.0.0")
    with urllib.request.urlopen(req, timeout=10) as resp:
        ctype = resp.headers.get("Content-Type", "")
        body = resp.read().decode()
    assert ("openmetrics" in ctype) == openmetrics, ctype
    return body


def _histogram_samples(text: str, openmetrics: bool) -> list:
    parse = openmetrics_families if openmetrics else text_string_to_metric_families
    families = [f for f in parse(text) if f.name == PROM_NAME]
    assert len(families) == 1, [f.name for f in parse(text)]
    assert families[0].type == "histogram"
    return families[0].samples


def _counts(samples) -> dict[tuple, float]:
    """(summary, error type) -> the series' count."""
    return {(s.labels["db_query_summary"], s.labels["error_type"]): s.value
            for s in samples if s.name == PROM_NAME + "_count"}


# ---------------------------------------------------------------- pure


def test_span_ids_read_encoded_spans():
    field = otlp_encoding.encode_span("SELECT", 0x1234 << 64 | 7, 0xABCDEF, 0x42, True, "k=v", SpanKind.SERVER,
                                      10, 20, {"db.query.summary": "SELECT"}, Status(StatusCode.UNSET))
    assert span_ids(field) == (0x1234 << 64 | 7, 0xABCDEF)
    assert span_ids((None, None, field)) == (0x1234 << 64 | 7, 0xABCDEF)


def test_buckets_sum_and_the_other_series():
    hist = LatencyHistograms(max_series=1)
    before = STATS.latency_series_overflow
    recs = [Statement("simple", "SELECT 1", start_ns=0, end_ns=2_000_000, status="ok", tx_status="I",
                      results=[Completion(2_000_000, "SELECT 1", 1, None)]),
            Statement("simple", "SELECT 1 FROM pg_class", start_ns=0, end_ns=20_000_000_000, status="ok",
                      tx_status="I", results=[Completion(20_000_000_000, "SELECT 1", 1, None)])]
    wanted = hist.observe(recs, "postgres")
    assert [w[0] for w in wanted] == [0, 1]  # no exemplar yet in either bucket
    snap = {row[0]: row for row in hist.snapshot()}
    assert set(snap) == {"SELECT", OTHER}
    assert snap["SELECT"][4][BOUNDS.index(0.005)] == 1
    assert snap[OTHER][4][len(BOUNDS)] == 1  # 20 s: +Inf
    assert snap[OTHER][1:4] == (None, None, None)
    assert STATS.latency_series_overflow - before == 1


def test_histograms_are_compiled_where_ci_expects_it():
    # .ci/run sets this: a machine with a C compiler must not silently lose the compiled loop.
    if os.environ.get("PGOTEL_EXPECT_COMPILED") and not os.environ.get("PGOTEL_PURE_PYTHON"):
        assert histograms_module.COMPILED, "pgotel_proxy.tracing.histograms was not compiled"


def _mixed_records(batch: int, now: int) -> list:
    """Statements of every kind the loop tells apart: shared and new texts, failures, phases, durations."""
    shared = "SELECT abalance FROM accounts WHERE aid = $1"
    failed = {"S": "ERROR", "C": "22012", "M": "division by zero"}
    recs = []
    for i in range(40):
        start = now + i * 1000
        kind = (i + batch) % 8
        if kind == 0:  # one text object, repeated: its shape and series are looked up once
            recs.append(Statement("extended", shared, start_ns=start, end_ns=start + 40_000 * (i + 1), status="ok",
                                  tag="SELECT 1", rows=1, tx_status="I"))
        elif kind == 1:  # a new text with its own traceparent
            recs.append(Statement("simple", f"SELECT {i} FROM pg_class /*traceparent='{TP[:-2]}0{i % 2}'*/",
                                  start_ns=start, end_ns=start + 3_000_000, status="ok", tx_status="I",
                                  results=[Completion(start + 3_000_000, "SELECT 1", 1, None)]))
        elif kind == 2:  # failed
            recs.append(Statement("extended", shared, start_ns=start, end_ns=start + 500, status="error",
                                  error=failed, tx_status="I"))
        elif kind == 3:  # a simple Query whose second statement failed
            recs.append(Statement("simple", "SELECT 1; SELECT 1/0", start_ns=start, end_ns=start + 7_000_000,
                                  status="error", tx_status="I",
                                  results=[Completion(start + 1000, "SELECT 1", 1, None),
                                           Completion(start + 7_000_000, None, 0, failed)]))
        elif kind == 4:  # a Parse alone: it ends where its parse ended
            recs.append(Statement("extended", f"SELECT {i} FROM pg_namespace", start_ns=start,
                                  parse_start_ns=start, parse_end_ns=start + 90_000, status="ok", tx_status="I"))
        elif kind == 5:  # slow, past the last bound
            recs.append(Statement("extended", "SELECT pg_sleep(1)", start_ns=start, end_ns=start + 12_000_000_000,
                                  status="ok", tag="SELECT 1", rows=1, tx_status="I"))
        elif kind == 6:  # no time at all
            recs.append(Statement("extended", shared, start_ns=start, end_ns=start, status="ok", tx_status="I"))
        else:  # no text
            recs.append(Statement("extended", "", start_ns=start, end_ns=start + 10, status="ok", tx_status="I"))
    return recs


@pytest.mark.parametrize("max_series", [1, 3, 200])
def test_the_compiled_and_interpreted_histograms_count_alike(max_series):
    """The same statements make the same series, counts, sums, extremes and exemplar wants in both builds."""
    twin = interpreted_histograms()
    builds = (LatencyHistograms(max_series), twin.LatencyHistograms(max_series))
    before = STATS.latency_series_overflow
    now = time.time_ns()
    overflows = []
    for batch in range(4):
        recs = _mixed_records(batch, now + batch * 10**9)
        answers = []
        for hist in builds:
            mark = STATS.latency_series_overflow
            wanted = hist.observe(recs, "db" if batch < 3 else None)
            overflows.append(STATS.latency_series_overflow - mark)
            for n, want in enumerate(wanted[:5]):  # some buckets get an exemplar, the rest are asked again
                hist.exemplar(want, types.SimpleNamespace(context=types.SimpleNamespace(trace_id=batch + 1,
                                                                                       span_id=n + 1)))
            answers.append([(w[0], w[2], w[3], w[4]) for w in wanted])
        assert answers[0] == answers[1]
        assert answers[0] or batch  # (later batches find exemplars held in the buckets they fall in)
    assert builds[0].snapshot() == builds[1].snapshot()
    assert builds[0].changes == builds[1].changes == 160
    assert overflows[0::2] == overflows[1::2]
    assert (STATS.latency_series_overflow > before) == (max_series < 5)


def _keyed_record(protocol: str, n: int, now: int) -> Statement:
    """A pgbench -S statement whose sqlcommenter traceparent is its own (parent span n + 1)."""
    tp = f"00-{TRACE}-{n + 1:016x}-01"
    if protocol == "extended":
        return Statement("extended", f"SELECT abalance FROM accounts WHERE aid = $1 /*traceparent='{tp}'*/",
                         start_ns=now, parse_start_ns=now, parse_end_ns=now + 10_000, bind_start_ns=now + 11_000,
                         bind_end_ns=now + 20_000, exec_start_ns=now + 21_000, end_ns=now + 50_000, status="ok",
                         tag="SELECT 1", rows=1, tx_status="I")
    return Statement("simple", f"SELECT abalance FROM accounts WHERE aid = {n} /*traceparent='{tp}'*/",
                     start_ns=now, end_ns=now + 50_000, status="ok", tx_status="I",
                     results=[Completion(now + 50_000, "SELECT 1", 1, None)])


@pytest.mark.parametrize("protocol", ["extended", "simple"])
def test_each_text_is_keyed_once_for_histograms_and_spans(monkeypatch, protocol):
    """The span builder takes the shape keys the histograms computed for the same records.

    Every text is new (a new traceparent each): with the histograms on, they
    key every text (``shape.statement_key``, into the helper's StatementKeys)
    and the span builder keys none again; with them off the builder keys each
    one. The spans built are the same.
    """
    import time

    from pgotel_proxy import shape
    from pgotel_proxy.config import Config
    from pgotel_proxy.tracing import spans as spans_module
    from pgotel_proxy.tracing.helper import SpanHelper
    from pgotel_proxy.tracing.process import _ChildInfo

    keyed: list = []  # texts the span builder keyed itself
    real = shape.statement_key

    def counting(sql):
        keyed.append(sql)
        return real(sql)

    real_missing = shape.StatementKeys.__missing__

    def missing(self, sql):  # the builder's look-up of a text the histograms did not key
        keyed.append(sql)
        return real_missing(self, sql)

    monkeypatch.setattr(spans_module, "statement_key", counting)
    monkeypatch.setattr(shape.StatementKeys, "__missing__", missing)
    now = time.time_ns()
    outcome = {}
    for on in (True, False):
        helper = SpanHelper(Config(exporter="none", sample_rate=1.0, latency_histograms=on), exporter=None)
        try:
            state = spans_module.ConnState(_ChildInfo(1, "app"), {"db.system.name": "postgresql"})
            keyed.clear()
            built: list = []
            for batch in range(3):  # the first builds the shape, the next two are spanned from it
                records = [_keyed_record(protocol, batch * 10 + i, now) for i in range(10)]
                helper.build(state, records, built)
                if on:  # the histograms keyed each text of the hand-over
                    assert sorted(helper._keys) == sorted(r.sql for r in records)
                    assert all(q is not None for q in helper._keys.values())
            outcome[on] = (len(keyed), len(built), {span_ids(s)[0] for s in built})
        finally:
            helper.shutdown()
    assert outcome[True] == (0, 60, {int(TRACE, 16)})
    assert outcome[False][1:] == outcome[True][1:] and outcome[False][0] >= 30, outcome[False][0]


# ---------------------------------------------------------- component


def test_counts_equal_statements_sent_at_one_percent_with_exemplars(make_proxy, otlp):
    proxy = make_proxy(sample_rate=0.01, latency_histogram_interval=0.2)
    plain, commented, failing = 300, 10, 4
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        for i in range(plain):
            conn.execute("SELECT %s::int FROM pg_class LIMIT 1", (i,))
        for i in range(commented):  # sampled whatever the rate: its parent says so
            conn.execute(f"SELECT {i} FROM pg_class LIMIT 1 /*traceparent='{TP}'*/")
        for _ in range(failing):
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1/0 FROM pg_class")
    proxy.flush()
    summary = "SELECT pg_class"
    expected = {(summary, ""): plain + commented, (summary, "22012"): failing}

    # Far fewer statement spans than statements: the histograms did not come from spans.
    spans = server_spans(otlp.spans)
    assert len(spans) < plain // 2

    for openmetrics in (False, True):
        samples = _histogram_samples(_scrape(proxy, openmetrics), openmetrics)
        counts = _counts(samples)
        assert {k: counts.get(k) for k in expected} == expected, counts
        buckets = [(float(s.labels["le"]), s.value) for s in samples if s.name == PROM_NAME + "_bucket"
                   and s.labels["db_query_summary"] == summary and s.labels["error_type"] == ""]
        assert [le for le, _ in buckets] == list(BOUNDS) + [float("inf")]
        assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1][1] == plain + commented
        if openmetrics:
            exemplars = [s.exemplar for s in samples if s.exemplar is not None
                         and s.labels["db_query_summary"] == summary]
            assert exemplars, samples
            by_id = {(s.trace_id, s.span_id): s for s in otlp.spans}
            for exemplar in exemplars:
                span = by_id.get((exemplar.labels["trace_id"], exemplar.labels["span_id"]))
                assert span is not None and span.kind == "SERVER", exemplar
                assert span.attributes.get("db.query.summary") == summary

    def otlp_counts(latest) -> dict:
        return {(p.attributes.get("db.query.summary"), p.attributes.get("error.type", "")): p.count
                for p in latest.values()}

    latest = otlp.wait_for_histograms(
        METRIC_NAME, lambda got: all(otlp_counts(got).get(k) == v for k, v in expected.items()))
    point = next(p for p in latest.values() if p.attributes.get("error.type") == "22012")
    assert point.attributes["db.response.status_code"] == "22012"
    assert point.attributes["db.operation.name"] == "SELECT"
    assert point.attributes["db.namespace"] == "postgres"
    assert point.unit == "s" and point.explicit_bounds == BOUNDS and sum(point.bucket_counts) == failing
    ok_point = next(p for p in latest.values() if p.attributes.get("db.query.summary") == summary
                    and "error.type" not in p.attributes)
    assert ok_point.exemplars
    exported = {(s.trace_id, s.span_id) for s in otlp.spans}
    assert all((trace_id, span_id) in exported for trace_id, span_id, _ in ok_point.exemplars)


def test_series_beyond_the_limit_go_to_other_and_are_counted(make_proxy, otlp):
    before = STATS.latency_series_overflow
    proxy = make_proxy(latency_histogram_series=3, latency_histogram_interval=0.2)
    tables = ["pg_class", "pg_namespace", "pg_type", "pg_proc", "pg_attribute", "pg_database"]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for table in tables:
            for _ in range(2):
                conn.execute(f"SELECT 1 FROM {table} LIMIT 1")
    proxy.flush()
    text = _scrape(proxy, True)
    counts = _counts(_histogram_samples(text, True))
    assert counts == {("SELECT pg_class", ""): 2, ("SELECT pg_namespace", ""): 2, ("SELECT pg_type", ""): 2,
                      (OTHER, ""): 6}, counts
    overflow = next(s.value for f in openmetrics_families(text) if f.name == "pgotel_latency_series_overflow"
                    for s in f.samples if s.name.endswith("_total"))
    assert overflow - before == 6
    otlp.wait_for_histograms(
        METRIC_NAME, lambda got: any(p.attributes.get("db.query.summary") == OTHER and p.count == 6
                                     for p in got.values()) and len(got) == 4)


def test_turned_off_nothing_is_kept_and_the_relay_draws_again(make_proxy, otlp):
    proxy = make_proxy(sample_rate=0.5, latency_histograms=False)
    assert proxy.tracer._presample
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
    proxy.flush()
    assert PROM_NAME not in _scrape(proxy, False)
    assert not otlp.histogram_points


def test_grpc_export_and_transaction_spans_keep_counts_and_exemplars(make_proxy, otlp):
    """The other span form (ReadableSpans, for transaction spans) and the other OTLP transport."""
    proxy = make_proxy(otlp_protocol="grpc", otlp_endpoint=f"http://{otlp.grpc_endpoint}", transaction_spans=True,
                       latency_histogram_interval=0.2)
    with psycopg.connect(proxy.dsn(), prepare_threshold=None) as conn:
        for i in range(5):
            conn.execute("SELECT %s::int FROM pg_type LIMIT 1", (i,))
        conn.commit()
    proxy.flush()

    def done(latest) -> bool:
        return any(p.attributes.get("db.query.summary") == "SELECT pg_type" and p.count == 5 and p.exemplars
                   for p in latest.values())

    latest = otlp.wait_for_histograms(METRIC_NAME, done)
    point = next(p for p in latest.values() if p.attributes.get("db.query.summary") == "SELECT pg_type")
    by_id = {(s.trace_id, s.span_id): s for s in otlp.spans}
    for trace_id, span_id, _ in point.exemplars:
        span = by_id[(trace_id, span_id)]
        assert span.kind == "SERVER" and span.attributes["db.query.summary"] == "SELECT pg_type"
        assert span.parent_span_id is not None  # under its transaction's span
